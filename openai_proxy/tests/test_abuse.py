"""
Hostile peers on loopback sockets: a client that sends and never reads, connections trickling their
HTTP request, and bad messages by the thousand.  Each test holds a figure: bytes the daemon accepts or
holds, the close code and the simulated seconds to the drop, the HTTP status, the number of log records.

The raw clients run their blocking socket calls in a thread (``deferToThread``), so the reactor serving
the daemon keeps running; the daemon's stall timer and request deadline run on a ``Clock`` the test
moves.
"""

from __future__ import annotations

import gc
import json
import select
import socket
import struct
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.config import Limits
from openai_proxy.relay import CLIENT_NOT_READING, CLOSE_TIMEOUT, ClientProtocol, _Flow
from openai_proxy.tests.helpers import DaemonTestCase, connect_client, default_settings, wait
from openai_proxy.tests.test_memory import _MemoryTestCase

KIB = 1024
MIB = 1024 * KIB


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One client WebSocket frame (FIN set), masked with the all-zero key, which RFC 6455 allows."""
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


def upgrade_request(port: int, path: str = "/v1/agent/converse") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode("ascii")


def raw_websocket(port: int, buffer_bytes: int = 4096) -> socket.socket:
    """
    (Blocking; run it in a thread.)  A socket with small kernel buffers that has completed the
    WebSocket opening handshake and will never read again.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {answer!r}")
        answer += chunk
    if not answer.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"not upgraded: {answer!r}")
    return sock


def flood(sock: socket.socket, frames: Iterator[bytes], limit: int, stuck_after: float = 2.0) -> tuple[int, bool]:
    """
    (Blocking; run it in a thread.)  Send ``frames`` until ``limit`` bytes went out, or until a send has
    made no progress for ``stuck_after`` seconds.  Returns the bytes sent and whether sending got stuck.
    """
    sock.settimeout(stuck_after)
    sent = 0
    try:
        while sent < limit:
            view = memoryview(next(frames))
            while view:
                n = sock.send(view)
                sent += n
                view = view[n:]
    except TimeoutError:
        return sent, True
    return sent, False


