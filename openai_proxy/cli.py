"""``openai-proxy-cli``: talk to a running openai-proxy from a terminal.

The CLI speaks the Deepgram Voice Agent API v1 like any other client: it waits
for ``Welcome``, sends ``Settings`` (pcm16 24 kHz in and out), waits for
``SettingsApplied``, then sends each line of text as ``InjectUserMessage`` and
waits for that turn to finish before sending the next. A turn is finished once
both the assistant's ``ConversationText`` and ``AgentAudioDone`` have arrived
(in either order: the protocol does not fix it). With ``--greeting`` the greeting
counts as a turn that must finish before the first line is sent.

Output: ``user: …`` and ``agent: …`` lines on stdout, ``error CODE: description``
and ``warning CODE: description`` on stderr, and with ``--verbose`` every frame
sent (``> Type``) and received (``< Type``) on stderr. Agent audio goes to the
``--wav`` file (mono, 16-bit, 24 kHz; the file is created when the CLI starts and
is a valid WAV file whatever happens).

Exit status: 0 when every turn got an answer; 1 on an ``Error`` from the daemon,
a failed connection, a closed connection or a timeout; 2 for bad arguments; 130
when interrupted (Ctrl-C).

The protocol logic is :class:`Conversation`, which consumes messages and returns
actions; the Autobahn protocol and the reactor only carry those actions out.
"""

from __future__ import annotations

import argparse
import enum
import json
import math
import os
import re
import sys
import wave
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn, Protocol, cast

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet import error as netError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.task import LoopingCall, react
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "DEFAULT_URL",
    "AgentAudio",
    "CancelTimer",
    "Conversation",
    "Finish",
    "NeedLine",
    "Print",
    "SendJSON",
    "StartTimer",
    "build_settings",
    "main",
    "run",
]

DEFAULT_URL = "ws://127.0.0.1:8080/v1/agent/converse"
DEFAULT_PROMPT = "You are a helpful voice assistant. Keep your answers short."
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_TIMEOUT = 30.0
SAMPLE_RATE = 24000
# Deepgram asks for a KeepAlive every 8 s while no audio is sent; the CLI never sends audio.
KEEPALIVE_SECONDS = 8.0
# Exit status after Ctrl-C, as shells report SIGINT.
INTERRUPTED = 130


# --- actions ---------------------------------------------------------------


@dataclass(frozen=True)
class SendJSON:
    """Send ``message`` to the daemon as one JSON text frame."""

    message: dict[str, Any]


@dataclass(frozen=True)
class Print:
    """Write ``line`` to stdout, or to stderr when ``error`` is true."""

    line: str
    error: bool = False


@dataclass(frozen=True)
class AgentAudio:
    """Agent audio (pcm16, 24 kHz, mono) to append to the WAV file."""

    data: bytes


@dataclass(frozen=True)
class StartTimer:
    """(Re)arm the single wait timer; on expiry call :meth:`Conversation.timed_out`."""

    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    """Disarm the wait timer."""


@dataclass(frozen=True)
class NeedLine:
    """Fetch the next user line and pass it to :meth:`Conversation.user_line`."""


@dataclass(frozen=True)
class Finish:
    """Close the connection cleanly; the process exits with ``exit_code``."""

    exit_code: int


Action = SendJSON | Print | AgentAudio | StartTimer | CancelTimer | NeedLine | Finish


# --- the protocol logic ----------------------------------------------------


def build_settings(
    prompt: str = DEFAULT_PROMPT,
    *,
    greeting: str | None = None,
    voice: str | None = None,
    model: str = DEFAULT_MODEL,
) -> dict[str, Any]:
    """The ``Settings`` message the CLI sends: linear16 24 kHz both ways, OpenAI think (and speak)."""
    agent: dict[str, Any] = {
        "think": {"provider": {"type": "open_ai", "model": model}, "prompt": prompt},
    }
    if voice:
        # Deepgram's open_ai speak provider requires a TTS model name; the daemon uses only the voice.
        agent["speak"] = {"provider": {"type": "open_ai", "model": "tts-1", "voice": voice}}
    if greeting:
        agent["greeting"] = greeting
    return {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": SAMPLE_RATE},
            "output": {"encoding": "linear16", "sample_rate": SAMPLE_RATE, "container": "none"},
        },
        "agent": agent,
    }


