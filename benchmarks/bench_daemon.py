"""CPU, latency and memory of the whole daemon per real-time session.

Run from the repository root after installing the package (with the ``simulator`` extra)::

    python benchmarks/bench_daemon.py [--clients 1,10,50] [--seconds 12]

For each client count the script starts the installed daemon (``twistd -n openai-proxy``) as a
child process, pointed at a simulated upstream that runs in this process, and connects that many
clients, also in this process.  Each client declares linear16 at 16 kHz in and linear16 at 24 kHz
out, then streams 20 ms frames at real-time pace for ``--seconds``: a spoken sentence in the
simulator's word code, then two seconds of silence, over and over, so every few seconds server VAD
ends a turn and the simulator answers with about 1.5 s of speech (sent faster than real time, as
the real API does).

Figures, measured over the streaming window only (connection set-up excluded):

- ``CPU/sess-s``: the daemon process's CPU time (user + system, from ``/proc``) divided by
  session-seconds (clients x seconds), in ms; ``% core`` is the same as a share of one core.
- ``in fr/s``: client audio frames the daemon received per second; ``appends/s``: the
  ``input_audio_buffer.append`` events the upstream received per second; ``out fr/s``: binary
  agent-audio frames the clients received per second.
- ``p50``/``p95``/``max``: from sending a client frame to the moment the upstream has received all
  of that frame's audio, converted to 24 kHz.  It includes the resampler's lag and the append
  batching, which is what delays a frame, not only the network hops.
- ``answer p50``: the daemon's own ``AgentStartedSpeaking.total_latency`` (end of the user's turn to
  the first agent audio), dominated here by the simulator.
- ``RSS``: the daemon's resident memory before the clients connected and its peak in the window.
- ``bench CPU``: this process (clients and simulator) in the window, so that a saturated
  benchmark can be told apart from a slow daemon.

These are figures, not assertions; the run takes well under two minutes.  Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent

from openai_proxy.simulator import SimulatorFactory, voice
from openai_proxy.simulator.server import SimulatorProtocol

API_KEY = "sk-bench-not-a-real-key"
DEFAULT_INPUT_RATE = 16000
OUTPUT_RATE = 24000
FRAME_MS = 20
#: Upstream pcm16 24 kHz samples per client frame.
UPSTREAM_FRAME_SAMPLES = 24000 * FRAME_MS // 1000
SENTENCE = "hello what time"
PAUSE_MS = 2000
#: How often the pacer looks for due frames (it sends every frame that is due, so none is skipped).
TICK_SECONDS = 0.005
START_TIMEOUT = 20.0
CLIENT_PROMPT = re.compile(r"bench client (\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def turn_audio(rate: int) -> bytes:
    """One turn: the sentence as word tones (200 ms a word, 60 ms gaps), then a pause."""
    n_word, n_gap = rate // 5, rate * 60 // 1000
    t = np.arange(n_word) / rate
    envelope = np.minimum(1.0, np.minimum(np.arange(n_word), np.arange(n_word)[::-1]) / (rate / 100))
    pieces: list[Any] = []
    for index, word in enumerate(SENTENCE.split()):
        if index:
            pieces.append(np.zeros(n_gap))
        pieces.append(np.sin(2 * np.pi * voice.word_frequency(word) * t) * envelope * 0.3 * 32767)
    pieces.append(np.zeros(rate * PAUSE_MS // 1000))
    return np.round(np.concatenate(pieces)).astype("<i2").tobytes()


def settings(index: int, input_rate: int) -> dict[str, Any]:
    return {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": input_rate},
            "output": {"encoding": "linear16", "sample_rate": OUTPUT_RATE, "container": "none"},
        },
        "agent": {
            "think": {
                "provider": {"type": "open_ai", "model": "gpt-realtime"},
                "prompt": f"You are bench client {index}.",
            },
            "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}},
        },
    }


# -- measurements ---------------------------------------------------------------------------------


@dataclass
class Window:
    """The streaming window: when it runs, what was sent and what arrived."""

    start: float = 0.0
    end: float = float("inf")
    latencies: list[float] = field(default_factory=list)
    appends: int = 0

    def inside(self, moment: float) -> bool:
        return self.start <= moment <= self.end


class BenchClient(WebSocketClientProtocol):
    """A client that sends Settings on Welcome and counts what comes back."""

    index: int
    bench: Bench

    def __init__(self) -> None:
        super().__init__()
        self.configured: defer.Deferred[None] = defer.Deferred()
        self.send_times: list[float] = []
        self.frames_sent = 0
        self.frames_in = 0
        self.turns = 0
        self.errors: list[str] = []
        self.total_latencies: list[float] = []
        self.started_at = 0.0

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            if self.bench.window.inside(time.monotonic()):
                self.frames_in += 1
            return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "Welcome":
            settings_message = settings(self.index, self.bench.input_rate)
            self.sendMessage(json.dumps(settings_message).encode(), isBinary=False)
        elif kind == "SettingsApplied" and not self.configured.called:
            self.configured.callback(None)
        elif kind == "AgentStartedSpeaking":
            self.total_latencies.append(float(message["total_latency"]))
        elif kind == "AgentAudioDone":
            self.turns += 1
        elif kind in ("Error", "Warning"):
            self.errors.append(str(message.get("code")))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.configured.called:
            self.configured.errback(ConnectionError(f"closed before SettingsApplied: {code} {reason}"))


class BenchClientFactory(WebSocketClientFactory):
    """Numbers its clients, so that the simulator can tell whose audio an append carries."""

    protocol = BenchClient

    def __init__(self, url: str, bench: Bench) -> None:
        super().__init__(url)
        self.bench = bench
        self.built = 0

    def buildProtocol(self, addr: Any) -> BenchClient:
        client = cast(BenchClient, super().buildProtocol(addr))
        client.index, client.bench = self.built, self.bench
        self.built += 1
        return client


class TimedSimulatorProtocol(SimulatorProtocol):
    """The simulated upstream, noting when each append arrives and how much audio it carries."""

    bench: Bench

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._received_at = time.monotonic()
        super().onMessage(payload, isBinary)

    def onOpen(self) -> None:
        super().onOpen()
        session = self.session
        if session is None:
            return
        original: Callable[[dict[str, Any]], None] = session._on_input_audio_buffer_append
        client: int | None = None
        samples = 0

        def appended(event: dict[str, Any]) -> None:
            nonlocal client, samples
            if client is None:
                match = CLIENT_PROMPT.search(session.config.get("instructions") or "")
                client = int(match.group(1)) if match else -1
            audio = event["audio"]
            size = len(audio) * 3 // 4 - audio[-2:].count("=")
            before, samples = samples, samples + size // 2
            self.bench.appended(client, before, samples, self._received_at)
            original(event)

        session._on_input_audio_buffer_append = appended  # type: ignore[method-assign]


class Bench:
    """One run: the simulator, a daemon process and the clients."""

    def __init__(self, reactor: Any, twistd: list[str], workdir: str, input_rate: int) -> None:
        self.reactor = reactor
        self.input_rate = input_rate
        self.twistd = twistd
        self.workdir = workdir
        self.window = Window()
        self.clients: list[BenchClient] = []
        self.simulator_port: Any = None

    @defer.inlineCallbacks
    def start_simulator(self) -> Any:
        factory = SimulatorFactory(self.reactor, api_key=API_KEY, record_received=False)
        factory.protocol = TimedSimulatorProtocol
        TimedSimulatorProtocol.bench = self
        endpoint = serverFromString(self.reactor, "tcp:0:interface=127.0.0.1")
        self.simulator_port = yield endpoint.listen(factory)
        return self.simulator_port.getHost().port

    def appended(self, client: int, before: int, after: int, moment: float) -> None:
        """Frames ``before // n`` .. ``after // n`` of ``client`` are now wholly upstream."""
        if not self.window.inside(moment) or not 0 <= client < len(self.clients):
            return
        self.window.appends += 1
        times = self.clients[client].send_times
        for frame in range(before // UPSTREAM_FRAME_SAMPLES, after // UPSTREAM_FRAME_SAMPLES):
            if frame < len(times) and self.window.inside(times[frame]):
                self.window.latencies.append(moment - times[frame])

    @defer.inlineCallbacks
    def run(self, count: int, seconds: float, simulator_port: int) -> Any:
        port = free_port()
        log_path = os.path.join(self.workdir, f"daemon-{count}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OTEL_", "LOG_"))}
        env.update(OPENAI_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
        argv = self.twistd + [
            "-n",
            "--pidfile=",
            "openai-proxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--upstream-url",
            f"ws://127.0.0.1:{simulator_port}/v1/realtime",
            "--shutdown-grace",
            "1",
        ]
        with open(log_path, "wb") as log:
            # cwd is a scratch directory so that no developer's ./.env is read.
            daemon = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
            )
        try:
            yield self._wait_ready(port, daemon, log_path)
            result = yield self._measure(daemon.pid, port, count, seconds)
        finally:
            yield self._stop(daemon)
        return result

    @defer.inlineCallbacks
    def _wait_ready(self, port: int, daemon: subprocess.Popen[bytes], log_path: str) -> Any:
        agent = Agent(self.reactor)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {log_path}")
            try:
                response = yield agent.request(b"GET", f"http://127.0.0.1:{port}/readyz".encode())
                if response.code == 200:
                    return
            except Exception:
                pass
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        raise RuntimeError(f"the daemon did not become ready; see {log_path}")

    @defer.inlineCallbacks
    def _measure(self, pid: int, port: int, count: int, seconds: float) -> Any:
        self.window = Window()
        self.clients = []
        rss_before = rss_mb(pid)
        url = f"ws://127.0.0.1:{port}/v1/agent/converse"
        factory = BenchClientFactory(url, self)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port)
        for _ in range(count):
            client = yield endpoint.connect(factory)
            self.clients.append(client)
        yield defer.gatherResults([c.configured for c in self.clients], consumeErrors=True)

        audio = turn_audio(self.input_rate)
        frame_bytes = self.input_rate * FRAME_MS // 1000 * 2
        frames = [audio[i : i + frame_bytes] for i in range(0, len(audio), frame_bytes)]
        frame_seconds = FRAME_MS / 1000
        start = time.monotonic() + 0.1
        for n, client in enumerate(self.clients):
            # Staggered, as independent callers are; and each at its own point of the sentence.
            client.started_at = start + frame_seconds * n / count
        self.window.start = start
        self.window.end = start + seconds
        cpu_before, own_before = cpu_seconds(pid), own_cpu_seconds()
        rss_peak = rss_before

        def pace() -> None:
            now = time.monotonic()
            for n, client in enumerate(self.clients):
                due = math.floor((min(now, self.window.end) - client.started_at) / frame_seconds) + 1
                while client.frames_sent < due:
                    frame = frames[(client.frames_sent + n * 7) % len(frames)]
                    client.send_times.append(time.monotonic())
                    client.sendMessage(frame, isBinary=True)
                    client.frames_sent += 1

        pacer = task.LoopingCall(pace)
        pacer.clock = self.reactor
        pacer.start(TICK_SECONDS, now=False)
        while time.monotonic() < self.window.end:
            yield task.deferLater(self.reactor, min(0.5, self.window.end - time.monotonic()), lambda: None)
            rss_peak = max(rss_peak, rss_mb(pid))
        pacer.stop()
        cpu = cpu_seconds(pid) - cpu_before
        own = own_cpu_seconds() - own_before
        # Let appends of the last frames arrive before closing.
        yield task.deferLater(self.reactor, 0.3, lambda: None)
        for client in self.clients:
            client.sendClose(1000)
        yield task.deferLater(self.reactor, 0.3, lambda: None)

        latencies = np.array(self.window.latencies) * 1000 if self.window.latencies else np.zeros(1)
        answers = [x for c in self.clients for x in c.total_latencies]
        frames_in = sum(c.frames_sent for c in self.clients)
        return {
            "clients": count,
            "cpu": cpu,
            "cpu_ms_per_session_second": cpu * 1000 / (count * seconds),
            "frames_in": frames_in / seconds,
            "appends": self.window.appends / seconds,
            "frames_out": sum(c.frames_in for c in self.clients) / seconds,
            "p50": float(np.percentile(latencies, 50)),
            "p95": float(np.percentile(latencies, 95)),
            "max": float(latencies.max()),
            "answer_p50": float(np.median(answers) * 1000) if answers else float("nan"),
            "rss_before": rss_before,
            "rss_peak": rss_peak,
            "turns": sum(c.turns for c in self.clients),
            "errors": sum(len(c.errors) for c in self.clients),
            "own": own,
        }

    def _stop(self, daemon: subprocess.Popen[bytes]) -> Any:
        return stop_daemon(self.reactor, daemon)


