"""
The installed daemon as an operator meets it: command-line mistakes, the exit status systemd sees after
a stop.
"""

from __future__ import annotations

import os
import signal

from .support import (
    API_KEY,
    STOP_TIMEOUT,
    SystemTestCase,
    clean_environment,
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
