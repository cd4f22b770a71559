"""Soak: thousands of short sessions and one long one through the real daemon; file descriptors and
resident memory over time, and whether they stay flat.

Run from the repository root after installing the package (with the ``simulator`` extra)::

    python benchmarks/soak.py [--sessions 3000] [--concurrency 20] [--round 250] [--max-seconds 900]

The script starts the installed daemon (``twistd -n openai-proxy --simulator``, loopback only) as a
child process. One long session opens first and keeps taking turns (an ``InjectUserMessage`` and the
whole spoken reply, over and over) for the whole run. Short sessions then run in rounds of ``--round``
sessions, ``--concurrency`` at a time, cycling through four endings:

- ``turn``: Settings, one question, the whole spoken reply, close 1000;
- ``barge``: Settings, one question, close 1000 at the first agent audio frame (mid-reply);
- ``abort``: TCP abort right after ``Welcome``, with no closing handshake;
- ``early``: close 1000 right after ``Settings``, before ``SettingsApplied``.

With ``--drop-every K`` (default 10) the built-in simulator also drops the upstream connection of every
Kth upstream session at its third audio delta (``--simulator-drop``), so the daemon's upstream-failure
path is soaked too; the client sees an ``Error``/``Warning`` and the session ends.

After each round the script waits until the daemon reports only the long session open (``/metrics``)
and its descriptor count has settled, then samples ``/proc/PID/fd`` and ``VmRSS``. At the end it prints
every sample and the least-squares slopes over sessions: descriptors per 1000 sessions, and RSS in KiB
per 1000 sessions over the second half of the samples (the first half is the allocator's warm-up), with
a verdict: flat when the settled descriptor count never moves after the first round and RSS grows by
less than 512 KiB per 1000 sessions (half a KiB a session, below which allocator noise hides a leak
over a few thousand sessions). ``--json FILE`` writes the same figures for tools (the test suite runs a short version).

Bounded: at most ``--sessions`` short sessions and ``--max-seconds`` of wall time (no round starts
after it); each session has ``--session-timeout`` seconds to end or counts as stuck. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from bench_daemon import free_port, rss_mb, stop_daemon, twistd_command
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint

ENDINGS = ("turn", "barge", "abort", "early")
START_TIMEOUT = 30.0


def settings_message(index: int) -> dict[str, Any]:
    return {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": 16000},
            "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
        },
        "agent": {
            "think": {"provider": {"type": "open_ai", "model": "gpt-realtime"},
                      "prompt": f"You are soak session {index}."},
            "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}},
        },
    }


# -- clients ----------------------------------------------------------------------------------------


class SoakClient(WebSocketClientProtocol):
    """One short session: follows its ``ending`` and fires ``ended`` with the outcome."""

    factory: SoakClientFactory

    def __init__(self) -> None:
        super().__init__()
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.outcome: str | None = None
        self.ending = "turn"
        self.index = 0

    def _finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome

    def _send(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.outcome is not None:
            return
        if isBinary:
            if self.ending == "barge":
                self._finish("barge")
                self.sendClose(1000)
            return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "Welcome":
            if self.ending == "abort":
                self._finish("abort")
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            self._send(settings_message(self.index))
            if self.ending == "early":
                self._finish("early")
                self.sendClose(1000)
        elif kind == "SettingsApplied":
            self._send({"type": "InjectUserMessage", "content": "hello there"})
        elif kind == "AgentAudioDone" and self.ending == "turn":
            self._finish("turn")
            self.sendClose(1000)
        elif kind in ("Error", "Warning") and str(message.get("code", "")).startswith("UPSTREAM_"):
            self._finish("upstream_failure")
            self.sendClose(1000)
        elif kind == "Error":
            self._finish(f"error {message.get('code')}")
            self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._finish("closed_by_daemon")
        if not self.ended.called:
            self.ended.callback(self.outcome or "closed_by_daemon")


class SoakClientFactory(WebSocketClientFactory):
    protocol = SoakClient


class LongClient(WebSocketClientProtocol):
    """The long session: a turn, a short pause, another turn, until told to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0
        self.problems: list[str] = []
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.stopping = False
        self.reactor: Any = None

    def _ask(self) -> None:
        if not self.stopping:
            self.sendMessage(json.dumps({"type": "InjectUserMessage", "content": "and now?"}).encode())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "Welcome":
            self.sendMessage(json.dumps(settings_message(0)).encode())
        elif kind == "SettingsApplied":
            if not self.ready.called:
                self.ready.callback(None)
            self._ask()
        elif kind == "AgentAudioDone":
            self.turns += 1
            self.reactor.callLater(0.5, self._ask)
        elif kind in ("Error", "Warning"):
            self.problems.append(f"{kind} {message.get('code')}")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.stopping:
            self.problems.append(f"closed {code}")
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"the long session closed early ({code})"))
        self.closed.callback(None)