def _held_by_transport(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space, waiting for the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _LoopbackTestCase(DaemonTestCase):
    timeout = 60

    @defer.inlineCallbacks
    def until(self, predicate: Callable[[], bool], what: str, within: float = 15.0) -> Any:
        """Let the reactor run until ``predicate`` holds (checked every 10 ms), failing after ``within``."""
        for _ in range(int(within / 0.01)):
            if predicate():
                return
            yield wait(0.01)
        self.fail(f"{what} did not happen within {within} s; {reactor.getDelayedCalls()}")

    def timers_ended(self) -> bool:
        """No closing-handshake timer of a connection (Autobahn's, the upstream link's abort) is left."""
        return not [c for c in reactor.getDelayedCalls()
                    if "_notify_bucket" in repr(c) or "_abort" in repr(c)]

    def only_session(self) -> ClientProtocol:
        assert self.daemon.registry is not None
        [protocol] = list(self.daemon.registry._sessions)
        return protocol


class NonReadingClientTests(_LoopbackTestCase):
    STALL = 30.0

    @defer.inlineCallbacks
    def test_a_client_that_sends_and_never_reads_is_paused_then_dropped(self) -> None:
        clock = Clock()
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0,
                                       client_stall_timeout=self.STALL))
        assert self.daemon.factory is not None and self.daemon.registry is not None
        self.daemon.factory.clock = clock
        port = self.daemon.port.getHost().port  # type: ignore[union-attr]
        was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()  # what the daemon held must go without a full collection
        if was_enabled:
            self.addCleanup(gc.enable)

        sock = yield threads.deferToThread(raw_websocket, port)
        self.addCleanup(sock.close)
        yield self.until(lambda: len(self.daemon.registry) == 1, "the session opening")  # type: ignore[arg-type]
        protocol = self.only_session()
        handle = protocol.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        yield threads.deferToThread(sock.sendall, ws_frame(json.dumps(default_settings()).encode()))
        session = protocol.session
        assert session is not None
        yield self.until(lambda session=session: session.phase is s.Phase.READY,  # type: ignore[misc]
                         "the session being configured")

        # InjectUserMessage of 100 KB each, as fast as the socket takes them; the unread output is the
        # echo of each message and the agent's replies.
        inject = ws_frame(json.dumps({"type": "InjectUserMessage", "content": "x" * 100_000}).encode())

        def frames() -> Iterator[bytes]:
            while True:
                yield inject

        flow = protocol.flow
        assert flow is not None
        sent = 0
        for _ in range(5):  # a busy machine may stall a send without the daemon having paused
            taken, stuck = yield threads.deferToThread(flood, sock, frames(), 16 * MIB - sent)
            sent += taken
            if not stuck or flow.is_paused("client"):
                break
        self.assertTrue(stuck, f"the daemon kept reading: {sent} bytes taken")
        self.assertTrue(flow.is_paused("client"))
        self.assertTrue(flow.is_paused("upstream"))
        self.assertNotIn(protocol.transport, reactor.getReaders())
        # Figures: what the daemon took from the client, what it holds for it, what waits upstream.
        self.assertLess(sent, 8 * MIB)
        self.assertLess(_held_by_transport(protocol.transport), 4 * MIB)
        self.assertLessEqual(len(session._user_echo), s.MAX_WAITING_REQUESTS)
        self.assertLessEqual(len(session._scheduler.waiting), s.MAX_WAITING_REQUESTS)
        assert protocol._upstream is not None and protocol._upstream._protocol is not None
        self.assertLess(_held_by_transport(protocol._upstream._protocol.transport), 4 * MIB)

        # Another client is served meanwhile.
        other = yield connect_client(self.daemon.url)
        self.addCleanup(lambda: other.dropConnection(abort=True))
        other.send_json(default_settings())
        yield other.expect("SettingsApplied")
        other.send_json({"type": "InjectUserMessage", "content": "still there?"})
        yield other.expect("AgentAudioDone", timeout=20)

        # Dropped after client_stall_timeout of simulated time, not before.
        clock.advance(self.STALL - 0.5)
        self.assertEqual(protocol.state, protocol.STATE_OPEN)
        clock.advance(0.5)
        self.assertEqual(protocol.localCloseCode, 1008)
        self.assertEqual(protocol.localCloseReason, CLIENT_NOT_READING.encode())
        clock.advance(CLOSE_TIMEOUT)
        yield self.until(lambda: len(self.daemon.registry) == 1, "the session ending")  # type: ignore[arg-type]
        self.assertEqual([p for p in self.daemon.registry._sessions if p is protocol], [])

        # The session's memory goes with the reference counts alone.
        gone_protocol = weakref.ref(protocol)
        gone_session = weakref.ref(session)
        del protocol, session, flow, handle
        other.dropConnection(abort=True)
        yield self.until(lambda: len(self.daemon.registry) == 0, "the other session ending")  # type: ignore[arg-type]
        assert self.daemon.simulator is not None
        yield self.until(lambda: not self.daemon.simulator.sessions, "the upstream legs closing")  # type: ignore[union-attr]
        # (Timers of the closing handshakes hold them for at most CLOSE_TIMEOUT.)
        yield self.until(lambda: gone_session() is None and gone_protocol() is None,
                         "the session's memory being released", within=2 * CLOSE_TIMEOUT)
        # Autobahn's batched close-handshake timers end within their one-second buckets.
        yield self.until(self.timers_ended, "the timers ending", within=5.0)
        self.assertIsNone(gone_session(), "the session is still referenced")
        self.assertIsNone(gone_protocol(), "the protocol is still referenced")


class BadMessagesTests(_LoopbackTestCase):
    BAD = 2000

    @defer.inlineCallbacks
    def test_bad_messages_by_the_thousand_write_a_bounded_number_of_log_records(self) -> None:
        records: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "openai_proxy":
                records.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        yield self.start()
        client = yield connect_client(self.daemon.url)
        yield client.expect("Welcome")
        kinds = [b"{nope", b"[1]", b'{"type": 5}', b'{"type": "Teleport"}',
                 b'{"type": "UpdatePrompt", "prompt": "x"}', b'{"type": "InjectUserMessage", "content": 7}']
        for i in range(self.BAD):
            client.sendMessage(kinds[i % len(kinds)], isBinary=False)
        yield self.until(lambda: len(client.messages) >= self.BAD + 1, "every Error arriving")
        codes = {m["code"] for m in client.messages[1:]}
        self.assertEqual(codes, {errors.UNPARSABLE_CLIENT_MESSAGE, errors.UNSUPPORTED_CLIENT_MESSAGE,
                                 errors.SETTINGS_REQUIRED, errors.INVALID_CLIENT_MESSAGE})
        faults = [r for r in records if "error_code" in r]
        # Every bad message got its Error, but the log holds the first ten of this minute only.
        self.assertEqual(len(faults), 10)
        client.dropConnection(abort=True)
        yield self.until(lambda: len(self.daemon.registry) == 0, "the session ending")  # type: ignore[arg-type]
        [summary] = [r for r in records if "count" in r and "client fault records" in r["log_format"]]
        self.assertEqual(summary["count"], self.BAD - 10)
        self.assertEqual(summary["connection_id"], faults[0]["connection_id"])


