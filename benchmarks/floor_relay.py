"""The thinnest Autobahn relay: the floor that ``bench_load.py`` compares a proxy against.

Run::

    python benchmarks/floor_relay.py --port 9000 --upstream-url ws://127.0.0.1:9001/v1/realtime

Every client connection gets its own upstream WebSocket connection; each message is forwarded as it
is (text as text, binary as binary) in both directions, with no parsing and no translation.
Messages that arrive before the upstream is open wait in a list.  Autobahn's default protocol
options are kept, except that Nagle's algorithm is off on both legs, as in any audio relay.
"""

from __future__ import annotations

import argparse
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

reactor: Any = _reactor


class Upstream(WebSocketClientProtocol):
    client: Client

    def onOpen(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.client.upstream_open(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client.upstream = None
        if self.client.state == self.client.STATE_OPEN:
            self.client.sendClose(1000)


class Client(WebSocketServerProtocol):
    upstream: Upstream | None = None

    def onOpen(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.waiting: list[tuple[bytes, bool]] | None = []
        factory = WebSocketClientFactory(self.factory.upstream_url)
        factory.protocol = Upstream
        host, port = self.factory.upstream_host, self.factory.upstream_port

        def connected(protocol: Upstream) -> None:
            protocol.client = self

        d = TCP4ClientEndpoint(reactor, host, port).connect(factory)
        d.addCallback(connected)
        d.addErrback(lambda f: self.dropConnection(abort=True))

    def upstream_open(self, upstream: Upstream) -> None:
        self.upstream = upstream
        waiting, self.waiting = self.waiting or [], None
        for payload, binary in waiting:
            upstream.sendMessage(payload, binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.upstream is not None:
            self.upstream.sendMessage(payload, isBinary)
        elif self.waiting is not None:
            self.waiting.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.upstream is not None:
            self.upstream.sendClose(1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    args = parser.parse_args()
    factory = WebSocketServerFactory()
    factory.protocol = Client
    factory.upstream_url = args.upstream_url
    hostport = args.upstream_url.split("//", 1)[1].split("/", 1)[0]
    factory.upstream_host, port = hostport.rsplit(":", 1)
    factory.upstream_port = int(port)
    TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1").listen(factory)
    reactor.run()


if __name__ == "__main__":
    main()
