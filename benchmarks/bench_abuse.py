"""Resident memory and descriptors of the daemon under hostile clients.

Run from the repository root after installing the package (with the ``simulator`` extra)::

    python benchmarks/bench_abuse.py [--seconds 30] [--clients 4] [--stall-timeout 30]

The script starts the installed daemon (``twistd -n openai-proxy --simulator``) as a child process and,
for each scenario, connects ``--clients`` raw WebSocket clients that send without ever reading:

- ``inject fast``: ``InjectUserMessage`` of 100 KB, as fast as the daemon takes them;
- ``inject 20/s``: the same, 20 a second;
- ``bad messages``: frames that are not JSON, as fast as the daemon takes them;
- ``audio``: 32 KB binary frames after ``Settings``, as fast as the daemon takes them;

then ``trickle``: 200 connections sending a partial HTTP upgrade a byte every 3 s, while ``/healthz`` is
asked every second.

Figures per scenario: the bytes the daemon accepted from all clients, its resident memory at the
start, at its peak and at the end, how many clients it dropped within the window, and for ``trickle`` the
connections it closed and the ``/healthz`` statuses.  These are figures, not assertions.  Linux only
(``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

MIB = 1024 * 1024


def frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + b"\0\0\0\0" + payload


SETTINGS = frame(json.dumps({
    "type": "Settings",
    "audio": {"input": {"encoding": "linear16", "sample_rate": 24000},
              "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"}},
    "agent": {"think": {"provider": {"type": "open_ai", "model": "gpt-realtime"}, "prompt": "Be brief."}},
}).encode())
INJECT = frame(json.dumps({"type": "InjectUserMessage", "content": "x" * 100_000}).encode())
BAD = frame(b"{nope") * 1000
AUDIO = frame(bytes(32_000), opcode=2)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_websocket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET /v1/agent/converse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        answer += chunk
    return sock


class Flooder(threading.Thread):
    def __init__(self, port: int, first: bytes, data: bytes, rate: float | None, until: float) -> None:
        super().__init__(daemon=True)
        self.port, self.first, self.data, self.rate, self.until = port, first, data, rate, until
        self.sent = 0
        self.dropped = False

    def run(self) -> None:
        try:
            sock = open_websocket(self.port)
        except OSError:
            return
        sock.settimeout(0.5)
        try:
            if self.first:
                sock.sendall(self.first)
            view = memoryview(b"")
            while time.monotonic() < self.until:
                if not view:
                    view = memoryview(self.data)
                    if self.rate:
                        time.sleep(1 / self.rate)
                try:
                    n = sock.send(view)
                except TimeoutError:
                    continue
                self.sent += n
                view = view[n:]
        except OSError:
            self.dropped = True
        finally:
            sock.close()


def healthz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def scenario(pid: int, port: int, name: str, clients: int, seconds: float, first: bytes, data: bytes,
             rate: float | None) -> None:
    start = rss(pid)
    until = time.monotonic() + seconds
    flooders = [Flooder(port, first, data, rate, until) for _ in range(clients)]
    for f in flooders:
        f.start()
    peak = start
    while time.monotonic() < until:
        time.sleep(0.5)
        peak = max(peak, rss(pid))
    for f in flooders:
        f.join(5)
    time.sleep(1)
    print(f"{name:14} {sum(f.sent for f in flooders) / MIB:10.1f} {start / MIB:9.1f} {peak / MIB:9.1f} "
          f"{rss(pid) / MIB:9.1f} {sum(f.dropped for f in flooders):5d}/{clients}")


def trickle(pid: int, port: int, seconds: float) -> None:
    socks = []
    for _ in range(200):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            socks.append(sock)
        except OSError:
            pass
    request = b"GET /v1/agent/converse HTTP/1.1\r\nHost: x\r\n"
    statuses: list[int | None] = []
    closed = 0
    start = time.monotonic()
    position = 0
    while time.monotonic() - start < seconds:
        for sock in list(socks):
            try:
                sock.send(request[position % len(request):][:1])
            except OSError:
                socks.remove(sock)
                closed += 1
                sock.close()
        position += 1
        for _ in range(3):
            statuses.append(healthz(port))
            time.sleep(1)
    for sock in socks:
        sock.close()
    answered = sum(1 for s in statuses if s == 200)
    print(f"trickle: 200 connections, {closed} closed by the daemon within {seconds:.0f} s; "
          f"/healthz answered 200 {answered}/{len(statuses)}; RSS {rss(pid) / MIB:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--stall-timeout", type=float, default=30.0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    workdir = tempfile.mkdtemp(prefix="bench-abuse-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    daemon = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "openai-proxy", "--simulator", "--ping-interval", "0",
         "--client-stall-timeout", str(args.stall_timeout), "--log-level", "warn",
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if healthz(port) == 200:
                break
            time.sleep(0.1)
        print(f"{args.clients} clients per scenario, {args.seconds:.0f} s each, "
              f"--client-stall-timeout {args.stall_timeout:g}")
        print(f"{'scenario':14} {'MiB taken':>10} {'RSS start':>9} {'RSS peak':>9} {'RSS end':>9} dropped")
        scenario(daemon.pid, port, "inject fast", args.clients, args.seconds, SETTINGS, INJECT, None)
        scenario(daemon.pid, port, "inject 20/s", args.clients, args.seconds, SETTINGS, INJECT, 20)
        scenario(daemon.pid, port, "bad messages", args.clients, args.seconds, b"", BAD, None)
        scenario(daemon.pid, port, "audio", args.clients, args.seconds, SETTINGS, AUDIO, None)
        trickle(daemon.pid, port, args.seconds)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


if __name__ == "__main__":
    main()