class SecretsTests(_LoopbackTestCase):
    @defer.inlineCallbacks
    def test_upstream_error_text_quoting_secrets_reaches_the_client_masked(self) -> None:
        key = "sk-test-key"
        token = "client-token-3f9a7c"
        quoted = {
            "the key": f"Incorrect API key provided: {key}.",
            "a client token": f"token {token} is not valid here",
            "an Authorization value": "header Authorization: Basic dXNlcjpwYXNz was sent",
            "a bearer credential": "got Bearer abcdefgh12345678 from the proxy",
        }

        class Leaky(WebSocketServerProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                event = json.loads(payload)
                if event["type"] == "session.update":
                    self.sendMessage(json.dumps({"type": "session.updated", "event_id": "e1",
                                                 "session": event["session"]}).encode())
                elif event["type"] == "conversation.item.create":
                    for n, message in enumerate(quoted.values()):
                        self.sendMessage(json.dumps({
                            "type": "error", "event_id": f"err{n}",
                            "error": {"type": "invalid_request_error", "code": f"leak_{n}",
                                      "message": message},
                        }).encode())

        factory = WebSocketServerFactory()
        factory.protocol = Leaky
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{number}/v1/realtime?model={model}",
                         client_tokens=frozenset({token}))
        client = yield connect_client(self.daemon.url, headers={"Authorization": f"Token {token}"})
        self.addCleanup(lambda: client.dropConnection(abort=True))
        client.send_json(default_settings())
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": "hello"})
        yield self.until(lambda: len([m for m in client.messages if m["type"] == "Error"]) == len(quoted),
                         "the upstream's errors arriving")
        errors_seen = [m for m in client.messages if m["type"] == "Error"]
        text = json.dumps(errors_seen)
        for secret in (key, token, "dXNlcjpwYXNz", "abcdefgh12345678"):
            self.assertNotIn(secret, text)
        self.assertEqual(text.count("[REDACTED]"), len(quoted))
        # The rest of each message is intact, and the codes pass through.
        self.assertEqual([m["code"] for m in errors_seen], [f"leak_{n}" for n in range(len(quoted))])
        self.assertEqual(errors_seen[0]["description"], "Incorrect API key provided: [REDACTED].")


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _read_all(sock: socket.socket) -> bytes:
    """What a closed (or closing) connection received, up to its end; never blocks."""
    sock.setblocking(False)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (BlockingIOError, ConnectionResetError):
        pass
    return data


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the daemon closed or reset the connection (what arrived before is read and dropped)."""
    if not _readable(sock):
        return False
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


class TricklingRequestTests(_LoopbackTestCase):
    TIMEOUT = 10.0

    def site(self) -> Any:
        return self.daemon.port.factory  # type: ignore[union-attr]

    def trickler(self, port: int, first: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(sock.close)
        sock.sendall(first)
        return sock

    @defer.inlineCallbacks
    def test_a_request_trickled_a_byte_every_3_s_is_cut_at_the_total_deadline_with_408(self) -> None:
        clock = Clock()
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0))
        site = self.site()
        site.reactor = clock
        site.request_timeout = self.TIMEOUT
        port = self.daemon.port.getHost().port  # type: ignore[union-attr]
        # Siblings: an upgrade trickled, a GET trickled, a POST whose body trickles after its headers,
        # and a keep-alive connection trickling its second request.
        post_head = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        socks = [self.trickler(port, b"G") for _ in range(10)]
        socks.append(self.trickler(port, post_head))
        keep_alive = self.trickler(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        yield self.until(lambda: _readable(keep_alive), "the first answer on the keep-alive connection")
        self.assertTrue(keep_alive.recv(65536).startswith(b"HTTP/1.1 200"))
        socks.append(keep_alive)
        # A client that upgrades in time keeps its session past every deadline.
        session_sock = yield threads.deferToThread(raw_websocket, port)
        self.addCleanup(session_sock.close)
        yield self.until(lambda: site.pending == len(socks), "the connections being accepted")
        received = site.pending_received()
        for byte in [b"E", b"T", b" "]:
            clock.advance(3.0)  # t = 3, 6, 9: one byte each
            for sock in socks:
                sock.sendall(byte if sock is not socks[10] else b"x")
            received += len(socks)
            yield self.until(lambda r=received: site.pending_received() == r, "the bytes arriving")
        clock.advance(self.TIMEOUT - 9.0 - 0.01)
        self.assertEqual(site.pending, len(socks))
        self.assertFalse(any(_readable(sock) for sock in socks))
        clock.advance(0.01)  # t = 10 s since each request began, whatever arrived meanwhile
        self.assertEqual(site.pending, 0)
        self.assertEqual(site.request_timeouts, len(socks))
        for sock in socks:
            yield self.until(lambda sock=sock: _readable(sock), "the answer")
            answer = _read_all(sock)
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertEqual(len(self.daemon.registry), 1)  # type: ignore[arg-type]

    @defer.inlineCallbacks
    def test_connections_that_never_upgrade_cannot_starve_clients_or_healthz(self) -> None:
        limit = 20
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0,
                                       max_pending_connections=limit))
        site = self.site()
        port = self.daemon.port.getHost().port  # type: ignore[union-attr]
        socks: list[socket.socket] = []
        for _ in range(20):
            # In batches the listen backlog holds, each accepted before the next.
            socks += [self.trickler(port, b"GET /v1/agent/converse HTTP/1.1\r\nHo") for _ in range(10)]
            created = len(socks)
            yield self.until(lambda n=created: site.pending + site.pending_dropped == n, "the accepts")
        self.assertEqual(site.pending_dropped, 200 - limit)
        self.assertEqual(site.pending, limit)
        # /healthz answers and a client gets its session, while trickling connections keep coming.
        more = [self.trickler(port, b"GE") for _ in range(10)]
        agent = Agent(reactor)
        response = yield agent.request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"ok\n"))
        client = yield connect_client(self.daemon.url)
        self.addCleanup(lambda: client.dropConnection(abort=True))
        yield client.expect("Welcome")
        # Descriptors held by connections that are not sessions never exceed the limit.
        self.assertLessEqual(site.pending, limit)
        yield self.until(lambda: sum(_closed_by_peer(sock) for sock in socks + more) >= 200 - limit,
                         "the dropped connections seeing their end")


class FlowTests(TestCase):
    """The backpressure rules of one session, on Twisted's in-memory transports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.stalls: list[float] = []
        self.flow = _Flow(self.clock, 30.0, lambda leg: self.stalls.append((leg, self.clock.seconds())))
        self.client = StringTransport()
        self.upstream = StringTransport()
        self.flow.attach("client", self.client)
        self.flow.attach("upstream", self.upstream)

    def test_a_client_that_does_not_read_pauses_both_legs_then_is_dropped(self) -> None:
        self.client.producer.pauseProducing()  # the client's write buffer went over the high-water mark
        self.assertEqual((self.client.producerState, self.upstream.producerState), ("paused", "paused"))
        self.clock.advance(29.9)
        self.assertEqual(self.stalls, [])
        self.client.producer.resumeProducing()  # drained in time: both legs read again, no drop
        self.assertEqual((self.client.producerState, self.upstream.producerState),
                         ("producing", "producing"))
        self.clock.advance(60)
        self.assertEqual(self.stalls, [])
        self.client.producer.pauseProducing()  # at 89.9 s; the stall timer starts again from zero
        self.clock.advance(29.9)
        self.assertEqual(self.stalls, [])
        self.clock.advance(0.1)
        [(leg, when)] = self.stalls
        self.assertEqual(leg, "client")
        self.assertAlmostEqual(when, 119.9)

    def test_an_upstream_that_does_not_read_pauses_the_client_only(self) -> None:
        self.upstream.producer.pauseProducing()
        self.assertEqual((self.client.producerState, self.upstream.producerState), ("paused", "producing"))
        self.clock.advance(29.9)
        self.assertEqual(self.stalls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.stalls, [("upstream", 30.0)])
        # Both backed up: the client leg resumes only when neither asks for the pause.
        self.client.producer.pauseProducing()
        self.upstream.producer.resumeProducing()
        self.assertEqual((self.client.producerState, self.upstream.producerState), ("paused", "paused"))
        self.client.producer.resumeProducing()
        self.assertEqual((self.client.producerState, self.upstream.producerState),
                         ("producing", "producing"))

    def test_detach_stops_the_stall_timer_and_forgets_the_transports(self) -> None:
        self.client.producer.pauseProducing()
        self.flow.detach()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.stalls, [])


