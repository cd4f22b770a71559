"""Tests for openai_proxy.cli against a small fake Deepgram v1 server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import wave
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

import openai_proxy
from openai_proxy.cli import (
    AgentAudio,
    CancelTimer,
    Conversation,
    Finish,
    NeedLine,
    Print,
    SendJSON,
    StartTimer,
    build_settings,
    run,
)

reactor: Any = _global_reactor

SAMPLES_PER_FRAME = 480
FRAMES_PER_REPLY = 3


def audio_frame(turn: int, index: int) -> bytes:
    """A recognisable 20 ms pcm16 frame."""
    value = turn * 100 + index
    return struct.pack(f"<{SAMPLES_PER_FRAME}h", *([value] * SAMPLES_PER_FRAME))


class FakeAgentProtocol(WebSocketServerProtocol):
    """Answers like a Deepgram v1 agent, one message per reactor turn."""

    @property
    def fake(self) -> FakeAgentFactory:
        return cast(FakeAgentFactory, self.factory)

    def onConnect(self, request: Any) -> None:
        self.fake.request_headers.append(dict(request.headers))
        if self.fake.refuse_status:
            raise ConnectionDeny(self.fake.refuse_status, "Unauthorized")

    def connectionMade(self) -> None:
        self.gone: Deferred[None] = Deferred()
        self.pending: list[IDelayedCall] = []
        self.fake.connections.append(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in self.pending:
            if call.active():
                call.cancel()
        super().connectionLost(reason)
        self.gone.callback(None)

    def onOpen(self) -> None:
        self.send({"type": "Welcome", "request_id": "5f0c7b5e-1111-4222-8333-944445555666"})

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.fake.close_codes.append(code)

    def send(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode(), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = json.loads(payload)
        self.fake.received.append(message)
        kind = message["type"]
        if kind == "Settings":
            self.send({"type": "SettingsApplied"})
            greeting = message["agent"].get("greeting")
            if greeting:
                self.reply(None, greeting)
        elif kind == "InjectUserMessage":
            if self.fake.replying:
                self.fake.overlaps += 1
            self.fake.turns += 1
            mode = self.fake.mode
            if mode == "error":
                self.send({"type": "Error", "code": "UPSTREAM_UNAVAILABLE", "description": "upstream down"})
            elif mode == "close":
                self.sendClose(code=4000, reason="upstream gone")
            elif mode == "silent":
                pass
            else:
                if mode == "warn":
                    self.send({"type": "Warning", "code": "MODEL_REPLACED", "description": "using gpt-realtime"})
                self.reply(message["content"], f"You said: {message['content']}")

    def reply(self, user_text: str | None, answer: str) -> None:
        turn = self.fake.turns
        steps: list[Any] = []
        if user_text is not None:
            steps.append({"type": "ConversationText", "role": "user", "content": user_text})
        steps.append({"type": "AgentStartedSpeaking", "total_latency": 0.1, "tts_latency": 0.05, "ttt_latency": 0.05})
        steps.extend(audio_frame(turn, i) for i in range(FRAMES_PER_REPLY))
        text = {"type": "ConversationText", "role": "assistant", "content": answer}
        done = {"type": "AgentAudioDone"}
        steps.extend([done, text] if self.fake.audio_done_first else [text, done])
        self.fake.replying = True
        self.next_step(steps)

    def next_step(self, steps: list[Any]) -> None:
        if not steps:
            self.fake.replying = False
            return
        step = steps.pop(0)
        if not steps:
            # The reply is over once its last message is sent: a client that answers it at once
            # (within the next reactor turn) is not overlapping it.
            self.fake.replying = False
        if isinstance(step, bytes):
            self.sendMessage(step, isBinary=True)
        else:
            self.send(step)
        self.pending.append(reactor.callLater(0.001, self.next_step, steps))


class FakeAgentFactory(WebSocketServerFactory):
    protocol = FakeAgentProtocol

    def __init__(self, url: str) -> None:
        super().__init__(url, reactor=reactor)
        self.mode = "answer"
        self.audio_done_first = False
        self.refuse_status = 0
        self.request_headers: list[dict[str, str]] = []
        self.received: list[dict[str, Any]] = []
        self.close_codes: list[int | None] = []
        self.connections: list[FakeAgentProtocol] = []
        self.replying = False
        self.overlaps = 0
        self.turns = 0

    def sent_types(self) -> list[str]:
        return [m["type"] for m in self.received]


class CliTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.server = FakeAgentFactory("ws://127.0.0.1")
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.url = f"ws://127.0.0.1:{self.port.getHost().port}/v1/agent/converse"
        self.addCleanup(self._stop_server)

    async def _stop_server(self) -> None:
        await gatherResults([c.gone for c in self.server.connections])
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped

    async def cli(self, *args: str, stdin: io.StringIO | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["--url", self.url, *args], out, err, stdin=stdin)
        return code, out.getvalue(), err.getvalue()


class ConversationOverWebSocketTests(CliTestCase):
    async def test_turns_are_printed_in_order(self) -> None:
        code, out, err = await self.cli("--text", "hello", "--text", "again")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            ["user: hello", "agent: You said: hello", "user: again", "agent: You said: again"],
        )
        self.assertEqual(self.server.sent_types(), ["Settings", "InjectUserMessage", "InjectUserMessage"])
        self.assertEqual([m.get("content") for m in self.server.received[1:]], ["hello", "again"])
        # The second message waited for the first turn to finish.
        self.assertEqual(self.server.overlaps, 0)
        self.assertEqual(self.server.close_codes, [1000])

    async def test_settings_shape(self) -> None:
        code, _, _ = await self.cli("--text", "hi", "--prompt", "Be brief.", "--voice", "marin")
        self.assertEqual(code, 0)
        settings = self.server.received[0]
        self.assertEqual(
            settings["audio"],
            {
                "input": {"encoding": "linear16", "sample_rate": 24000},
                "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
            },
        )
        self.assertEqual(settings["agent"]["think"]["provider"]["type"], "open_ai")
        self.assertEqual(settings["agent"]["think"]["prompt"], "Be brief.")
        self.assertEqual(settings["agent"]["speak"]["provider"]["type"], "open_ai")
        self.assertEqual(settings["agent"]["speak"]["provider"]["voice"], "marin")
        self.assertNotIn("greeting", settings["agent"])

    async def test_wav_holds_the_agent_audio(self) -> None:
        path = self.mktemp() + ".wav"
        code, _, _ = await self.cli("--text", "one", "--text", "two", "--wav", path)
        self.assertEqual(code, 0)
        with wave.open(path, "rb") as wav:
            self.assertEqual(wav.getnchannels(), 1)
            self.assertEqual(wav.getsampwidth(), 2)
            self.assertEqual(wav.getframerate(), 24000)
            self.assertEqual(wav.getnframes(), 2 * FRAMES_PER_REPLY * SAMPLES_PER_FRAME)
            frames = wav.readframes(wav.getnframes())
        expected = b"".join(audio_frame(turn, i) for turn in (1, 2) for i in range(FRAMES_PER_REPLY))
        self.assertEqual(frames, expected)

    async def test_token_is_sent_as_authorization(self) -> None:
        await self.cli("--text", "x", "--token", "client-token-1")
        await self.cli("--text", "x")
        self.assertEqual(self.server.request_headers[0].get("authorization"), "Token client-token-1")
        self.assertNotIn("authorization", self.server.request_headers[1])

    async def test_stdin_lines_without_text(self) -> None:
        code, out, _ = await self.cli(stdin=io.StringIO("first\n\n   \nsecond"))
        self.assertEqual(code, 0)
        self.assertEqual([m.get("content") for m in self.server.received[1:]], ["first", "second"])
        self.assertEqual(out.splitlines()[-1], "agent: You said: second")

    async def test_empty_stdin_configures_and_exits_zero(self) -> None:
        code, out, err = await self.cli(stdin=io.StringIO(""))
        self.assertEqual((code, out, err), (0, "", ""))
        self.assertEqual(self.server.sent_types(), ["Settings"])

    async def test_greeting_finishes_before_first_message(self) -> None:
        code, out, _ = await self.cli("--greeting", "Hi, how can I help?", "--text", "hello")
        self.assertEqual(code, 0)
        self.assertEqual(self.server.received[0]["agent"]["greeting"], "Hi, how can I help?")
        self.assertEqual(out.splitlines()[0], "agent: Hi, how can I help?")
        self.assertEqual(self.server.overlaps, 0)

    async def test_audio_done_before_text_still_ends_the_turn(self) -> None:
        self.server.audio_done_first = True
        code, out, _ = await self.cli("--text", "a", "--text", "b")
        self.assertEqual(code, 0)
        self.assertEqual(self.server.overlaps, 0)
        self.assertEqual(out.splitlines()[-1], "agent: You said: b")

    async def test_verbose_prints_every_message_type(self) -> None:
        code, _, err = await self.cli("--text", "hi", "--verbose")
        self.assertEqual(code, 0)
        lines = err.splitlines()
        for expected in (
            "< Welcome",
            "> Settings",
            "< SettingsApplied",
            "> InjectUserMessage",
            "< ConversationText",
            "< AgentStartedSpeaking",
            f"< audio {SAMPLES_PER_FRAME * 2} bytes",
            "< AgentAudioDone",
        ):
            self.assertIn(expected, lines)
        self.assertLess(lines.index("< Welcome"), lines.index("> Settings"))

    async def test_warning_goes_to_stderr_and_session_continues(self) -> None:
        self.server.mode = "warn"
        code, out, err = await self.cli("--text", "hi")
        self.assertEqual(code, 0)
        self.assertEqual(err, "warning MODEL_REPLACED: using gpt-realtime\n")
        self.assertIn("agent: You said: hi", out)


class FailureTests(CliTestCase):
    async def test_error_exits_one_and_closes_cleanly(self) -> None:
        self.server.mode = "error"
        code, out, err = await self.cli("--text", "hi", "--text", "never sent")
        self.assertEqual(code, 1)
        self.assertEqual(err, "error UPSTREAM_UNAVAILABLE: upstream down\n")
        self.assertEqual(self.server.sent_types(), ["Settings", "InjectUserMessage"])
        self.assertEqual(self.server.close_codes, [1000])

    async def test_refused_connection(self) -> None:
        await self.port.stopListening()
        self.server.connections.clear()
        code, out, err = await self.cli("--text", "hi")
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(err, f"cannot connect to {self.url}: connection refused\n")

    async def test_refused_handshake(self) -> None:
        self.server.refuse_status = 401
        code, _, err = await self.cli("--text", "hi", "--token", "wrong")
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertTrue(err.startswith(f"cannot connect to {self.url}: HTTP 401"), err)

    async def test_timeout_without_answer(self) -> None:
        self.server.mode = "silent"
        code, _, err = await self.cli("--text", "hello there", "--timeout", "0.2")
        self.assertEqual(code, 1)
        self.assertEqual(err, "timeout: no answer to 'hello there' within 0.2 s\n")
        self.assertEqual(self.server.close_codes, [1000])

    async def test_daemon_closing_mid_turn(self) -> None:
        self.server.mode = "close"
        code, _, err = await self.cli("--text", "hi")
        self.assertEqual(code, 1)
        self.assertIn("connection closed by the daemon: code 4000: upstream gone", err)

    async def test_bad_arguments(self) -> None:
        code, _, err = await self.cli("--timeout", "soon")
        self.assertEqual(code, 2)
        self.assertIn("--timeout", err)
        self.assertEqual(self.server.received, [])

    async def test_help_goes_to_stdout(self) -> None:
        code, out, err = await self.cli("--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("--timeout SECONDS", out)

    async def test_bad_url(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        code = await run(reactor, ["--url", "http://127.0.0.1:1/", "--text", "x"], out, err)
        self.assertEqual(code, 2)
        self.assertTrue(err.getvalue().startswith("invalid --url"))

    async def test_unwritable_wav(self) -> None:
        missing_dir = os.path.join(self.mktemp(), "nowhere", "out.wav")
        code, _, err = await self.cli("--text", "x", "--wav", missing_dir)
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"cannot write {missing_dir}"))
        self.assertEqual(self.server.received, [])


class MainTests(CliTestCase):
    """The console entry point in a child process, against the same fake server."""

    async def _main(self, *args: str, stdin: bytes = b"") -> tuple[bytes, bytes, int]:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(openai_proxy.__file__)))
        env = dict(os.environ, PYTHONPATH=package_root)
        code = "import sys; from openai_proxy.cli import main; main(sys.argv[1:])"
        out, err, status = await getProcessOutputAndValue(
            sys.executable, ["-c", code, "--url", self.url, *args], env=env, reactor=reactor, stdinBytes=stdin
        )
        return out, err, status

    async def test_main_exit_zero(self) -> None:
        out, err, status = await self._main("--text", "hi")
        self.assertEqual((status, err), (0, b""))
        self.assertEqual(out.decode().splitlines(), ["user: hi", "agent: You said: hi"])

    async def test_main_exit_one_on_error(self) -> None:
        self.server.mode = "error"
        out, err, status = await self._main("--text", "hi")
        self.assertEqual(status, 1)
        self.assertEqual(err.decode(), "error UPSTREAM_UNAVAILABLE: upstream down\n")

    async def test_main_reads_stdin_lines(self) -> None:
        out, err, status = await self._main(stdin=b"from stdin\n\nlast line without newline")
        self.assertEqual((status, err), (0, b""))
        self.assertEqual(
            [m.get("content") for m in self.server.received[1:]], ["from stdin", "last line without newline"]
        )
        self.assertEqual(out.decode().splitlines()[-1], "agent: You said: last line without newline")

    async def test_main_empty_stdin(self) -> None:
        out, err, status = await self._main()
        self.assertEqual((status, out, err), (0, b"", b""))
        self.assertEqual(self.server.sent_types(), ["Settings"])


class _InterruptibleChild(ProcessProtocol):
    """Collects a child's output and interrupts it once stdout shows ``trigger``."""

    def __init__(self, trigger: bytes) -> None:
        self.trigger = trigger
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.trigger in self.out and self.transport is not None:
            self.trigger = b"\0never\0"
            self.transport.signalProcess("INT")

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


