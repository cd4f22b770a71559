"""What an operator reads at ``info``: one line per session start and end, one per refused client, and
no per-session factory lines from Twisted or Autobahn (the installed daemon, its real log)."""

from __future__ import annotations

from websockets.exceptions import InvalidStatus

from .support import SystemTestCase, agent_settings, connect_agent

TOKEN = "operator-log-token-6c1d"


class OperatorLogTests(SystemTestCase):
    def test_one_line_per_session_edge_and_refusal(self) -> None:
        daemon = self.start_daemon("--simulator", api_key=None, env={"OPENAI_PROXY_CLIENT_TOKENS": TOKEN})
        started = len(daemon.log_records())
        for _ in range(2):
            with connect_agent(daemon.base_url, token=TOKEN) as agent:
                agent.expect("Welcome")
                agent.send_settings(agent_settings(model="gpt-realtime"))
                agent.expect("SettingsApplied")
                agent.inject("Hello there")
                agent.turn()
        for token in ("wrong-token", f"{TOKEN}x"):
            with self.assertRaises(InvalidStatus), connect_agent(daemon.base_url, token=token):
                pass
        daemon.stop()
        bodies = [r.get("body", "") for r in daemon.log_records()[started:]]
        self.assertEqual([b for b in bodies if "factory" in b.lower()], [])
        self.assertEqual(len([b for b in bodies if b.startswith("client connected")]), 2)
        self.assertEqual(len([b for b in bodies if b.startswith("client closed")]), 2)
        refusals = [b for b in bodies if "refus" in b or "handshake" in b or "dropping connection" in b]
        self.assertEqual(refusals, ["client refused (HTTP 401): a valid token is required"] * 2)
        self.assertFalse([b for b in bodies if b.startswith(("upstream open", "upstream closed"))], bodies)
