"""
Conversations that outlive their upstream connection (SPEC §8), in memory: the real daemon, upstream
link and strict simulator on one ``MemoryReactorClock`` (see :mod:`.test_memory`), with the simulator
expiring sessions and dropping connections at each stage of a turn.

Every case ends by closing the client and checking that nothing is left: no session in the registry,
no simulated upstream session, no connection (upstream sockets included) and no delayed call.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from typing import Any

from openai_proxy import errors
from openai_proxy.simulator import voice
from openai_proxy.simulator.faults import DropRule
from openai_proxy.tests.helpers import default_settings
from openai_proxy.tests.test_memory import MemoryClient, MemoryDaemon, _MemoryTestCase

FIRST = "Tell me about the sea"
QUESTION = "What did I say first?"


class _ContinuityTestCase(_MemoryTestCase):
    def start(self, **options: Any) -> MemoryDaemon:
        daemon = super().start(**options)
        # The backoff's jitter: half of each ceiling, so the waits are known.
        daemon.factory.session_options = replace(daemon.factory.session_options, random=lambda: 0.5)
        return daemon

    def _check_upstream(self, daemon: MemoryDaemon) -> None:
        daemon.upstream_events()
        refusals = [e for e in daemon.simulator_sent("error")
                    if e["error"].get("code") != "session_expired"]
        self.assertEqual(refusals, [], "the simulator refused an event")

    def turn(self, daemon: MemoryDaemon, client: MemoryClient, text: str) -> str:
        """Say ``text``; the agent's whole reply text."""
        before = len(client.of_type("ConversationText", role="assistant"))
        client.send_json({"type": "InjectUserMessage", "content": text})
        daemon.run_until(
            lambda: len(client.of_type("ConversationText", role="assistant")) > before,
            f"the reply to {text!r}")
        self.wait_for_playback(daemon)
        reply: str = client.of_type("ConversationText", role="assistant")[-1]["content"]
        return reply

    def wait_for_playback(self, daemon: MemoryDaemon) -> None:
        """Let simulated time pass, in steps of 0.1 s, until the client has played the reply."""
        session = daemon.client_session().session
        assert session is not None
        for _ in range(300):
            if session._replies is None or not session._replies.playing:
                return
            daemon.advance(0.1)
        raise AssertionError("the reply never ended playing")

    def assertRemembers(self, daemon: MemoryDaemon, client: MemoryClient) -> None:
        self.assertEqual(self.turn(daemon, client, QUESTION), f"You first said: {FIRST}")

    def closeAndCheck(self, daemon: MemoryDaemon, client: MemoryClient) -> None:
        protocol = daemon.client_session()
        session = weakref.ref(protocol.session) if protocol.session is not None else None
        links = [weakref.ref(link) for link in (protocol._upstream, protocol._candidate) if link]
        del protocol
        client.sendClose(1000)
        daemon.run_until(lambda: client.closed.called, "the client's close")
        daemon.run_until(lambda: not daemon.simulator.sessions and not daemon.pumps,
                         "every upstream connection's end", within=5.0)
        daemon.advance(5.0)  # Autobahn's close timers of the old connections run out
        self.assertQuiet(daemon)
        # Nothing holds the session or its upstream links any more.
        gc.collect()
        self.assertEqual([ref() for ref in links if ref() is not None], [])
        self.assertIsNotNone(session)
        assert session is not None
        self.assertIsNone(session(), "the session outlived its client")

    def warnings(self, client: MemoryClient) -> list[str]:
        return [m["code"] for m in client.messages if m["type"] in ("Warning", "Error")]

    def stats(self, daemon: MemoryDaemon) -> dict[str, int]:
        return dict(daemon.registry.continuity)


