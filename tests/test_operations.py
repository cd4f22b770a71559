"""
The installed daemon as an operator meets it: command-line mistakes, the exit status systemd sees after
a stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Any

from twisted.trial.unittest import FailTest, SkipTest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from .support import (
    API_KEY,
    STOP_TIMEOUT,
    TIMEOUT,
    Daemon,
    SystemTestCase,
    agent_settings,
    clean_environment,
    connect_agent,
    texts,
    twistd_command,
)

UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "misc",
                    "openai-proxy.service")


def unit_settings(path: str, name: str) -> list[str]:
    """Every value of ``name=`` in a systemd unit file (continuation lines joined)."""
    with open(path, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.startswith(name + "=")]


class CommandLineTests(SystemTestCase):
    """A mistake on the command line: one line on stderr, nothing on stdout, exit status 78."""

    def twistd(self, *options: str) -> tuple[int | None, str, str]:
        process = self.run_command(
            twistd_command() + ["-n", "--pidfile=", "openai-proxy", *options],
            env=clean_environment(OPENAI_API_KEY=API_KEY), name="twistd")
        return process.exited(), process.stdout(), process.stderr()

    def test_usage_errors(self) -> None:
        cases = [
            (["--no-such-option"], "--no-such-option"),
            (["--listen"], "listen"),                              # a missing value
            (["--max-sessions"], "max-sessions"),
            (["-z"], "-z"),                                        # an unknown short option
            (["--simulator=yes"], "simulator"),                    # a flag given a value
            (["unexpected-argument"], "argument"),                 # a stray positional argument
        ]
        for options, named in cases:
            status, stdout, stderr = self.twistd(*options)
            self.assertEqual(status, 78, options)
            self.assertEqual(stdout, "", options)
            lines = [line for line in stderr.splitlines() if line.strip()]
            self.assertEqual(len(lines), 1, f"{options}: {lines}")
            self.assertTrue(lines[0].startswith("openai-proxy: configuration error: "), lines[0])
            self.assertIn(named, lines[0])

    def test_help_still_prints_and_succeeds(self) -> None:
        status, stdout, stderr = self.twistd("--help")
        self.assertEqual(status, 0)
        self.assertIn("--listen", stdout)
        self.assertIn("--allowed-origins", stdout)


class StopStatusTests(SystemTestCase):
    """What systemd sees when the daemon stops: the status of the real process, and the unit's rule."""

    def test_sigterm_and_sigint_end_with_the_signal(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            daemon = self.start_daemon("--simulator", name=f"daemon-{signum.name}", api_key=None)
            daemon.signal(signum)
            # twistd re-raises the signal after the drain: the parent sees "killed by <signal>".
            self.assertEqual(daemon.wait(STOP_TIMEOUT), -signum)
            self.assertIn("openai-proxy", daemon.stdout())
        # The unit declares those statuses clean, so the unit ends inactive, not failed.
        [success] = unit_settings(UNIT, "SuccessExitStatus")
        self.assertEqual(set(success.split()), {"SIGTERM", "SIGINT"})
        self.assertEqual(unit_settings(UNIT, "KillSignal"), ["SIGTERM"])
        self.assertIn("78", unit_settings(UNIT, "RestartPreventExitStatus"))


def _status(port: int, token: str | None) -> int:
    """101 when a session with ``token`` opens (its Welcome read), else the HTTP status of the refusal."""
    headers = {"Authorization": f"Token {token}"} if token else {}
    try:
        with connect(f"ws://127.0.0.1:{port}/v1/agent/converse", additional_headers=headers,
                     open_timeout=TIMEOUT) as websocket:
            json.loads(websocket.recv(timeout=TIMEOUT))
            return 101
    except InvalidStatus as e:
        return int(e.response.status_code)


class ReloadTests(SystemTestCase):
    """SIGHUP reloads the client tokens and the function URL prefixes; open sessions carry on; a bad
    reload keeps the running settings."""

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path + ".new", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".new", path)
        return path

    def reload(self, daemon: Daemon, expected: str) -> dict[str, Any]:
        """SIGHUP, then wait (bounded) for the next log record whose body starts with ``expected``."""
        seen = len(daemon.log_records())
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for record in daemon.log_records()[seen:]:
                if str(record.get("body", "")).startswith(("settings reloaded", "reload failed")):
                    self.assertTrue(record["body"].startswith(expected), record)
                    return record
            time.sleep(0.05)
        raise FailTest(f"no reload record within {TIMEOUT}s")

    def test_tokens_file(self) -> None:
        tokens = self.write("tokens", "old-token\n")
        simulator = self.start_simulator()
        daemon = self.start_daemon("--client-tokens-file", tokens, upstream=simulator)
        self.assertEqual(_status(daemon.port, "old-token"), 101)
        with connect_agent(daemon.base_url, token="old-token") as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")

            self.write("tokens", "# rotated\nnew-token\nsecond-token\n")
            record = self.reload(daemon, "settings reloaded")
            self.assertEqual(record["attributes"]["client_auth_entries"], 2)
            self.assertEqual(_status(daemon.port, "old-token"), 401)
            self.assertEqual(_status(daemon.port, "new-token"), 101)
            # The session opened with the old token goes on.
            agent.inject("Are you still there?")
            self.assertTrue(texts(agent.turn(), "assistant"))

            # Bad reloads: an empty file, a missing file.  The running tokens stay.
            self.write("tokens", "# nothing\n\n")
            record = self.reload(daemon, "reload failed")
            self.assertIn("holds no token", record["body"])
            self.assertEqual(_status(daemon.port, "new-token"), 101)
            os.remove(tokens)
            self.reload(daemon, "reload failed")
            self.assertEqual(_status(daemon.port, "second-token"), 101)
            self.assertEqual(_status(daemon.port, None), 401)
            agent.inject("And now?")
            self.assertTrue(texts(agent.turn(), "assistant"))
        self.assertNotIn("new-token", daemon.stdout())
        self.assertNotIn("old-token", daemon.stdout())

    def test_environment_file_tokens_and_prefixes(self) -> None:
        # The daemon runs in the test directory, so ./.env is its .env file.
        self.write(".env", "OPENAI_PROXY_CLIENT_TOKENS=env-one,env-two\n")
        daemon = self.start_daemon("--simulator", api_key=None)
        self.assertEqual(_status(daemon.port, "env-one"), 101)
        self.write(".env", "OPENAI_PROXY_CLIENT_TOKENS=env-three\n"
                           "OPENAI_PROXY_FUNCTION_URL_PREFIXES=http://127.0.0.1:9/tools/\n"
                           "OPENAI_REALTIME_MODEL=gpt-realtime-mini\n")
        record = self.reload(daemon, "settings reloaded")
        self.assertEqual(record["attributes"]["client_auth_entries"], 1)
        self.assertEqual(record["attributes"]["prefixes"], 1)
        # A setting that needs a restart is named as such.
        warnings = [r for r in daemon.log_records() if "a restart applies that" in str(r.get("body"))]
        self.assertEqual(len(warnings), 1)
        self.assertIn("model", warnings[0]["body"])
        self.assertEqual(_status(daemon.port, "env-one"), 401)
        self.assertEqual(_status(daemon.port, "env-three"), 101)
        # A bad prefix: refused, the previous values stay.
        self.write(".env", "OPENAI_PROXY_CLIENT_TOKENS=env-four\n"
                           "OPENAI_PROXY_FUNCTION_URL_PREFIXES=ftp://nowhere/\n")
        record = self.reload(daemon, "reload failed")
        self.assertIn("--function-url-prefixes", record["body"])
        self.assertEqual(_status(daemon.port, "env-four"), 401)
        self.assertEqual(_status(daemon.port, "env-three"), 101)
        # A .env file without tokens would turn authentication off: refused too.
        self.write(".env", "# emptied by mistake\n")
        record = self.reload(daemon, "reload failed")
        self.assertIn("cannot be removed by a reload", record["body"])
        self.assertEqual(_status(daemon.port, None), 401)
        self.assertEqual(_status(daemon.port, "env-three"), 101)
        # The process is still the same one, serving.
        self.assertIsNone(daemon.exited())