class _FakeRlimit:
    """A stand-in for the ``resource`` module's open-files limit."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if limits[0] > self.limits[1] and self.limits[1] != self.RLIM_INFINITY:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


class DescriptorTests(TestCase):
    def warnings(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(records.append)
        self.addCleanup(globalLogPublisher.removeObserver, records.append)
        return records

    def test_the_open_files_limit_is_raised_to_what_the_limits_need(self) -> None:
        from openai_proxy.config import Config
        from openai_proxy.tap import descriptors_needed, ensure_descriptors

        config = Config(api_key="k", limits=Limits(max_sessions=200, max_pending_connections=128))
        needed = descriptors_needed(config)
        self.assertEqual(needed, 2 * 200 + 128 + 64)
        records = self.warnings()
        enough = _FakeRlimit(4096, 4096)
        ensure_descriptors(config, enough)
        self.assertEqual(enough.limits, (4096, 4096))
        raised = _FakeRlimit(256, 65536)
        ensure_descriptors(config, raised)
        self.assertEqual(raised.limits, (needed, 65536))
        self.assertEqual([r for r in records if "open-files limit" in r.get("log_format", "")], [])
        short = _FakeRlimit(256, 300)
        ensure_descriptors(config, short)
        self.assertEqual(short.limits, (300, 300))
        [warning] = [r for r in records if "open-files limit" in r.get("log_format", "")]
        self.assertEqual((warning["limit"], warning["needed"]), (300, needed))


class ErrorCodeCounterTests(TestCase):
    def test_codes_from_a_peer_cannot_forge_or_grow_the_counters(self) -> None:
        from openai_proxy.metrics import KNOWN_CODES, OTHER
        from openai_proxy.relay import SessionRegistry

        registry = SessionRegistry(Clock(), 0)
        registry.count_client_message({"type": "Error", "code": 'x"} 1\nforged_metric 999\n#'})
        for n in range(20_000):
            registry.count_client_message({"type": "Error", "code": f"code_{n}"})
        registry.count_client_message({"type": "Warning", "code": 5})
        registry.count_client_message({"type": "Error", "code": "UNPARSABLE_CLIENT_MESSAGE"})
        self.assertEqual(
            dict(registry.client_errors),
            {("Error", OTHER): 20_001, ("Warning", OTHER): 1, ("Error", "UNPARSABLE_CLIENT_MESSAGE"): 1},
        )
        self.assertIn("UNPARSABLE_CLIENT_MESSAGE", KNOWN_CODES)
        text = registry.metrics.prometheus_text()
        self.assertNotIn("forged_metric", text)
        self.assertNotIn("code_1", text)


class OneReadFrameTests(_MemoryTestCase):
    def test_over_limit_frames_arriving_whole_in_one_read_close_1009(self) -> None:
        """
        In memory a frame arrives whole in one read, so it takes the per-message fast path; a frame over
        ``max_message_bytes`` must still be refused (close 1009), text and binary alike, and one at the
        limit accepted.
        """
        at_limit = json.dumps({"type": "KeepAlive", "pad": ""}).encode()
        at_limit = json.dumps({"type": "KeepAlive", "pad": "x" * (4096 - len(at_limit))}).encode()
        self.assertEqual(len(at_limit), 4096)
        for payload, opcode in ((b"\x00" * 5000, 2), (at_limit + b" ", 1)):
            daemon = self.start(limits=Limits(max_message_bytes=4096, ping_interval=0))
            client = daemon.configured_client()
            client.transport.write(ws_frame(at_limit, 1))
            daemon.flush()
            self.assertIsNone(client.close_code)
            client.transport.write(ws_frame(payload, opcode))
            daemon.flush()
            self.assertEqual(client.close_code, 1009)


class WaitingRequestsTests(_MemoryTestCase):
    """Requests a client adds while the upstream has not answered yet stay bounded (in memory)."""

    def test_injections_and_updates_the_upstream_has_not_confirmed_are_bounded(self) -> None:
        daemon = self.start()
        client = daemon.configured_client()
        daemon.upstream_transport().hold()  # the upstream's answers wait from here on
        for n in range(40):
            client.send_json({"type": "InjectUserMessage", "content": f"message {n} " + "x" * 10_000})
            client.send_json({"type": "UpdatePrompt", "prompt": f"rule {n}: " + "y" * 1_000})
        daemon.flush()
        session = daemon.client_session().session
        assert session is not None
        self.assertEqual(len(session._user_echo), s.MAX_WAITING_REQUESTS)
        self.assertEqual(len(session._in_flight_updates), s.MAX_WAITING_REQUESTS)
        refused = client.of_type("Error", code=errors.TOO_MANY_REQUESTS)
        self.assertEqual(len(refused), 2 * (40 - s.MAX_WAITING_REQUESTS))
        # Once the upstream answers, the session goes on.
        daemon.upstream_transport().release()
        daemon.run_until(client.has("AgentAudioDone"), "a reply")
        self.assertEqual(len(client.of_type("PromptUpdated")), s.MAX_WAITING_REQUESTS)


class _DeafUpstream(WebSocketServerProtocol):
    """Confirms the session, then never reads again (with a small receive buffer)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # type: ignore[union-attr]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        event = json.loads(payload)
        if event["type"] == "session.update":
            self.sendMessage(json.dumps({"type": "session.updated", "event_id": "e1",
                                         "session": event["session"]}).encode())
            self.transport.pauseProducing()  # type: ignore[union-attr]


