"""Added latency, CPU and memory of a voice-agent proxy under load, side by side with a bare relay.

Run from the repository root after installing the package::

    python benchmarks/bench_load.py [--sessions 10,50,100,200] [--seconds 10]
    python benchmarks/bench_load.py --proxy-cmd 'node ts-proxy.js --port {port} --upstream {upstream_url}'
    python benchmarks/bench_load.py --sessions 50 --soak 600          # memory over ten minutes

What runs, all on loopback:

- The proxy under test, started from ``--proxy-cmd`` (a command template; ``{port}``, ``{upstream_port}``
  and ``{upstream_url}`` are filled in; ``{python}`` is this interpreter).  By default it is the installed
  daemon.  A fresh process for every session count.
- The floor: the same traffic through ``benchmarks/floor_relay.py``, the thinnest Autobahn relay,
  which forwards every message unchanged.  Every figure is also printed as a ratio to the floor measured
  at the same session count in the same run, so that figures from a loaded, shared machine stay
  comparable.
- This process: the load generator, both sides of every session.  The client side speaks Deepgram
  Voice Agent v1; the upstream side is a fake OpenAI Realtime (GA) server that answers ``session.update``
  with ``session.updated`` and plays a scripted conversation with GA events.  Both use a minimal
  WebSocket codec with pre-built frames (not Autobahn), so that the generator stays cheap next to what
  it measures.

Traffic per session: ``Settings`` with linear16 16 kHz in (``--input-rate``), linear16 24 kHz out and one client-side
function declared; then 20 ms binary frames of 16 kHz linear16 at real-time pace, up; and down, every
``--reply-every`` seconds (staggered across sessions), one spoken reply: ``speech_started``,
``speech_stopped``, ``committed``, the user item and its transcript, ``response.created``, then
``--reply-ms`` of 24 kHz pcm16 in ``response.output_audio.delta`` events paced at 20 per second (50 ms
each) with transcript deltas, and the closing ``*.done`` events.  The floor forwards the same messages
(binary audio up, JSON deltas down), so both carry the same audio.

Latency is matched by byte position, per audio sample: every sent byte range is stamped with its send
time, and when bytes covering a position come out of the other side (``input_audio_buffer.append`` up,
binary frames or deltas down), the delay of each covered sample is the arrival time minus the send time
of the same sample.  Percentiles are over samples, so a proxy that coalesces frames or resamples in
blocks shows the delay every part of its audio really gets.  ``lost`` is audio sent in the window that
never came out; ``late`` is the share of frames (client frames up, deltas down) more than half of whose
audio came out more than ``--late-ms`` after it was sent.

CPU is user + system time of the proxy's whole process tree (``/proc``) over the window, per
session-second (``sys``: the kernel's share of it); RSS is the tree's peak resident memory in the
window minus its RSS before the clients connected, per session.  ``gen`` is this process's CPU share,
to tell a saturated generator from a slow proxy.  With two or more cores the proxy is pinned to
core 0 and this process to core 1 (``--no-pin`` to leave placement to the kernel).

``--processes N`` starts N proxies sharing one port (``--listen reuseport:...``) when the daemon has
that endpoint, and otherwise says that it was not measured; ``--processes 1,2`` measures each count
in the same run (every count then listens with ``reuseport:``), and prints each process's share of a
core, which shows how evenly the kernel spread the sessions.  One process is pinned as above; with
several, the proxies and this process are all left to the kernel, so on a 2-core machine the
generator shares the cores with the proxies.

``--cpu-budget F`` gives every proxy process (the floor's too) a CPU budget of its own, ``F`` of one
core, through a Linux control group (``cpu.cfs_quota_us`` under cgroup v1, ``cpu.max`` under v2; needs
root; the period is 10 ms, so a process over its budget waits at most that long), and leaves every process
to the kernel.  With ``F`` small enough that the proxies and the generator all fit on the machine
(``--processes 1,2 --cpu-budget 0.4`` on 2 cores: 0.8 of a core for the proxies), it measures what N
processes carry against one, each with the same CPU, on a machine that cannot give each of them a whole
core of its own besides the generator's.

These are figures, not assertions.  Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

API_KEY = "sk-bench-not-a-real-key"
INPUT_RATE = 16000
OUTPUT_RATE = 24000
FRAME_MS = 20
DELTA_MS = 50
UP_BYTES_PER_MS = INPUT_RATE * 2 / 1000
PCM24_BYTES_PER_MS = 48.0
TICK = 0.005
CLIENT_ID = re.compile(rb"bench client (\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGESIZE") // 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HERE = os.path.dirname(os.path.abspath(__file__))


# -- a minimal WebSocket codec (RFC 6455), enough for a load generator ------------------------------


def ws_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """One final frame.  A client frame is masked with the all-zero key, so the payload is unchanged."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, mask_bit | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, n)
    if masked:
        header += b"\0\0\0\0"
    return header + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    if key == b"\0\0\0\0" or not payload:
        return payload
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


