"""
Several daemon processes on one listening socket: systemd socket activation (``systemd-socket-activate``
and a socket inherited by two processes, as ``Sockets=`` does for instances of a template unit) and
``reuseport:`` endpoints.  Sessions land on both processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from twisted.trial.unittest import FailTest, SkipTest
from websockets.sync.client import connect

from .support import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    TIMEOUT,
    Daemon,
    Process,
    SystemTestCase,
    clean_environment,
    free_port,
    twistd_command,
)

#: Connections tried before concluding that sessions do not spread (the kernel hashes each new
#: connection to one of the listeners; with two listeners, 64 misses in a row are a 2**-63 event).
MAX_ATTEMPTS = 64

# What systemd does for a service that inherits sockets: the descriptors start at 3, and LISTEN_PID
# names the process that execs the service (so it is set after the fork, by the process itself).
_INHERIT = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web")
os.execv(sys.argv[2], sys.argv[2:])
"""


class NotifyListener:
    """A ``NOTIFY_SOCKET`` (a Unix datagram socket, like systemd's) collecting what a service says."""

    def __init__(self) -> None:
        # Unix socket paths are short (108 bytes): not under the test's own directory.
        self.directory = tempfile.mkdtemp(prefix="notify-")
        self.path = os.path.join(self.directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.states: list[str] = []

    def wait_for(self, state: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until a datagram holding the line ``state`` (e.g. ``READY=1``) arrives."""
        deadline = time.monotonic() + timeout
        while not any(state in message.splitlines() for message in self.states):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FailTest(f"no {state} within {timeout}s; got {self.states}")
            self.socket.settimeout(remaining)
            try:
                self.states.append(self.socket.recv(4096).decode("utf-8", "replace"))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.socket.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class InheritingProcess(Process):
    """A process started with one inherited descriptor (``pass_fds``)."""

    def __init__(self, name: str, argv: Sequence[str], directory: str, env: dict[str, str],
                 fd: int) -> None:
        super().__init__(name, argv, directory, env)
        self.fd = fd

    def start(self) -> None:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          cwd=self.directory, env=self.env, start_new_session=True,
                                          pass_fds=(self.fd,))


def connected_ids(process: Process) -> set[str]:
    """The connection ids of the sessions a daemon logged as connected."""
    ids = set()
    for line in process.stdout().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        attributes = record.get("attributes") or {}
        if str(record.get("body", "")).startswith("client connected") and "connection_id" in attributes:
            ids.add(attributes["connection_id"])
    return ids


def welcome_id(port: int) -> str:
    """Open a session on ``127.0.0.1:port``, read its ``Welcome`` and close; the ``request_id``."""
    with connect(f"ws://127.0.0.1:{port}/v1/agent/converse", open_timeout=TIMEOUT) as websocket:
        welcome = json.loads(websocket.recv(timeout=TIMEOUT))
    if welcome.get("type") != "Welcome":
        raise FailTest(f"expected Welcome, got {welcome}")
    return str(welcome["request_id"])


class SpreadMixin:
    def assertSpread(self, port: int, processes: Sequence[Process]) -> None:
        """Open sessions until each process has served at least one; every session is logged by exactly
        one of them."""
        opened: list[str] = []
        for _ in range(MAX_ATTEMPTS):
            opened.append(welcome_id(port))
            served = [connected_ids(p) & set(opened) for p in processes]
            if all(served) and sum(map(len, served)) == len(opened):
                break
        else:
            raise FailTest(f"{len(opened)} sessions did not spread over {len(processes)} processes: "
                           f"{[len(connected_ids(p) & set(opened)) for p in processes]}")
        a, b = (connected_ids(p) & set(opened) for p in processes)
        self.assertEqual(a & b, set())  # type: ignore[attr-defined]


def twistd_argv(*options: str) -> list[str]:
    return twistd_command() + ["-n", "--pidfile=", "openai-proxy", "--simulator", "--shutdown-grace", "1",
                               *options]


class SocketActivationTests(SystemTestCase, SpreadMixin):
    """``--listen systemd:domain=INET:index=0`` with the socket made by systemd (or like systemd does)."""

    def setUp(self) -> None:
        super().setUp()
        self.tool = shutil.which("systemd-socket-activate")

    def notify_listener(self) -> NotifyListener:
        listener = NotifyListener()
        self.addCleanup(listener.close)
        return listener

    def test_systemd_socket_activate(self) -> None:
        if self.tool is None:
            raise SkipTest("systemd-socket-activate is not installed (Debian package systemd)")
        port = free_port()
        notify = self.notify_listener()
        argv = [self.tool, "-l", f"127.0.0.1:{port}", "--fdname=web",
                "-E", f"NOTIFY_SOCKET={notify.path}", "-E", "PYTHONUNBUFFERED=1",
                *twistd_argv("--listen", "systemd:domain=INET:index=0")]
        process = Process("activated", argv, self.directory, clean_environment())
        self._track(process)
        process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while "Listening on" not in process.stderr():
            if process.exited() is not None or time.monotonic() > deadline:
                raise FailTest("systemd-socket-activate did not listen")
            time.sleep(0.05)
        # systemd-socket-activate starts the service on the first connection, and then becomes it.
        first = welcome_id(port)
        notify.wait_for("READY=1")
        self.assertIn(first, connected_ids(process))
        second = welcome_id(port)
        self.assertIn(second, connected_ids(process))
        process.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        self.assertEqual(process.wait(STOP_TIMEOUT), -signal.SIGTERM)

    def test_two_processes_inherit_one_socket(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        processes = []
        for index in (1, 2):
            notify = self.notify_listener()
            argv = [sys.executable, "-c", _INHERIT, str(listener.fileno()),
                    *twistd_argv("--listen", "systemd:domain=INET:index=0")]
            process = InheritingProcess(f"instance{index}", argv, self.directory,
                                        clean_environment(NOTIFY_SOCKET=notify.path), listener.fileno())
            self._track(process)
            process.start()
            notify.wait_for("READY=1")
            processes.append(process)
        # The test's own copy must not accept anything.
        listener.close()
        self.assertSpread(port, processes)
        # Stopping one instance leaves the socket (and the other instance) serving.
        processes[0].signal(signal.SIGTERM)
        self.assertEqual(processes[0].wait(STOP_TIMEOUT), -signal.SIGTERM)
        before = connected_ids(processes[1])
        self.assertIn(welcome_id(port), connected_ids(processes[1]) - before)


class ReusePortTests(SystemTestCase, SpreadMixin):
    """``--listen reuseport:PORT:interface=127.0.0.1`` in two processes."""

    def start_pair(self, shared: int) -> list[Daemon]:
        return [self.start_daemon("--simulator", "--listen", f"reuseport:{shared}:interface=127.0.0.1",
                                  name=f"daemon{index}", api_key=None) for index in (1, 2)]

    def test_two_processes_share_a_port(self) -> None:
        shared = free_port()
        daemons = self.start_pair(shared)
        self.assertSpread(shared, daemons)
        # One stops; the port goes on working with the other.
        daemons[0].signal(signal.SIGTERM)
        self.assertEqual(daemons[0].wait(STOP_TIMEOUT), -signal.SIGTERM)
        for _ in range(3):
            self.assertIn(welcome_id(shared), connected_ids(daemons[1]))

    def test_plain_listener_blocks_the_port(self) -> None:
        # A socket without SO_REUSEPORT on the port: the daemon cannot listen and says so.
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        process = self.run_command(
            twistd_argv("--listen", f"reuseport:{port}:interface=127.0.0.1"),
            env=clean_environment(), name="blocked")
        self.assertNotIn(process.exited(), (0, None))
        self.assertIn("Address already in use", process.stdout() + process.stderr())

    def test_bad_endpoint_strings(self) -> None:
        for description in ("reuseport:", "reuseport:http", "reuseport:8080:interface=nowhere",
                            "reuseport:70000", "reuseport:8080:backlog=0", "reuseport:8080:colour=red"):
            process = self.run_command(twistd_argv("--listen", description), env=clean_environment(),
                                       name="bad")
            self.assertEqual(process.exited(), 78, description)
            lines = [line for line in process.stderr().splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("--listen", lines[0])


