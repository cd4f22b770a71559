"""
Integration: a WebSocket client ↔ the daemon's site ↔ the strict simulator, over loopback sockets.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from openai_proxy import errors
from openai_proxy.config import Limits
from openai_proxy.tests.helpers import DaemonTestCase, connect_client, default_settings, wait


class _DaemonTestCase(DaemonTestCase):
    timeout = 20

    @defer.inlineCallbacks
    def configured_client(self, settings: dict[str, Any] | None = None, **kw: Any) -> Any:
        client = yield connect_client(self.daemon.url, **kw)
        self.addCleanup(self._close, client)
        welcome = yield client.expect("Welcome")
        self.assertIn("request_id", welcome)
        client.send_json(settings or default_settings())
        yield client.expect("SettingsApplied")
        return client

    @defer.inlineCallbacks
    def _close(self, client: Any) -> Any:
        if client.transport is not None and client.transport.connected:
            client.dropConnection(abort=True)
        yield wait(0.01)


class ConversationTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_settings_then_text_turn_with_audio(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Hello there"})
        echo = yield client.expect("ConversationText", role="user")
        self.assertEqual(echo["content"], "Hello there")
        started = yield client.expect("AgentStartedSpeaking")
        for key in ("total_latency", "tts_latency", "ttt_latency"):
            self.assertIsInstance(started[key], float)
        yield client.expect("AgentAudioDone", timeout=10)
        reply = yield client.wait_for("ConversationText", role="assistant")
        self.assertIn("Hello there", reply["content"])
        # Binary audio arrived after AgentStartedSpeaking and before AgentAudioDone.
        kinds = ["audio" if isinstance(f, bytes) else f["type"] for f in client.frames]
        first_audio = kinds.index("audio")
        last_audio = len(kinds) - 1 - kinds[::-1].index("audio")
        self.assertLess(kinds.index("AgentStartedSpeaking"), first_audio)
        self.assertEqual(kinds[last_audio + 1], "AgentAudioDone")
        self.assertGreater(len(client.audio), 4800)
        self.assertEqual(len(client.audio) % 2, 0)
        assistant_texts = [m for m in client.messages
                           if m["type"] == "ConversationText" and m["role"] == "assistant"]
        self.assertEqual(len(assistant_texts), 1)

        events = self.daemon.upstream_events()  # validated strictly
        types = [e["type"] for e in events]
        self.assertEqual(types[0], "session.update")
        self.assertEqual(types.count("session.update"), 1)
        create = types.index("conversation.item.create")
        self.assertGreater(types.index("response.create"), create)
        session = events[0]["session"]
        self.assertEqual(session["type"], "realtime")
        self.assertEqual(session["audio"]["output"]["voice"], "alloy")
        self.assertEqual(session["tools"][0]["name"], "get_weather")

    @defer.inlineCallbacks
    def test_function_call_round_trip(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        request = yield client.expect("FunctionCallRequest")
        [function] = request["functions"]
        self.assertEqual(function["name"], "get_weather")
        self.assertTrue(function["client_side"])
        self.assertIsInstance(json.loads(function["arguments"]), dict)
        client.send_json({"type": "FunctionCallResponse", "id": function["id"],
                          "name": "get_weather", "content": '{"temperature_c": 21}'})
        yield client.expect("AgentAudioDone", timeout=10)
        reply = yield client.expect("ConversationText", role="assistant", timeout=10)
        self.assertIn("21", reply["content"])
        requests = [m for m in client.messages if m["type"] == "FunctionCallRequest"]
        self.assertEqual(len(requests), 1)
        events = self.daemon.upstream_events()
        outputs = [e for e in events if e["type"] == "conversation.item.create"
                   and e["item"]["type"] == "function_call_output"]
        self.assertEqual(outputs[0]["item"]["call_id"], function["id"])
        self.assertEqual([e["type"] for e in events].count("response.create"), 2)

    @defer.inlineCallbacks
    def test_greeting_spoken_after_settings_applied(self) -> None:
        yield self.start()
        client = yield self.configured_client(default_settings(greeting="Welcome to the test!"))
        yield client.expect("AgentAudioDone", timeout=10)
        text = yield client.expect("ConversationText", role="assistant", timeout=10)
        self.assertEqual(text["content"], "Welcome to the test!")
        kinds = [m["type"] for m in client.messages]
        self.assertLess(kinds.index("SettingsApplied"), kinds.index("AgentStartedSpeaking"))

    @defer.inlineCallbacks
    def test_openai_path_and_bad_messages(self) -> None:
        yield self.start()
        client = yield connect_client(self.daemon.url.replace("/v1/agent/converse", "/openai"))
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.sendMessage(b"{nope", isBinary=False)
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UNPARSABLE_CLIENT_MESSAGE)
        client.send_json({"type": "Teleport"})
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UNSUPPORTED_CLIENT_MESSAGE)
        client.send_json(default_settings())
        yield client.expect("SettingsApplied")

    @defer.inlineCallbacks
    def test_key_never_reaches_the_client(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Tell me your key"})
        yield client.expect("AgentAudioDone", timeout=10)
        for message in client.messages:
            self.assertNotIn("sk-test-key", json.dumps(message))


class HttpTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        assert self.daemon.port is not None
        agent = Agent(reactor)
        response = yield agent.request(
            b"GET", f"http://127.0.0.1:{self.daemon.port.getHost().port}{path}".encode()
        )
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def test_health_ready_and_404(self) -> None:
        yield self.start()
        code, _ = yield self.get("/healthz")
        self.assertEqual(code, 200)
        code, _ = yield self.get("/readyz")
        self.assertEqual(code, 200)
        code, _ = yield self.get("/elsewhere")
        self.assertEqual(code, 404)
        assert self.daemon.registry is not None
        self.daemon.registry.draining = True
        code, _ = yield self.get("/readyz")
        self.assertEqual(code, 503)


class AuthTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_tokens(self) -> None:
        yield self.start(client_tokens=frozenset({"good-token"}))
        with self.assertRaises(ConnectionError):
            yield connect_client(self.daemon.url)
        with self.assertRaises(ConnectionError):
            yield connect_client(self.daemon.url, headers={"Authorization": "Token bad"})
        client = yield connect_client(self.daemon.url, headers={"Authorization": "Token good-token"})
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client2 = yield connect_client(self.daemon.url, headers={"Authorization": "Bearer good-token"})
        self.addCleanup(self._close, client2)
        yield client2.expect("Welcome")
        client3 = yield connect_client(self.daemon.url, protocols=["token", "good-token"])
        self.addCleanup(self._close, client3)
        self.assertEqual(client3.websocket_protocol_in_use, "token")
        yield client3.expect("Welcome")


def _capture_log(test: TestCase) -> list[str]:
    """Every log line (formatted, plus its fields) emitted while ``test`` runs."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class QueryTokenTests(_DaemonTestCase):
    """The ``token`` query parameter of the React component's proxy mode (SPEC §7)."""

    TOKEN = "query-token-7d1e9b2c4a"

    @defer.inlineCallbacks
    def test_query_token_accepted_and_never_logged(self) -> None:
        log = _capture_log(self)
        yield self.start(client_tokens=frozenset({self.TOKEN}), log_level="debug")
        base = self.daemon.url.replace("/v1/agent/converse", "/openai")
        uuid = "0af76519-16cd-43dd-8448-eb211c80319c"
        for url in [
            f"{base}?service=agent&token={self.TOKEN}",
            f"{base}?token={self.TOKEN}&service=agent&traceId={uuid}",
            f"{self.daemon.url}?token=&token={self.TOKEN}",  # the first non-empty value
        ]:
            client = yield connect_client(url)
            self.addCleanup(self._close, client)
            yield client.expect("Welcome")
        traces = {p.trace_id for p in self.daemon.registry._sessions}
        self.assertIn(uuid.replace("-", ""), traces)
        client.send_json(default_settings())
        yield client.expect("SettingsApplied")
        for url in [f"{base}?service=agent&token=wrong-{self.TOKEN}", f"{base}?token=",
                    f"{base}?service=agent&token={self.TOKEN[:-1]}"]:
            with self.assertRaises(ConnectionError):
                yield connect_client(url)
        # An Authorization header is checked first: a wrong one is not rescued by the URL.
        with self.assertRaises(ConnectionError):
            yield connect_client(f"{base}?token={self.TOKEN}", headers={"Authorization": "Token nope"})
        # The subprotocol form still works (and is answered).
        client = yield connect_client(base, protocols=["token", self.TOKEN])
        self.addCleanup(self._close, client)
        self.assertEqual(client.websocket_protocol_in_use, "token")
        yield client.expect("Welcome")
        yield wait(0.05)
        leaked = [line for line in log if self.TOKEN[:-1] in line]
        self.assertEqual(leaked, [])
        # (The test's own client logs its side of each refusal; only the daemon's side counts.)
        server_side = [line for line in log if "WebSocketClientProtocol" not in line]
        refusals = [line for line in server_side if "client refused" in line or "handshake" in line
                    or "dropping connection" in line]
        # One line per refusal (four refused clients), nothing from Autobahn.
        self.assertEqual(len(refusals), 4, refusals)
        self.assertTrue(all(line.startswith("client refused (HTTP 401): a valid token is required")
                            for line in refusals), refusals)

    @defer.inlineCallbacks
    def test_query_token_turned_off(self) -> None:
        log = _capture_log(self)
        yield self.start(client_tokens=frozenset({self.TOKEN}), query_token=False)
        with self.assertRaises(ConnectionError):
            yield connect_client(f"{self.daemon.url}?token={self.TOKEN}")
        client = yield connect_client(self.daemon.url, headers={"Authorization": f"Bearer {self.TOKEN}"})
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client2 = yield connect_client(f"{self.daemon.url}?token={self.TOKEN}",
                                       protocols=["token", self.TOKEN])
        self.addCleanup(self._close, client2)
        yield client2.expect("Welcome")
        refusals = [line for line in log if "client refused" in line]
        self.assertEqual(len(refusals), 1)
        self.assertIn("tokens in the URL are not accepted", refusals[0])
        self.assertEqual([line for line in log if self.TOKEN in line], [])

    @defer.inlineCallbacks
    def test_query_token_ignored_without_client_auth(self) -> None:
        yield self.start()
        client = yield connect_client(f"{self.daemon.url}?token=anything")
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")