class WebSocketPeer(protocol.Protocol):
    """Frame parsing after an HTTP upgrade; subclasses do the handshake and handle messages."""

    masked_out = False

    def __init__(self) -> None:
        self._buffer = b""
        self._upgraded = False
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._upgraded:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            self._upgraded = True
            self.upgrade(head)
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            p = pos + 2
            if length == 126:
                if len(buf) - p < 2:
                    break
                length = int.from_bytes(buf[p : p + 2], "big")
                p += 2
            elif length == 127:
                if len(buf) - p < 8:
                    break
                length = int.from_bytes(buf[p : p + 8], "big")
                p += 8
            key = b""
            if b1 & 0x80:
                if len(buf) - p < 4:
                    break
                key = buf[p : p + 4]
                p += 4
            if len(buf) - p < length:
                break
            payload = buf[p : p + length]
            pos = p + length
            if key:
                payload = unmask(payload, key)
            opcode = b0 & 0x0F
            if opcode == 0:
                self._fragments.append(payload)
                if b0 & 0x80:
                    payload = b"".join(self._fragments)
                    self._fragments = []
                    self.message(self._fragment_opcode, payload)
            elif opcode in (1, 2):
                if b0 & 0x80:
                    self.message(opcode, payload)
                else:
                    self._fragment_opcode = opcode
                    self._fragments = [payload]
            elif opcode == 9:
                self.transport.write(ws_frame(10, payload, self.masked_out))
            elif opcode == 8:
                self.transport.write(ws_frame(8, payload[:2], self.masked_out))
                self.transport.loseConnection()
        self._buffer = buf[pos:]

    def upgrade(self, head: bytes) -> None:
        raise NotImplementedError

    def message(self, opcode: int, payload: bytes) -> None:
        raise NotImplementedError


# -- byte-position matching -----------------------------------------------------------------------


class Matcher:
    """Send times of audio positions (ms of audio) and the delay of each position when it comes out."""

    def __init__(self, stats: DirectionStats) -> None:
        self.stats = stats
        #: [send time, start, end, inside the window, ms of it that came out late]
        self.sent: deque[list[Any]] = deque()
        self.sent_end = 0.0
        self.received = 0.0
        self._late_seen = False

    def send(self, moment: float, ms: float, counted: bool) -> None:
        self.sent.append([moment, self.sent_end, self.sent_end + ms, counted, 0.0])
        self.sent_end += ms

    def arrive(self, moment: float, ms: float) -> None:
        q0 = self.received
        q1 = q0 + ms
        self.received = q1
        stats = self.stats
        sent = self.sent
        while sent:
            head = sent[0]
            sent_at, p0, p1, counted, _ = head
            if p0 >= q1:
                break
            overlap = min(p1, q1) - max(p0, q0)
            delay = moment - sent_at
            if counted and overlap > 0:
                stats.delays.append(delay)
                stats.weights.append(overlap)
                if delay > stats.late_s:
                    head[4] += overlap
            if p1 <= q1 + 1e-9:
                sent.popleft()
                if counted:
                    stats.frames += 1
                    # Late: most of the frame's audio came out after the limit.
                    if head[4] > (p1 - p0) / 2:
                        stats.late += 1
            else:
                break

    def lost_ms(self) -> float:
        """Audio sent inside the window that never came out."""
        lost = 0.0
        for _, p0, p1, counted, _ in self.sent:
            if counted:
                lost += p1 - max(p0, self.received)
        return lost


@dataclass
class DirectionStats:
    late_s: float
    delays: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    frames: int = 0
    late: int = 0

    def percentiles(self) -> tuple[float, float, float]:
        if not self.delays:
            return float("nan"), float("nan"), float("nan")
        d = np.asarray(self.delays) * 1000
        w = np.asarray(self.weights)
        order = np.argsort(d)
        d, w = d[order], np.cumsum(w[order])
        total = w[-1]

        def q(fraction: float) -> float:
            return float(d[min(len(d) - 1, int(np.searchsorted(w, fraction * total)))])

        return q(0.5), q(0.99), float(d[-1])


# -- the two sides of a session -------------------------------------------------------------------


class Session:
    """One conversation: its client connection, its upstream connection and what they measured."""

    def __init__(self, run: Run, index: int) -> None:
        self.run = run
        self.index = index
        self.client: BenchClient | None = None
        self.upstream: FakeUpstream | None = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.up = Matcher(run.up)
        self.down = Matcher(run.down)
        self.frames_sent = 0
        self.stream_start = 0.0
        self.next_reply = 0.0
        self.reply: list[tuple[float, bytes, float]] = []
        self.replies = 0
        self.appends = 0