# -- the daemon -------------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass
class Sample:
    sessions: int
    elapsed: float
    fds: int
    rss_kib: int


@dataclass
class Result:
    samples: list[Sample] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    fds_before_sessions: int = 0
    long_turns: int = 0
    long_problems: list[str] = field(default_factory=list)
    fd_slope_per_1000: float = 0.0
    rss_slope_kib_per_1000: float = 0.0
    fds_settled_range: int = 0
    flat: bool = False
    stopped_by_time: bool = False


class Soak:
    def __init__(self, reactor: Any, options: argparse.Namespace, workdir: str) -> None:
        self.reactor = reactor
        self.options = options
        self.workdir = workdir
        self.port = free_port()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(workdir, "daemon.log")

    def argv(self) -> list[str]:
        argv = twistd_command() + [
            "-n", "--pidfile=", "openai-proxy", "--simulator",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--shutdown-grace", "1", "--log-level", "warn",
            "--max-sessions", str(self.options.concurrency + 10),
        ]
        if self.options.drop_every:
            # Session 1 (the long one) is never a multiple of every >= 2.
            argv += ["--simulator-drop",
                     f"event=response.output_audio.delta,nth=3,every={self.options.drop_every}"]
        return argv

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OTEL_", "LOG_"))}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            # A scratch working directory, so that no developer's ./.env is read.
            self.daemon = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    @defer.inlineCallbacks
    def metric(self, name: str) -> Any:
        response = yield treq.get(f"http://127.0.0.1:{self.port}/metrics", persistent=False)
        body = yield response.text()
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise RuntimeError(f"/metrics has no {name}")

    @defer.inlineCallbacks
    def wait_ready(self) -> Any:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.daemon is not None
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.daemon.returncode}):\n{self.log_tail()}")
            try:
                response = yield treq.get(f"http://127.0.0.1:{self.port}/readyz", persistent=False)
                yield response.content()
                if response.code == 200:
                    return
            except Exception:
                pass
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        raise RuntimeError(f"the daemon did not become ready:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    @defer.inlineCallbacks
    def settle(self, open_sessions: int) -> Any:
        """Wait (bounded) until only ``open_sessions`` are open and the descriptor count is steady."""
        deadline = time.monotonic() + 15.0
        while (yield self.metric("openai_proxy_sessions_active")) > open_sessions:
            if time.monotonic() > deadline:
                raise RuntimeError("sessions did not close")
            yield task.deferLater(self.reactor, 0.1, lambda: None)
        # Upstream sockets close shortly after their client's (a closing handshake, at most 1 s).
        previous, steady = -1, 0
        while steady < 5 and time.monotonic() < deadline:
            yield task.deferLater(self.reactor, 0.1, lambda: None)
            count = fd_count(self.pid)
            steady = steady + 1 if count == previous else 0
            previous = count
        return previous

    @defer.inlineCallbacks
    def run_session(self, endpoint: Any, factory: SoakClientFactory, index: int) -> Any:
        protocol = yield endpoint.connect(factory)
        protocol.ending = ENDINGS[index % len(ENDINGS)]
        protocol.index = index
        timer = self.reactor.callLater(self.options.session_timeout, self._stuck, protocol)
        outcome = yield protocol.ended
        if timer.active():
            timer.cancel()
        return outcome

    def _stuck(self, protocol: SoakClient) -> None:
        protocol._finish("stuck")
        protocol.transport.abortConnection()

    @defer.inlineCallbacks
    def run(self) -> Any:
        result = Result()
        options = self.options
        self.start()
        try:
            yield self.wait_ready()
            url = f"ws://127.0.0.1:{self.port}/v1/agent/converse"
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
            long_factory = WebSocketClientFactory(url)
            long_factory.protocol = LongClient
            long_client = yield endpoint.connect(long_factory)
            long_client.reactor = self.reactor
            yield long_client.ready
            result.fds_before_sessions = yield self.settle(1)
            factory = SoakClientFactory(url)
            outcomes: Counter[str] = Counter()
            started = time.monotonic()
            done = 0
            while done < options.sessions:
                if time.monotonic() - started > options.max_seconds:
                    result.stopped_by_time = True
                    break
                round_size = min(options.round, options.sessions - done)
                pending = list(range(done, done + round_size))

                @defer.inlineCallbacks
                def worker(queue: list[int] = pending) -> Any:
                    while queue:
                        index = queue.pop(0)
                        outcome = yield self.run_session(endpoint, factory, index)
                        outcomes[outcome] += 1

                yield defer.gatherResults([worker() for _ in range(options.concurrency)],
                                          consumeErrors=True)
                done += round_size
                fds = yield self.settle(1)
                sample = Sample(done, round(time.monotonic() - started, 2), fds, round(rss_mb(self.pid) * 1024))
                result.samples.append(sample)
                print(f"{sample.sessions:>7} sessions {sample.elapsed:>8.1f} s  fds {sample.fds:>4}  "
                      f"RSS {sample.rss_kib / 1024:>7.1f} MiB  long-session turns {long_client.turns}",
                      flush=True)
            long_client.stopping = True
            long_client.sendClose(1000)
            yield long_client.closed
            result.long_turns = long_client.turns
            result.long_problems = long_client.problems
            result.outcomes = dict(outcomes)
        finally:
            yield self.stop()
        return result

    def stop(self) -> Any:
        if self.daemon is None:
            return defer.succeed(None)
        return stop_daemon(self.reactor, self.daemon)


def verdict(result: Result) -> None:
    """Descriptors: every settled count after the first round must be the same. Memory: the RSS slope
    over the second half of the samples (the first half is the allocator's warm-up: pymalloc arenas,
    Autobahn and resampler buffers reach their working size over the first several hundred sessions)
    must stay under 512 KiB per 1000 sessions."""
    samples = result.samples
    after_first = samples[1:] if len(samples) > 1 else samples
    xs = [s.sessions / 1000 for s in after_first]
    result.fd_slope_per_1000 = slope(xs, [float(s.fds) for s in after_first])
    fds = [s.fds for s in after_first]
    result.fds_settled_range = max(fds) - min(fds) if fds else 0
    steady = samples[len(samples) // 2:]
    result.rss_slope_kib_per_1000 = slope([s.sessions / 1000 for s in steady],
                                          [float(s.rss_kib) for s in steady])
    result.flat = (len(steady) >= 2 and result.fds_settled_range == 0
                   and result.rss_slope_kib_per_1000 < 512)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3000, help="short sessions (default 3000)")
    parser.add_argument("--concurrency", type=int, default=20, help="short sessions at a time (20)")
    parser.add_argument("--round", type=int, default=250, help="sessions between samples (250)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="wall-time bound (900)")
    parser.add_argument("--session-timeout", type=float, default=20.0,
                        help="seconds a short session has to end before it counts as stuck (20)")
    parser.add_argument("--drop-every", type=int, default=10,
                        help="drop every Kth upstream session mid-reply; 0: never (10)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    options = parser.parse_args(argv)
    if min(options.sessions, options.concurrency, options.round) < 1 or options.drop_every == 1 \
            or options.drop_every < 0:
        parser.error("--sessions, --concurrency and --round must be >= 1; --drop-every 0 or >= 2")

    print(f"soak: {options.sessions} short sessions ({', '.join(ENDINGS)}), {options.concurrency} at a "
          f"time, one long session; upstream dropped every {options.drop_every or 'never'}th session",
          flush=True)
    task.react(lambda reactor: _run(reactor, options))


def report(result: Result, options: argparse.Namespace) -> None:
    verdict(result)
    print(f"outcomes: {json.dumps(result.outcomes, sort_keys=True)}")
    print(f"long session: {result.long_turns} turns, problems: {result.long_problems or 'none'}")
    print(f"descriptors with only the long session open: {result.fds_before_sessions} before the short "
          f"sessions, settled range after the first round {result.fds_settled_range}, slope "
          f"{result.fd_slope_per_1000:+.2f} per 1000 sessions")
    steady = result.samples[len(result.samples) // 2:]
    if steady:
        print(f"RSS over the second half: {steady[0].rss_kib / 1024:.1f} → {steady[-1].rss_kib / 1024:.1f} MiB, "
              f"slope {result.rss_slope_kib_per_1000:+.0f} KiB per 1000 sessions")
    print(f"verdict: {'FLAT' if result.flat else 'NOT FLAT'}"
          + (" (stopped by --max-seconds)" if result.stopped_by_time else ""), flush=True)
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=1)


@defer.inlineCallbacks
def _run(reactor: Any, options: argparse.Namespace) -> Any:
    # (task.react ends the process when this finishes: the report is printed from here.)
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        result = yield Soak(reactor, options, workdir).run()
    report(result, options)


if __name__ == "__main__":
    main()