class InterruptTests(CliTestCase):
    async def test_ctrl_c_finishes_the_wav_and_exits_130(self) -> None:
        path = os.path.abspath(self.mktemp() + ".wav")
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(openai_proxy.__file__)))
        child = _InterruptibleChild(b"agent: Hello\n")
        code = "import sys; from openai_proxy.cli import main; main(sys.argv[1:])"
        # stdin stays open, so the CLI is waiting for a line when it is interrupted.
        reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", code, "--url", self.url, "--greeting", "Hello", "--wav", path],
            env=dict(os.environ, PYTHONPATH=package_root),
        )
        status = await child.ended
        self.assertEqual(status, 130)
        self.assertEqual(child.err, b"interrupted\n")
        with wave.open(path, "rb") as wav:
            self.assertEqual(wav.getnframes(), FRAMES_PER_REPLY * SAMPLES_PER_FRAME)


class ConversationUnitTests(unittest.TestCase):
    """The sans-IO protocol logic, fed message by message."""

    def configured(self, **settings: Any) -> Conversation:
        conversation = Conversation(build_settings(**settings), timeout=5)
        conversation.opened()
        conversation.received_text('{"type":"Welcome","request_id":"r"}')
        conversation.received_text('{"type":"SettingsApplied"}')
        return conversation

    def test_welcome_then_settings(self) -> None:
        settings = build_settings("p")
        conversation = Conversation(settings, timeout=5)
        self.assertEqual(conversation.opened(), [StartTimer(5)])
        self.assertEqual(conversation.received_text('{"type":"SettingsApplied"}'), [])
        self.assertEqual(
            conversation.received_text('{"type":"Welcome","request_id":"r"}'),
            [SendJSON(settings), StartTimer(5)],
        )
        self.assertEqual(conversation.received_text('{"type":"SettingsApplied"}'), [CancelTimer(), NeedLine()])

    def test_turn_needs_text_and_audio_done(self) -> None:
        conversation = self.configured()
        self.assertEqual(
            conversation.user_line("  hi  "),
            [SendJSON({"type": "InjectUserMessage", "content": "hi"}), StartTimer(5)],
        )
        self.assertEqual(
            conversation.received_text('{"type":"ConversationText","role":"user","content":"hi"}'),
            [Print("user: hi")],
        )
        self.assertEqual(conversation.received_audio(b"\x00\x00"), [AgentAudio(b"\x00\x00")])
        self.assertEqual(
            conversation.received_text('{"type":"ConversationText","role":"assistant","content":"yo"}'),
            [Print("agent: yo")],
        )
        self.assertEqual(conversation.received_text('{"type":"AgentAudioDone"}'), [CancelTimer(), NeedLine()])
        self.assertEqual(conversation.user_line(None), [CancelTimer(), Finish(0)])
        self.assertEqual(conversation.exit_code, 0)

    def test_user_text_alone_does_not_end_turn(self) -> None:
        conversation = self.configured()
        conversation.user_line("hi")
        conversation.received_text('{"type":"ConversationText","role":"user","content":"hi"}')
        self.assertEqual(conversation.received_text('{"type":"AgentAudioDone"}'), [])
        self.assertEqual(
            conversation.timed_out(),
            [Print("timeout: no answer to 'hi' within 5 s", error=True), CancelTimer(), Finish(1)],
        )

    def test_greeting_is_waited_for(self) -> None:
        conversation = Conversation(build_settings(greeting="Hello!"), timeout=5)
        conversation.opened()
        conversation.received_text('{"type":"Welcome","request_id":"r"}')
        self.assertEqual(conversation.received_text('{"type":"SettingsApplied"}'), [StartTimer(5)])
        self.assertEqual(conversation.user_line("too early"), [])
        conversation.received_text('{"type":"ConversationText","role":"assistant","content":"Hello!"}')
        self.assertEqual(conversation.received_text('{"type":"AgentAudioDone"}'), [CancelTimer(), NeedLine()])

    def test_timeouts_name_what_was_awaited(self) -> None:
        conversation = Conversation(build_settings(), timeout=1.5)
        self.assertEqual(conversation.timed_out(), [])  # not waiting yet
        conversation.opened()
        self.assertEqual(conversation.timed_out()[0], Print("timeout: no Welcome within 1.5 s", error=True))
        self.assertTrue(conversation.finished)
        self.assertEqual(conversation.received_text('{"type":"Welcome","request_id":"r"}'), [])

    def test_error_finishes_with_one(self) -> None:
        conversation = self.configured()
        actions = conversation.received_text('{"type":"Error","code":"INVALID_SETTINGS","description":"bad"}')
        self.assertEqual(actions, [Print("error INVALID_SETTINGS: bad", error=True), CancelTimer(), Finish(1)])
        self.assertEqual(conversation.closed("code 1000"), [])
        self.assertEqual(conversation.exit_code, 1)

    def test_garbage_is_reported_not_fatal(self) -> None:
        conversation = self.configured()
        [warning] = conversation.received_text("not json")
        self.assertIsInstance(warning, Print)
        assert isinstance(warning, Print)
        self.assertTrue(warning.error)
        [warning] = conversation.received_text("[1, 2]")
        self.assertFalse(conversation.finished)
        self.assertEqual(conversation.received_text('{"type":"SomethingNew"}'), [])

    def test_keepalive_only_once_configured(self) -> None:
        conversation = Conversation(build_settings(), timeout=5)
        conversation.opened()
        self.assertEqual(conversation.keepalive(), [])
        conversation.received_text('{"type":"Welcome","request_id":"r"}')
        conversation.received_text('{"type":"SettingsApplied"}')
        self.assertEqual(conversation.keepalive(), [SendJSON({"type": "KeepAlive"})])

    def test_unexpected_close(self) -> None:
        conversation = self.configured()
        conversation.user_line("hi")
        self.assertEqual(
            conversation.closed("code 1006"),
            [Print("connection closed by the daemon: code 1006", error=True), CancelTimer()],
        )
        self.assertEqual(conversation.exit_code, 1)

    def test_settings_accepted_by_the_deepgram_sdk(self) -> None:
        try:
            from deepgram.agent.v1.types import AgentV1Settings
        except ImportError:
            raise unittest.SkipTest("deepgram-sdk is not installed") from None
        settings = build_settings("Be brief.", greeting="Hi", voice="alloy")
        model = AgentV1Settings.model_validate(settings)
        self.assertEqual(model.model_dump(exclude_none=True, by_alias=True)["agent"]["greeting"], "Hi")


class WavSinkTests(unittest.TestCase):
    def test_sample_split_across_frames(self) -> None:
        from openai_proxy.cli import _WavSink

        path = self.mktemp()
        sink = _WavSink(path)
        sink.write(b"\x01")
        sink.write(b"\x02\x03\x04\x05")
        sink.write(b"\x06")
        sink.close()
        with wave.open(path, "rb") as wav:
            self.assertEqual(wav.getnframes(), 3)
            self.assertEqual(wav.readframes(3), b"\x01\x02\x03\x04\x05\x06")

    def test_no_audio_is_an_empty_valid_file(self) -> None:
        from openai_proxy.cli import _WavSink

        path = self.mktemp()
        _WavSink(path).close()
        with wave.open(path, "rb") as wav:
            self.assertEqual((wav.getnframes(), wav.getframerate()), (0, 24000))