class BenchClient(WebSocketPeer):
    """The Deepgram v1 side of one session."""

    masked_out = True

    def __init__(self, session: Session, port: int) -> None:
        super().__init__()
        self.session = session
        self.port = port
        self.configured = False
        self.settings_sent = False

    def connectionMade(self) -> None:
        super().connectionMade()
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET /v1/agent/converse HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.port, key)
        )

    def upgrade(self, head: bytes) -> None:
        if not head.startswith(b"HTTP/1.1 101"):
            self.session.run.errors.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            self.transport.loseConnection()

    def message(self, opcode: int, payload: bytes) -> None:
        session = self.session
        if opcode == 2:
            session.down.arrive(time.monotonic(), len(payload) / PCM24_BYTES_PER_MS)
            return
        if self.configured:
            if payload.startswith(b'{"type":"response.output_audio.delta"'):
                # The floor forwards the upstream's deltas as they are.
                start = payload.find(b'"delta":"') + 9
                end = payload.find(b'"', start)
                size = (end - start) * 3 // 4 - payload[end - 2 : end].count(b"=")
                session.down.arrive(time.monotonic(), size / PCM24_BYTES_PER_MS)
            elif b'"Error"' in payload[:40] or b'"error"' in payload[:40]:
                session.run.errors.append(payload[:200].decode("utf-8", "replace"))
            return
        if not self.settings_sent and (b'"Welcome"' in payload or b'"session.created"' in payload):
            self.settings_sent = True
            self.transport.write(ws_frame(1, session.run.settings_frame(session.index), True))
        elif b'"SettingsApplied"' in payload or b'"session.updated"' in payload:
            self.configured = True
            if not session.ready.called:
                session.ready.callback(None)
        elif b'"Error"' in payload:
            session.run.errors.append(payload[:200].decode("utf-8", "replace"))