class UnitFileTests(SystemTestCase):
    """The shipped unit files pass ``systemd-analyze verify`` (with ExecStart= pointing at this twistd)."""

    def test_units_verify(self) -> None:
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed (Debian package systemd)")
        misc = os.path.dirname(UNIT)
        units = os.path.join(self.directory, "units")
        os.makedirs(units)
        for name in ("openai-proxy.service", "openai-proxy.socket", "openai-proxy@.service"):
            with open(os.path.join(misc, name), encoding="utf-8") as f:
                text = f.read()
            if name.endswith(".service"):
                self.assertIn("/opt/openai-proxy/bin/twistd", text)
            text = text.replace("/opt/openai-proxy/bin/twistd", twistd_command()[0])
            with open(os.path.join(units, name), "w", encoding="utf-8") as f:
                f.write(text)
        # An instance of the template, as systemctl would load it.
        shutil.copy(os.path.join(units, "openai-proxy@.service"), os.path.join(units, "openai-proxy@1.service"))
        process = self.run_command(
            [tool, "verify", "--man=no", *(os.path.join(units, name) for name in
                                           ("openai-proxy.service", "openai-proxy.socket",
                                            "openai-proxy@1.service"))],
            env=clean_environment(SYSTEMD_LOG_LEVEL="notice"), name="verify")
        complaints = [line for line in (process.stdout() + process.stderr()).splitlines()
                      if "openai-proxy" in line]
        self.assertEqual(complaints, [])
        self.assertEqual(process.exited(), 0)
        # The socket unit shares one socket between instances; the template inherits it.
        self.assertEqual(unit_settings(os.path.join(misc, "openai-proxy.socket"), "Accept"), ["no"])
        template = os.path.join(misc, "openai-proxy@.service")
        self.assertEqual(unit_settings(template, "Sockets"), ["openai-proxy.socket"])
        self.assertIn("--listen systemd:domain=INET:index=0", unit_settings(template, "ExecStart")[0])
        for unit in (UNIT, template):
            self.assertEqual(unit_settings(unit, "ExecReload"), ["/bin/kill -HUP $MAINPID"])
            self.assertEqual(unit_settings(unit, "SuccessExitStatus"), ["SIGTERM SIGINT"])
