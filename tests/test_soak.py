"""
A short soak (``benchmarks/soak.py``) against the installed daemon: a few rounds of short sessions of
every ending, upstream drops included, beside one long session. Asserted on counts only: once the
sessions of a round are closed, the daemon holds exactly the descriptors it held after the first round,
never more than a handful above what it held with only the long session open; every session ended
(none stuck), and the long session kept answering throughout.
"""

from __future__ import annotations

import json
import os
import sys

from .support import SystemTestCase, clean_environment

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "soak.py")
SESSIONS = 120
ROUND = 30


class ShortSoakTests(SystemTestCase):
    def test_descriptors_do_not_grow(self) -> None:
        figures = os.path.join(self.directory, "soak.json")
        process = self.run_command(
            [sys.executable, SOAK, "--sessions", str(SESSIONS), "--concurrency", "6",
             "--round", str(ROUND), "--drop-every", "4", "--max-seconds", "240", "--json", figures],
            env=clean_environment(), timeout=300, name="soak")
        self.assertEqual(process.exited(), 0, process.describe())
        with open(figures, encoding="utf-8") as f:
            result = json.load(f)

        self.assertFalse(result["stopped_by_time"])
        outcomes = result["outcomes"]
        self.assertEqual(sum(outcomes.values()), SESSIONS, outcomes)
        self.assertNotIn("stuck", outcomes)
        for ending in ("turn", "barge", "abort", "early", "upstream_failure"):
            self.assertGreater(outcomes.get(ending, 0), 0, (ending, outcomes))
        self.assertEqual([k for k in outcomes if k.startswith("error")], [], outcomes)

        fds = [sample["fds"] for sample in result["samples"]]
        self.assertEqual(len(fds), SESSIONS // ROUND)
        self.assertEqual(fds[1:], [fds[0]] * (len(fds) - 1), "descriptors grew")
        # Bounded: settled rounds hold what the daemon held with only the long session open, give or
        # take what a first round opens once (nothing more, here).
        self.assertLessEqual(fds[0], result["fds_before_sessions"] + 2)

        self.assertGreater(result["long_turns"], 0)
        self.assertEqual(result["long_problems"], [])
