"""The daemon's session on a C frame path: a measurement host for ``bench_load.py``, not a server.

It runs :class:`openai_proxy.session.Session`, the sans-IO core the daemon runs (Settings, audio
conversion, append batching, the response state machine, every message's translation), on asyncio
with ``uvloop`` (the event loop in C, on libuv) and ``picows`` (WebSocket framing, masking and
buffering in Cython) instead of Twisted and Autobahn.  It answers one question of
``docs/performance.md``: what the same translation costs when the per-message path around it is
compiled code.

Run it through the load benchmark, from an interpreter that has ``pip install '.[cpath]'``::

    python benchmarks/bench_load.py --proxy-cmd \\
        'cpath={python} {here}/cpath_session.py --port {port} --upstream-url {upstream_url}'

What it carries out of the session's outputs: client frames (text and binary), upstream events
(held until the upstream is open), upstream connections and their swap, timers, closes, and
server-side function calls (answered as disabled, as the daemon does without ``--function-url-prefix``).
What the daemon does beyond the session is left out: client tokens, origins, limits on sessions and
message sizes, backpressure, metrics, logging, TLS upstreams, draining.  Fragmented client messages
are refused with 1003.  So this is what a C frame path would cost the daemon, not a replacement for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvloop
from cpath_floor import serve
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_connect,
)

from openai_proxy import session as s
from openai_proxy.config import Config
from openai_proxy.relay import FUNCTIONS_DISABLED_RESULT, session_options
from openai_proxy.translate import messages as m


class UpstreamListener(WSListener):  # type: ignore[misc]
    """One upstream connection of a client: JSON events to the session, its end as an UpstreamClosure."""

    def __init__(self, client: ClientListener, generation: int) -> None:
        self.client = client
        self.generation = generation
        self.transport: WSTransport | None = None
        self.queue: list[bytes] = []
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.closed:
            transport.disconnect(False)
            return
        self.transport = transport
        self.client.report(lambda session: session.upstream_opened(self.generation), self)
        for data in self.queue:
            transport.send(WSMsgType.TEXT, data)
        self.queue.clear()

    def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        data = m.encode_event(event)
        if self.transport is None:
            self.queue.append(data)
        else:
            self.transport.send(WSMsgType.TEXT, data)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT and frame.fin:
            try:
                event = json.loads(frame.get_payload_as_bytes())
            except ValueError:
                return
            if isinstance(event, dict) and not self.closed:
                self.client.report(lambda session: session.upstream_event(event, self.generation), self)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        was_open, self.transport = self.transport is not None, None
        if self.closed:
            return
        self.closed = True
        info = transport.close_handshake
        code = int(info.recv.code) if info is not None and info.recv is not None else None
        closure = s.UpstreamClosure(was_open=was_open, close_code=code)
        self.client.report(lambda session: session.upstream_closed(closure, self.generation), self)

    def close(self) -> None:
        self.closed = True
        self.queue.clear()
        if self.transport is not None:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


class ClientListener(WSListener):  # type: ignore[misc]
    """One Deepgram v1 client and its session."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.session: s.Session | None = None
        self.transport: WSTransport | None = None
        self.links: dict[int, UpstreamListener] = {}
        self.current: int | None = None
        self.timers: dict[Any, asyncio.TimerHandle] = {}
        self.gone = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.session = s.Session(self.host.options, now=time.time)
        self.carry_out(self.session.start())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        session = self.session
        if session is None or self.gone:
            return
        kind = frame.msg_type
        if not frame.fin or kind == WSMsgType.CONTINUATION:
            self.close(1003, "fragmented messages are not handled by this host")
        elif kind == WSMsgType.BINARY:
            self.carry_out(session.client_binary(frame.get_payload_as_bytes()))
        elif kind == WSMsgType.TEXT:
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self.close(1007, "invalid UTF-8")
                return
            self.carry_out(session.client_text(text))
        elif kind == WSMsgType.CLOSE:
            self.gone = True
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True
        session, self.session = self.session, None
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if session is not None:
            session.client_closed()
        for link in self.links.values():
            link.close()
        self.links.clear()

    def report(self, step: Any, link: UpstreamListener) -> None:
        if self.session is not None and self.links.get(link.generation) is link:
            self.carry_out(step(self.session))

    def close(self, code: int, reason: str) -> None:
        self.gone = True
        if self.transport is not None and not self.transport.is_close_frame_sent:
            reason_bytes = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self.transport.send_close(code, reason_bytes)
            self.transport.disconnect()

    def carry_out(self, outputs: list[s.Output]) -> None:
        transport = self.transport
        assert transport is not None
        for output in outputs:
            if isinstance(output, s.SendClientAudio):
                if not self.gone:
                    transport.send(WSMsgType.BINARY, output.data)
            elif isinstance(output, s.SendUpstream):
                generation = self.current if output.generation is None else output.generation
                link = self.links.get(generation) if generation is not None else None
                if link is not None:
                    link.send(output.event)
            elif isinstance(output, s.SendClient):
                if not self.gone:
                    transport.send(WSMsgType.TEXT, json.dumps(output.message, allow_nan=False).encode())
            elif isinstance(output, s.ConnectUpstream):
                self.connect(output.model, output.generation)
            elif isinstance(output, s.SwapUpstream):
                old = self.links.pop(self.current) if self.current in self.links else None
                self.current = output.generation
                if old is not None:
                    old.close()
            elif isinstance(output, s.StartTimer):
                self.start_timer(output.name, output.seconds)
            elif isinstance(output, s.CancelTimer):
                timer = self.timers.pop(output.name, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(output, s.CallFunction):
                call_id = output.call_id
                asyncio.get_running_loop().call_soon(self.function_answered, call_id)
            elif isinstance(output, s.CloseClient):
                self.close(output.code, output.reason)
                for link in self.links.values():
                    link.close()
                self.links.clear()
            elif isinstance(output, s.CloseUpstream):
                for generation in list(self.links):
                    if output.generation is None or generation == output.generation:
                        self.links.pop(generation).close()
            # Count and Log outputs: the host keeps no metrics and writes no log.

    def connect(self, model: str, generation: int) -> None:
        link = UpstreamListener(self, generation)
        previous = self.links.get(generation)
        if previous is not None:
            previous.close()
        self.links[generation] = link
        if self.current is None:
            self.current = generation
        config = self.host.config
        task = asyncio.ensure_future(ws_connect(
            lambda: link, config.upstream_url_for(model), extra_headers=config.upstream_headers(),
            max_frame_size=16 * 1024 * 1024,
        ))

        def done(task: asyncio.Future[Any]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            if not link.closed:
                link.closed = True
                self.report(lambda session: session.upstream_unreachable(generation), link)

        task.add_done_callback(done)

    def start_timer(self, name: Any, seconds: float) -> None:
        previous = self.timers.pop(name, None)
        if previous is not None:
            previous.cancel()

        def fire() -> None:
            self.timers.pop(name, None)
            if self.session is not None:
                self.carry_out(self.session.timer_fired(name))

        self.timers[name] = asyncio.get_running_loop().call_later(seconds, fire)

    def function_answered(self, call_id: str) -> None:
        if self.session is not None and not self.gone:
            self.carry_out(self.session.function_result(call_id, FUNCTIONS_DISABLED_RESULT))


class Host:
    """What every session shares: the configuration and the session options built from it."""

    def __init__(self, upstream_url: str, api_key: str) -> None:
        self.config = Config(api_key=api_key, upstream_url=upstream_url)
        self.options = session_options(self.config)

    def listener(self, request: WSUpgradeRequest) -> ClientListener:
        return ClientListener(self)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-url", required=True)
    parser.add_argument("--api-key", default="sk-bench")
    args = parser.parse_args()
    uvloop.run(serve(Host(args.upstream_url, args.api_key).listener, args.port))


if __name__ == "__main__":
    main()