class ReconnectTests(_ContinuityTestCase):
    """An unexpected drop at each stage of a turn: reconnect, replay, go on."""

    def test_drop_during_agent_audio(self) -> None:
        daemon = self.start(drops=(DropRule(event="response.output_audio.delta", nth=3, session=1),))
        client = daemon.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED), "the reconnection")
        kinds = client.kinds()
        # The cut reply is reported before the reconnection: its audio is done.
        self.assertIn("audio", kinds)
        reconnecting = kinds.index("Warning")
        self.assertIn("AgentAudioDone", kinds[reconnecting:])
        # ... and the text it had reached, as after a barge-in.
        [partial] = client.of_type("ConversationText", role="assistant")
        self.assertTrue(f"You said: {FIRST}".startswith(partial["content"]), partial)
        self.assertLess(client.messages.index(partial),
                        client.messages.index(client.of_type("Warning")[1]))
        self.assertEqual(self.warnings(client),
                         [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_RECONNECTED])
        self.assertRemembers(daemon, client)
        self.assertEqual(len(client.of_type("SettingsApplied")), 1)
        stats = self.stats(daemon)
        self.assertEqual(stats["reconnects"], 1)
        self.assertGreaterEqual(stats["replayed_items"], 1)
        self.closeAndCheck(daemon, client)

    def test_drop_before_session_updated(self) -> None:
        daemon = self.start(drops=(DropRule(event="session.update", session=1),))
        client = daemon.connect_client()
        client.send_json(default_settings())
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        daemon.run_until(client.has("SettingsApplied"), "SettingsApplied")
        daemon.run_until(client.has("ConversationText", role="assistant"), "the first reply")
        self.assertEqual(self.warnings(client),
                         [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_RECONNECTED])
        self.assertEqual(len(client.of_type("SettingsApplied")), 1)
        self.wait_for_playback(daemon)
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_drop_between_a_function_call_and_its_output(self) -> None:
        # The second output item of the session is the call (the first is the first reply).
        daemon = self.start(drops=(
            DropRule(event="response.output_item.done", nth=2, close=1011, session=1),))
        client = daemon.configured_client()
        self.assertEqual(self.turn(daemon, client, FIRST), f"You said: {FIRST}")
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        daemon.run_until(client.has("FunctionCallRequest"), "the function call")
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED), "the reconnection")
        [request] = client.of_type("FunctionCallRequest")
        call_id = request["functions"][0]["id"]
        client.send_json({"type": "FunctionCallResponse", "id": call_id, "name": "get_weather",
                          "content": "sunny, 21 C"})
        daemon.run_until(
            lambda: any("sunny, 21 C" in m["content"]
                        for m in client.of_type("ConversationText", role="assistant")),
            "the answer from the function's output")
        # The call was replayed into the new session, so its output found it.
        replayed_calls = [e for e in daemon.upstream_events()
                          if e["type"] == "conversation.item.create"
                          and e["item"]["type"] == "function_call"]
        self.assertEqual([e["item"]["call_id"] for e in replayed_calls], [call_id])
        self.wait_for_playback(daemon)
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_drop_while_the_call_is_being_made(self) -> None:
        # Its arguments are complete but its item is not: the call was never requested, the reply
        # is cut; the conversation goes on and the question can be asked again.
        daemon = self.start(drops=(
            DropRule(event="response.function_call_arguments.done", close=1011, session=1),))
        client = daemon.configured_client()
        self.assertEqual(self.turn(daemon, client, FIRST), f"You said: {FIRST}")
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED), "the reconnection")
        self.assertEqual(client.of_type("FunctionCallRequest"), [])
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Rome?"})
        daemon.run_until(client.has("FunctionCallRequest"), "the function call")
        self.assertRemembers_after_call(daemon, client)

    def assertRemembers_after_call(self, daemon: MemoryDaemon, client: MemoryClient) -> None:
        [request] = client.of_type("FunctionCallRequest")
        call_id = request["functions"][0]["id"]
        client.send_json({"type": "FunctionCallResponse", "id": call_id, "name": "get_weather",
                          "content": "rainy"})
        daemon.run_until(
            lambda: any("rainy" in m["content"]
                        for m in client.of_type("ConversationText", role="assistant")),
            "the answer from the function's output")
        self.wait_for_playback(daemon)
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_drop_while_idle_by_each_retried_ending(self) -> None:
        for close in (None, 1000, 1001, 1011, 1012, 1013):
            daemon = self.start(drops=(DropRule(after=2.0, close=close, session=1),))
            client = daemon.configured_client()
            self.turn(daemon, client, FIRST)
            daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED),
                             f"the reconnection after {close}")
            self.assertEqual(self.warnings(client),
                             [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_RECONNECTED], close)
            self.assertRemembers(daemon, client)
            self.closeAndCheck(daemon, client)

    def test_updates_during_a_reconnect_apply_to_the_new_session(self) -> None:
        daemon = self.start(drops=(DropRule(after=2.0, session=1),), connect_delay=0.5)
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTING), "the drop")
        client.send_json({"type": "UpdatePrompt", "prompt": "Always be brief."})
        client.send_json({"type": "UpdateSpeak", "speak": {"provider": {"type": "open_ai",
                                                                        "model": "tts-1",
                                                                        "voice": "cedar"}}})
        client.sendMessage(voice.silence(100), isBinary=True)
        daemon.run_until(client.has("SpeakUpdated"), "SpeakUpdated")
        self.assertIn("PromptUpdated", client.kinds())
        kinds = client.kinds()
        self.assertLess(kinds.index("Warning"), kinds.index("PromptUpdated"))
        [session] = daemon.simulator.sessions
        self.assertIn("Always be brief.", session.session.config["instructions"])
        self.assertEqual(session.session.config["audio"]["output"]["voice"], "cedar")
        # The audio sent meanwhile went to the new session.
        appends = [e for e in daemon.upstream_events() if e["type"] == "input_audio_buffer.append"]
        self.assertTrue(appends)
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_drop_during_a_reconnect(self) -> None:
        daemon = self.start(drops=(
            DropRule(event="response.output_audio.delta", nth=2, session=1),
            DropRule(event="session.update", session=2),
        ))
        client = daemon.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED), "the reconnection")
        self.assertEqual(self.warnings(client),
                         [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_RECONNECTED])
        self.assertEqual(len(daemon.endpoint_requests), 3)
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_close_that_is_not_retried(self) -> None:
        for close in (1008, 3000, 4000):
            daemon = self.start(drops=(DropRule(after=2.0, close=close, session=1),))
            client = daemon.configured_client()
            daemon.run_until(lambda c=client: bool(c.closed.called), "the client's close")
            [error] = client.of_type("Error")
            self.assertEqual(error["code"], errors.UPSTREAM_CLOSED)
            self.assertIn(f"code {close}", error["description"])
            self.assertEqual(client.close_code, 1011)
            self.assertEqual(len(daemon.endpoint_requests), 1)
            daemon.advance(5.0)
            self.assertQuiet(daemon)

    def test_attempts_exhausted(self) -> None:
        daemon = self.start(drops=(DropRule(event="session.update", session=1),
                                   DropRule(event="session.update", every=1)))
        client = daemon.connect_client()
        client.send_json(default_settings())
        daemon.run_until(lambda: client.closed.called, "the client's close", within=60.0)
        self.assertEqual(self.warnings(client), [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_CLOSED])
        self.assertIn("could not be reconnected", client.of_type("Error")[0]["description"])
        self.assertEqual(client.close_code, 1011)
        policy = daemon.factory.session_options.backoff
        self.assertLessEqual(len(daemon.endpoint_requests), 1 + policy.max_attempts)
        self.assertEqual(self.stats(daemon).get("reconnects_failed"), 1)
        daemon.advance(5.0)
        self.assertQuiet(daemon)

    def test_auth_refused_on_reconnect(self) -> None:
        daemon = self.start(drops=(DropRule(after=2.0, session=1),))
        client = daemon.configured_client()
        daemon.simulator.api_key = "sk-another-key"
        daemon.run_until(lambda: client.closed.called, "the client's close")
        self.assertEqual(self.warnings(client),
                         [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_AUTH_FAILED])
        self.assertEqual(len(daemon.endpoint_requests), 2)
        daemon.advance(5.0)
        self.assertQuiet(daemon)

    def test_client_leaving_during_a_reconnect(self) -> None:
        daemon = self.start(drops=(DropRule(after=2.0, session=1),), connect_delay=0.5)
        client = daemon.configured_client()
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTING), "the drop")
        daemon.run_until(lambda: len(daemon.endpoint_requests) == 2, "the second attempt")
        client.dropConnection(abort=True)
        daemon.flush()
        daemon.advance(5.0)
        self.assertQuiet(daemon)


