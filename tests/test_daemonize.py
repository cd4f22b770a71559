"""``twistd openai-proxy`` without ``-n``: the daemon detaches, serves, logs to its log file and stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

from tests.support import SystemTestCase, clean_environment, free_port, twistd_command


class DaemonizeTests(SystemTestCase):
    def test_detached_daemon_serves_and_logs_to_its_logfile(self) -> None:
        port = free_port()
        pidfile = os.path.join(self.directory, "daemon.pid")
        logfile = os.path.join(self.directory, "daemon.log")
        argv = twistd_command() + [
            "--pidfile", pidfile, "--logfile", logfile,
            "openai-proxy", "--simulator", "--listen", f"tcp:{port}:interface=127.0.0.1",
        ]
        started = subprocess.run(argv, cwd=self.directory, env=clean_environment(),
                                 capture_output=True, timeout=30)
        self.assertEqual(started.returncode, 0, started.stderr.decode(errors="replace"))
        deadline = time.monotonic() + 20
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(pidfile) as f:
            pid = int(f.read().strip())
        self.addCleanup(_kill, pid)

        status = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                    status = reply.status
                    break
            except OSError:
                time.sleep(0.1)
        self.assertEqual(status, 200)

        os.kill(pid, signal.SIGTERM)
        while _alive(pid) and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        self.assertFalse(_alive(pid))
        with open(logfile, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        bodies = [r["body"] for r in records]
        self.assertTrue(any("listening on" in b for b in bodies), bodies)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