class FakeUpstream(WebSocketPeer):
    """The OpenAI Realtime (GA) side: one connection from the proxy."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run
        self.session: Session | None = None
        self.seq = 0

    def upgrade(self, head: bytes) -> None:
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept
        )
        self.send_event(
            {
                "type": "session.created",
                "event_id": self.event_id(),
                "session": {"type": "realtime", "object": "realtime.session", "id": "sess_bench",
                            "model": "gpt-realtime", "output_modalities": ["audio"]},
            }
        )

    def event_id(self) -> str:
        self.seq += 1
        return f"event_bench{self.seq}"

    def send_event(self, event: dict[str, Any]) -> None:
        self.transport.write(ws_frame(1, json.dumps(event, separators=(",", ":")).encode(), False))

    def message(self, opcode: int, payload: bytes) -> None:
        session = self.session
        if opcode == 2:
            if session is not None:
                session.up.arrive(time.monotonic(), len(payload) / UP_BYTES_PER_MS)
            return
        if payload.startswith(b'{"type":"input_audio_buffer.append"'):
            moment = time.monotonic()
            start = payload.find(b'"audio":"') + 9
            end = payload.find(b'"', start)
            size = (end - start) * 3 // 4 - payload[end - 2 : end].count(b"=")
            if session is not None:
                if self.run.window[0] <= moment < self.run.window[1]:
                    session.appends += 1
                session.up.arrive(moment, size / PCM24_BYTES_PER_MS)
            return
        if session is None:
            match = CLIENT_ID.search(payload)
            if match is not None:
                session = self.session = self.run.sessions[int(match.group(1))]
                session.upstream = self
        try:
            event = json.loads(payload)
        except ValueError:
            return
        kind = event.get("type")
        if kind in ("session.update", "Settings"):
            echoed = event.get("session") if kind == "session.update" else {}
            self.send_event(
                {"type": "session.updated", "event_id": self.event_id(), "session": echoed or {}}
            )

    def reply_events(self, session: Session, start: float) -> list[tuple[float, bytes, float]]:
        """The scripted turn: (when, frame, ms of audio it carries)."""
        run = self.run
        n = session.replies
        user_item, item, response = f"item_u{n}", f"item_a{n}", f"resp_{session.index}_{n}"
        out: list[tuple[float, bytes, float]] = []

        def add(moment: float, event: dict[str, Any]) -> None:
            event.setdefault("event_id", f"event_b{session.index}_{n}_{len(out)}")
            out.append((moment, ws_frame(1, json.dumps(event, separators=(",", ":")).encode(), False), 0.0))

        add(start, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": user_item})
        t = start + 0.6
        add(t, {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 600, "item_id": user_item})
        add(t, {"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": user_item})
        add(t, {"type": "conversation.item.added", "previous_item_id": None,
                "item": {"id": user_item, "type": "message", "status": "completed", "role": "user",
                         "content": [{"type": "input_audio", "transcript": None}]}})
        add(t, {"type": "conversation.item.input_audio_transcription.completed", "item_id": user_item,
                "content_index": 0, "transcript": "what time is it"})
        add(t, {"type": "response.created",
                "response": {"object": "realtime.response", "id": response, "status": "in_progress",
                             "output": [], "output_modalities": ["audio"]}})
        add(t, {"type": "response.output_item.added", "response_id": response, "output_index": 0,
                "item": {"id": item, "type": "message", "status": "in_progress", "role": "assistant",
                         "content": []}})
        add(t, {"type": "response.content_part.added", "response_id": response, "item_id": item,
                "output_index": 0, "content_index": 0, "part": {"type": "audio", "transcript": ""}})
        head = (b'{"type":"response.output_audio.delta","event_id":"event_d%d_%d_%%d","response_id":"%s",'
                b'"item_id":"%s","output_index":0,"content_index":0,"delta":"'
                % (session.index, n, response.encode(), item.encode()))
        for k in range(run.reply_ms // DELTA_MS):
            moment = t + k * DELTA_MS / 1000
            frame = ws_frame(1, (head % k) + run.delta_b64 + b'"}', False)
            out.append((moment, frame, DELTA_MS))
            if k % 4 == 0:
                add(moment, {"type": "response.output_audio_transcript.delta", "response_id": response,
                             "item_id": item, "output_index": 0, "content_index": 0, "delta": "It is "})
        t += run.reply_ms / 1000
        add(t, {"type": "response.output_audio.done", "response_id": response, "item_id": item,
                "output_index": 0, "content_index": 0})
        add(t, {"type": "response.output_audio_transcript.done", "response_id": response, "item_id": item,
                "output_index": 0, "content_index": 0, "transcript": "It is noon."})
        done_item = {"id": item, "type": "message", "status": "completed", "role": "assistant",
                     "content": [{"type": "output_audio", "transcript": "It is noon."}]}
        add(t, {"type": "response.output_item.done", "response_id": response, "output_index": 0,
                "item": done_item})
        add(t, {"type": "response.done",
                "response": {"object": "realtime.response", "id": response, "status": "completed",
                             "output": [done_item], "output_modalities": ["audio"]}})
        return out


class UpstreamFactory(protocol.Factory):
    def __init__(self, run: Run) -> None:
        self.run = run

    def buildProtocol(self, addr: Any) -> FakeUpstream:
        return FakeUpstream(self.run)


# -- one measurement ------------------------------------------------------------------------------


class Run:
    """N sessions through one proxy process (or a group of them)."""

    def __init__(self, args: argparse.Namespace, count: int) -> None:
        self.count = count
        self.reply_ms = args.reply_ms
        self.reply_every = args.reply_every
        self.up = DirectionStats(args.late_ms / 1000)
        self.down = DirectionStats(args.late_ms / 1000)
        self.sessions = [Session(self, i) for i in range(count)]
        self.errors: list[str] = []
        self.window = (float("inf"), float("inf"))
        tone = np.sin(2 * np.pi * 220 * np.arange(24 * DELTA_MS) / 24000) * 8000
        self.delta_b64 = base64.b64encode(tone.astype("<i2").tobytes())
        up = (np.sin(2 * np.pi * 440 * np.arange(INPUT_RATE * FRAME_MS // 1000) / INPUT_RATE) * 6000)
        self.up_frame = ws_frame(2, up.astype("<i2").tobytes(), True)
        self.up_frame_ms = float(FRAME_MS)

    def settings_frame(self, index: int) -> bytes:
        settings = {
            "type": "Settings",
            "audio": {
                "input": {"encoding": "linear16", "sample_rate": INPUT_RATE},
                "output": {"encoding": "linear16", "sample_rate": OUTPUT_RATE, "container": "none"},
            },
            "agent": {
                "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
                "think": {
                    "provider": {"type": "open_ai", "model": "gpt-realtime"},
                    "prompt": f"You are bench client {index}.",
                    "functions": [
                        {
                            "name": "get_time",
                            "description": "The current time in a time zone.",
                            "parameters": {
                                "type": "object",
                                "properties": {"zone": {"type": "string"}},
                                "required": ["zone"],
                            },
                        }
                    ],
                },
                "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}},
            },
        }
        return json.dumps(settings).encode()

    def tick(self) -> None:
        now = time.monotonic()
        start, end = self.window
        frame, frame_ms = self.up_frame, self.up_frame_ms
        for session in self.sessions:
            client = session.client
            if client is None or not client.configured or session.stream_start == 0.0:
                continue
            due = int((min(now, end) - session.stream_start) / (FRAME_MS / 1000)) + 1
            if due > session.frames_sent:
                moment = time.monotonic()
                counted = start <= moment <= end
                writes = due - session.frames_sent
                for _ in range(writes):
                    session.up.send(moment, frame_ms, counted)
                client.transport.write(frame * writes)
                session.frames_sent = due
            upstream = session.upstream
            if upstream is None:
                continue
            if not session.reply and now >= session.next_reply and now < end:
                session.reply = upstream.reply_events(session, session.next_reply)
                session.replies += 1
                session.next_reply += self.reply_every
            sent = 0
            for moment, data, ms in session.reply:
                if moment > now:
                    break
                sent += 1
                if ms:
                    at = time.monotonic()
                    session.down.send(at, ms, start <= at <= end)
                upstream.transport.write(data)
            if sent:
                del session.reply[:sent]


# -- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(roots: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of the process trees under ``roots``."""
    user = system = 0
    for root in roots:
        for pid in process_tree(root):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            user += int(fields[11])
            system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def tree_rss_kib(roots: list[int]) -> float:
    total = 0
    for root in roots:
        for pid in process_tree(root):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * PAGE_KIB
            except OSError:
                continue
    return float(total)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, max(0.0, seconds), lambda: None)


