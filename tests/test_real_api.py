"""
The daemon against the real OpenAI Realtime API.  Runs only when ``OPENAI_API_KEY`` is set (it costs a
little): one short spoken reply through the official Deepgram SDK.
"""

from __future__ import annotations

import os
import unittest

from .support import (
    TIMEOUT,
    SystemTestCase,
    agent_settings,
    audio_of,
    check_server_frames,
    connect_agent,
    texts,
)


class RealAPITests(SystemTestCase):
    def setUp(self) -> None:
        self.key = os.environ.get("OPENAI_API_KEY", "")
        if not self.key:
            raise unittest.SkipTest("OPENAI_API_KEY is not set")
        super().setUp()

    def test_one_reply(self) -> None:
        # The default upstream: wss://api.openai.com/v1/realtime, gpt-realtime.
        daemon = self.start_daemon(api_key=self.key)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings(model="gpt-realtime"))
            agent.expect("SettingsApplied", timeout=2 * TIMEOUT)
            agent.inject("Please answer with one short sentence: what colour is the sky?")
            turn = agent.turn(timeout=4 * TIMEOUT)
        [reply] = texts(turn, "assistant")
        self.assertTrue(reply.strip())
        self.assertGreater(len(audio_of(turn)), 4800)
        check_server_frames(agent.frames)
        self.assertNotIn(self.key, daemon.stdout() + daemon.stderr())