class RolloverTests(_ContinuityTestCase):
    def test_rollovers_are_invisible_to_the_client(self) -> None:
        daemon = self.start(max_session_seconds=10.0)
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        daemon.run_until(lambda: self.stats(daemon).get("rollovers") == 1, "the first rollover")
        self.turn(daemon, client, "And about the mountains")
        daemon.run_until(lambda: self.stats(daemon).get("rollovers") == 2, "the second rollover")
        self.assertEqual(daemon.simulator_sent("error"), [], "no session reached its expiry")
        self.assertRemembers(daemon, client)
        self.assertEqual(self.warnings(client), [])
        self.assertEqual(len(client.of_type("SettingsApplied")), 1)
        # Each new session had the configuration, then the replay, before anything else.
        self.assertEqual(len(daemon.endpoint_requests), 3)
        session = daemon.client_session()
        self.assertIsNone(session._candidate)
        # Backpressure watches the current upstream socket, and nothing of the old ones.
        assert session._upstream is not None and session._upstream._protocol is not None
        assert session.flow is not None
        upstream: Any = session._upstream._protocol.transport
        self.assertIs(session.flow._transports["upstream"], upstream)
        self.assertIsNotNone(upstream.producer)
        self.assertFalse(session.flow.is_paused("client"))
        del session, upstream
        self.closeAndCheck(daemon, client)

    def soft_deadline(self, daemon: MemoryDaemon) -> float:
        session = daemon.client_session().session
        assert session is not None and session._schedule is not None
        return session._schedule.soft_deadline

    def test_rollover_waits_for_a_quiet_moment(self) -> None:
        # 60-second sessions: soft deadline at 55 s, hard at 58 s.
        daemon = self.start(max_session_seconds=60.0)
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        soft = self.soft_deadline(daemon)
        daemon.advance(soft - 0.5 - daemon.reactor.seconds())
        # A reply that plays past the soft deadline but not to the hard one.
        client.send_json({"type": "InjectUserMessage", "content": "Say something short"})
        daemon.run_until(client.has("AgentStartedSpeaking"), "the reply")
        self.assertEqual(self.stats(daemon).get("rollovers"), None)
        daemon.run_until(lambda: self.stats(daemon).get("rollovers") == 1, "the rollover")
        self.assertNotIn("rollovers_forced", self.stats(daemon))
        # It came once the reply had played out, not at the soft deadline.
        session = daemon.client_session().session
        assert session is not None and session._replies is not None
        self.assertGreater(daemon.reactor.seconds(), soft)
        self.assertEqual(len(client.of_type("AgentAudioDone")), 2)
        self.assertEqual(self.warnings(client), [])
        self.assertRemembers(daemon, client)
        del session
        self.closeAndCheck(daemon, client)

    def test_forced_rollover_cuts_the_reply_as_a_barge_in(self) -> None:
        daemon = self.start(max_session_seconds=60.0)
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        session = daemon.client_session().session
        assert session is not None and session._schedule is not None
        hard = session._schedule.hard_deadline
        # About 12 s of agent audio, starting a second before the soft deadline.
        long_text = "Please repeat this long sentence about the wide and deep blue sea " * 3
        daemon.advance(self.soft_deadline(daemon) - 1.0 - daemon.reactor.seconds())
        client.send_json({"type": "InjectUserMessage", "content": long_text})
        daemon.run_until(client.has("AgentStartedSpeaking"), "the long reply")
        daemon.run_until(lambda: self.stats(daemon).get("rollovers") == 1, "the forced rollover")
        self.assertAlmostEqual(daemon.reactor.seconds(), hard, places=3)
        self.assertEqual(self.stats(daemon).get("rollovers_forced"), 1)
        self.assertEqual(len(client.of_type("AgentAudioDone")), 2)
        self.assertEqual(self.warnings(client), [])
        self.assertEqual(daemon.simulator_sent("error"), [])
        self.assertRemembers(daemon, client)
        del session
        self.closeAndCheck(daemon, client)

    def test_failed_forced_rollover_is_retried_after_the_retry_delay(self) -> None:
        """A rollover that waited for quiet, was forced, and whose new session dropped is tried again
        after ROLLOVER_RETRY_SECONDS, not at the next quiet moment (no burst of new sessions)."""
        from openai_proxy.session import ROLLOVER_RETRY_SECONDS

        daemon = self.start(max_session_seconds=60.0,
                            drops=(DropRule(event="session.update", session=2),))
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        long_text = "Please repeat this long sentence about the wide and deep blue sea " * 3
        daemon.advance(self.soft_deadline(daemon) - 1.0 - daemon.reactor.seconds())
        client.send_json({"type": "InjectUserMessage", "content": long_text})
        daemon.run_until(lambda: self.stats(daemon).get("rollovers_failed") == 1, "the failed rollover")
        self.assertEqual(self.stats(daemon).get("rollovers_forced"), 1)
        self.assertEqual(daemon.simulator.opened, 2)
        # The reply was cut: the session is quiet at once, and still no new session is opened early.
        daemon.advance(ROLLOVER_RETRY_SECONDS - 0.05)
        self.assertEqual(daemon.simulator.opened, 2)
        self.assertEqual(self.warnings(client), [])
        self.closeAndCheck(daemon, client)

    def test_drop_during_a_rollover(self) -> None:
        daemon = self.start(max_session_seconds=60.0,
                            drops=(DropRule(event="session.update", session=2),))
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        daemon.run_until(lambda: self.stats(daemon).get("rollovers") == 1, "the second try",
                         within=70.0)
        self.assertEqual(self.stats(daemon).get("rollovers_failed"), 1)
        self.assertEqual(self.warnings(client), [])
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)

    def test_expiry_without_a_rollover_is_a_reconnection(self) -> None:
        # A rollover that keeps failing until the upstream ends the session.
        daemon = self.start(max_session_seconds=10.0,
                            drops=tuple(DropRule(event="session.update", session=n)
                                        for n in (2, 3, 4)))
        client = daemon.configured_client()
        self.turn(daemon, client, FIRST)
        daemon.run_until(client.has("Warning", code=errors.UPSTREAM_RECONNECTED), "the reconnection",
                         within=20.0)
        self.assertEqual(self.warnings(client),
                         [errors.UPSTREAM_RECONNECTING, errors.UPSTREAM_RECONNECTED])
        self.assertEqual(len(daemon.simulator_sent("error")), 1)  # session_expired
        self.assertRemembers(daemon, client)
        self.closeAndCheck(daemon, client)