class NonReadingUpstreamTests(_LoopbackTestCase):
    STALL = 30.0

    @defer.inlineCallbacks
    def test_an_upstream_that_stops_reading_pauses_the_client_then_ends_the_session(self) -> None:
        factory = WebSocketServerFactory()
        factory.protocol = _DeafUpstream
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        clock = Clock()
        yield self.start(url_for=lambda model: f"ws://127.0.0.1:{number}/v1/realtime?model={model}",
                         limits=Limits(handshake_timeout=5.0, ping_interval=0,
                                       client_stall_timeout=self.STALL))
        assert self.daemon.factory is not None
        self.daemon.factory.clock = clock
        client = yield connect_client(self.daemon.url)
        self.addCleanup(lambda: client.dropConnection(abort=True))
        client.send_json(default_settings())
        yield client.expect("SettingsApplied")
        protocol = self.only_session()
        assert protocol._upstream is not None and protocol._upstream._protocol is not None
        upstream_transport = protocol._upstream._protocol.transport
        upstream_transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        flow = protocol.flow
        assert flow is not None
        for n in range(8):
            client.send_json({"type": "InjectUserMessage", "content": f"{n} " + "x" * 200_000})
        yield self.until(lambda: flow.is_paused("client"), "the client's reading pausing")
        self.assertFalse(flow.is_paused("upstream"))
        self.assertLess(_held_by_transport(upstream_transport), 2 * MIB)
        clock.advance(self.STALL - 0.5)
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])
        clock.advance(0.5)
        error = yield client.expect("Error")
        self.assertEqual(error["code"], errors.UPSTREAM_TIMEOUT)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1011)
        yield self.until(self.timers_ended, "the timers ending", within=5.0)


