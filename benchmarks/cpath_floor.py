"""The thinnest relay on a C frame path: ``floor_relay.py``'s forwarding on uvloop and picows.

``bench_load.py``'s floor is the thinnest Autobahn relay; this is the same forwarding (each client
connection gets its own upstream connection, every message forwarded as it is, messages that arrive
before the upstream is open wait in a list) with the event loop (uvloop) and the WebSocket framing
(picows) in compiled code.  It shows what the per-message path alone costs once it leaves Python::

    python benchmarks/bench_load.py --proxy-cmd \\
        'cfloor={python} {here}/cpath_floor.py --port {port} --upstream-url {upstream_url}'

from an interpreter that has ``pip install '.[cpath]'``.  Fragmented messages are not forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_connect, ws_create_server


class Upstream(WSListener):  # type: ignore[misc]
    def __init__(self, client: Client) -> None:
        self.client = client

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.client.upstream_open(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        client = self.client.transport
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY) and client is not None:
            client.send(frame.msg_type, frame.get_payload_as_memoryview())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.client.transport is not None:
            self.client.transport.send_close()
            self.client.transport.disconnect()


class Client(WSListener):  # type: ignore[misc]
    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.transport: WSTransport | None = None
        self.upstream: WSTransport | None = None
        self.waiting: list[tuple[WSMsgType, bytes]] = []
        self.task: asyncio.Future[object] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.task = asyncio.ensure_future(ws_connect(lambda: Upstream(self), self.upstream_url))

    def upstream_open(self, transport: WSTransport) -> None:
        self.upstream = transport
        for kind, payload in self.waiting:
            transport.send(kind, payload)
        self.waiting.clear()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in (WSMsgType.TEXT, WSMsgType.BINARY):
            if self.upstream is not None:
                self.upstream.send(kind, frame.get_payload_as_memoryview())
            else:
                self.waiting.append((kind, frame.get_payload_as_bytes()))
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.transport = None
        if self.upstream is not None:
            self.upstream.disconnect()
        elif self.task is not None:
            self.task.cancel()


async def serve(listener: Callable[[WSUpgradeRequest], WSListener], port: int) -> None:
    """Serve WebSocket clients on 127.0.0.1:``port``, one ``listener(request)`` each, until SIGINT or
    SIGTERM (``cpath_session.py`` serves through it too)."""
    server = await ws_create_server(listener, "127.0.0.1", port)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    await stop
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    args = parser.parse_args()
    uvloop.run(serve(lambda request: Client(args.upstream_url), args.port))


if __name__ == "__main__":
    main()