#: The scheduling period of a CPU budget (µs): a process that spent its budget waits at most this long.
BUDGET_PERIOD_US = 10_000


class CpuBudget:
    """
    A Linux control group that holds a process (and its children) to ``share`` of one core (0 < share).
    cgroup v1 (``/sys/fs/cgroup/cpu``) or v2 (``/sys/fs/cgroup`` with the ``cpu`` controller); raises
    ``OSError`` where neither can be written (not root, no cpu controller).
    """

    def __init__(self, share: float, name: str) -> None:
        quota = max(1000, int(share * BUDGET_PERIOD_US))
        v1 = "/sys/fs/cgroup/cpu"
        if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
            self.path = os.path.join(v1, name)
            os.mkdir(self.path)
            self._write("cpu.cfs_period_us", str(BUDGET_PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota))
        else:
            self.path = os.path.join("/sys/fs/cgroup", name)
            os.mkdir(self.path)
            self._write("cpu.max", f"{quota} {BUDGET_PERIOD_US}")

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def enter(self) -> None:
        """Move the calling process into the group (from a child before it runs the proxy)."""
        self._write("cgroup.procs", str(os.getpid()))

    def throttled_ms(self) -> float:
        """Time the group's processes waited for budget so far (ms)."""
        with open(os.path.join(self.path, "cpu.stat")) as f:
            stats = dict(line.split() for line in f if line.strip())
        if "throttled_time" in stats:  # v1, ns
            return int(stats["throttled_time"]) / 1e6
        return int(stats.get("throttled_usec", 0)) / 1e3

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


class Proxy:
    """A proxy started from a command template, on core 0 when pinning."""

    def __init__(self, template: str, processes: int, pin: bool, workdir: str, name: str,
                 budget: float = 0.0) -> None:
        self.template = template
        self.processes = processes
        self.pin = pin
        self.workdir = workdir
        self.name = name
        self.children: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.budget = budget
        self.budgets: list[CpuBudget] = []

    def start(self, upstream_port: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OTEL_", "LOG_"))}
        env.update(OPENAI_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
        values = {
            "port": self.port,
            "upstream_port": upstream_port,
            "upstream_url": f"ws://127.0.0.1:{upstream_port}/v1/realtime",
            "python": sys.executable,
            "here": HERE,
            "twistd": twistd(),
        }
        argv = shlex.split(self.template.format(**values))
        # Several processes are meant to use several cores: they are left to the kernel.
        pin = self.pin and self.processes == 1

        for n in range(self.processes):
            budget = None
            if self.budget:
                budget = CpuBudget(self.budget, f"bench-load-{os.getpid()}-{self.name}-{n}")
                self.budgets.append(budget)

            def placement(budget: CpuBudget | None = budget) -> None:
                if pin:
                    os.sched_setaffinity(0, {0})
                if budget is not None:
                    budget.enter()

            log = open(os.path.join(self.workdir, f"{self.name}-{n}.log"), "ab")
            self.children.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.workdir, env=env, preexec_fn=placement)
            )
            log.close()

    def throttled_ms(self) -> float:
        """Time the proxy's processes waited for their CPU budget so far (ms; 0 without budgets)."""
        return sum(budget.throttled_ms() for budget in self.budgets)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    @defer.inlineCallbacks
    def wait_ready(self, reactor: Any) -> Any:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for child in self.children:
                if child.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({child.returncode}); see {self.workdir}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                yield wait(reactor, 0.3)
                return
            except OSError:
                yield wait(reactor, 0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port}")

    @defer.inlineCallbacks
    def stop(self, reactor: Any) -> Any:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(c.poll() is None for c in self.children) and time.monotonic() < deadline:
            yield wait(reactor, 0.1)
        for child in self.children:
            if child.poll() is None:
                child.kill()
                child.wait(5)
        for budget in self.budgets:
            budget.remove()
        self.budgets = []


