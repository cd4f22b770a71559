"""The ``reuseport:`` server endpoint: parsing, and two listeners on one port."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openai_proxy.endpoints import DEFAULT_BACKLOG, ReusePortEndpoint, ReusePortParser


class ParserTests(SynchronousTestCase):
    def parse(self, *args: str, **kwargs: str) -> ReusePortEndpoint:
        endpoint = ReusePortParser().parseStreamServer(reactor, *args, **kwargs)
        assert isinstance(endpoint, ReusePortEndpoint)
        return endpoint

    def test_arguments(self) -> None:
        endpoint = self.parse("8080")
        self.assertEqual((endpoint._port, endpoint._interface, endpoint._backlog), (8080, "", DEFAULT_BACKLOG))
        endpoint = self.parse("0", interface="127.0.0.1", backlog="512")
        self.assertEqual((endpoint._port, endpoint._interface, endpoint._backlog), (0, "127.0.0.1", 512))
        self.assertEqual(self.parse("8080", interface="::1")._interface, "::1")

    def test_bad_arguments(self) -> None:
        for args, kwargs in ((("x",), {}), ((), {}), (("1", "2"), {}), (("-1",), {}), (("65536",), {}),
                             (("80",), {"interface": "localhost"}), (("80",), {"interface": "1.2.3"}),
                             (("80",), {"backlog": "0"}), (("80",), {"backlog": "many"}),
                             (("80",), {"reuse": "yes"})):
            with self.assertRaises(ValueError, msg=f"{args} {kwargs}"):
                self.parse(*args, **kwargs)


class _Hello(Protocol):
    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)
        self.transport.loseConnection()


class _Read(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


class ListenTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_two_listeners_share_a_port(self) -> None:
        first = yield ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(
            Factory.forProtocol(lambda: _Hello(b"one")))
        self.addCleanup(first.stopListening)
        port = first.getHost().port
        second = yield ReusePortEndpoint(reactor, port, "127.0.0.1").listen(
            Factory.forProtocol(lambda: _Hello(b"two")))
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, port)
        seen = set()
        for _ in range(64):
            reader = _Read()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), reader)
            seen.add((yield reader.done))
            if seen == {b"one", b"two"}:
                break
        self.assertEqual(seen, {b"one", b"two"})

    @defer.inlineCallbacks
    def test_ipv6(self) -> None:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError:
            raise self.skipTest("no IPv6 loopback here") from None
        listening = yield ReusePortEndpoint(reactor, 0, "::1").listen(Factory.forProtocol(lambda: _Hello(b"6")))
        self.addCleanup(listening.stopListening)
        self.assertEqual(listening.getHost().host, "::1")

    @defer.inlineCallbacks
    def test_plain_socket_on_the_port(self) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        with self.assertRaises(CannotListenError) as e:
            yield ReusePortEndpoint(reactor, holder.getsockname()[1], "127.0.0.1").listen(
                Factory.forProtocol(Protocol))
        self.assertIn("Address already in use", str(e.exception))