class AzureUpstreamTests(_DaemonTestCase):
    """Azure OpenAI's GA realtime shape, against the simulator speaking it (and refusing OpenAI's)."""

    KEY = "azure-key-0c5e2f7a91"

    @defer.inlineCallbacks
    def start_azure(self, **config: Any) -> Any:
        from openai_proxy.simulator import listen_simulator

        port, simulator = yield listen_simulator(
            reactor, api_key=self.KEY, azure=True, entra_token="entra-token-5b8d",
            azure_deployments=frozenset({"voice-prod"}))
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [p.dropConnection(abort=True) for p in list(simulator.sessions)])
        url = f"ws://127.0.0.1:{port.getHost().port}/openai/v1/realtime"
        config = {"api_key": self.KEY, "upstream_kind": "azure", "upstream_url": url,
                  "model": "voice-prod", "allowed_models": ("voice-prod",), **config}
        # The daemon's own rule builds the URL (?model=<deployment>).
        yield self.start(url_for=lambda model: self.daemon.config.upstream_url_for(model), **config)
        return simulator

    @defer.inlineCallbacks
    def text_turn(self) -> Any:
        client = yield self.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Hello there"})
        yield client.expect("AgentAudioDone", timeout=10)
        reply = yield client.wait_for("ConversationText", role="assistant")
        self.assertIn("Hello there", reply["content"])
        self.assertGreater(len(client.audio), 4800)

    @defer.inlineCallbacks
    def test_api_key_header_and_deployment(self) -> None:
        simulator = yield self.start_azure()
        yield self.text_turn()
        [(_, first)] = simulator.received[:1]
        self.assertEqual(first["type"], "session.update")

    @defer.inlineCallbacks
    def test_entra_token(self) -> None:
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("entra-token-5b8d\n")
        yield self.start_azure(api_key=None, azure_ad_token_file=token)
        yield self.text_turn()

    @defer.inlineCallbacks
    def expect_refusal(self, code: str) -> Any:
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        error = yield client.expect("Error", timeout=10)
        self.assertEqual(error["code"], code)
        self.assertNotIn(self.KEY, json.dumps(client.messages))
        yield client.closed

    @defer.inlineCallbacks
    def test_openai_shape_refused_by_azure(self) -> None:
        # An OpenAI-style bearer key is not an Azure credential.
        yield self.start_azure(upstream_kind="openai")
        yield self.expect_refusal(errors.UPSTREAM_AUTH_FAILED)

    @defer.inlineCallbacks
    def test_wrong_key(self) -> None:
        yield self.start_azure(api_key="not-the-key")
        yield self.expect_refusal(errors.UPSTREAM_AUTH_FAILED)

    @defer.inlineCallbacks
    def test_unknown_deployment(self) -> None:
        yield self.start_azure(model="voice-staging", allowed_models=("voice-staging",))
        yield self.expect_refusal(errors.UPSTREAM_UNAVAILABLE)


class UpstreamFailureTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_refused_key(self) -> None:
        yield self.start(simulator_options={})
        assert self.daemon.simulator is not None
        self.daemon.simulator.api_key = "sk-other"
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        client.send_json(default_settings())
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UPSTREAM_AUTH_FAILED)
        self.assertNotIn("sk-test-key", json.dumps(error))
        yield client.closed

    @defer.inlineCallbacks
    def test_unreachable(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{port}/v1/realtime?model={model}")
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        client.send_json(default_settings())
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UPSTREAM_UNAVAILABLE)
        yield client.closed

    @defer.inlineCallbacks
    def test_closed_mid_session(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        assert self.daemon.simulator is not None
        for protocol in list(self.daemon.simulator.sessions):
            protocol.sendClose(4000)  # an application code: not worth a reconnection (SPEC §8)
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UPSTREAM_CLOSED)
        yield client.closed

    @defer.inlineCallbacks
    def test_refusing_handshake_with_status(self) -> None:
        class Refuse(WebSocketServerProtocol):
            def onConnect(self, request: Any) -> None:
                raise ConnectionDeny(429, "slow down")

        factory = WebSocketServerFactory()
        factory.protocol = Refuse
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{number}/v1/realtime?model={model}")
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        client.send_json(default_settings())
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UPSTREAM_RATE_LIMITED)
        yield client.closed

    @defer.inlineCallbacks
    def test_client_disconnect_releases_upstream(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        assert self.daemon.simulator is not None
        self.assertEqual(len(self.daemon.simulator.sessions), 1)
        client.dropConnection(abort=True)
        yield wait(1.0)
        self.assertEqual(len(self.daemon.simulator.sessions), 0)
        assert self.daemon.registry is not None
        self.assertEqual(len(self.daemon.registry), 0)


class LimitTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_oversized_message_closes_1009(self) -> None:
        yield self.start(limits=Limits(max_message_bytes=4096, ping_interval=0))
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.sendMessage(b"\x00" * 10000, isBinary=True)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_session_limit(self) -> None:
        yield self.start(limits=Limits(max_sessions=1, ping_interval=0))
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        with self.assertRaises(ConnectionError):
            yield connect_client(self.daemon.url)

    @defer.inlineCallbacks
    def test_tcp_nodelay_on_both_legs(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        assert self.daemon.registry is not None
        [server_side] = list(self.daemon.registry._sessions)
        handle = server_side.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        upstream = server_side._upstream._protocol
        self.assertTrue(upstream.transport.getHandle().getsockopt(socket.IPPROTO_TCP,
                                                                  socket.TCP_NODELAY))
        del client


def _buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space, waiting for the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class BackpressureTests(_DaemonTestCase):
    timeout = 40

    @defer.inlineCallbacks
    def test_slow_client_pauses_the_upstream_instead_of_queueing(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        assert self.daemon.registry is not None
        [server_side] = list(self.daemon.registry._sessions)
        # Small kernel buffers on both ends so the daemon's own buffer is what fills up.
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_side.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.pauseProducing()
        client.send_json({"type": "InjectUserMessage", "content": "tell me a long story " * 5})
        upstream_transport = server_side._upstream._protocol.transport
        peak = 0
        paused_seen = False
        for _ in range(40):
            yield wait(0.05)
            peak = max(peak, _buffered(server_side.transport))
            paused_seen = paused_seen or upstream_transport not in reactor.getReaders()
        self.assertTrue(paused_seen, "the upstream leg was never paused")
        # One upstream delta can land after the pause; the daemon never holds much more than that.
        self.assertLess(peak, 512 * 1024)
        client.transport.resumeProducing()
        yield client.expect("AgentAudioDone", timeout=30)
        # Nothing was lost: the whole reply arrived once the client read again.
        assert self.daemon.simulator is not None
        [simulated] = self.daemon.simulator.sessions
        produced_ms = sum(item.audio_ms for item in simulated.session.conversation
                          if item.role == "assistant")
        self.assertGreater(produced_ms, 3_000)
        # audio_ms is rounded to whole milliseconds (48 bytes).
        self.assertLessEqual(abs(len(client.audio) - produced_ms * 48), 48)


class _ToolServer(Resource):
    """A function endpoint: /tools/weather answers, /tools/broken fails, /tools/slow never answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, dict[str, Any]]] = []
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        body = json.loads(request.content.read() or b"{}")
        self.requests.append((request.method, request.path, body))
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/tools/weather":
            return json.dumps({"city": body.get("city"), "temperature_c": 17}).encode()
        if request.path == b"/tools/broken":
            request.setResponseCode(500)
            return b"database exploded"
        self.pending.append(request)
        return NOT_DONE_YET


class ServerSideFunctionTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def start_with_tools(self, path: str) -> Any:
        self.tools = _ToolServer()
        port = reactor.listenTCP(0, Site(self.tools), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}/tools"

        def finish_pending() -> None:
            for request in self.tools.pending:
                if not request.finished and not request._disconnected:
                    request.finish()

        self.addCleanup(finish_pending)
        yield self.start(
            function_url_prefixes=(base,),
            limits=Limits(ping_interval=0, function_timeout=0.5),
        )
        settings = default_settings()
        settings["agent"]["think"]["functions"][0]["endpoint"] = {
            "url": f"{base}/{path}", "method": "POST", "headers": {"X-Api-Key": "tool-secret"}}
        return settings

    @defer.inlineCallbacks
    def test_daemon_runs_the_function_and_the_model_gets_the_answer(self) -> None:
        settings = yield self.start_with_tools("weather")
        client = yield self.configured_client(settings)
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        request = yield client.expect("FunctionCallRequest")
        self.assertFalse(request["functions"][0]["client_side"])
        response = yield client.expect("FunctionCallResponse")
        self.assertEqual(response["id"], request["functions"][0]["id"])
        self.assertEqual(json.loads(response["content"])["temperature_c"], 17)
        yield client.expect("AgentAudioDone", timeout=10)
        reply = yield client.wait_for("ConversationText", role="assistant")
        self.assertIn("17", reply["content"])
        [(method, path, body)] = self.tools.requests
        self.assertEqual((method, path), (b"POST", b"/tools/weather"))
        self.assertEqual(body, json.loads(request["functions"][0]["arguments"]))
        for message in client.messages:
            self.assertNotIn("tool-secret", json.dumps(message))

    @defer.inlineCallbacks
    def test_failures_become_results_the_model_can_read(self) -> None:
        for path, expected in [("broken", "http_status"), ("slow", "timeout")]:
            settings = yield self.start_with_tools(path)
            client = yield self.configured_client(settings)
            client.send_json({"type": "InjectUserMessage", "content": "weather in Oslo?"})
            response = yield client.expect("FunctionCallResponse", timeout=5)
            self.assertEqual(json.loads(response["content"])["error"], expected)
            yield client.expect("AgentAudioDone", timeout=10)
            yield self._close(client)
            yield self.daemon.stop()

    @defer.inlineCallbacks
    def test_url_outside_the_allow_list_is_refused_at_settings(self) -> None:
        settings = yield self.start_with_tools("weather")
        settings["agent"]["think"]["functions"][0]["endpoint"]["url"] = "http://127.0.0.2:9/tools/x"
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        client.send_json(settings)
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("endpoint.url", error["description"])
        self.assertEqual(self.tools.requests, [])


class DrainTests(HttpTests):
    @defer.inlineCallbacks
    def test_drain_refuses_new_sessions_then_closes_open_ones_with_1001(self) -> None:
        yield self.start(limits=Limits(ping_interval=0, shutdown_grace=0.5))
        client = yield self.configured_client()
        assert self.daemon.registry is not None
        drained = self.daemon.registry.stopService()
        code, _ = yield self.get("/readyz")
        self.assertEqual(code, 503)
        with self.assertRaises(ConnectionError):
            yield connect_client(self.daemon.url)
        error = yield client.expect("Error", timeout=5)
        self.assertEqual(error["code"], errors.SHUTTING_DOWN)
        _, close_code, _ = yield client.closed
        self.assertEqual(close_code, 1001)
        yield drained


class OutgoingSizeTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_message_limit_applies_to_clients_only(self) -> None:
        # Agent audio frames and session events are larger than this limit; the session must go on.
        yield self.start(limits=Limits(ping_interval=0, max_message_bytes=2048))
        client = yield self.configured_client()
        client.send_json({"type": "InjectUserMessage", "content": "Hello " * 40})
        yield client.expect("AgentAudioDone", timeout=10)
        self.assertTrue(any(isinstance(f, bytes) and len(f) > 2048 for f in client.frames))


class HeadTests(HttpTests):
    @defer.inlineCallbacks
    def test_head_answers_without_a_body(self) -> None:
        yield self.start()
        assert self.daemon.port is not None
        response = yield Agent(reactor).request(
            b"HEAD", f"http://127.0.0.1:{self.daemon.port.getHost().port}/readyz".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b""))


class InternalErrorTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_a_failing_handler_answers_an_error_and_the_session_goes_on(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        assert self.daemon.registry is not None
        [server_side] = list(self.daemon.registry._sessions)
        real = server_side.session.client_text
        calls = []

        def broken_once(text: str) -> Any:
            if not calls:
                calls.append(text)
                raise RuntimeError("simulated bug")
            return real(text)

        server_side.session.client_text = broken_once
        client.send_json({"type": "KeepAlive"})
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        client.send_json({"type": "InjectUserMessage", "content": "still alive?"})
        yield client.expect("AgentAudioDone", timeout=10)


class _HostileUpstream(WebSocketServerProtocol):
    """Answers a session.update with garbage of every kind, then a real session.updated."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        event = json.loads(payload)
        if event["type"] != "session.update":
            return
        self.sendMessage(b"\x00\x01binary", isBinary=True)
        for junk in [b"not json", b"[1, 2]", b'{"type": 5}', b'{"no": "type"}', b"[" * 100_000,
                     b'{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": NaN}',
                     b'{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1e999}',
                     b'{"type": "response.created", "response": {"id": 5}}',
                     b'{"type": "error", "error": {"code": 500, "message": {"a": 1}, "event_id": "x"}}',
                     b'{"type": "response.output_audio.delta", "delta": "!!!"}',
                     b'{"type": "response.created", "response": []}',
                     b'{"type": "error", "error": "flat"}',
                     b'{"type": "brand.new.event", "x": 1}']:
            self.sendMessage(junk, isBinary=False)
        self.sendMessage(json.dumps({"type": "session.updated", "event_id": "e",
                                     "session": event["session"]}).encode(), isBinary=False)


class HostileUpstreamTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_garbage_from_the_upstream_breaks_nothing(self) -> None:
        factory = WebSocketServerFactory()
        factory.protocol = _HostileUpstream
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{number}/v1/realtime?model={model}")
        client = yield self.configured_client()
        # Only Deepgram messages reached the client: nothing raw, no binary frame.
        self.assertEqual([f for f in client.frames if isinstance(f, bytes)], [])
        for message in client.messages:
            self.assertIn(message["type"], {"Welcome", "SettingsApplied", "Warning", "Error",
                                            "UserStartedSpeaking", "UtteranceEnd"})
            if message["type"] == "UtteranceEnd":
                self.assertEqual(message["last_word_end"], 0.0)
        client.send_json({"type": "KeepAlive"})
        yield wait(0.1)
        self.assertTrue(client.transport.connected)


class MetricsTests(HttpTests):
    @defer.inlineCallbacks
    def test_metrics_count_sessions_and_errors(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        client.send_json({"type": "Teleport"})
        yield client.expect("Error")
        code, body = yield self.get("/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        self.assertIn("openai_proxy_sessions_active 1\n", text)
        self.assertIn("openai_proxy_sessions_total 1\n", text)
        self.assertIn('openai_proxy_client_errors_total{type="Error",code="UNSUPPORTED_CLIENT_MESSAGE"} 1',
                      text)


class _DeafUpstream(WebSocketServerProtocol):
    """Opens, then never answers a close frame (a peer that vanishes mid-closing-handshake)."""

    opened: list[_DeafUpstream] = []
    close_frames = 0

    def onOpen(self) -> None:
        _DeafUpstream.opened.append(self)

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> None:
        _DeafUpstream.close_frames += 1
        return None


def _batched_timer_calls() -> list[Any]:
    """
    Reactor calls left for a closing handshake: Autobahn's batched timers (closing-handshake timeouts
    and the like) and the upstream link's own abort of an unanswered close.
    """
    return [c for c in reactor.getDelayedCalls()
            if getattr(c.func, "__name__", "") in ("_notify_bucket", "_abort")]


class CloseTimerTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_no_closing_handshake_timer_outlives_a_lost_connection(self) -> None:
        _DeafUpstream.opened = []
        _DeafUpstream.close_frames = 0
        factory = WebSocketServerFactory()
        factory.protocol = _DeafUpstream
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{number}/v1/realtime?model={model}")
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        for _ in range(100):
            if _DeafUpstream.opened:
                break
            yield wait(0.01)
        upstream = _DeafUpstream.opened[0]
        # The client leaves: the daemon starts the upstream's closing handshake, which is never answered.
        client.dropConnection(abort=True)
        for _ in range(100):
            if _DeafUpstream.close_frames:
                break
            yield wait(0.01)
        self.assertEqual(_DeafUpstream.close_frames, 1, "the closing handshake never started")
        self.assertNotEqual(_batched_timer_calls(), [], "nothing bounds the unanswered close")
        upstream.transport.abortConnection()
        for _ in range(100):
            if not upstream.transport.connected and not self.daemon.registry:
                break
            yield wait(0.01)
        yield wait(0.02)
        self.assertEqual(_batched_timer_calls(), [])


class StrictJsonTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def test_deeply_nested_client_json(self) -> None:
        yield self.start()
        assert self.daemon.factory is not None
        self.daemon.factory.debug = True  # the debug log peeks at every message's type too
        client = yield self.configured_client()
        client.sendMessage(b'{"type": "Settings", "agent": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UNPARSABLE_CLIENT_MESSAGE)
        client.send_json({"type": "InjectUserMessage", "content": "still there?"})
        yield client.expect("AgentAudioDone", timeout=10)

    @defer.inlineCallbacks
    def test_non_finite_numbers_in_settings(self) -> None:
        yield self.start()
        client = yield self.configured_client()
        for bad in (b"NaN", b"Infinity", b"1e999"):
            text = json.dumps(default_settings()).encode().replace(
                b'"required": ["city"]', b'"required": ["city"], "maximum": ' + bad)
            client.sendMessage(text)
            error = yield client.expect("Error")
            self.assertEqual(error["code"], errors.UNPARSABLE_CLIENT_MESSAGE)
        self.assertEqual([e for e in self.daemon.upstream_events() if "NaN" in json.dumps(e)], [])


class DemoPageTests(_DaemonTestCase):
    """``GET /demo``: the browser demo's files from package data, each with its content type."""

    @defer.inlineCallbacks
    def fetch(self, path: str, method: bytes = b"GET") -> Any:
        assert self.daemon.port is not None
        response = yield Agent(reactor).request(
            method, f"http://127.0.0.1:{self.daemon.port.getHost().port}{path}".encode())
        body = yield readBody(response)
        return response.code, response.headers, body

    @defer.inlineCallbacks
    def test_files_and_content_types(self) -> None:
        yield self.start(demo=True)
        for path, content_type, marker in [
            ("/demo", "text/html; charset=utf-8", b'<script src="/demo/demo.js">'),
            ("/demo/", "text/html; charset=utf-8", b'id="talk"'),
            ("/demo/demo.js", "text/javascript; charset=utf-8", b"/v1/agent/converse"),
            ("/demo/mic-worklet.js", "text/javascript; charset=utf-8", b"registerProcessor"),
            ("/demo/demo.css", "text/css; charset=utf-8", b"#talk"),
        ]:
            code, headers, body = yield self.fetch(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [content_type.encode()], path)
            self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
            self.assertIn(marker, body, path)
        code, headers, body = yield self.fetch("/demo/demo.js", b"HEAD")
        self.assertEqual((code, body), (200, b""))
        for path in ["/demo/__init__.py", "/demo/demo.js/x", "/demo/../web.py", "/demo/nope.js",
                     "/demo/index.html/"]:
            code, _, _ = yield self.fetch(path)
            self.assertEqual(code, 404, path)

    @defer.inlineCallbacks
    def test_off_unless_enabled(self) -> None:
        yield self.start()
        for path in ["/demo", "/demo/demo.js"]:
            code, _, _ = yield self.fetch(path)
            self.assertEqual(code, 404, path)