def twistd() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    return path if os.path.exists(path) else f"{sys.executable} -m twisted"


DEFAULT_PROXY = (
    "{twistd} -n --pidfile= openai-proxy --listen tcp:{port}:interface=127.0.0.1 "
    "--upstream-url {upstream_url} --shutdown-grace 1 --max-sessions 2000"
)
DEFAULT_FLOOR = "{python} {here}/floor_relay.py --port {port} --upstream-url {upstream_url}"


@defer.inlineCallbacks
def measure(reactor: Any, args: argparse.Namespace, template: str, name: str, count: int,
            processes: int, workdir: str, seconds: float) -> Any:
    run = Run(args, count)
    upstream_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        UpstreamFactory(run)
    )
    proxy = Proxy(template, processes, args.pin, workdir, name, args.cpu_budget)
    if args.pin:
        # One proxy: it has core 0, the generator core 1.  Several: the kernel places them all.
        os.sched_setaffinity(0, {1} if processes == 1 else set(range(os.cpu_count() or 1)))
    pacer = task.LoopingCall(run.tick)
    pacer.clock = reactor
    try:
        proxy.start(upstream_port.getHost().port)
        yield proxy.wait_ready(reactor)
        rss_before = tree_rss_kib(proxy.pids)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port, timeout=10)
        for session in run.sessions:
            client = BenchClient(session, proxy.port)
            session.client = client
            yield endpoint.connect(protocol.Factory.forProtocol(lambda c=client: c))
        ready = defer.DeferredList([s.ready for s in run.sessions], consumeErrors=True)
        timeout = reactor.callLater(30, lambda: ready.cancel() if not ready.called else None)
        yield ready
        if timeout.active():
            timeout.cancel()
        configured = sum(1 for s in run.sessions if s.client is not None and s.client.configured)
        if configured < count:
            print(f"        {name}: {count - configured} of {count} sessions were not configured in 30 s")
        start = time.monotonic() + 0.2
        for session in run.sessions:
            session.stream_start = start + FRAME_MS / 1000 * session.index / count
            session.next_reply = start + 0.5 + run.reply_every * session.index / count
        window_start = start + args.warmup
        run.window = (window_start, window_start + seconds)
        pacer.start(TICK, now=False)
        yield wait(reactor, window_start - time.monotonic())
        cpu0, own0 = tree_cpu_seconds(proxy.pids), own_cpu_seconds()
        throttled0 = proxy.throttled_ms()
        each0 = [sum(tree_cpu_seconds([pid])) for pid in proxy.pids]
        rss_peak = rss_before
        samples: list[tuple[float, float]] = []
        while time.monotonic() < run.window[1]:
            yield wait(reactor, min(args.sample_every, run.window[1] - time.monotonic()))
            rss = tree_rss_kib(proxy.pids)
            rss_peak = max(rss_peak, rss)
            samples.append((time.monotonic() - window_start, rss))
        cpu1 = tree_cpu_seconds(proxy.pids)
        each = [sum(tree_cpu_seconds([pid])) - c for pid, c in zip(proxy.pids, each0, strict=True)]
        cpu = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
        cpu_system = cpu1[1] - cpu0[1]
        own = own_cpu_seconds() - own0
        throttled = proxy.throttled_ms() - throttled0
        # Let the audio of the window come out, then count what did not.
        yield wait(reactor, args.drain)
        pacer.stop()
        lost_up = sum(s.up.lost_ms() for s in run.sessions)
        lost_down = sum(s.down.lost_ms() for s in run.sessions)
        for session in run.sessions:
            if session.client is not None and session.client.transport is not None:
                session.client.transport.loseConnection()
        yield wait(reactor, 0.3)
    finally:
        if pacer.running:
            pacer.stop()
        yield proxy.stop(reactor)
        yield upstream_port.stopListening()
    up50, up99, upmax = run.up.percentiles()
    dn50, dn99, dnmax = run.down.percentiles()
    return {
        "name": name,
        "sessions": count,
        "configured": configured,
        "cpu": cpu * 1000 / (count * seconds),
        "sys": cpu_system / cpu * 100 if cpu > 0 else 0.0,
        "processes": processes,
        "per_process": [c / seconds * 100 for c in each],
        "throttled": throttled / seconds / 10,  # % of the window, summed over the processes
        "rss": (rss_peak - rss_before) / count,
        "rss_before": rss_before,
        "samples": samples,
        "up": (up50, up99, upmax),
        "down": (dn50, dn99, dnmax),
        "appends": sum(s.appends for s in run.sessions) / (count * seconds),
        "lost_up": lost_up,
        "lost_down": lost_down,
        "late_up": run.up.late / max(1, run.up.frames) * 100,
        "late_down": run.down.late / max(1, run.down.frames) * 100,
        "gen": own / seconds * 100,
        "errors": len(run.errors),
        "first_error": run.errors[0] if run.errors else "",
    }


