"""
The installed daemon (``twistd -n openai-proxy``) as a separate process, in front of the simulated
upstream (``python -m openai_proxy.simulator``), driven by the official ``deepgram-sdk`` agent client.
"""

from __future__ import annotations

import json
import os
import signal
import time
import wave
from typing import Any

from deepgram.core.api_error import ApiError
from twisted.trial.unittest import FailTest, SynchronousTestCase
from websockets.exceptions import InvalidStatus

from .support import (
    API_KEY,
    BIN,
    GET_WEATHER,
    STOP_TIMEOUT,
    TIMEOUT,
    SystemTestCase,
    agent_settings,
    audio_of,
    check_server_frames,
    check_upstream_events,
    clean_environment,
    connect_agent,
    texts,
    twistd_command,
    types_of,
)

GREETING = "Hi, I am the system test agent."
#: twistd stops on SIGTERM and then ends itself with that signal, so a parent sees why it ended;
#: systemd counts that as a clean stop, like exit status 0.
CLEAN_EXIT = (0, -signal.SIGTERM)


def refusal_status(error: Exception) -> int:
    """The HTTP status of a refused upgrade.  The SDK turns it into ``ApiError`` only for the
    websockets versions that raise ``InvalidStatusCode``; newer ones raise ``InvalidStatus``."""
    if isinstance(error, InvalidStatus):
        return int(error.response.status_code)
    assert isinstance(error, ApiError)
    return int(error.status_code or 0)


class ConversationTests(SystemTestCase):
    """A whole conversation through the SDK, with every frame on both legs validated."""

    def assertSpokenTurn(self, frames: list[Any]) -> None:
        kinds = types_of(frames)
        self.assertIn("AgentStartedSpeaking", kinds)
        self.assertIn("AgentAudioDone", kinds)
        first_audio = next(i for i, f in enumerate(frames) if isinstance(f, bytes))
        started = next(i for i, f in enumerate(frames)
                       if isinstance(f, dict) and f.get("type") == "AgentStartedSpeaking")
        done = max(i for i, f in enumerate(frames)
                   if isinstance(f, dict) and f.get("type") == "AgentAudioDone")
        last_audio = max(i for i, f in enumerate(frames) if isinstance(f, bytes))
        self.assertLess(started, first_audio)
        self.assertLess(last_audio, done)
        # 24 kHz pcm16: a short sentence is well over a tenth of a second of audio.
        self.assertGreater(len(audio_of(frames)), 4800)

    def test_conversation(self) -> None:
        simulator = self.start_simulator()
        daemon = self.start_daemon(upstream=simulator)
        with connect_agent(daemon.base_url) as agent:
            welcome = agent.expect("Welcome")
            self.assertIs(agent.frames[0], welcome)
            self.assertTrue(welcome["request_id"])

            agent.send_settings(agent_settings(greeting=GREETING, functions=[GET_WEATHER]))
            agent.expect("SettingsApplied")

            greeting = agent.turn()
            self.assertEqual(texts(greeting, "assistant"), [GREETING])
            self.assertSpokenTurn(greeting)

            agent.inject("Hello")
            hello = agent.turn()
            self.assertEqual(texts(hello, "user"), ["Hello"])
            self.assertLess(types_of(hello).index("ConversationText"),
                            types_of(hello).index("AgentStartedSpeaking"))
            self.assertEqual(texts(hello, "assistant"), ["You said: Hello"])
            self.assertSpokenTurn(hello)

            agent.inject("What is the weather in Paris?")
            request = agent.expect("FunctionCallRequest")
            self.assertEqual(texts(agent.frames, "user")[-1], "What is the weather in Paris?")
            [call] = request["functions"]
            self.assertEqual(call["name"], "get_weather")
            self.assertTrue(call["client_side"])
            self.assertEqual(json.loads(call["arguments"]), {"city": "Paris"})
            agent.function_response(call["id"], call["name"], "Sunny and 21 degrees")
            answer = agent.turn()
            [reply] = texts(answer, "assistant")
            self.assertIn("Sunny and 21 degrees", reply)
            self.assertSpokenTurn(answer)

        check_server_frames(agent.frames)
        events = self.upstream_after_close(daemon, simulator)
        check_upstream_events(events)
        kinds = [e["type"] for e in events]
        self.assertEqual(kinds[0], "session.update")
        outputs = [e["item"] for e in events if e["type"] == "conversation.item.create"
                   and e["item"].get("type") == "function_call_output"]
        # Exactly one output went up, with the client's content (the simulator, like the API,
        # refuses an output whose call_id it does not know).
        self.assertEqual([o["output"] for o in outputs], ["Sunny and 21 degrees"])

    def upstream_after_close(self, daemon: Any, simulator: Any) -> list[dict[str, Any]]:
        """What reached the simulator, once the daemon has stopped (so nothing is still in flight)."""
        self.assertIn(daemon.stop(), CLEAN_EXIT)
        return simulator.received()