class _State(enum.Enum):
    CONNECTING = "connecting"
    AWAIT_WELCOME = "await_welcome"
    AWAIT_SETTINGS_APPLIED = "await_settings_applied"
    GREETING = "greeting"
    AWAIT_LINE = "await_line"
    TURN = "turn"
    FINISHED = "finished"


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Conversation:
    """The CLI's side of a Deepgram v1 session, without any I/O.

    Feed it what happens (:meth:`opened`, :meth:`received_text`,
    :meth:`received_audio`, :meth:`user_line`, :meth:`timed_out`, :meth:`keepalive`,
    :meth:`closed`); each returns the actions to carry out, in order. Once a
    :class:`Finish` has been returned, further input is ignored.
    """

    def __init__(self, settings: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT, verbose: bool = False) -> None:
        self._settings = settings
        self._timeout = timeout
        self._verbose = verbose
        self._state = _State.CONNECTING
        self._greeting = bool(settings.get("agent", {}).get("greeting"))
        self._turn_text = ""
        self._assistant_text_seen = False
        self._audio_done_seen = False
        self.exit_code: int | None = None

    @property
    def finished(self) -> bool:
        """True once the conversation has decided how the CLI exits."""
        return self._state is _State.FINISHED

    # inputs

    def opened(self) -> list[Action]:
        """The WebSocket is open: wait for ``Welcome``."""
        if self._state is not _State.CONNECTING:
            return []
        self._state = _State.AWAIT_WELCOME
        return [StartTimer(self._timeout)]

    def received_text(self, text: str) -> list[Action]:
        """A text frame from the daemon."""
        if self.finished:
            return []
        try:
            message = json.loads(text)
        except ValueError:
            return [Print(f"warning: ignoring a text frame that is not JSON: {_shorten(text)!r}", error=True)]
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return [Print(f"warning: ignoring a message without a type: {_shorten(text)!r}", error=True)]
        kind = message["type"]
        actions: list[Action] = []
        if self._verbose:
            actions.append(Print(f"< {kind}", error=True))
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            actions.extend(handler(message))
        return actions

    def received_audio(self, data: bytes) -> list[Action]:
        """A binary frame (agent audio) from the daemon."""
        if self.finished:
            return []
        actions: list[Action] = [AgentAudio(data)]
        if self._verbose:
            actions.insert(0, Print(f"< audio {len(data)} bytes", error=True))
        return actions

    def user_line(self, line: str | None) -> list[Action]:
        """The next user line (None at the end of input), answering :class:`NeedLine`."""
        if self._state is not _State.AWAIT_LINE:
            return []
        if line is None:
            return self._finish(0)
        content = line.strip()
        if not content:
            return [NeedLine()]
        self._state = _State.TURN
        self._start_turn(content)
        return [*self._send({"type": "InjectUserMessage", "content": content}), StartTimer(self._timeout)]

    def timed_out(self) -> list[Action]:
        """The wait timer expired."""
        waiting_for = {
            _State.AWAIT_WELCOME: "no Welcome",
            _State.AWAIT_SETTINGS_APPLIED: "no SettingsApplied",
            _State.GREETING: "the greeting did not finish",
            _State.TURN: f"no answer to {_shorten(self._turn_text)!r}",
        }.get(self._state)
        if waiting_for is None:
            return []
        return [Print(f"timeout: {waiting_for} within {self._timeout:g} s", error=True), *self._finish(1)]

    def keepalive(self) -> list[Action]:
        """Periodic tick: a ``KeepAlive`` once the session is configured."""
        if self._state in (_State.GREETING, _State.AWAIT_LINE, _State.TURN):
            return self._send({"type": "KeepAlive"})
        return []

    def closed(self, reason: str) -> list[Action]:
        """The connection closed; ``reason`` says why. Returns the last words, if any."""
        if self.finished:
            return []
        if self._state is _State.CONNECTING:
            line = f"cannot connect: {reason}"
        else:
            line = f"connection closed by the daemon: {reason}"
        self._state = _State.FINISHED
        self.exit_code = 1
        return [Print(line, error=True), CancelTimer()]

    # message handlers (named after the message type)

    def _on_Welcome(self, message: dict[str, Any]) -> list[Action]:
        if self._state is not _State.AWAIT_WELCOME:
            return []
        self._state = _State.AWAIT_SETTINGS_APPLIED
        return [*self._send(self._settings), StartTimer(self._timeout)]

    def _on_SettingsApplied(self, message: dict[str, Any]) -> list[Action]:
        if self._state is not _State.AWAIT_SETTINGS_APPLIED:
            return []
        if self._greeting:
            self._state = _State.GREETING
            self._start_turn("")
            return [StartTimer(self._timeout)]
        return self._await_line()

    def _on_ConversationText(self, message: dict[str, Any]) -> list[Action]:
        role = message.get("role")
        content = message.get("content", "")
        label = {"assistant": "agent", "user": "user"}.get(str(role), str(role))
        actions: list[Action] = [Print(f"{label}: {content}")]
        if role == "assistant" and self._state in (_State.GREETING, _State.TURN):
            self._assistant_text_seen = True
            actions.extend(self._maybe_turn_done())
        return actions

    def _on_AgentAudioDone(self, message: dict[str, Any]) -> list[Action]:
        if self._state not in (_State.GREETING, _State.TURN):
            return []
        self._audio_done_seen = True
        return self._maybe_turn_done()

    def _on_Error(self, message: dict[str, Any]) -> list[Action]:
        return [Print(_describe("error", message), error=True), *self._finish(1)]

    def _on_Warning(self, message: dict[str, Any]) -> list[Action]:
        return [Print(_describe("warning", message), error=True)]

    # helpers

    def _send(self, message: dict[str, Any]) -> list[Action]:
        actions: list[Action] = [SendJSON(message)]
        if self._verbose:
            actions.append(Print(f"> {message['type']}", error=True))
        return actions

    def _start_turn(self, text: str) -> None:
        self._turn_text = text
        self._assistant_text_seen = False
        self._audio_done_seen = False

    def _maybe_turn_done(self) -> list[Action]:
        if self._assistant_text_seen and self._audio_done_seen:
            return self._await_line()
        return []

    def _await_line(self) -> list[Action]:
        self._state = _State.AWAIT_LINE
        return [CancelTimer(), NeedLine()]

    def _finish(self, exit_code: int) -> list[Action]:
        self._state = _State.FINISHED
        self.exit_code = exit_code
        return [CancelTimer(), Finish(exit_code)]