# -- process figures ------------------------------------------------------------------------------


@defer.inlineCallbacks
def stop_daemon(reactor: Any, daemon: subprocess.Popen[bytes]) -> Any:
    """SIGTERM, up to 10 s to exit, then SIGKILL."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while daemon.poll() is None and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.1, lambda: None)
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait(5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def twistd_command() -> list[str]:
    """The ``twistd`` next to this interpreter (the one the package was installed with)."""
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def print_table(rows: list[dict[str, Any]], seconds: float) -> None:
    print(
        f"{'clients':>7} {'CPU/sess-s':>10} {'% core':>7} {'in fr/s':>8} {'appends/s':>9} "
        f"{'out fr/s':>8} {'p50':>7} {'p95':>7} {'max':>7} {'answer p50':>10} "
        f"{'RSS MB':>13} {'turns':>6} {'errors':>6} {'bench CPU':>9}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['cpu_ms_per_session_second']:>7.1f} ms "
            f"{r['cpu_ms_per_session_second'] / 10:>6.2f}% {r['frames_in']:>8.0f} "
            f"{r['appends']:>9.0f} {r['frames_out']:>8.0f} {r['p50']:>4.0f} ms {r['p95']:>4.0f} ms "
            f"{r['max']:>4.0f} ms {r['answer_p50']:>7.0f} ms "
            f"{r['rss_before']:>5.0f} → {r['rss_peak']:>4.0f} {r['turns']:>6} {r['errors']:>6} "
            f"{r['own'] / seconds * 100:>8.0f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--clients", default="1,10,50", help="comma-separated concurrent client counts (default 1,10,50)"
    )
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="streaming seconds per client count (default 12)"
    )
    parser.add_argument(
        "--input-rate",
        type=int,
        default=DEFAULT_INPUT_RATE,
        help="the clients' linear16 input rate in Hz (default 16000; 24000 needs "
        "no resampling, for comparison)",
    )
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",") if c.strip()]

    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"client linear16 {args.input_rate} Hz in, {OUTPUT_RATE} Hz out, {FRAME_MS} ms frames, "
        f"{args.seconds:g} s of streaming per row"
    )

    def run(reactor: IReactorTime) -> defer.Deferred[None]:
        return _run_all(reactor, counts, args.seconds, args.input_rate)

    task.react(run)


@defer.inlineCallbacks
def _run_all(reactor: Any, counts: list[int], seconds: float, input_rate: int) -> Any:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as workdir:
        bench = Bench(reactor, twistd_command(), workdir, input_rate)
        simulator_port = yield bench.start_simulator()
        rows = []
        try:
            for count in counts:
                row = yield bench.run(count, seconds, simulator_port)
                rows.append(row)
        finally:
            yield bench.simulator_port.stopListening()
        print_table(rows, seconds)


if __name__ == "__main__":
    main()
