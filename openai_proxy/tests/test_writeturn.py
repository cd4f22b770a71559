"""
Frames written in one reactor turn leave together at the start of the next
(:mod:`openai_proxy.writeturn`), over real loopback TCP: in order, in one ``send`` per connection,
never overtaken by Autobahn's own writes (close, ping), nothing lost when the socket takes only part,
nothing sent after an abort; and the daemon's sessions run on the TCP transport itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketServerFactory
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openai_proxy.relay import ClientProtocol
from openai_proxy.tests.helpers import DaemonTestCase, connect_client, default_settings
from openai_proxy.tests.test_frames import FastClient, FastServer
from openai_proxy.writeturn import WriteTurn, sends_directly, write_turn


class _Server(FastServer):
    def onOpen(self) -> None:
        super().onOpen()
        self.factory.opened.callback(self)


class _Client(FastClient):
    def __init__(self) -> None:
        super().__init__()
        #: Every frame in arrival order: ("message", payload), ("ping", payload), ("close", code).
        self.events: list[tuple[str, Any]] = []

    def onOpen(self) -> None:
        super().onOpen()
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        self.events.append(("message", payload))

    def onPing(self, payload: bytes) -> None:
        self.events.append(("ping", payload))
        super().onPing(payload)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        self.events.append(("close", code))
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class _Factories:
    def __init__(self) -> None:
        self.server = WebSocketServerFactory(reactor=reactor)
        self.server.protocol = _Server
        self.server.opened = defer.Deferred()
        self.client = WebSocketClientFactory("ws://127.0.0.1/", reactor=reactor)
        self.client.protocol = _Client
        self.client.opened = defer.Deferred()
        self.client.closed = defer.Deferred()


class LoopbackTests(TestCase):
    """A fast-path server and client over a real loopback TCP connection."""

    timeout = 30

    @defer.inlineCallbacks
    def connect(self) -> Any:
        factories = _Factories()
        port = reactor.listenTCP(0, factories.server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoint.connect(factories.client)
        server = yield factories.server.opened
        yield factories.client.opened

        def drop() -> None:
            for side in (server, client):
                if side.transport.connected:
                    side.dropConnection(abort=True)

        self.addCleanup(drop)
        return factories, server, client

    @defer.inlineCallbacks
    def until(self, predicate: Callable[[], bool], what: str) -> Any:
        for _ in range(2000):
            if predicate():
                return
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.005, d.callback, None)
            yield d
        self.fail(f"timed out waiting for {what}")

    @defer.inlineCallbacks
    def test_frames_of_one_turn_leave_in_one_send_in_order(self) -> Any:
        _, server, client = yield self.connect()
        transport = server.transport
        self.assertIsInstance(transport, tcp.Server)
        self.assertIs(server._turn, write_turn(reactor))
        sends: list[int] = []
        write_some = transport.writeSomeData

        def counted(data: Any) -> Any:
            sends.append(len(data))
            return write_some(data)

        transport.writeSomeData = counted
        messages = [b"one", b"\x00" * 300, json.dumps({"type": "x", "n": 3}).encode()]
        server.sendMessage(messages[0])
        server.sendMessage(messages[1], isBinary=True)
        server.sendMessage(messages[2])
        # Nothing has left yet, and nothing went through Twisted's buffer.
        self.assertEqual(sends, [])
        self.assertEqual(transport._tempDataLen, 0)
        self.assertEqual(server._turn.pending(transport), 3 + 2 + 4 + 300 + 2 + len(messages[2]))
        yield self.until(lambda: len(client.received) == 3, "three messages")
        self.assertEqual(client.received, [(messages[0], False), (messages[1], True), (messages[2], False)])
        self.assertEqual(len(sends), 1)
        self.assertEqual(server._turn.pending(transport), 0)

    @defer.inlineCallbacks
    def test_masked_frames_from_the_client_side_arrive_unchanged(self) -> Any:
        _, server, client = yield self.connect()
        self.assertIsNotNone(client._turn)
        payloads = [bytes(range(256)) * n for n in (0, 1, 4, 5, 300)]
        for payload in payloads:
            client.sendMessage(payload, isBinary=True)
        yield self.until(lambda: len(server.received) == len(payloads), "the client's messages")
        self.assertEqual(server.received, [(p, True) for p in payloads])

    @defer.inlineCallbacks
    def test_autobahns_own_frames_do_not_overtake_queued_ones(self) -> Any:
        # Siblings: a ping, then a close, each written by Autobahn in the same turn as queued frames.
        factories, server, client = yield self.connect()
        server.sendMessage(b"before the ping")
        server.sendPing(b"p")
        server.sendMessage(b"before the close")
        server.sendClose(1000, "done")
        code = yield factories.client.closed
        self.assertEqual(code, 1000)
        self.assertEqual(
            client.events,
            [("message", b"before the ping"), ("ping", b"p"), ("message", b"before the close"), ("close", 1000)],
        )

    @defer.inlineCallbacks
    def test_an_abort_sends_nothing_that_was_queued(self) -> Any:
        factories, server, client = yield self.connect()
        server.sendMessage(b"never")
        server.dropConnection(abort=True)
        self.assertEqual(server._turn.pending(server.transport), 0)
        yield self.until(lambda: not client.transport.connected, "the connection to go")
        self.assertEqual(client.received, [])

    @defer.inlineCallbacks
    def test_what_the_socket_does_not_take_waits_in_twisteds_buffer_in_order(self) -> Any:
        # A client that stops reading: the socket buffers fill, a send takes part of a turn's frames,
        # the rest goes to Twisted's buffer, and every later turn's frames queue behind it.
        factories, server, client = yield self.connect()
        client.transport.pauseProducing()
        transport = server.transport
        block = 64 * 1024
        sent = 0
        while not transport._tempDataLen and not transport.dataBuffer:
            for _ in range(4):
                server.sendMessage(struct.pack("!I", sent) + bytes(block), isBinary=True)
                sent += 1
            yield self.until(lambda: server._turn.pending(transport) == 0, "the turn")
            self.assertLess(sent, 2000, "the socket never filled")
        # More turns while Twisted holds data: they go behind it.
        for _ in range(3):
            server.sendMessage(struct.pack("!I", sent) + bytes(block), isBinary=True)
            sent += 1
            yield self.until(lambda: server._turn.pending(transport) == 0, "the turn")
        server.sendClose(1000)
        client.transport.resumeProducing()
        code = yield factories.client.closed
        self.assertEqual(code, 1000)
        numbers = [struct.unpack("!I", payload[:4])[0] for payload, _ in client.received]
        self.assertEqual(numbers, list(range(sent)))
        self.assertTrue(all(len(payload) == 4 + block for payload, _ in client.received))


class DirectTransportTests(SynchronousTestCase):
    def test_only_plain_tcp_transports_are_written_directly(self) -> None:
        self.assertFalse(sends_directly(StringTransport()))
        options = optionsForClientTLS("example.com")
        tls = TLSMemoryBIOFactory(options, True, protocol.Factory.forProtocol(protocol.Protocol))
        self.assertFalse(sends_directly(TLSMemoryBIOProtocol(tls, protocol.Protocol())))

    def test_a_turn_schedules_one_call_and_forgets_discarded_transports(self) -> None:
        clock = Clock()
        turn = WriteTurn(clock)
        first, second = object(), object()
        turn.write(first, b"a")
        turn.write(first, b"b")
        turn.write(second, b"c")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual((turn.pending(first), turn.pending(second)), (2, 1))
        turn.discard(first)
        self.assertEqual(turn.pending(first), 0)
        self.assertEqual(turn.pending(second), 1)


class DaemonTransportTests(DaemonTestCase):
    """A session of the daemon's site talks to the TCP transport itself once it has upgraded."""

    timeout = 30

    @defer.inlineCallbacks
    def test_a_session_runs_on_the_tcp_transport_and_is_not_pending(self) -> Any:
        daemon = yield self.start()
        client = yield connect_client(daemon.url)
        self.addCleanup(client.dropConnection, abort=True)
        client.sendMessage(json.dumps(default_settings()).encode())
        yield client.expect("SettingsApplied")
        (session,) = list(daemon.registry._sessions)
        self.assertIsInstance(session, ClientProtocol)
        self.assertIsInstance(session.transport, tcp.Server)
        self.assertIs(session.transport.protocol, session)
        self.assertIsNotNone(session._turn)
        self.assertEqual(daemon.port.factory.pending, 0)
