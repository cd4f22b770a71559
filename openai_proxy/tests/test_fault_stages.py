"""The daemon (in process, on loopback) in front of a simulated upstream that fails at each stage of a
turn: before ``session.updated``, during agent audio, between a function call and its output, at the
session's expiry, on an idle session, silently (only a ping timeout notices). Each case checks what the
client is told (SPEC §8: a reconnection, or an ``Error`` when none is possible) and that nothing is
left behind: no session in the registry, no simulated upstream session, no upstream socket (trial
fails a test that leaves a timer or a connection in the reactor)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor

from openai_proxy import errors
from openai_proxy.config import Limits
from openai_proxy.simulator.faults import DropRule
from openai_proxy.tests.helpers import connect_client, default_settings, wait
from openai_proxy.tests.test_relay import _DaemonTestCase

FIRST = "Tell me about the sea"


class FaultStageTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def client_of_failing_upstream(self, **simulator_options: Any) -> Any:
        yield self.start(simulator_options=simulator_options)
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        return client

    @defer.inlineCallbacks
    def assertToldAndReleased(self, client: Any, close_code: int | str) -> Any:
        error = yield client.expect("Error", code=errors.UPSTREAM_CLOSED)
        self.assertIn(f"code {close_code}", error["description"])
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1011)
        registry, simulator = self.daemon.registry, self.daemon.simulator
        assert registry is not None and simulator is not None
        deadline = reactor.seconds() + 5.0
        while (len(registry) or simulator.sessions) and reactor.seconds() < deadline:
            yield wait(0.01)
        self.assertEqual(len(registry), 0)
        self.assertEqual(simulator.sessions, [])
        return error

    @defer.inlineCallbacks
    def assertReconnectedAndReleased(self, client: Any) -> Any:
        yield client.wait_for("Warning", code=errors.UPSTREAM_RECONNECTING, timeout=10)
        yield client.wait_for("Warning", code=errors.UPSTREAM_RECONNECTED, timeout=10)
        # The first reply (cut or not) has ended before the question.
        yield client.wait_for("ConversationText", role="assistant", timeout=10)
        client.send_json({"type": "InjectUserMessage", "content": "What did I say first?"})
        reply = yield client.wait_for("ConversationText", role="assistant",
                                      content=f"You first said: {FIRST}", timeout=10)
        self.assertTrue(reply)
        self.assertEqual([m["code"] for m in client.messages if m["type"] == "Error"], [])
        client.sendClose(1000)
        yield client.closed
        registry, simulator = self.daemon.registry, self.daemon.simulator
        assert registry is not None and simulator is not None
        deadline = reactor.seconds() + 5.0
        while (len(registry) or simulator.sessions) and reactor.seconds() < deadline:
            yield wait(0.01)
        self.assertEqual(len(registry), 0)
        self.assertEqual(simulator.sessions, [])

    @defer.inlineCallbacks
    def test_before_session_updated(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(event="session.update", session=1),))
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        yield self.assertReconnectedAndReleased(client)
        self.assertEqual([m["type"] for m in client.messages].count("SettingsApplied"), 1)

    @defer.inlineCallbacks
    def test_during_agent_audio(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(event="response.output_audio.delta", nth=3, session=1),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        yield client.expect("Warning", code=errors.UPSTREAM_RECONNECTING)
        self.assertTrue(client.audio, "some agent audio arrived before the drop")
        yield self.assertReconnectedAndReleased(client)
        kinds = [m["type"] for m in client.messages]
        self.assertLess(kinds.index("AgentAudioDone"), kinds.index("Warning") + 2)

    @defer.inlineCallbacks
    def test_between_a_function_call_and_its_output(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(event="response.output_item.done", nth=2, close=1011, session=1),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        yield client.wait_for("ConversationText", role="assistant")
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        request = yield client.expect("FunctionCallRequest")
        yield client.expect("Warning", code=errors.UPSTREAM_RECONNECTED, timeout=10)
        call_id = request["functions"][0]["id"]
        client.send_json({"type": "FunctionCallResponse", "id": call_id, "name": "get_weather",
                          "content": "sunny"})
        yield client.wait_for("ConversationText", role="assistant",
                              content="Here is what I found: sunny", timeout=10)
        yield self.assertReconnectedAndReleased_after(client)

    @defer.inlineCallbacks
    def assertReconnectedAndReleased_after(self, client: Any) -> Any:
        client.send_json({"type": "InjectUserMessage", "content": "What did I say first?"})
        yield client.wait_for("ConversationText", role="assistant",
                              content=f"You first said: {FIRST}", timeout=10)
        client.sendClose(1000)
        yield client.closed

    @defer.inlineCallbacks
    def test_at_the_session_expiry(self) -> None:
        # The rollover (before the expiry) is refused, so the expiry is met: a reconnection.
        client = yield self.client_of_failing_upstream(
            max_session_seconds=1.0, drops=(DropRule(event="session.update", session=2),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        yield self.assertReconnectedAndReleased(client)
        self.assertNotIn("session_expired", [m.get("code") for m in client.messages])

    @defer.inlineCallbacks
    def test_idle_session_going_away(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(after=0.5, close=1001, session=1),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        yield self.assertReconnectedAndReleased(client)

    @defer.inlineCallbacks
    def test_silent_upstream_noticed_by_the_ping_timeout(self) -> None:
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0,
                                       upstream_ping_interval=1.0),
                         simulator_options={"drops": (DropRule(after=0.6, hang=True, session=1),)})
        assert self.daemon.simulator is not None
        self.daemon.simulator.hang_seconds = 5.0
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        client.send_json({"type": "InjectUserMessage", "content": FIRST})
        started = reactor.seconds()
        # A ping each second (Autobahn batches its timers by whole seconds), answered within two.
        yield client.expect("Warning", code=errors.UPSTREAM_RECONNECTING, timeout=6)
        self.assertLess(reactor.seconds() - started, 6.0)
        yield self.assertReconnectedAndReleased_after(client)
        # The hung simulated connection is released by the simulator's own bound.
        deadline = reactor.seconds() + 6.0
        while self.daemon.simulator.sessions and reactor.seconds() < deadline:
            yield wait(0.05)
        self.assertEqual(self.daemon.simulator.sessions, [])

    @defer.inlineCallbacks
    def test_close_not_worth_a_reconnection(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(after=0.5, close=1008, session=1),))
        yield client.expect("SettingsApplied")
        yield self.assertToldAndReleased(client, 1008)
