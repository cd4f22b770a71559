"""
The simulated upstream's fault injection from the command line: ``twistd openai-proxy --simulator
--simulator-expire-after / --simulator-drop`` and ``python -m openai_proxy.simulator --expire-after /
--drop-after``, with the official ``deepgram-sdk`` client. Each case checks where the upstream
connection ended (the daemon's ``upstream closed`` log record carries the close code) and that the
client was told about it.
"""

from __future__ import annotations

import time
from typing import Any

from .support import (
    SystemTestCase,
    agent_settings,
    clean_environment,
    connect_agent,
    texts,
    twistd_command,
)


def _upstream_closes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["attributes"] for r in records
            if str(r.get("body", "")).startswith("upstream closed")]


def _switches(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["attributes"] for r in records
            if str(r.get("body", "")).startswith("switched to a new upstream session")]


def _told_about_upstream(frames: list[Any]) -> bool:
    # How the client is told (an Error, or a Warning while the daemon reconnects) is the session's
    # business; what these tests check is where and how the upstream connection ended.
    last = frames[-1]
    return isinstance(last, dict) and last.get("type") in ("Error", "Warning")


class DaemonSimulatorFaultTests(SystemTestCase):
    def test_drop_during_agent_audio(self) -> None:
        daemon = self.start_daemon(
            "--simulator", "--simulator-drop",
            "event=response.output_audio.delta,nth=3,close=1011", api_key=None)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.inject("Tell me about the sea")
            frames = agent.read_until(_told_about_upstream, what="an Error or Warning")
        audio_frames = [f for f in frames if isinstance(f, bytes)]
        self.assertTrue(audio_frames, "agent audio before the drop")
        daemon.stop()
        closes = _upstream_closes(daemon.log_records())
        self.assertEqual([c["close_code"] for c in closes][:1], [1011])

    def test_sessions_expire_after_the_chosen_seconds(self) -> None:
        # The simulated sessions announce their 1.5-second life in session.created; the daemon rolls
        # each over before it ends (at 55/60 of it), so no session reaches its expiry and the
        # client notices nothing.
        daemon = self.start_daemon("--simulator", "--simulator-expire-after", "1.5", api_key=None)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.inject("Tell me about the sea")
            agent.turn()
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and len(_switches(daemon.log_records())) < 2:
                time.sleep(0.05)
            agent.inject("What did I say first?")
            self.assertIn("You first said: Tell me about the sea", texts(agent.turn(), "assistant"))
        self.assertEqual([f for f in agent.frames if isinstance(f, dict) and (
            f.get("type") == "Error" or str(f.get("code")).startswith("UPSTREAM_"))], [])
        daemon.stop()
        records = daemon.log_records()
        self.assertGreaterEqual(len(_switches(records)), 2)
        # (A rollover that finds the agent still speaking at the last moment is forced.)
        self.assertLessEqual({s["switch_reason"] for s in _switches(records)},
                             {"rollover", "forced_rollover"})
        self.assertNotIn(1001, [c["close_code"] for c in _upstream_closes(records)])

    def test_bad_fault_option_stops_the_start(self) -> None:
        process = self.run_command(
            twistd_command() + ["-n", "--pidfile=", "openai-proxy", "--listen",
                                "tcp:0:interface=127.0.0.1", "--simulator", "--simulator-drop",
                                "after=1,close=1006"],
            env=clean_environment(), name="twistd")
        self.assertEqual(process.exited(), 78)
        self.assertIn("--simulator-drop: 'after=1,close=1006': close: 1006 cannot be sent",
                      process.stderr())


class SimulatorProcessFaultTests(SystemTestCase):
    def test_drop_after_seconds_is_an_abort(self) -> None:
        simulator = self.start_simulator(extra=["--drop-after", "1", "--expire-after", "600"])
        daemon = self.start_daemon(upstream=simulator)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.read_until(_told_about_upstream, timeout=10, what="an Error or Warning")
        daemon.stop()
        closes = _upstream_closes(daemon.log_records())
        self.assertEqual([c["close_code"] for c in closes][:1], [1006])
        self.assertIn("simulated drop of session", simulator.stderr())