class ClientTokenTests(SystemTestCase):
    """``--client-tokens-file``: the SDK's ``Authorization: Token <key>`` is checked before the upgrade."""

    def test_right_token_accepted_wrong_refused(self) -> None:
        tokens = os.path.join(self.directory, "client-tokens")
        with open(tokens, "w", encoding="utf-8") as f:
            f.write("# one token a line\nclient-token-alpha\nclient-token-beta\n")
        simulator = self.start_simulator()
        daemon = self.start_daemon("--client-tokens-file", tokens, upstream=simulator)

        with connect_agent(daemon.base_url, token="client-token-beta") as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
        check_server_frames(agent.frames)

        for wrong in ("client-token-gamma", "client-token-alph"):
            with self.assertRaises((ApiError, InvalidStatus)) as refused:
                with connect_agent(daemon.base_url, token=wrong):
                    pass
            self.assertEqual(refusal_status(refused.exception), 401)
        self.assertEqual(daemon.http_status("/readyz"), 200)
        daemon.stop()
        log = daemon.stdout() + daemon.stderr()
        for secret in ("client-token-beta", "client-token-gamma", API_KEY):
            self.assertNotIn(secret, log)


class ConfigurationTests(SystemTestCase):
    """Configuration problems stop ``twistd`` at once with one line naming the setting."""

    def twistd(self, *options: str, env: dict[str, str] | None = None) -> Any:
        process = self.run_command(
            twistd_command() + ["-n", "--pidfile=", "openai-proxy", *options],
            env=clean_environment(**(env or {})), name="twistd")
        status = process.exited()
        self.assertNotIn(status, (0, None))
        lines = [line for line in process.stderr().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"stderr: {lines}")
        return lines[0]

    def test_no_key(self) -> None:
        line = self.twistd("--listen", "tcp:0:interface=127.0.0.1")
        self.assertIn("OPENAI_API_KEY", line)

    def test_bad_listen(self) -> None:
        for endpoint in ("tcp:not-a-port", "nonsense:8080"):
            line = self.twistd("--listen", endpoint, env={"OPENAI_API_KEY": API_KEY})
            self.assertIn("--listen", line)
            self.assertNotIn(API_KEY, line)


class DrainTests(SystemTestCase):
    """SIGTERM: no new sessions, open ones get the grace period, then 1001, then a clean exit."""

    def test_sigterm_drains(self) -> None:
        grace = 1.0
        simulator = self.start_simulator()
        daemon = self.start_daemon(upstream=simulator, grace=grace)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")

            daemon.signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            status = daemon.http_status("/readyz")
            while status == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                status = daemon.http_status("/readyz")
            # Draining answers 503; once the listener has closed nothing answers.
            self.assertIn(status, (503, None))

            self.assertEqual(agent.wait_closed(timeout=grace + 5), 1001)
        self.assertIn(daemon.wait(STOP_TIMEOUT), CLEAN_EXIT)
        check_server_frames(agent.frames)


class BuiltinSimulatorTests(SystemTestCase):
    """``--simulator``: the daemon alone, no key, no network."""

    def test_sdk_and_cli(self) -> None:
        daemon = self.start_daemon("--simulator", api_key=None)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.inject("Hello")
            turn = agent.turn()
            self.assertEqual(texts(turn, "assistant"), ["You said: Hello"])
            self.assertTrue(audio_of(turn))
        check_server_frames(agent.frames)

        # What the README's "Try it" command runs.
        wav = os.path.join(self.directory, "reply.wav")
        cli = self.run_command([os.path.join(BIN, "openai-proxy-cli"), "--url", daemon.agent_url,
                                "--text", "Hello", "--wav", wav], name="cli", timeout=30)
        self.assertEqual(cli.exited(), 0, cli.describe())
        self.assertIn("agent: You said: Hello", cli.stdout())
        with wave.open(wav, "rb") as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (1, 2, 24000))
            self.assertGreater(w.getnframes(), 2400)