class ScrubTests(TestCase):
    def test_configured_secrets_are_masked_literally_and_known_forms_by_pattern(self) -> None:
        from openai_proxy.config import Config
        from openai_proxy.relay import ClientFactory, SessionRegistry, UpstreamConnector

        config = Config(api_key="opaque-secret-value-1",
                        client_tokens=frozenset({"tok-abcdef", "tok-abcdef-longer", "ab"}))
        factory = ClientFactory(Clock(), config, SessionRegistry(Clock(), 0),  # type: ignore[arg-type]
                                UpstreamConnector(Clock(), config))
        self.assertEqual(
            factory.scrub("key opaque-secret-value-1, tokens tok-abcdef-longer tok-abcdef ab, "
                          "sk-proj-abcdefgh1234 and authorization: Basic Zm9vOmJhcg=="),
            "key [REDACTED], tokens [REDACTED] [REDACTED] ab, sk-[REDACTED] and authorization: [REDACTED]",
        )
        # Only the texts of a message are touched; a two-letter token is not masked literally.
        message = {"type": "Error", "code": "x_opaque-secret-value-1", "description": "ok", "n": 5}
        self.assertEqual(factory.scrub_message(message),
                         {"type": "Error", "code": "x_[REDACTED]", "description": "ok", "n": 5})
