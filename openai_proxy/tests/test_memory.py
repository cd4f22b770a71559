"""
Integration in memory: a Deepgram v1 client ↔ the daemon's site ↔ the upstream link ↔ the strict
simulator, with no socket and no real timer.

Every hop is a ``twisted.test.iosim`` ``FakeTransport`` pair moved by an ``IOPump``, and every timer
(the daemon's, the simulator's pacing, and Autobahn's own through ``txaio``) is a delayed call on one
``MemoryReactorClock`` that the tests advance, so each flow is deterministic and takes milliseconds.
The pieces are the real ones: the ``twisted.web`` site of :func:`openai_proxy.web.make_site` (so
``WebSocketResource`` routing and the transport takeover are included), :class:`ClientProtocol`,
:class:`UpstreamLink` / :class:`UpstreamProtocol` reached through
:class:`UpstreamConnector`'s ``endpoint_factory``, and the simulator's protocol.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import TestCase
from txaio.testutil import replace_loop
from zope.interface import implementer

from openai_proxy import errors
from openai_proxy.config import Config, Limits
from openai_proxy.relay import ClientFactory, ClientProtocol, SessionRegistry, UpstreamConnector
from openai_proxy.simulator import SimulatorFactory, SimulatorProtocol, voice
from openai_proxy.simulator.validation import validate_client_event
from openai_proxy.tests.helpers import TestClient, default_settings
from openai_proxy.web import make_site

API_KEY = "sk-test-key"
UPSTREAM_HOST = "realtime.memory.test"
#: Bytes per millisecond of linear16 at 24 kHz, the format of these tests on both sides.
BYTES_PER_MS = 48
#: No flow here needs more simulated time than this; running past it means a flow is stuck.
MAX_FLOW_SECONDS = 30.0


class _Transport(iosim.FakeTransport):
    """
    A fake TCP transport that says whether it is still connected, as a real one does, and can hold
    back what its protocol writes from a moment on: a slow network in one direction.
    """

    #: While holding, how many of the written chunks may still go.
    _deliverable: int | None = None

    @property
    def connected(self) -> bool:
        return not self.disconnected

    def hold(self) -> None:
        """What is written from now on waits until :meth:`release`."""
        self._deliverable = len(self.stream)

    def release(self) -> None:
        self._deliverable = None

    @property
    def has_output(self) -> bool:
        return bool(self.stream[: self._deliverable])

    def getOutBuffer(self) -> bytes | None:
        if self._deliverable is None:
            data: bytes | None = super().getOutBuffer()
            return data
        ready, self.stream = self.stream[: self._deliverable], self.stream[self._deliverable :]
        self._deliverable = 0
        return b"".join(ready) or None


def _pair(server: Any, client: Any, clock: MemoryReactorClock, port: int) -> iosim.IOPump:
    server_address = IPv4Address("TCP", "127.0.0.1", port)
    client_address = IPv4Address("TCP", "127.0.0.1", 40000 + port % 20000)
    return iosim.connect(
        server,
        _Transport(server, isServer=True, hostAddress=server_address, peerAddress=client_address),
        client,
        _Transport(client, isServer=False, hostAddress=client_address, peerAddress=server_address),
        greet=False,
        clock=clock,
    )


class _RecordingSimulatorProtocol(SimulatorProtocol):
    """The simulator's protocol, noting what it received and sent in one timeline."""

    factory: _RecordingSimulatorFactory

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            try:
                self.factory.timeline.append(("received", json.loads(payload)))
            except ValueError:
                pass
        super().onMessage(payload, isBinary)

    def _send_event(self, event: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.factory.timeline.append(("sent", event))
        super()._send_event(event)


class _RecordingSimulatorFactory(SimulatorFactory):
    protocol = _RecordingSimulatorProtocol  # type: ignore[assignment]

    def __init__(self, clock: Any, **kwargs: Any) -> None:
        super().__init__(clock, **kwargs)
        self.timeline: list[tuple[str, dict[str, Any]]] = []


@implementer(IStreamClientEndpoint)
class _SimulatorEndpoint:
    """
    Connects to the simulator in memory, ``connect_delay`` later (at least one reactor turn).  The
    daemon asks for ``wss://``; the memory link carries no TLS, the request is noted instead.
    """

    def __init__(self, daemon: MemoryDaemon, host: str, port: int, secure: bool) -> None:
        self._daemon = daemon
        daemon.endpoint_requests.append((host, port, secure))

    def connect(self, protocol_factory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        daemon = self._daemon

        def complete() -> None:
            address = IPv4Address("TCP", "127.0.0.1", 443)
            client = protocol_factory.buildProtocol(address)
            server = daemon.simulator.buildProtocol(address)
            assert client is not None and server is not None
            daemon.pumps.append(_pair(server, client, daemon.reactor, 443))
            connected.callback(client)

        call = daemon.reactor.callLater(daemon.connect_delay, complete)
        connected: defer.Deferred[IProtocol] = defer.Deferred(lambda d: call.cancel())
        return connected


class MemoryClient(TestClient):
    """
    The test client of :mod:`.helpers`, read synchronously: these tests move time themselves, so
    they look at what arrived instead of waiting on ``expect``.
    """

    close_code: int | None = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_code = code
        super().onClose(wasClean, code, reason)

    def of_type(self, message_type: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            m for m in self.messages
            if m["type"] == message_type and all(m.get(k) == v for k, v in fields.items())
        ]

    def has(self, message_type: str, **fields: Any) -> Callable[[], bool]:
        """A predicate for :meth:`MemoryDaemon.run_until`."""
        return lambda: bool(self.of_type(message_type, **fields))

    def kinds(self) -> list[str]:
        """Message types and ``audio`` for binary frames, in arrival order."""
        return ["audio" if isinstance(f, bytes) else f["type"] for f in self.frames]


class MemoryDaemon:
    """The daemon and the simulator wired together in memory, on one clock."""

    def __init__(
        self, *, limits: Limits | None = None, connect_delay: float = 0.0, **simulator_options: Any
    ) -> None:
        self.reactor = MemoryReactorClock()
        #: Simulated seconds a TCP connection to the upstream takes.
        self.connect_delay = connect_delay
        self.pumps: list[iosim.IOPump] = []
        self.endpoint_requests: list[tuple[str, int, bool]] = []
        self.simulator = _RecordingSimulatorFactory(
            self.reactor, api_key=API_KEY, **simulator_options
        )
        self.config = Config(api_key=API_KEY, simulator=True, limits=limits or Limits())
        self.registry = SessionRegistry(self.reactor, self.config.limits.shutdown_grace)
        connector = UpstreamConnector(
            self.reactor,
            self.config,
            url_for=lambda model: f"wss://{UPSTREAM_HOST}/v1/realtime?model={model}",
            endpoint_factory=lambda host, port, secure: _SimulatorEndpoint(self, host, port, secure),
        )
        self.factory = ClientFactory(self.reactor, self.config, self.registry, connector)
        self.site = make_site(self.factory, self.registry)
        # The HTTP channel's idle timeout belongs on the test clock too.
        self.site.reactor = self.reactor

    def connect_client(self, path: str = "/v1/agent/converse") -> MemoryClient:
        """A client through the site's routing, open (the daemon's Welcome is already there)."""
        factory = WebSocketClientFactory(f"ws://daemon.memory.test{path}", reactor=self.reactor)
        factory.protocol = MemoryClient
        address = IPv4Address("TCP", "127.0.0.1", 8080)
        client = factory.buildProtocol(address)
        server = self.site.buildProtocol(address)
        assert server is not None
        self.pumps.append(_pair(server, client, self.reactor, 8080))
        self.flush()
        assert isinstance(client, MemoryClient)
        return client

    def configured_client(self, settings: dict[str, Any] | None = None) -> MemoryClient:
        client = self.connect_client()
        client.send_json(settings or default_settings())
        self.run_until(client.has("SettingsApplied"), "SettingsApplied")
        return client

    def upstream_transport(self) -> _Transport:
        """The simulator's side of the only upstream connection."""
        [protocol] = self.simulator.sessions
        transport = protocol.transport
        assert isinstance(transport, _Transport)
        return transport

    def client_session(self) -> ClientProtocol:
        """The daemon's protocol serving the only open session."""
        [protocol] = list(self.registry._sessions)
        return protocol

    # -- moving bytes and time --------------------------------------------------------------------

    def flush(self, until: Callable[[], bool] | None = None) -> None:
        """
        Move bytes on every connection (running what is due now) until nothing moves, or, with
        ``until``, as soon as it holds after one delivery.
        """
        for _ in range(10_000):
            self.reactor.advance(0)
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
                if until is not None and until():
                    self._forget_closed()
                    return
            self._forget_closed()
            # A call that ran during the pass may have written to a pump already passed, or
            # opened a connection: quiet means nothing moved and nothing is waiting.
            waiting = any(p.clientIO.has_output or p.serverIO.has_output for p in self.pumps) or any(
                call.getTime() <= self.reactor.seconds() for call in self.reactor.getDelayedCalls()
            )
            if not moved and not waiting:
                if until is not None:
                    raise AssertionError("the connections went quiet first")
                return
        raise AssertionError("the connections never went quiet")

    def _forget_closed(self) -> None:
        self.pumps = [
            p for p in self.pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)
        ]

    def _step(self, limit: float) -> bool:
        """Advance to the next delayed call due by ``limit`` and flush; False when there is none."""
        due = [c.getTime() for c in self.reactor.getDelayedCalls() if c.getTime() <= limit]
        if not due:
            return False
        self.reactor.advance(max(0.0, min(due) - self.reactor.seconds()))
        self.flush()
        return True

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass, stopping at every timer on the way."""
        target = self.reactor.seconds() + seconds
        self.flush()
        while self._step(target):
            pass
        self.reactor.advance(max(0.0, target - self.reactor.seconds()))
        self.flush()

    def run_until(self, predicate: Callable[[], bool], what: str,
                  within: float = MAX_FLOW_SECONDS) -> float:
        """Advance timer by timer until ``predicate`` holds; the simulated seconds it took."""
        start = self.reactor.seconds()
        self.flush()
        while not predicate():
            if not self._step(start + within):
                raise AssertionError(f"{what} did not happen within {within} simulated seconds")
        return self.reactor.seconds() - start

    # -- what the upstream saw ----------------------------------------------------------------------

    def upstream_events(self) -> list[dict[str, Any]]:
        """Every event the simulator received, each validated strictly with the openai types."""
        events = [event for direction, event in self.simulator.timeline if direction == "received"]
        for event in events:
            validate_client_event(event)
        return events

    def simulator_sent(self, event_type: str) -> list[dict[str, Any]]:
        return [
            event for direction, event in self.simulator.timeline
            if direction == "sent" and event["type"] == event_type
        ]

    def delayed_calls(self) -> list[str]:
        return [repr(call) for call in self.reactor.getDelayedCalls()]


class _MemoryTestCase(TestCase):
    def start(self, **options: Any) -> MemoryDaemon:
        """A :class:`MemoryDaemon`, with Autobahn's own timers (through ``txaio``) on its clock."""
        daemon = MemoryDaemon(**options)
        loop = replace_loop(daemon.reactor)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.addCleanup(self._check_upstream, daemon)
        return daemon

    def _check_upstream(self, daemon: MemoryDaemon) -> None:
        daemon.upstream_events()
        self.assertEqual(daemon.simulator_sent("error"), [], "the simulator refused an event")

    def assertQuiet(self, daemon: MemoryDaemon) -> None:
        """No connection left, and no timer of any of them left either."""
        self.assertEqual(len(daemon.registry), 0)
        self.assertEqual(daemon.simulator.sessions, [])
        self.assertEqual(daemon.pumps, [])
        self.assertEqual(daemon.delayed_calls(), [])


class SettingsTests(_MemoryTestCase):
    def test_welcome_then_settings_applied_and_nothing_upstream_before_session_updated(self) -> None:
        daemon = self.start()
        client = daemon.connect_client()
        self.assertTrue(client.opened.called)
        self.assertEqual(client.kinds(), ["Welcome"])
        self.assertIn("request_id", client.messages[0])
        self.assertEqual(daemon.endpoint_requests, [])  # no upstream until Settings
        # Everything at once: a message and audio the daemon must hold until the session is set.
        client.send_json(default_settings())
        client.send_json({"type": "InjectUserMessage", "content": "Hello there"})
        client.sendMessage(voice.silence(200), isBinary=True)
        daemon.flush(until=lambda: bool(daemon.simulator.sessions))
        self.assertEqual(daemon.endpoint_requests, [(UPSTREAM_HOST, 443, True)])
        # The upstream's answers are slow from here on (its handshake and session.created go).
        upstream = daemon.upstream_transport()
        upstream.hold()
        daemon.advance(1.0)
        self.assertEqual([e["type"] for e in daemon.upstream_events()], ["session.update"])
        self.assertEqual(client.kinds(), ["Welcome"])
        upstream.release()
        daemon.run_until(client.has("SettingsApplied"), "SettingsApplied")
        self.assertEqual(client.kinds()[:2], ["Welcome", "SettingsApplied"])

        timeline = daemon.simulator.timeline
        updated_at = next(
            n for n, (direction, event) in enumerate(timeline)
            if direction == "sent" and event["type"] == "session.updated"
        )
        after = [event["type"] for direction, event in timeline[updated_at:] if direction == "received"]
        # The held message and audio went up once the session was confirmed.
        self.assertIn("conversation.item.create", after)
        self.assertIn("input_audio_buffer.append", after)
        session = daemon.upstream_events()[0]["session"]
        self.assertEqual(session["type"], "realtime")
        self.assertEqual(session["audio"]["output"]["voice"], "alloy")
        self.assertEqual(session["tools"][0]["name"], "get_weather")

    def test_the_openai_path_is_routed_too(self) -> None:
        daemon = self.start()
        client = daemon.connect_client("/openai")
        self.assertEqual(client.kinds(), ["Welcome"])

    def test_an_unknown_path_is_not_upgraded(self) -> None:
        daemon = self.start()
        client = daemon.connect_client("/elsewhere")
        daemon.advance(1.0)
        self.failureResultOf(client.opened, ConnectionError)
        self.assertTrue(client.closed.called)
        self.assertEqual(len(daemon.registry), 0)


class ConversationTests(_MemoryTestCase):
    def test_text_turn_with_paced_audio(self) -> None:
        daemon = self.start()
        client = daemon.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Hello there"})
        daemon.flush()
        # Without time passing the simulator has not finished speaking.
        self.assertEqual(client.of_type("AgentAudioDone"), [])
        elapsed = daemon.run_until(client.has("AgentAudioDone"), "AgentAudioDone")

        deltas = daemon.simulator_sent("response.output_audio.delta")
        produced = b"".join(base64.b64decode(e["delta"]) for e in deltas)
        # Each delta waits one chunk interval of the clock.
        self.assertGreaterEqual(elapsed, (len(deltas) - 1) * daemon.simulator.chunk_interval)
        self.assertEqual(bytes(client.audio), produced)
        self.assertGreater(len(client.audio), 100 * BYTES_PER_MS)

        kinds = client.kinds()
        echo = kinds.index("ConversationText")
        self.assertEqual(client.frames[echo], {"type": "ConversationText", "role": "user",
                                                "content": "Hello there"})
        started = kinds.index("AgentStartedSpeaking")
        first_audio = kinds.index("audio")
        last_audio = len(kinds) - 1 - kinds[::-1].index("audio")
        self.assertLess(echo, started)
        self.assertLess(started, first_audio)
        self.assertEqual(kinds[last_audio + 1 :].count("audio"), 0)
        self.assertEqual(kinds.index("AgentAudioDone"), last_audio + 1)
        [reply] = client.of_type("ConversationText", role="assistant")
        self.assertEqual(reply["content"], "You said: Hello there")
        for key in ("total_latency", "tts_latency", "ttt_latency"):
            self.assertIsInstance(client.frames[started][key], float)

        types = [e["type"] for e in daemon.upstream_events()]
        self.assertEqual(types.count("session.update"), 1)
        self.assertLess(types.index("conversation.item.create"), types.index("response.create"))

    def test_function_call_round_trip(self) -> None:
        daemon = self.start()
        client = daemon.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        daemon.run_until(client.has("FunctionCallRequest"), "FunctionCallRequest")
        [request] = client.of_type("FunctionCallRequest")
        [function] = request["functions"]
        self.assertEqual(function["name"], "get_weather")
        self.assertTrue(function["client_side"])
        self.assertEqual(json.loads(function["arguments"]), {"city": "Paris"})
        # The model waits for the answer, however long it takes.
        daemon.advance(5.0)
        self.assertEqual(client.of_type("AgentStartedSpeaking"), [])
        client.send_json({"type": "FunctionCallResponse", "id": function["id"],
                          "name": "get_weather", "content": '{"temperature_c": 21}'})
        daemon.run_until(client.has("AgentAudioDone"), "AgentAudioDone")
        [reply] = client.of_type("ConversationText", role="assistant")
        self.assertIn("21", reply["content"])
        self.assertEqual(len(client.of_type("FunctionCallRequest")), 1)

        events = daemon.upstream_events()
        [output] = [e for e in events if e["type"] == "conversation.item.create"
                    and e["item"]["type"] == "function_call_output"]
        self.assertEqual(output["item"]["call_id"], function["id"])
        self.assertEqual(output["item"]["output"], '{"temperature_c": 21}')
        self.assertEqual([e["type"] for e in events].count("response.create"), 2)

    def test_greeting_spoken_after_settings_applied(self) -> None:
        daemon = self.start()
        client = daemon.connect_client()
        client.send_json(default_settings(greeting="Welcome to the test!"))
        daemon.run_until(client.has("AgentAudioDone"), "AgentAudioDone")
        [text] = client.of_type("ConversationText", role="assistant")
        self.assertEqual(text["content"], "Welcome to the test!")
        kinds = client.kinds()
        self.assertLess(kinds.index("SettingsApplied"), kinds.index("AgentStartedSpeaking"))
        self.assertLess(kinds.index("AgentStartedSpeaking"), kinds.index("audio"))
        # A greeting is the agent's, not the user's.
        self.assertEqual(client.of_type("ConversationText", role="user"), [])


class BargeInTests(_MemoryTestCase):
    LONG_TEXT = "Please read me a long story about a quiet harbour town and its lighthouse keeper"

    def long_reply_under_way(self) -> tuple[MemoryDaemon, MemoryClient]:
        """A session (without functions) whose client has heard 300 ms of a long spoken reply."""
        daemon = self.start()
        settings = default_settings()
        del settings["agent"]["think"]["functions"]
        client = daemon.configured_client(settings)
        client.send_json({"type": "InjectUserMessage", "content": self.LONG_TEXT})
        daemon.run_until(lambda: len(client.audio) >= 300 * BYTES_PER_MS, "300 ms of reply audio")
        return daemon, client

    def test_speech_over_the_reply_interrupts_it_and_truncates_what_was_not_heard(self) -> None:
        daemon, client = self.long_reply_under_way()

        # The user talks over the reply, in 20 ms frames at the pace of a microphone.
        spoken = voice.speak_words("stop") + voice.silence(600)
        frame = 20 * BYTES_PER_MS
        for offset in range(0, len(spoken), frame):
            client.sendMessage(spoken[offset : offset + frame], isBinary=True)
            daemon.advance(0.02)
        daemon.run_until(client.has("UserStartedSpeaking"), "UserStartedSpeaking")
        daemon.run_until(lambda: len(client.of_type("AgentStartedSpeaking")) == 2,
                         "the answer to the interruption")
        daemon.run_until(client.has("AgentAudioDone"), "AgentAudioDone")

        kinds = client.kinds()
        barge = kinds.index("UserStartedSpeaking")
        answer = kinds.index("AgentStartedSpeaking", barge)
        # Not one frame of the interrupted reply after UserStartedSpeaking.
        self.assertNotIn("audio", kinds[barge:answer])
        delivered_ms = sum(len(f) for f in client.frames[:barge] if isinstance(f, bytes)) / BYTES_PER_MS

        [truncate] = [e for e in daemon.upstream_events() if e["type"] == "conversation.item.truncate"]
        interrupted = daemon.simulator_sent("response.output_audio.delta")[0]["item_id"]
        self.assertEqual(truncate["item_id"], interrupted)
        self.assertEqual(truncate["content_index"], 0)
        self.assertGreater(truncate["audio_end_ms"], 0)
        self.assertLessEqual(truncate["audio_end_ms"], delivered_ms)
        # The simulator accepted it, having cancelled the reply on speech_started.
        [truncated] = daemon.simulator_sent("conversation.item.truncated")
        self.assertEqual(truncated["audio_end_ms"], truncate["audio_end_ms"])
        cancelled, completed = daemon.simulator_sent("response.done")
        self.assertEqual(cancelled["response"]["status"], "cancelled")
        self.assertEqual(cancelled["response"]["status_details"]["reason"], "turn_detected")
        self.assertEqual(completed["response"]["status"], "completed")
        self.assertEqual(client.of_type("ConversationText", role="user")[-1]["content"], "stop")
        self.assertEqual(client.of_type("Error"), [])

    def test_typing_over_the_reply_drops_the_audio_still_on_its_way(self) -> None:
        daemon, client = self.long_reply_under_way()
        # More of the reply is generated but still on the network when the user types.
        upstream = daemon.upstream_transport()
        delivered_deltas = len(daemon.simulator_sent("response.output_audio.delta"))
        upstream.hold()
        daemon.advance(0.1)
        in_flight = len(daemon.simulator_sent("response.output_audio.delta")) - delivered_deltas
        self.assertGreater(in_flight, 0)
        heard_ms = len(client.audio) / BYTES_PER_MS
        interrupted_at = len(client.frames)
        client.send_json({"type": "InjectUserMessage", "content": "Tell me a joke"})
        daemon.flush()
        upstream.release()
        daemon.run_until(lambda: len(client.of_type("AgentStartedSpeaking")) == 2, "the answer")
        daemon.run_until(client.has("AgentAudioDone"), "AgentAudioDone")

        kinds = client.kinds()
        answer = kinds.index("AgentStartedSpeaking", interrupted_at)
        self.assertNotIn("audio", kinds[interrupted_at:answer])
        types = [e["type"] for e in daemon.upstream_events()]
        self.assertLess(types.index("response.cancel"), types.index("conversation.item.truncate"))
        [truncate] = [e for e in daemon.upstream_events() if e["type"] == "conversation.item.truncate"]
        self.assertGreater(truncate["audio_end_ms"], 0)
        self.assertLessEqual(truncate["audio_end_ms"], heard_ms)
        cancelled = daemon.simulator_sent("response.done")[0]["response"]
        self.assertEqual(cancelled["status_details"]["reason"], "client_cancelled")
        self.assertEqual(client.of_type("ConversationText", role="assistant")[-1]["content"],
                         "You said: Tell me a joke")


class TeardownTests(_MemoryTestCase):
    def test_upstream_closing_mid_session_is_an_error_then_a_close(self) -> None:
        # 1008 (policy violation) is not worth a reconnection (SPEC §8): the client is told.
        daemon = self.start()
        client = daemon.configured_client()
        [upstream] = daemon.simulator.sessions
        upstream.sendClose(4000)
        daemon.flush()
        errors_seen = client.of_type("Error")
        self.assertEqual([e["code"] for e in errors_seen], [errors.UPSTREAM_CLOSED])
        self.assertEqual(client.kinds()[-1], "Error")
        daemon.run_until(lambda: client.closed.called, "the client's close")
        self.assertEqual(client.close_code, 1011)
        self.assertQuiet(daemon)

    def test_client_disconnect_releases_the_upstream_and_every_timer(self) -> None:
        daemon = self.start()
        client = daemon.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Hello there"})
        daemon.run_until(client.has("AgentStartedSpeaking"), "AgentStartedSpeaking")
        # Mid-reply, with the simulator's pacing timer armed, and a short frame of audio waiting
        # in the session's append batcher behind its flush timer.
        client.sendMessage(voice.silence(5), isBinary=True)
        daemon.flush()
        self.assertNotEqual(daemon.client_session()._timers, {})
        client.dropConnection(abort=True)
        daemon.flush()
        self.assertEqual(len(daemon.registry), 0)
        elapsed = daemon.run_until(lambda: not daemon.simulator.sessions, "the upstream's close",
                                   within=1.0)
        self.assertLessEqual(elapsed, 1.0)
        self.assertQuiet(daemon)

    def test_an_upstream_that_ignores_the_close_is_dropped_within_a_second(self) -> None:
        daemon = self.start()
        client = daemon.configured_client()
        # The upstream stops reading: the daemon's close frame never reaches it.
        daemon.upstream_transport().bufferReceived = lambda data: None  # type: ignore[method-assign]
        client.dropConnection(abort=True)
        daemon.flush()
        self.assertEqual(len(daemon.simulator.sessions), 1)
        elapsed = daemon.run_until(lambda: not daemon.simulator.sessions, "the upstream's drop",
                                   within=1.0)
        self.assertLessEqual(elapsed, 1.0)
        self.assertQuiet(daemon)

    def test_a_client_that_leaves_while_the_upstream_connects_leaves_no_timer(self) -> None:
        daemon = self.start(connect_delay=0.5)
        client = daemon.connect_client()
        client.send_json(default_settings())
        daemon.flush()
        self.assertEqual(len(daemon.endpoint_requests), 1)
        client.dropConnection(abort=True)
        daemon.flush()
        # The pending connection was cancelled along with the handshake timer.
        self.assertQuiet(daemon)
        self.assertEqual(daemon.simulator.timeline, [])

    def test_an_upstream_that_opens_after_the_client_left_is_dropped(self) -> None:
        daemon = self.start()
        client = daemon.connect_client()
        client.send_json(default_settings())
        client.dropConnection(abort=True)
        # Settings and the close reach the daemon in one read; the upstream handshake is already
        # under way and finishes after the client is gone.
        daemon.flush()
        self.assertQuiet(daemon)
        sent = [event["type"] for direction, event in daemon.simulator.timeline if direction == "sent"]
        self.assertEqual(sent, ["session.created"])
        self.assertEqual(client.of_type("SettingsApplied"), [])
        self.assertEqual(daemon.upstream_events(), [])
