"""
Real processes for the system tests: the simulated upstream (``python -m openai_proxy.simulator``),
the installed daemon (``twistd -n openai-proxy``) and the official Deepgram SDK agent client.

Every process is started with its output in files under the test's temporary directory, is stopped
with SIGTERM (SIGKILL after a bounded wait) by a cleanup, and has its output shown when the test
fails. Every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import typing
import unittest
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pydantic
from deepgram import DeepgramClient
from deepgram.agent.v1.socket_client import V1SocketClient, V1SocketClientResponse
from deepgram.agent.v1.types import (
    AgentV1InjectUserMessage,
    AgentV1SendFunctionCallResponse,
    AgentV1Settings,
)
from deepgram.environment import DeepgramClientEnvironment
from twisted.trial.unittest import FailTest, SynchronousTestCase
from websockets.exceptions import ConnectionClosed

from openai_proxy.simulator.validation import ClientEventError, validate_client_event

BIN = os.path.dirname(sys.executable)
#: The key the daemon is given; distinctive, so that a leak into a log line or a frame is found.
API_KEY = "sk-systemtest-5f3c9a1e7b2d4c60a8e1"
#: Seconds to wait for one expected message (generous: the whole run shares one machine).
TIMEOUT = 15.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

#: The daemon's one message type that the SDK does not model (sent for compatibility).
COMPATIBILITY_EXTRAS = frozenset({"UtteranceEnd"})
_SERVER_MESSAGES: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(V1SocketClientResponse)

# Environment settings of the machine running the tests that must not leak into the daemon.
_SCRUBBED_PREFIXES = ("OPENAI_", "OTEL_", "LOG_LEVEL")

GET_WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city"}},
        "required": ["city"],
    },
}


def agent_settings(*, greeting: str | None = None, functions: Sequence[Mapping[str, Any]] = (),
                   model: str = "gpt-4o-mini") -> dict[str, Any]:
    """A ``Settings`` message as Deepgram's documentation shows it (linear16 24 kHz both ways)."""
    think: dict[str, Any] = {
        "provider": {"type": "open_ai", "model": model, "temperature": 0.7},
        "prompt": "You are a helpful voice assistant. Keep answers short.",
    }
    if functions:
        think["functions"] = [dict(f) for f in functions]
    agent: dict[str, Any] = {
        "language": "en",
        "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
        "think": think,
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
    }
    if greeting is not None:
        agent["greeting"] = greeting
    return {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": 24000},
            "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
        },
        "agent": agent,
    }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_command() -> list[str]:
    """The ``twistd`` of the interpreter running the tests."""
    path = os.path.join(BIN, "twistd")
    if os.path.exists(path):
        return [path]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def clean_environment(**overrides: str) -> dict[str, str]:
    """This process's environment without the daemon's settings, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            content = f.read().splitlines()
    except OSError:
        return "(missing)"
    if len(content) > lines:
        return f"... ({len(content) - lines} lines before)\n" + "\n".join(content[-lines:])
    return "\n".join(content) or "(empty)"


class Process:
    """A child process whose stdout and stderr go to ``NAME.stdout`` / ``NAME.stderr`` in ``directory``."""

    def __init__(self, name: str, argv: Sequence[str], directory: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.directory = directory
        self.env = dict(env) if env is not None else clean_environment()
        self.stdout_path = os.path.join(directory, f"{name}.stdout")
        self.stderr_path = os.path.join(directory, f"{name}.stderr")
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd is the test directory: the daemon must not pick up a developer's ./.env.
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          cwd=self.directory, env=self.env, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exited(self) -> int | None:
        """The exit status, or None while it runs."""
        return None if self.popen is None else self.popen.poll()

    def signal(self, signum: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit status; ``subprocess.TimeoutExpired`` if it is still running after ``timeout``."""
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        return self.popen.returncode

    def stdout(self) -> str:
        with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def describe(self, lines: int = 60) -> str:
        """The command, the status and the end of both outputs, for a failure report."""
        status = self.exited()
        return (
            f"==== {self.name}: {' '.join(self.argv)} "
            f"({'running' if status is None else f'exit {status}'})\n"
            f"---- {self.stdout_path}\n{_tail(self.stdout_path, lines)}\n"
            f"---- {self.stderr_path}\n{_tail(self.stderr_path, lines)}\n"
        )