def _describe(kind: str, message: dict[str, Any]) -> str:
    code = message.get("code") or "UNKNOWN"
    description = message.get("description") or message.get("message") or ""
    return f"{kind} {code}: {description}"


# --- user lines ------------------------------------------------------------


class LineSource(Protocol):
    """Where user lines come from."""

    def next_line(self) -> Deferred[str | None]:
        """The next line, or None when there are no more."""

    def close(self) -> None:
        """Stop reading."""


class _ListLines:
    """Lines given up front (``--text``)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = deque(lines)

    def next_line(self) -> Deferred[str | None]:
        return succeed(self._lines.popleft() if self._lines else None)

    def close(self) -> None:
        self._lines.clear()


class _StreamLines:
    """Lines read from a text stream that never blocks for long (a file, a StringIO)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def next_line(self) -> Deferred[str | None]:
        line = self._stream.readline()
        return succeed(line if line else None)

    def close(self) -> None:
        pass


@implementer(IReadDescriptor)
class _FileDescriptorLines:
    """Lines read from a file descriptor (the terminal or a pipe) through the reactor.

    The descriptor is watched, never switched to non-blocking mode: on a terminal
    stdin and stdout usually share one open file, and a non-blocking stdout would
    make ordinary ``write`` calls fail.
    """

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd
        self._buffer = b""
        self._lines: deque[str | None] = deque()
        self._waiting: Deferred[str | None] | None = None
        self._reading = True
        reactor.addReader(self)

    def next_line(self) -> Deferred[str | None]:
        if self._lines:
            return succeed(self._lines.popleft())
        self._waiting = Deferred()
        return self._waiting

    def close(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    # IReadDescriptor

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stdin"

    def doRead(self) -> Any:
        data = os.read(self._fd, 65536)
        if not data:
            return CONNECTION_DONE
        self._buffer += data
        *complete, self._buffer = self._buffer.split(b"\n")
        for raw in complete:
            self._deliver(raw.decode("utf-8", "replace"))
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._reading = False
        if self._buffer:
            self._deliver(self._buffer.decode("utf-8", "replace"))
            self._buffer = b""
        self._deliver(None)

    def _deliver(self, line: str | None) -> None:
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(line)
        else:
            self._lines.append(line)


# --- Twisted / Autobahn side -----------------------------------------------


class _AgentClientProtocol(WebSocketClientProtocol):
    """Hands Autobahn's callbacks to the :class:`_Session` that owns the connection."""

    session: _Session

    def onOpen(self) -> None:
        self.session.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.session.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.session.closed(self, wasClean, code, reason)


class _AgentClientFactory(WebSocketClientFactory):
    """Builds protocols bound to one :class:`_Session`."""

    protocol = _AgentClientProtocol

    def __init__(self, session: _Session, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session = session

    def buildProtocol(self, addr: Any) -> _AgentClientProtocol:
        protocol = cast(_AgentClientProtocol, super().buildProtocol(addr))
        protocol.session = self.session
        return protocol


_UPGRADE_FAILED = re.compile(r"upgrade failed \[(\d{3})\]:?\s*(.*?)\"?\)?$")


def _connect_failure_reason(failure: Failure) -> str:
    if failure.check(netError.ConnectionRefusedError):
        return "connection refused"
    if failure.check(netError.DNSLookupError):
        return "host not found"
    if failure.check(netError.TimeoutError, netError.TCPTimedOutError):
        return "timed out"
    return failure.getErrorMessage()


def _handshake_failure_reason(protocol: WebSocketClientProtocol, reason: str | None) -> str:
    detail = getattr(protocol, "wasNotCleanReason", None) or reason or "closed during the handshake"
    match = _UPGRADE_FAILED.search(detail)
    if match:
        status, text = match.groups()
        return f"HTTP {status} {text}".rstrip()
    return str(detail)


class _Session:
    """Carries out a :class:`Conversation`'s actions on one connection."""

    def __init__(
        self,
        reactor: Any,
        url: str,
        conversation: Conversation,
        lines: LineSource,
        wav: _WavSink | None,
        stdout: IO[str],
        stderr: IO[str],
    ) -> None:
        self._reactor = reactor
        self._url = url
        self._conversation = conversation
        self._lines = lines
        self._wav = wav
        self._stdout = stdout
        self._stderr = stderr
        self._protocol: _AgentClientProtocol | None = None
        self._timer: IDelayedCall | None = None
        self._keepalive = LoopingCall(self._keepalive_tick)
        self._keepalive.clock = reactor
        self._closing = False
        self._done = False
        self.result: Deferred[int] = Deferred()
        # Ctrl-C stops the reactor: still finish the WAV file and exit non-zero.
        self._shutdown_trigger = reactor.addSystemEventTrigger("before", "shutdown", self._interrupted)

    # connection events

    def connect_failed(self, failure: Failure) -> None:
        self._write(Print(f"cannot connect to {self._url}: {_connect_failure_reason(failure)}", error=True))
        self._end(1)

    def opened(self, protocol: _AgentClientProtocol) -> None:
        self._protocol = protocol
        self._keepalive.start(KEEPALIVE_SECONDS, now=False)
        self._apply(self._conversation.opened())

    def received(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            self._apply(self._conversation.received_audio(payload))
        else:
            self._apply(self._conversation.received_text(payload.decode("utf-8", "replace")))

    def closed(self, protocol: WebSocketClientProtocol, was_clean: bool, code: int | None, reason: str | None) -> None:
        if self._done:
            return
        if self._protocol is None:
            # Never opened: the WebSocket handshake failed.
            reason_text = _handshake_failure_reason(protocol, reason)
            self._write(Print(f"cannot connect to {self._url}: {reason_text}", error=True))
            self._end(1)
            return
        self._protocol = None
        detail = f"code {code}" + (f": {reason}" if reason else "")
        self._apply(self._conversation.closed(detail))
        exit_code = self._conversation.exit_code
        self._end(1 if exit_code is None else exit_code)

    # actions

    def _apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, SendJSON):
                if self._protocol is not None and not self._closing:
                    self._protocol.sendMessage(json.dumps(action.message).encode("utf-8"), isBinary=False)
            elif isinstance(action, Print):
                self._write(action)
            elif isinstance(action, AgentAudio):
                if self._wav is not None:
                    self._wav.write(action.data)
            elif isinstance(action, StartTimer):
                self._cancel_timer()
                self._timer = self._reactor.callLater(action.seconds, self._timer_fired)
            elif isinstance(action, CancelTimer):
                self._cancel_timer()
            elif isinstance(action, NeedLine):
                self._lines.next_line().addCallback(self._got_line)
            elif isinstance(action, Finish):
                self._close()

    def _got_line(self, line: str | None) -> None:
        if not self._done:
            self._apply(self._conversation.user_line(line))

    def _timer_fired(self) -> None:
        self._timer = None
        self._apply(self._conversation.timed_out())

    def _keepalive_tick(self) -> None:
        self._apply(self._conversation.keepalive())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _close(self) -> None:
        if self._protocol is not None and not self._closing:
            self._closing = True
            self._protocol.sendClose(code=1000)

    def _write(self, action: Print) -> None:
        stream = self._stderr if action.error else self._stdout
        stream.write(action.line + "\n")
        stream.flush()

    def _interrupted(self) -> None:
        self._shutdown_trigger = None
        if not self._done:
            self._write(Print("interrupted", error=True))
            self._close()
            self._end(INTERRUPTED)

    def _end(self, exit_code: int) -> None:
        if self._done:
            return
        self._done = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._cancel_timer()
        if self._keepalive.running:
            self._keepalive.stop()
        self._lines.close()
        if self._wav is not None:
            self._wav.close()
        self.result.callback(exit_code)


# --- command line ----------------------------------------------------------


class _UsageError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that writes to the given streams and raises instead of exiting."""

    def __init__(self, stdout: IO[str], stderr: IO[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stdout = stdout
        self._stderr = stderr

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (self._stdout if file is sys.stdout else self._stderr).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._stderr.write(message)
        raise _UsageError(status)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _parser(stdout: IO[str], stderr: IO[str]) -> _ArgumentParser:
    parser = _ArgumentParser(
        stdout,
        stderr,
        prog="openai-proxy-cli",
        description=(
            "Talk to a running openai-proxy (Deepgram Voice Agent API v1). Each --text, or else each "
            "non-empty line of standard input, is one user turn; the answer is printed and its audio "
            "can be saved with --wav."
        ),
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon WebSocket URL (default: {DEFAULT_URL})")
    parser.add_argument("--token", help="client token, sent as 'Authorization: Token T'")
    parser.add_argument(
        "--text", action="append", default=[], metavar="TEXT", help="a user message (repeatable; default: stdin lines)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the agent's instructions")
    parser.add_argument("--greeting", help="what the agent says first")
    parser.add_argument("--voice", help="OpenAI voice, e.g. marin")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"realtime model to ask for (default: {DEFAULT_MODEL})")
    parser.add_argument("--wav", metavar="PATH", help="write the agent's audio to this WAV file (pcm16, 24 kHz)")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for the connection, each reply and each answer (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--verbose", action="store_true", help="print every message type sent and received")
    return parser


class _WavSink:
    """Agent audio appended to a WAV file (mono, 16-bit, 24 kHz) as it arrives."""

    def __init__(self, path: str) -> None:
        # Opened here (not by wave.open) so a bad path fails before any WAV state exists.
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._writer = wave.open(self._file, "wb")
        self._writer.setnchannels(1)
        self._writer.setsampwidth(2)
        self._writer.setframerate(SAMPLE_RATE)

    def write(self, data: bytes) -> None:
        """Append pcm16 audio (the header counts bytes, so a sample split across frames is fine)."""
        self._writer.writeframes(data)

    def close(self) -> None:
        """Fix up the WAV header and close the file."""
        self._writer.close()
        self._file.close()


def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: IO[str],
    stderr: IO[str],
    stdin: IO[str] | None = None,
) -> Deferred[int]:
    """Run the CLI with ``argv`` (without the program name); fires with the exit code.

    User lines come from ``--text``, else from ``stdin`` when given (read line by line,
    which must not block for long), else from the process's standard input through
    the reactor.
    """
    try:
        options = _parser(stdout, stderr).parse_args(list(argv))
    except _UsageError as usage:
        return succeed(usage.code)
    try:
        secure, host, port, _resource, _path, _params = parse_url(options.url)
    except ValueError as exc:
        stderr.write(f"invalid --url {options.url!r}: {exc}\n")
        return succeed(2)
    try:
        wav = _WavSink(options.wav) if options.wav else None
    except OSError as exc:
        stderr.write(f"cannot write {options.wav}: {exc.strerror or exc}\n")
        return succeed(1)

    lines: LineSource
    if options.text:
        lines = _ListLines(options.text)
    elif stdin is not None:
        lines = _StreamLines(stdin)
    else:
        lines = _FileDescriptorLines(reactor, 0)

    settings = build_settings(options.prompt, greeting=options.greeting, voice=options.voice, model=options.model)
    conversation = Conversation(settings, timeout=options.timeout, verbose=options.verbose)
    session = _Session(reactor, options.url, conversation, lines, wav, stdout, stderr)

    headers = {"Authorization": f"Token {options.token}"} if options.token else None
    factory = _AgentClientFactory(session, options.url, headers=headers, reactor=reactor)
    # Autobahn rounds its timers down to whole seconds; round up so the wait is never shorter.
    factory.setProtocolOptions(openHandshakeTimeout=math.ceil(options.timeout) + 1)
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=options.timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    endpoint.connect(factory).addErrback(session.connect_failed)
    return session.result


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run the CLI under ``twisted.internet.task.react`` and exit."""
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        code = await run(reactor, arguments, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(_main)


if __name__ == "__main__":
    main()
