"""
What a newcomer pastes: the README's Python client (``examples/python_agent.py``) against the installed
daemon on its built-in simulator, and the Azure OpenAI upstream shape end to end.
"""

from __future__ import annotations

import os
import sys
import wave

from openai_proxy.simulator.speak import speech_wav

from .support import (
    API_KEY,
    SystemTestCase,
    agent_settings,
    check_server_frames,
    check_upstream_events,
    connect_agent,
    texts,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


class PythonExampleTests(SystemTestCase):
    def test_text_and_spoken_turn(self) -> None:
        daemon = self.start_daemon("--simulator", api_key=None)
        question = os.path.join(self.directory, "question.wav")
        # 16 kHz, as a typical microphone recording: the daemon resamples it.
        speech_wav("what is the weather in paris", question, rate=16000)
        reply = os.path.join(self.directory, "reply.wav")
        run = self.run_command(
            [sys.executable, os.path.join(EXAMPLES, "python_agent.py"), "--url", daemon.base_url,
             "--wav", question, "--out", reply, "--timeout", "15"],
            timeout=60, name="example")
        self.assertEqual(run.exited(), 0, run.describe())
        self.assertEqual(run.stdout().splitlines(), [
            "user: Hello there",
            "assistant: You said: Hello there",
            "user: what is the weather in paris",
            "assistant: You said: what is the weather in paris",
        ])
        with wave.open(reply, "rb") as audio:
            self.assertEqual((audio.getnchannels(), audio.getsampwidth(), audio.getframerate()),
                             (1, 2, 24000))
            # Two spoken replies of 20+ characters at about 60 ms a character.
            self.assertGreater(audio.getnframes(), 2 * 24000)


class AzureUpstreamTests(SystemTestCase):
    """The daemon against the simulator speaking Azure OpenAI's GA shape (path, api-key header,
    deployment as the model); the simulator refuses anything else."""

    def test_conversation_through_azure_shape(self) -> None:
        simulator = self.start_simulator(extra=["--azure"])
        daemon = self.start_daemon("--upstream-url", simulator.upstream_url(), "--upstream-kind", "azure",
                                   "--model", "voice-prod", api_key=None,
                                   env={"AZURE_OPENAI_API_KEY": API_KEY})
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())  # names gpt-4o-mini: the deployment is used instead
            warning = agent.expect("Warning")
            self.assertEqual(warning["code"], "MODEL_REPLACED")
            agent.expect("SettingsApplied")
            agent.inject("Hello there")
            frames = agent.turn()
        check_server_frames(agent.frames)
        self.assertEqual(texts(frames, "assistant"), ["You said: Hello there"])
        check_upstream_events(simulator.received())
        self.assertNotIn(API_KEY, daemon.stdout() + daemon.stderr())

    def test_openai_shape_is_refused(self) -> None:
        simulator = self.start_simulator(extra=["--azure"])
        daemon = self.start_daemon("--upstream-url", simulator.upstream_url(), "--upstream-kind", "openai")
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings(model="gpt-realtime"))
            self.assertEqual(agent.expect("Error")["code"], "UPSTREAM_AUTH_FAILED")