class Simulator(Process):
    """``python -m openai_proxy.simulator`` on a free port, recording what it receives."""

    def __init__(self, directory: str, *, name: str = "simulator", api_key: str | None = API_KEY,
                 tls: tuple[str, str] | None = None, options: Sequence[str] = ()) -> None:
        self.port_file = os.path.join(directory, f"{name}.port")
        self.record_path = os.path.join(directory, f"{name}.received.jsonl")
        argv = [sys.executable, "-m", "openai_proxy.simulator", "--port-file", self.port_file,
                "--record", self.record_path, *options]
        if api_key is not None:
            argv += ["--api-key", api_key]
        if tls is not None:
            key, cert = tls
            argv += ["--tls-key", key, "--tls-cert", cert]
        self.secure = tls is not None
        super().__init__(name, argv, directory)
        self.port = 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.port_file):
            if self.exited() is not None:
                raise RuntimeError(f"the simulator exited early\n{self.describe()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not start in {timeout}s\n{self.describe()}")
            time.sleep(0.05)
        with open(self.port_file, encoding="ascii") as f:
            self.port = int(f.read())

    def upstream_url(self, host: str = "127.0.0.1") -> str:
        """The ``--upstream-url`` that points the daemon here."""
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}/v1/realtime"

    def received(self) -> list[dict[str, Any]]:
        """Every event received so far, in order (from the ``--record`` file)."""
        if not os.path.exists(self.record_path):
            return []
        with open(self.record_path, encoding="utf-8") as f:
            return [json.loads(line)["event"] for line in f if line.endswith("\n")]


