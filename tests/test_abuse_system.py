"""
Hostile clients against the installed daemon process: figures measured on the real process (resident
memory, exit status, the close), bounded by what the limits promise.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from openai_proxy.tests.test_abuse import flood as send_frames
from openai_proxy.tests.test_abuse import raw_websocket, ws_frame

from .support import API_KEY, SystemTestCase, agent_settings, clean_environment, twistd_command

MIB = 1024 * 1024


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def flood(pid: int, sock: Any, frame: bytes, limit: int) -> tuple[int, bool, int]:
    """
    Send ``frame`` again and again, as fast as the daemon takes it, until ``limit`` bytes went out or
    sending made no progress at all for 2 s.  The bytes sent, whether sending got stuck, and the growth
    of the daemon's resident memory (the highest seen minus the start).
    """
    before = peak = resident_bytes(pid)
    sent = 0
    stuck = False
    while sent < limit:
        try:
            taken, stalled = send_frames(sock, itertools.repeat(frame), min(limit - sent, 4 * MIB))
        except (ConnectionResetError, BrokenPipeError):
            stuck = True  # dropped already: it had stopped reading long enough
            break
        sent += taken
        peak = max(peak, resident_bytes(pid))
        if stalled and taken == 0:
            stuck = True
            break
    print(f"\naccepted {sent} bytes; resident {before} -> peak {peak} bytes")
    return sent, stuck, peak - before


class NonReadingClientTests(SystemTestCase):
    STALL = 3.0

    def test_a_client_flooding_without_reading_neither_grows_the_daemon_nor_stays(self) -> None:
        simulator = self.start_simulator()
        daemon = self.start_daemon("--client-stall-timeout", str(self.STALL), "--ping-interval", "0",
                                   upstream=simulator)
        sock = raw_websocket(daemon.port)
        self.addCleanup(sock.close)
        sock.sendall(ws_frame(json.dumps(agent_settings()).encode()))
        inject = ws_frame(json.dumps({"type": "InjectUserMessage", "content": "x" * 100_000}).encode())
        sent, stuck, growth = flood(daemon.pid, sock, inject, 256 * MIB)
        stalled_at = time.monotonic()
        self.assertTrue(stuck, f"the daemon kept reading a client that does not read ({sent} bytes)")
        self.assertLess(sent, 32 * MIB)
        self.assertLess(growth, 48 * MIB)

        # Still not reading, it is dropped once its output has stayed unread for the stall timeout.
        deadline = stalled_at + self.STALL + 15.0
        closed: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not closed:
            time.sleep(0.1)
            closed = [r for r in daemon.log_records() if r["body"].startswith("client closed")]
        self.assertTrue(closed, "the client was never dropped")
        [dropped] = [r for r in daemon.log_records() if r["body"].startswith("client not reading")]
        self.assertEqual(dropped["attributes"]["error.code"], "CLIENT_NOT_READING")
        self.assertEqual(closed[0]["attributes"]["sent_close_code"], 1008)
        with self.assertRaises(OSError):  # reset: the daemon dropped the connection
            for _ in range(100):
                sock.send(b"\x81\x80\0\0\0\0")
                time.sleep(0.01)
        self.assertEqual(daemon.http_status("/healthz"), 200)


    def test_bad_messages_or_audio_from_a_client_that_never_reads_are_bounded_too(self) -> None:
        simulator = self.start_simulator()
        daemon = self.start_daemon("--ping-interval", "0", upstream=simulator)
        # Bad messages only: each earns an Error the client never reads.
        sock = raw_websocket(daemon.port)
        self.addCleanup(sock.close)
        sent, stuck, growth = flood(daemon.pid, sock, ws_frame(b"{nope") * 1000, 256 * MIB)
        self.assertTrue(stuck, f"the daemon kept reading a client that does not read ({sent} bytes)")
        self.assertLess(sent, 32 * MIB)
        self.assertLess(growth, 48 * MIB)
        records = daemon.log_records()
        faults = [r for r in records if r["body"].startswith("client error")]
        self.assertEqual(len(faults), 10, "client fault records are not rate-limited")
        # The whole log so far (start-up included) against what the client sent.
        log_bytes = len(daemon.stdout().encode())
        print(f"log: {log_bytes} bytes for {sent} bytes of bad messages")
        self.assertLess(log_bytes, 32 * 1024)
        # Audio after Settings goes upstream as fast as the upstream reads it; nothing piles up.
        sock = raw_websocket(daemon.port)
        self.addCleanup(sock.close)
        sock.sendall(ws_frame(json.dumps(agent_settings()).encode()))
        sent, stuck, growth = flood(daemon.pid, sock, ws_frame(bytes(32_000), opcode=2), 8 * MIB)
        self.assertLess(growth, 48 * MIB)
        self.assertEqual(daemon.http_status("/healthz"), 200)


class TokensConfigurationTests(SystemTestCase):
    def test_a_tokens_setting_of_separators_only_stops_the_start_with_78(self) -> None:
        for value in (",", " , "):
            process = self.run_command(
                twistd_command() + ["-n", "--pidfile=", "openai-proxy",
                                    "--listen", "tcp:0:interface=127.0.0.1"],
                env=clean_environment(OPENAI_API_KEY=API_KEY, OPENAI_PROXY_CLIENT_TOKENS=value),
                name="twistd")
            self.assertEqual(process.exited(), 78)
            lines = [line for line in process.stderr().splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("OPENAI_PROXY_CLIENT_TOKENS", lines[0])
            self.assertNotIn(API_KEY, lines[0])