# -- report ---------------------------------------------------------------------------------------

COLUMNS = (
    f"{'':<7} {'N':>4} {'up p50':>7} {'p99':>6} {'max':>6} {'down p50':>8} {'p99':>6} {'max':>6} "
    f"{'CPU/s-s':>8} {'RSS/s':>8} {'app/s':>5} {'lost up/dn ms':>13} {'late up/dn %':>12} "
    f"{'gen':>4} {'err':>3} {'sys':>4}"
)


def row(r: dict[str, Any]) -> str:
    up, dn = r["up"], r["down"]
    return (
        f"{r['name'][:7]:<7} {r['sessions']:>4} {up[0]:>7.2f} {up[1]:>6.1f} {up[2]:>6.0f} {dn[0]:>8.2f} "
        f"{dn[1]:>6.1f} {dn[2]:>6.0f} {r['cpu']:>5.2f} ms {r['rss']:>4.0f} KiB {r['appends']:>5.1f} "
        f"{r['lost_up']:>6.0f}/{r['lost_down']:<6.0f} {r['late_up']:>5.1f}/{r['late_down']:<6.1f} "
        f"{r['gen']:>3.0f}% {r['errors']:>3} {r['sys']:>3.0f}%"
    )


def ratio(r: dict[str, Any], f: dict[str, Any]) -> str:
    def x(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 and a == a and b == b else "-"

    up, dn, fu, fd = r["up"], r["down"], f["up"], f["down"]
    return (
        f"{r['name'][:5] + '÷fl':<7} {r['sessions']:>4} {x(up[0], fu[0]):>7} {x(up[1], fu[1]):>6} {x(up[2], fu[2]):>6} "
        f"{x(dn[0], fd[0]):>8} {x(dn[1], fd[1]):>6} {x(dn[2], fd[2]):>6} {x(r['cpu'], f['cpu']):>8} "
        f"{x(r['rss'], f['rss']):>8}"
    )


def reuseport_supported() -> bool:
    try:
        from twisted.internet import reactor as r
        from twisted.internet.endpoints import serverFromString

        serverFromString(r, "reuseport:0:interface=127.0.0.1")
        return True
    except Exception:
        return False


def proxies(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, template) of every ``--proxy-cmd``; ``LABEL=template`` names one."""
    out = []
    for n, value in enumerate(args.proxy_cmd or [DEFAULT_PROXY]):
        match = re.match(r"^(\w{1,12})=(.*)$", value, re.S)
        label, template = (match.group(1), match.group(2)) if match else (f"proxy{n or ''}", value)
        out.append((label, template))
    return out


@defer.inlineCallbacks
def main_run(reactor: Any, args: argparse.Namespace) -> Any:
    counts = [int(c) for c in args.sessions.split(",") if c.strip()]
    commands = proxies(args)
    process_counts = [int(p) for p in str(args.processes).split(",") if p.strip()]
    if max(process_counts) > 1:
        if not reuseport_supported():
            print(f"--processes {args.processes}: not measured: needs the reuseport endpoint")
            process_counts = [1]
        else:
            # Every process count listens the same way, so that only the number of processes differs.
            commands = [
                (label, cmd.replace("--listen tcp:{port}:", "--listen reuseport:{port}:"))
                for label, cmd in commands
            ]
    if len(process_counts) > 1:
        commands = [(f"{label}x{p}", cmd, p) for label, cmd in commands for p in process_counts]
    else:
        commands = [(label, cmd, process_counts[0]) for label, cmd in commands]
    rows: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
    workdir = tempfile.mkdtemp(prefix="bench-load-")
    if args.keep_logs:
        print(f"logs in {workdir}")
    try:
        for count in counts:
            floor = None
            if not args.no_floor:
                floor = yield measure(reactor, args, args.floor_cmd, "floor", count, 1, workdir,
                                      args.seconds)
                print(row(floor), flush=True)
            for label, command, processes in commands:
                result = yield measure(reactor, args, command, label, count, processes, workdir,
                                       args.soak or args.seconds)
                print(row(result), flush=True)
                if processes > 1:
                    shares = " / ".join(f"{c:.0f}%" for c in result["per_process"])
                    print(f"        {processes} processes, each one's share of a core: {shares}")
                if args.cpu_budget:
                    print(f"        waited for the CPU budget: {result['throttled']:.1f}% of the window "
                          "(all processes)")
                if result["first_error"]:
                    print(f"        first error: {result['first_error']}")
                rows.append((floor, result))
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(COLUMNS)
    shown: set[int] = set()
    for floor, result in rows:
        if floor is not None and id(floor) not in shown:
            shown.add(id(floor))
            print(row(floor))
        print(row(result))
        if floor is not None:
            print(ratio(result, floor))
    for label, _, _ in commands:
        good = [r["sessions"] for _, r in rows if r["name"] == label and r["up"][1] < 20
                and r["down"][1] < 20 and r["configured"] == r["sessions"]]
        print(f"\n{label}: largest N with p99 < 20 ms both ways: {max(good) if good else 'none'}")
    if args.soak:
        for _, result in rows:
            samples = result["samples"]
            if len(samples) >= 4:
                t = np.array([s[0] for s in samples])
                rss = np.array([s[1] for s in samples])
                half = len(samples) // 2
                slope = np.polyfit(t[half:], rss[half:], 1)[0] * 60
                print(
                    f"soak N={result['sessions']}: RSS {rss[0] / 1024:.1f} -> {rss[-1] / 1024:.1f} MiB; "
                    f"second-half trend {slope:+.1f} KiB/min ({slope / result['sessions']:+.2f} KiB/min "
                    "per session)"
                )


def main() -> None:
    global INPUT_RATE, UP_BYTES_PER_MS
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", default="10,50,100,200",
                        help="comma-separated session counts, the ramp (default 10,50,100,200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per row (default 10)")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before the window (default 1.5)")
    parser.add_argument("--drain", type=float, default=0.5, help="seconds after it (default 0.5)")
    parser.add_argument("--proxy-cmd", action="append",
                        help="command template of a proxy under test ({port}, {upstream_port}, "
                        "{upstream_url}, {python}, {twistd}, {here}), LABEL=TEMPLATE to name it; "
                        "repeat to compare several in one run; default: the installed daemon")
    parser.add_argument("--floor-cmd", default=DEFAULT_FLOOR, help="command template of the floor relay")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor")
    parser.add_argument("--processes", default="1",
                        help="proxy processes sharing the port (--listen reuseport:); a comma-separated "
                        "list (1,2) measures each count in the same run (default 1)")
    parser.add_argument("--input-rate", type=int, default=INPUT_RATE,
                        help="sample rate of the clients' linear16 audio, Hz (16000; 24000 is the "
                        "upstream's own rate, so the daemon passes it through unconverted)")
    parser.add_argument("--cpu-budget", type=float, default=0.0,
                        help="give every proxy process its own CPU budget, this share of one core "
                        "(a control group; needs root), and leave placement to the kernel")
    parser.add_argument("--reply-every", type=float, default=5.0, help="seconds between replies (5)")
    parser.add_argument("--reply-ms", type=int, default=1000, help="audio per reply in ms (1000)")
    parser.add_argument("--late-ms", type=float, default=20.0, help="a frame later than this is late (20)")
    parser.add_argument("--soak", type=float, default=0.0,
                        help="measure the proxy for this many seconds instead (memory growth)")
    parser.add_argument("--sample-every", type=float, default=1.0, help="RSS sampling period (1 s)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the proxies' logs")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the proxy to core 0 and this process to core 1")
    args = parser.parse_args()
    INPUT_RATE = args.input_rate
    UP_BYTES_PER_MS = INPUT_RATE * 2 / 1000
    if args.soak:
        args.sample_every = max(args.sample_every, 10.0)
        args.no_floor = True
    cores = os.cpu_count() or 1
    if args.cpu_budget:
        args.pin = False
    if args.pin and cores >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})
    else:
        args.pin = False
    several = any(int(p) > 1 for p in str(args.processes).split(",") if p.strip())
    placement = "no pinning"
    if args.cpu_budget:
        placement += f"; each proxy process held to {args.cpu_budget:g} of a core"
    if args.pin:
        placement = "proxy on core 0, generator on core 1"
        if several:
            placement += "; several proxies and the generator left to the kernel"
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"{platform.machine()} {platform.processor() or ''}, {cores} cores, "
        f"load {' '.join(load)}, Python {platform.python_version()}; "
        f"{placement}; "
        f"{args.seconds:g} s window; clients at {INPUT_RATE} Hz; latency in ms, CPU ms per session-second, RSS per session"
    )
    print(COLUMNS, flush=True)
    task.react(lambda reactor: main_run(reactor, args))


if __name__ == "__main__":
    main()