class Daemon(Process):
    """``twistd -n --pidfile= openai-proxy --listen tcp:PORT:interface=127.0.0.1 OPTIONS``."""

    def __init__(self, directory: str, options: Sequence[str], *, name: str = "daemon",
                 env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        argv = twistd_command() + ["-n", "--pidfile=", "openai-proxy",
                                   "--listen", f"tcp:{self.port}:interface=127.0.0.1", *options]
        super().__init__(name, argv, directory, env)

    @property
    def base_url(self) -> str:
        """What the Deepgram SDK takes as its agent environment."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def agent_url(self) -> str:
        return f"{self.base_url}/v1/agent/converse"

    def http_status(self, path: str) -> int | None:
        """The status of ``GET path``, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until ``/readyz`` answers 200."""
        super().start()
        deadline = time.monotonic() + timeout
        while self.http_status("/readyz") != 200:
            if self.exited() is not None:
                raise RuntimeError(f"the daemon exited early\n{self.describe()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon was not ready in {timeout}s\n{self.describe()}")
            time.sleep(0.1)

    def log_records(self) -> list[dict[str, Any]]:
        """The daemon's stdout, one JSON log record a line (a line that is not JSON fails)."""
        records = []
        for number, line in enumerate(self.stdout().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise FailTest(f"stdout line {number} is not JSON: {line!r}") from None
        return records


# --------------------------------------------------------------------------- the SDK client


class Agent:
    """
    The SDK's agent socket plus every frame the daemon sent on it, in arrival order (dicts for text,
    bytes for audio).

    Messages are sent with the SDK's typed senders. They are read from the SDK's connection directly:
    the SDK's ``recv()`` has no timeout and parses leniently, and the tests need bounded waits and the
    raw frames to validate them strictly.
    """

    def __init__(self, sdk_socket: V1SocketClient) -> None:
        self.socket = sdk_socket
        self.frames: list[dict[str, Any] | bytes] = []
        self._consumed = 0
        self.close_code: int | None = None

    # -- sending

    def send_settings(self, settings: Mapping[str, Any]) -> None:
        self.socket.send_settings(AgentV1Settings.model_validate(dict(settings)))

    def inject(self, text: str) -> None:
        self.socket.send_inject_user_message(AgentV1InjectUserMessage(content=text))

    def function_response(self, call_id: str, name: str, content: str) -> None:
        self.socket.send_function_call_response(
            AgentV1SendFunctionCallResponse(id=call_id, name=name, content=content)
        )

    # -- receiving

    def _receive(self, timeout: float) -> dict[str, Any] | bytes:
        try:
            raw = self.socket._websocket.recv(timeout=max(timeout, 0.0))
        except ConnectionClosed as e:
            self.close_code = e.rcvd.code if e.rcvd is not None else None
            raise
        frame: dict[str, Any] | bytes = raw if isinstance(raw, bytes) else json.loads(raw)
        self.frames.append(frame)
        return frame

    def next(self, timeout: float = TIMEOUT) -> dict[str, Any] | bytes:
        """The next frame not yet looked at."""
        if self._consumed < len(self.frames):
            frame = self.frames[self._consumed]
        else:
            frame = self._receive(timeout)
        self._consumed += 1
        return frame

    def _types_since(self, start: int) -> list[str]:
        return [f.get("type", "?") if isinstance(f, dict) else f"<{len(f)} bytes>"
                for f in self.frames[start:]][-30:]

    def read_until(self, done: Callable[[list[dict[str, Any] | bytes]], bool],
                   timeout: float = TIMEOUT, what: str = "") -> list[dict[str, Any] | bytes]:
        """
        Frames up to the first one after which ``done(frames so far)`` holds.  An ``Error`` fails the
        wait, unless ``done`` accepts it.
        """
        start = self._consumed
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.next(deadline - time.monotonic())
            except TimeoutError:
                raise FailTest(f"no {what or 'expected frames'} within {timeout}s; "
                               f"received {self._types_since(start)}") from None
            except ConnectionClosed:
                raise FailTest(f"closed ({self.close_code}) while waiting for "
                               f"{what or 'frames'}; received {self._types_since(start)}") from None
            got = self.frames[start:self._consumed]
            if done(got):
                return got
            if isinstance(frame, dict) and frame.get("type") == "Error":
                raise FailTest(f"Error while waiting for {what or 'frames'}: {frame}")

    def expect(self, message_type: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The next message of ``message_type`` (with ``fields``); fails on an ``Error`` or a close."""

        def matches(frame: dict[str, Any] | bytes) -> bool:
            return isinstance(frame, dict) and frame.get("type") == message_type and all(
                frame.get(k) == v for k, v in fields.items())

        frames = self.read_until(lambda got: matches(got[-1]), timeout, what=message_type)
        last = frames[-1]
        assert isinstance(last, dict)
        return last

    def turn(self, timeout: float = TIMEOUT) -> list[dict[str, Any] | bytes]:
        """The frames of one agent turn: up to both the assistant's text and ``AgentAudioDone``
        (the protocol does not fix their order)."""

        def finished(got: list[dict[str, Any] | bytes]) -> bool:
            kinds = [(f.get("type"), f.get("role")) for f in got if isinstance(f, dict)]
            return ("ConversationText", "assistant") in kinds and ("AgentAudioDone", None) in kinds

        return self.read_until(finished, timeout, what="a finished agent turn")

    def wait_closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the daemon closes the connection; its close code."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.next(deadline - time.monotonic())
            except ConnectionClosed:
                return self.close_code
            except TimeoutError:
                raise FailTest(f"still open after {timeout}s") from None


def sdk_client(base_url: str, token: str = "unused") -> DeepgramClient:
    """The official client pointed at the daemon (``base_url`` like ``ws://127.0.0.1:8080``)."""
    http = base_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    environment = DeepgramClientEnvironment(base=http, production=base_url, agent=base_url,
                                            agent_rest=http)
    return DeepgramClient(api_key=token, environment=environment)


@contextmanager
def connect_agent(base_url: str, token: str = "unused") -> Iterator[Agent]:
    """``client.agent.v1.connect()`` as an :class:`Agent`."""
    with sdk_client(base_url, token).agent.v1.connect() as sdk_socket:
        yield Agent(sdk_socket)


# --------------------------------------------------------------------------- validation


def texts(frames: Sequence[dict[str, Any] | bytes], role: str) -> list[str]:
    """The ``content`` of each ``ConversationText`` of ``role``."""
    return [f["content"] for f in frames
            if isinstance(f, dict) and f.get("type") == "ConversationText" and f.get("role") == role]


def audio_of(frames: Sequence[dict[str, Any] | bytes]) -> bytes:
    """The binary frames, joined."""
    return b"".join(f for f in frames if isinstance(f, bytes))


def types_of(frames: Sequence[dict[str, Any] | bytes]) -> list[str]:
    """The ``type`` of each text frame."""
    return [f["type"] for f in frames if isinstance(f, dict)]



def speech_windows_ok(frames: Sequence[dict[str, Any] | bytes]) -> None:
    """Every binary frame lies between an ``AgentStartedSpeaking`` and the next ``AgentAudioDone``."""
    speaking = False
    for index, frame in enumerate(frames):
        if isinstance(frame, bytes):
            if not speaking:
                raise FailTest(f"binary frame {index} outside AgentStartedSpeaking..AgentAudioDone")
        elif frame.get("type") == "AgentStartedSpeaking":
            speaking = True
        elif frame.get("type") == "AgentAudioDone":
            speaking = False


def _known_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values of an "open" enum (``Union[Literal[...], Any]``, how the SDK stays
    forward-compatible), or None for any other annotation."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = typing.get_args(annotation)
    literals = [m for m in members if typing.get_origin(m) is typing.Literal]
    if typing.Any not in members or not literals:
        return None
    return tuple(v for literal in literals for v in typing.get_args(literal))


def _lenient_spots(model: Any, path: str) -> Iterator[str]:
    """What the SDK's lenient models accept but do not declare, at any depth: unknown fields and
    values outside an open enum."""
    for key in getattr(model, "model_extra", None) or {}:
        yield f"unknown field {path}.{key}"
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        known = _known_values(info.annotation)
        if known is not None and value is not None and value not in known:
            yield f"{path}.{name} = {value!r} (not one of {list(known)})"
        if isinstance(value, pydantic.BaseModel):
            yield from _lenient_spots(value, f"{path}.{name}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, pydantic.BaseModel):
                    yield from _lenient_spots(item, f"{path}.{name}[{index}]")


def check_server_frame(frame: dict[str, Any]) -> None:
    """One text frame from the daemon is a v1 message the SDK models, with no unknown field (or the
    ``UtteranceEnd`` compatibility extra, with its exact shape)."""
    kind = frame.get("type")
    if kind in COMPATIBILITY_EXTRAS:
        last = frame.get("last_word_end")
        if (set(frame) != {"type", "channel", "last_word_end"} or frame.get("channel") != [0, 1]
                or not isinstance(last, (int, float)) or isinstance(last, bool)):
            raise FailTest(f"malformed UtteranceEnd: {frame}")
        return
    try:
        model = _SERVER_MESSAGES.validate_python(frame)
    except pydantic.ValidationError as e:
        raise FailTest(f"not a v1 server message: {frame}\n{e}") from None
    if model.type != kind:
        raise FailTest(f"{frame} validated as {type(model).__name__}")
    problems = list(_lenient_spots(model, str(kind)))
    if problems:
        raise FailTest(f"{'; '.join(problems)} in {frame}")


def check_server_frames(frames: Sequence[dict[str, Any] | bytes], *, sample_width: int = 2) -> None:
    """Every frame the daemon sent: text frames per :func:`check_server_frame`, binary frames whole
    samples of audio, inside a speaking window."""
    for index, frame in enumerate(frames):
        if isinstance(frame, bytes):
            if not frame or len(frame) % sample_width:
                raise FailTest(f"binary frame {index} holds {len(frame)} bytes, "
                               f"not whole {sample_width}-byte samples")
        else:
            check_server_frame(frame)
    speech_windows_ok(frames)


#: Keys that belong to the beta Realtime shape or that the GA API refuses.
FORBIDDEN_ANYWHERE = frozenset({"temperature", "modalities"})
FORBIDDEN_IN_SESSION = frozenset({"voice", "turn_detection", "input_audio_format",
                                  "output_audio_format", "input_audio_transcription"})


def _keys(value: object) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def check_upstream_events(events: Sequence[dict[str, Any]]) -> None:
    """Every event that reached the upstream is a strict GA client event without beta-only keys."""
    for index, event in enumerate(events):
        try:
            validate_client_event(event)
        except ClientEventError as e:
            raise FailTest(f"upstream event {index} refused ({e.code}, {e.param}): "
                           f"{e.message}\n{event}") from None
        bad = FORBIDDEN_ANYWHERE.intersection(_keys(event))
        for holder in ("session", "response"):
            if isinstance(event.get(holder), dict):
                bad |= FORBIDDEN_IN_SESSION.intersection(event[holder])
        if bad:
            raise FailTest(f"upstream event {index} has {sorted(bad)}: {event}")


# --------------------------------------------------------------------------- the test case


class SystemTestCase(SynchronousTestCase):
    """
    A test with its own directory (``self.directory``) and processes that are always stopped.  When
    the test fails, the output of every process it started is added to the failure.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.processes: list[Process] = []
        method = getattr(self, self._testMethodName)
        setattr(self, self._testMethodName, self._with_process_output(method))

    def _with_process_output(self, method: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(method)
        def run() -> Any:
            try:
                return method()
            except unittest.SkipTest:
                raise
            except Exception as e:
                if self.processes:
                    report = "\n" + "".join(p.describe() for p in self.processes)
                    # Keep the exception (and its traceback); add the output to its message.
                    message = e.args[0] if len(e.args) == 1 else " ".join(map(str, e.args))
                    e.args = (f"{message}{report}",)
                    if report not in str(e):  # an exception that formats itself otherwise
                        sys.stderr.write(report)
                raise

        return run

    def _track(self, process: Process) -> None:
        self.processes.append(process)
        self.addCleanup(process.stop)

    def start_simulator(self, *, api_key: str | None = API_KEY, tls: tuple[str, str] | None = None,
                        name: str = "simulator", options: Sequence[str] = ()) -> Simulator:
        simulator = Simulator(self.directory, name=name, api_key=api_key, tls=tls, options=options)
        self._track(simulator)
        simulator.start()
        return simulator

    def start_daemon(self, *options: str, upstream: Simulator | None = None, name: str = "daemon",
                     env: Mapping[str, str] | None = None, api_key: str | None = API_KEY,
                     grace: float = 2.0) -> Daemon:
        """The daemon, ready; against ``upstream`` when given (else ``options`` say where)."""
        overrides = dict(env or {})
        if api_key is not None:
            overrides["OPENAI_API_KEY"] = api_key
        arguments = ["--shutdown-grace", str(grace), *options]
        if upstream is not None:
            arguments += ["--upstream-url", upstream.upstream_url()]
        daemon = Daemon(self.directory, arguments, name=name, env=clean_environment(**overrides))
        self._track(daemon)
        daemon.start()
        return daemon

    def run_command(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                    timeout: float = START_TIMEOUT, name: str = "command") -> Process:
        """Run ``argv`` to completion (bounded); the finished :class:`Process`."""
        process = Process(name, argv, self.directory, env)
        self._track(process)
        process.start()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise FailTest(f"{name} still running after {timeout}s") from None
        return process