class UpstreamRefusalTests(SystemTestCase):
    """The upstream refuses the daemon's key: the client learns why, the daemon goes on."""

    def test_upstream_refuses_key(self) -> None:
        simulator = self.start_simulator(api_key="sk-another-key-altogether")
        daemon = self.start_daemon(upstream=simulator)
        for _ in range(2):  # the second session shows the daemon still serves
            with connect_agent(daemon.base_url) as agent:
                agent.expect("Welcome")
                agent.send_settings(agent_settings())
                error = agent.expect("Error")
                self.assertEqual(error["code"], "UPSTREAM_AUTH_FAILED", error)
                self.assertIsNotNone(agent.wait_closed())
            check_server_frames(agent.frames)
            self.assertNotIn("SettingsApplied", types_of(agent.frames))
            for frame in agent.frames:
                self.assertNotIn(API_KEY, json.dumps(frame) if isinstance(frame, dict) else "")
            self.assertIsNone(daemon.exited())
            self.assertEqual(daemon.http_status("/readyz"), 200)
        daemon.stop()
        self.assertNotIn(API_KEY, daemon.stdout() + daemon.stderr())


class LogTests(SystemTestCase):
    """``LOG_LEVEL=debug``: JSON records per message, tied to the session, never the key."""

    def test_debug_log(self) -> None:
        simulator = self.start_simulator()
        daemon = self.start_daemon(upstream=simulator, env={"LOG_LEVEL": "debug"})
        with connect_agent(daemon.base_url) as agent:
            welcome = agent.expect("Welcome")
            agent.send_settings(agent_settings(functions=[GET_WEATHER]))
            agent.expect("SettingsApplied")
            agent.inject("Hello")
            agent.turn()
        self.assertIn(daemon.stop(), CLEAN_EXIT)

        records = daemon.log_records()
        mine = [r for r in records
                if r.get("attributes", {}).get("connection_id") == welcome["request_id"]]
        seen = {(r["attributes"]["direction"], r["attributes"].get("message_type")) for r in mine
                if "direction" in r["attributes"]}
        for expected in [
            ("daemon->client", "Welcome"),
            ("client->daemon", "Settings"),
            ("daemon->upstream", "session.update"),
            ("upstream->daemon", "session.updated"),
            ("daemon->client", "SettingsApplied"),
            ("client->daemon", "InjectUserMessage"),
            ("daemon->upstream", "conversation.item.create"),
            ("daemon->upstream", "response.create"),
            ("upstream->daemon", "response.done"),
            ("daemon->client", "ConversationText"),
            ("daemon->client", "AgentAudioDone"),
        ]:
            self.assertIn(expected, seen)
        self.assertTrue(any(r.get("severity_text") == "DEBUG" for r in mine))

        self.assertNotIn(API_KEY, daemon.stdout() + daemon.stderr())
        for frame in agent.frames:
            if isinstance(frame, bytes):
                self.assertNotIn(API_KEY.encode(), frame)
            else:
                self.assertNotIn(API_KEY, json.dumps(frame))


class CheckerTests(SynchronousTestCase):
    """The frame and event checks used above do refuse what they must (in memory, no process)."""

    def test_server_frames(self) -> None:
        check_server_frames([
            {"type": "Welcome", "request_id": "r"},
            {"type": "AgentStartedSpeaking", "total_latency": 0.1, "tts_latency": 0.05,
             "ttt_latency": 0.05},
            b"\x00\x00\x01\x00",
            {"type": "AgentAudioDone"},
            {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 1.5},
        ])
        for bad in [
            [{"type": "Welcome"}],  # request_id missing
            [{"type": "Welcome", "request_id": "r", "session_id": "s"}],  # unknown field
            [{"type": "ConversationText", "role": "narrator", "content": "x"}],
            [{"type": "UtteranceEnd", "channel": [0], "last_word_end": 1.5}],
            [{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": True}],
            [{"type": "SpeechStarted"}],
            [{"type": "AgentStartedSpeaking", "total_latency": 0, "tts_latency": 0,
              "ttt_latency": 0}, b"\x00\x00\x00", {"type": "AgentAudioDone"}],  # half a sample
            [b"\x00\x00"],  # audio outside a spoken reply
        ]:
            self.assertRaises(FailTest, check_server_frames, bad)

    def test_upstream_events(self) -> None:
        good = {"type": "session.update", "session": {
            "type": "realtime", "audio": {"output": {"voice": "marin"}}}}
        check_upstream_events([good, {"type": "response.create"}])
        for bad in [
            {"type": "session.update", "session": {"type": "realtime", "voice": "marin"}},
            {"type": "session.update", "session": {"type": "realtime", "temperature": 0.7}},
            {"type": "session.update", "session": {"modalities": ["audio"]}},
            {"type": "response.create", "response": {"temperature": 0.7}},
            {"type": "input_audio_buffer.append"},
        ]:
            self.assertRaises(FailTest, check_upstream_events, [good, bad])
