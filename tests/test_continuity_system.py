"""
A conversation that outlives its upstream sessions (SPEC §8), through the installed ``twistd`` daemon
with its built-in simulator and the official ``deepgram-sdk`` client: simulated sessions expire after
4 s, the daemon rolls them over after 2 s, and the third upstream session is dropped (a TCP abort).
The conversation crosses two rollovers and a reconnection and still answers a question about what
was said before the first switch.
"""

from __future__ import annotations

from typing import Any

from .support import SystemTestCase, agent_settings, connect_agent, texts

FIRST = "Tell me about the sea"


def _switches(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["attributes"] for r in records
            if str(r.get("body", "")).startswith("switched to a new upstream session")]


class ContinuitySystemTests(SystemTestCase):
    def test_two_rollovers_and_a_drop(self) -> None:
        daemon = self.start_daemon(
            "--simulator", "--simulator-expire-after", "4", "--rollover-after", "2",
            "--simulator-drop", "after=1,session=3", api_key=None)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.inject(FIRST)
            self.assertIn(f"You said: {FIRST}", texts(agent.turn(), "assistant"))
            # Session 2 comes by a rollover; session 3 too, and it is dropped a second later.
            reconnecting = agent.expect("Warning", code="UPSTREAM_RECONNECTING", timeout=20)
            self.assertIn("reconnecting", reconnecting["description"])
            agent.expect("Warning", code="UPSTREAM_RECONNECTED", timeout=20)
            agent.inject("What did I say first?")
            frames = agent.turn()
            self.assertIn(f"You first said: {FIRST}", texts(frames, "assistant"))
            self.assertNotIn("Error", [f.get("type") for f in agent.frames if isinstance(f, dict)])
            upstream_warnings = [f["code"] for f in agent.frames if isinstance(f, dict)
                                 and str(f.get("code")).startswith("UPSTREAM_")]
            self.assertEqual(upstream_warnings[:2], ["UPSTREAM_RECONNECTING", "UPSTREAM_RECONNECTED"])
        daemon.stop()
        switches = _switches(daemon.log_records())
        reasons = [s["switch_reason"] for s in switches]
        self.assertGreaterEqual(reasons.count("rollover"), 2, reasons)
        # (A rollover that finds the agent still speaking at the last moment is forced.)
        self.assertEqual([r.replace("forced_", "") for r in reasons[:3]],
                         ["rollover", "rollover", "reconnect"])
        for switch in switches:
            self.assertGreaterEqual(switch["replayed_items"], 2)
            self.assertIsInstance(switch["switch_ms"], int)
