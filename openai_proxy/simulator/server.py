"""A strict, GA-faithful stand-in for the OpenAI Realtime WebSocket API.

It serves ``ws://HOST:PORT/v1/realtime?model=gpt-realtime`` like the real endpoint: the
``Authorization: Bearer <key>`` header, ``session.created`` first, every client event validated
with the ``openai`` package's GA types (see :mod:`.validation`) and refused whole with the real
error codes, the GA event orderings, server VAD with barge-in, function calls and truncation.

Strictness beyond the real API (field lesson 21: fixes checked only against lenient mocks failed
against the real API), each answered by an ``error`` event whose ``error.event_id`` is the client's:

* ``input_audio_buffer.append``, ``conversation.item.create`` and ``response.create`` before the
  first accepted ``session.update`` give ``session_not_configured``: the real API would quietly
  use its defaults, which is how audio in the wrong format went unnoticed.
* Any ``audio.output.voice`` in a ``session.update`` once assistant audio exists gives
  ``cannot_update_voice`` and refuses the whole update, even when the voice is the current one.
* Binary frames give ``unsupported_frame``; unparsable text gives ``invalid_json``.

Fatal handshake errors (``beta_api_shape_disabled``, ``model_not_found``) are sent as an ``error``
event and the socket is closed with code 4000, the code observed for the first of them. A session
that reaches its maximum duration (60 minutes, ``max_session_seconds``) gets an ``error``
``session_expired`` ("Your session hit the maximum duration of 60 minutes.") and a close with 1001
(going away) whose reason is that message, as public reports of the real API show.

Fault injection (:mod:`.faults`): ``drops`` make chosen connections end at a chosen point (after some
seconds, or at the Nth occurrence of an event type) by a TCP abort or a close code, so reconnection
can be tested in seconds.

What the simulated model says is deterministic, decided per response in this order:

1. The response's own ``instructions`` ask for a verbatim utterance: they contain "exactly",
   "verbatim" or "word for word" followed by a double-quoted text (straight or curly quotes; the
   text runs to the last closing quote), or a quoted text followed by one of those words, as in
   ``Say exactly: "Welcome back!"``. The quoted text is said.
2. The last item of the context is a ``function_call_output``: "Here is what I found: <output>".
3. The last user message has not been answered yet and names a tool: a word of a session (or
   response) function tool's name, other than generic verbs such as "get", appears in it
   (``get_weather`` matches "What is the weather in Paris"). Every matching tool is called, in
   declaration order, with arguments filled from the text (:func:`_fill_arguments`).
   ``tool_choice`` ``"none"`` disables this, ``"required"`` calls the first tool when none
   matches, ``{"type": "function", "name": ...}`` calls that tool.
4. The last user message asks "what did I say first" (any case, any punctuation): "You first said:
   <the first user message of the conversation>", so that a test can tell whether the session
   still holds its beginning (after a rollover or a reconnection, from the replayed items).
5. Otherwise "You said: <user text>" (audio turns use the simulated transcript, see
   :mod:`.voice`), or "Hello! How can I help you today?" when there is no user message.

Replies are spoken in the session's (or the response's) output format as a synthetic voice of
about 60 ms a character, sent ``audio_chunk_ms`` of audio every ``chunk_interval`` seconds of the
injected clock, faster than real time as the real API does, so barge-in can cut a reply short.

Not simulated: ``semantic_vad`` is server VAD with a silence that depends on ``eagerness``;
``idle_timeout_ms``, MCP tools, noise reduction, transcription deltas and logprobs are accepted
and ignored; ``conversation.item.retrieved`` carries no audio bytes.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import json
import re
import secrets
import string
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger

from ..wsclose import cancel_close_handshake_timer
from . import voice
from .faults import DropRule
from .validation import ClientEventError, validate_client_event, validate_server_event

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "EXPIRED_CLOSE_CODE",
    "FATAL_CLOSE_CODE",
    "SimulatedSession",
    "SimulatorFactory",
    "SimulatorProtocol",
    "listen_simulator",
]

REALTIME_PATH = "/v1/realtime"
#: Azure OpenAI's GA (v1) realtime path.
AZURE_REALTIME_PATH = "/openai/v1/realtime"
FATAL_CLOSE_CODE = 4000
#: The close code that follows ``session_expired`` (RFC 6455 "going away").
EXPIRED_CLOSE_CODE = 1001
DEFAULT_INSTRUCTIONS = (
    "You are a helpful voice assistant. Speak clearly, keep answers short, and ask when "
    "something is unclear."
)
GREETING = "Hello! How can I help you today?"
TOKEN_RATE_LIMIT = 40_000
MIN_COMMIT_MS = 100
# Larger than the 15 MiB append limit, so that the limit is reported as the API reports it.
MAX_FRAME_BYTES = 32 * 1024 * 1024

_ID_ALPHABET = string.ascii_letters + string.digits
_PCM24K: dict[str, Any] = {"type": "audio/pcm", "rate": voice.PCM_RATE}
_SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: dict[str, Any] = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
_EAGERNESS_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}


def new_id(prefix: str, length: int = 21) -> str:
    """A random id shaped like the real API's (``event_Ct1OVqJmiaDhg4nkh3JWr``)."""
    return f"{prefix}_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def default_session(session_id: str, model: str, expires_at: int) -> dict[str, Any]:
    """The full default session object, shaped like the real ``session.created`` frame."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": expires_at,
        "audio": {
            "input": {
                "format": dict(_PCM24K),
                "transcription": None,
                "noise_reduction": None,
                # gpt-realtime announces 200 ms of silence in session.created [CAP].
                "turn_detection": {**_SERVER_VAD_DEFAULTS, "silence_duration_ms": 200},
            },
            "output": {"format": dict(_PCM24K), "voice": "alloy", "speed": 1.0},
        },
        "include": None,
    }


def _normalize_format(audio_format: dict[str, Any]) -> dict[str, Any]:
    if audio_format.get("type", "audio/pcm") == "audio/pcm":
        return dict(_PCM24K)
    return {"type": audio_format["type"]}


def _normalize_turn_detection(turn_detection: dict[str, Any] | None) -> dict[str, Any] | None:
    # A turn_detection object replaces the previous one; fields left out take their defaults.
    if turn_detection is None:
        return None
    defaults = (
        _SERVER_VAD_DEFAULTS if turn_detection["type"] == "server_vad" else _SEMANTIC_VAD_DEFAULTS
    )
    return {**defaults, **turn_detection}


# Top-level session fields whose null clears them; a null anywhere else leaves the field as it is.
_NULLABLE = frozenset({"tracing", "prompt", "include"})
_NULLABLE_INPUT = frozenset({"transcription", "noise_reduction", "turn_detection"})


def merge_session(current: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """The effective session after a validated ``session.update`` (only the sent fields change)."""
    merged = copy.deepcopy(current)
    for key, value in update.items():
        if key in ("type", "audio"):
            continue
        if value is None and key not in _NULLABLE:
            if key == "tools":
                merged["tools"] = []
            continue
        merged[key] = copy.deepcopy(value)
    audio = update.get("audio") or {}
    for direction in ("input", "output"):
        for key, value in (audio.get(direction) or {}).items():
            if value is None and not (direction == "input" and key in _NULLABLE_INPUT):
                continue
            if key == "format":
                value = _normalize_format(value)
            elif key == "turn_detection":
                value = _normalize_turn_detection(value)
            merged["audio"][direction][key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------- what the model says


@dataclass
class Item:
    """A conversation item: its wire shape (never with audio) plus what the simulation needs."""

    data: dict[str, Any]
    #: What the simulated model understood of a user audio message.
    heard: str | None = None
    #: Assistant audio generated for this item (ms), and when each transcript word starts.
    audio_ms: int = 0
    words: list[tuple[int, str]] = field(default_factory=list)
    truncated: bool = False

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def role(self) -> str | None:
        return self.data.get("role")

    def text(self) -> str:
        """The item's text as the model reads it."""
        parts = []
        for part in self.data.get("content") or []:
            if part.get("type") == "input_audio":
                parts.append(part.get("transcript") or self.heard or "")
            else:
                parts.append(part.get("text") or part.get("transcript") or "")
        return " ".join(p for p in parts if p).strip()

    def has_audio(self) -> bool:
        return any(p.get("type") == "output_audio" for p in self.data.get("content") or [])


@dataclass(frozen=True)
class Say:
    """Reply with this text."""

    text: str


@dataclass(frozen=True)
class Call:
    """Call this function tool with these JSON arguments."""

    name: str
    arguments: str


_VERBATIM = (
    re.compile(
        r"\b(?:exactly|verbatim|word for word)\b[^\"“”]*[\"“](?P<text>.+)[\"”]", re.I | re.S
    ),
    re.compile(r"[\"“](?P<text>.+)[\"”]\s*,?\s*(?:exactly|verbatim|word for word)\b", re.I | re.S),
)
_GENERIC_NAME_WORDS = frozenset(
    "get set fetch find lookup look up check do make query call run the a an of for to by "
    "info information data current api tool function".split()
)
_PLACE_PARAMETER = re.compile(r"location|city|place|country|destination|address|region|town|where")
_PREPOSITION_PLACE = re.compile(
    r"\b(?:in|at|for|near|to|from)\s+([A-Za-z][\w'-]*(?:\s+[A-Z][\w'-]*)*)"
)
_NOT_PLACES = frozenset("today tomorrow now the a an me my you it this that".split())


def verbatim_request(instructions: str | None) -> str | None:
    """The text that ``instructions`` ask to be said word for word, if they do."""
    for pattern in _VERBATIM:
        match = pattern.search(instructions or "")
        if match and match.group("text").strip():
            return match.group("text").strip()
    return None


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _name_words(name: str) -> set[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w}
    return {w for w in words if len(w) >= 3 and w not in _GENERIC_NAME_WORDS}


def tool_matches(name: str, text: str) -> bool:
    """Whether a user text names the tool ``name`` (``get_weather`` and "weather in Paris")."""
    said = _words(text)
    return any(w in said or w + "s" in said or w.rstrip("s") in said for w in _name_words(name))


def _place_in(text: str) -> str | None:
    for match in _PREPOSITION_PLACE.finditer(text):
        words = match.group(1).split()
        if words and words[0].lower() not in _NOT_PLACES:
            return " ".join(w.strip(".,;:!?'\"").capitalize() for w in words)
    return None


def _fill_arguments(parameters: object, text: str) -> str:
    """JSON arguments for a tool call: every declared string property and every required one.

    Enums take the value named in the text (else the first); place-like string properties
    (``location``, ``city`` ...) take the place after "in"/"at"/"for" ("Paris"); other strings take
    the whole user text; required numbers take the first number in the text (else 1), required
    booleans false, arrays [] and objects {}.
    """
    schema = parameters if isinstance(parameters, dict) else {}
    declared = schema.get("properties")
    properties: dict[str, Any] = declared if isinstance(declared, dict) else {}
    required = [r for r in schema.get("required") or [] if isinstance(r, str)]
    arguments: dict[str, object] = {}
    for name, spec in properties.items():
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        enum = spec.get("enum")
        if isinstance(enum, list) and enum:
            said = text.lower()
            arguments[name] = next((v for v in enum if str(v).lower() in said), enum[0])
        elif kind == "string":
            place = _place_in(text) if _PLACE_PARAMETER.search(name.lower()) else None
            arguments[name] = place or text
        elif name in required:
            arguments[name] = _required_value(kind, text)
    for name in required:
        arguments.setdefault(name, text)
    return json.dumps(arguments)


def _required_value(kind: object, text: str) -> object:
    if kind in ("integer", "number"):
        number = re.search(r"-?\d+(?:\.\d+)?", text)
        if number is None:
            return 1
        return int(float(number.group())) if kind == "integer" else float(number.group())
    return {"boolean": False, "array": [], "object": {}}.get(str(kind), text)


_WORD = re.compile(r"[a-z']+")
_FIRST_QUESTION = "what did i say first"


def compose_reply(
    instructions: str | None,
    context: list[Item],
    tools: list[dict[str, Any]],
    tool_choice: object,
) -> list[Say | Call]:
    """What the simulated model answers, following the rules of the module docstring."""
    verbatim = verbatim_request(instructions)
    if verbatim is not None:
        return [Say(verbatim)]
    if context and context[-1].data.get("type") == "function_call_output":
        return [Say(f"Here is what I found: {context[-1].data.get('output', '')}")]
    last_user = next((i for i in reversed(range(len(context))) if context[i].role == "user"), None)
    if last_user is None:
        return [Say(GREETING)]
    text = context[last_user].text()
    if _FIRST_QUESTION in " ".join(_WORD.findall(text.lower())):
        first = next(i.text() for i in context if i.role == "user")
        return [Say(f"You first said: {first}")]
    answered = any(
        item.role == "assistant" or item.data.get("type") == "function_call"
        for item in context[last_user + 1 :]
    )
    functions = [t for t in tools if t.get("type", "function") == "function" and t.get("name")]
    if not answered and tool_choice != "none":
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            chosen = [t for t in functions if t["name"] == tool_choice.get("name")]
        else:
            chosen = [t for t in functions if tool_matches(t["name"], text)]
            if not chosen and tool_choice == "required":
                chosen = functions[:1]
        if chosen:
            return [Call(t["name"], _fill_arguments(t.get("parameters"), text)) for t in chosen]
    return [Say(f"You said: {text}")]


# --------------------------------------------------------------------------- responses


@dataclass
class _OpenItem:
    """The output item a response is generating right now."""

    index: int
    item: Item
    audio: bool = False  # an audio message (else text message or function call)
    sent: str = ""  # transcript, text or arguments sent so far


@dataclass
class Response:
    """One response from ``response.created`` to ``response.done``."""

    id: str
    data: dict[str, Any]  # the wire shape, updated as the response goes
    in_conversation: bool
    context: list[Item]
    output_format: dict[str, Any]
    voice: object
    modality: str
    items: list[Item] = field(default_factory=list)
    open_item: _OpenItem | None = None
    steps: Generator[None, None, None] | None = None
    timer: IDelayedCall | None = None
    truncated_by_limit: bool = False
    input_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0


def _audio_bytes(encoded: str, param: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ClientEventError(
            "invalid_value", f"Invalid '{param}'. Expected base64-encoded audio bytes.", param
        ) from None


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


# --------------------------------------------------------------------------- input audio


class _InputStream:
    """Appended input audio in one input format: the buffer and the VAD, in audio time."""

    def __init__(
        self, audio_format: dict[str, Any], origin_ms: int, turn_detection: dict[str, Any] | None
    ):
        self.format = audio_format
        self.rate = voice.format_rate(audio_format)
        self.origin_ms = origin_ms
        self.total = 0  # samples appended in this format
        self.buffer_start = 0  # sample position of the first buffered sample
        self._chunks: list[np.ndarray] = []
        self._carry = b""  # half a pcm16 sample
        self.turn_detection = turn_detection
        self.vad: voice.VoiceActivityDetector | None = None
        self.prefix_samples = 0
        if turn_detection is not None:
            silence_ms = turn_detection.get("silence_duration_ms")
            if turn_detection["type"] == "semantic_vad":
                silence_ms = _EAGERNESS_SILENCE_MS[turn_detection.get("eagerness") or "auto"]
            self.vad = voice.VoiceActivityDetector(
                self.rate, float(turn_detection.get("threshold", 0.5)), int(silence_ms or 0)
            )
            self.prefix_samples = (
                self.rate * int(turn_detection.get("prefix_padding_ms", 300)) // 1000
            )
        self.threshold = float((turn_detection or {}).get("threshold", 0.5))

    def ms(self, sample: int) -> int:
        return self.origin_ms + sample * 1000 // self.rate

    @property
    def now_ms(self) -> int:
        return self.ms(self.total)

    @property
    def buffered_ms(self) -> float:
        return (self.total - self.buffer_start) * 1000 / self.rate

    def append(self, data: bytes) -> list[voice.VadEvent]:
        if self.rate == voice.PCM_RATE:
            data = self._carry + data
            self._carry = data[len(data) - len(data) % 2 :]
        samples = voice.decode(self.format, data)
        self._chunks.append(samples)
        self.total += len(samples)
        events = self.vad.feed(samples) if self.vad is not None else []
        if self.vad is not None and not self.vad.speaking and not events:
            # Idle under VAD: keep only what prefix padding and speech detection may still need.
            keep = self.prefix_samples + self.rate * voice.MIN_SPEECH_MS // 1000 + self.vad.frame
            self.drop_before(self.total - keep)
        return events

    def drop_before(self, sample: int) -> None:
        if sample > self.buffer_start:
            self.take(sample)

    def take(self, until: int | None = None) -> np.ndarray:
        """Remove and return the buffered samples before ``until`` (default: all of them)."""
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        cut = len(audio) if until is None else max(0, min(len(audio), until - self.buffer_start))
        self._chunks = [audio[cut:]] if cut < len(audio) else []
        self.buffer_start += cut
        return audio[:cut]


# --------------------------------------------------------------------------- the session


def _duration(seconds: float) -> str:
    """``3600`` → ``"60 minutes"`` (the real message); durations that are not whole minutes in seconds."""
    if seconds >= 60 and seconds % 60 == 0:
        amount, unit = f"{int(seconds // 60)}", "minute"
    else:
        amount, unit = f"{seconds:g}", "second"
    return f"{amount} {unit}" + ("" if amount == "1" else "s")


class SimulatedSession:
    """The state and behaviour of one simulated Realtime session, without the socket.

    ``emit`` sends one server event, ``close`` closes the socket with a code and reason. Time
    (pacing, expiry) comes from ``clock``. Tests may read ``config`` (the effective session),
    ``conversation`` (the default conversation's items), ``active`` (the default conversation's
    response in progress) and ``audio_produced``.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        model: str,
        emit: Callable[[dict[str, Any]], None],
        close: Callable[[int, str], None],
        *,
        audio_chunk_ms: int = 100,
        chunk_interval: float = 0.02,
        max_session_seconds: float = 3600.0,
    ) -> None:
        self.clock = clock
        self.id = new_id("sess")
        self.conversation_id = new_id("conv")
        self._emit = emit
        self._close = close
        self.audio_chunk_ms = audio_chunk_ms
        self.chunk_interval = chunk_interval
        self.max_session_seconds = max_session_seconds
        expires_at = int(clock.seconds() + max_session_seconds)
        self.config = default_session(self.id, model, expires_at)
        self.configured = False
        self.audio_produced = False
        self.conversation: list[Item] = []
        self.active: Response | None = None
        self.out_of_band: list[Response] = []
        self._input = self._new_input(origin_ms=0)
        self._speech_item: str | None = None
        self._expiry: IDelayedCall | None = None
        self.closed = False

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the session clock and send ``session.created``."""
        # The clock first: a fault injected at session.created stops the session, timer included.
        self._expiry = self.clock.callLater(self.max_session_seconds, self._expire)
        self._send("session.created", session=copy.deepcopy(self.config))

    def stop(self) -> None:
        """Release every timer (the socket is gone)."""
        self.closed = True
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        for response in self._responses():
            if response.timer is not None and response.timer.active():
                response.timer.cancel()
        self.active = None
        self.out_of_band = []

    def _expire(self) -> None:
        self._expiry = None
        message = f"Your session hit the maximum duration of {_duration(self.max_session_seconds)}."
        self.error("session_expired", message)
        self.stop()
        self._close(EXPIRED_CLOSE_CODE, message)

    def _responses(self) -> list[Response]:
        return ([self.active] if self.active else []) + list(self.out_of_band)

    # ----------------------------------------------------------------- wire

    def _send(self, event_type: str, **fields: Any) -> None:
        if not self.closed:
            self._emit({"type": event_type, "event_id": new_id("event"), **fields})

    def error(
        self,
        code: str,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        """Send an ``error`` event shaped like the real one."""
        self._log.debug("simulated error {code}: {message}", code=code, message=message)
        self._send(
            "error",
            error={
                "type": error_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        )

    def send_scripted(self, event_type: str, **fields: Any) -> None:
        """
        Send one server event a test script wrote (a sequence the real API produces in a race or a
        failure).  It is held to the GA server event types like everything else: a script cannot make
        the simulator send what the real API could not.
        """
        event = {"type": event_type, "event_id": new_id("event"), **fields}
        validate_server_event(event)
        if not self.closed:
            self._emit(event)

    def receive_unparsable(self, problem: str) -> None:
        """A text frame that is not JSON."""
        self.error("invalid_json", f"The server failed to parse the event as JSON: {problem}")

    def receive_binary(self) -> None:
        """A binary frame: the API takes JSON text frames only."""
        self.error(
            "unsupported_frame", "Binary frames are not supported; send JSON events as text frames."
        )

    def receive(self, event: object) -> None:
        """One parsed client event: validate it, then act on it or refuse it whole."""
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if not isinstance(event_id, str):
            event_id = None
        try:
            validate_client_event(event)
            assert isinstance(event, dict)
            handler = getattr(self, "_on_" + event["type"].replace(".", "_"))
            handler(event)
        except ClientEventError as error:
            self.error(error.code, error.message, error.param, event_id)

    # ----------------------------------------------------------------- session.update

    def _on_session_update(self, event: dict[str, Any]) -> None:
        update = event["session"]
        if update["type"] != "realtime":
            raise ClientEventError(
                "invalid_value",
                "Passing a transcription session update event to a realtime session is not allowed.",
                "session.type",
            )
        if "model" in update and update["model"] != self.config["model"]:
            raise ClientEventError(
                "invalid_value",
                f"Cannot change the model of a session from '{self.config['model']}' "
                f"to '{update['model']}'.",
                "session.model",
            )
        output = (update.get("audio") or {}).get("output") or {}
        if "voice" in output and self.audio_produced:
            raise ClientEventError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )
        if (
            "tracing" in update
            and self.config["tracing"] is not None
            and update["tracing"] != self.config["tracing"]
        ):
            raise ClientEventError(
                "invalid_value", "Tracing cannot be modified once it is enabled.", "session.tracing"
            )
        before = self.config["audio"]["input"]
        self.config = merge_session(self.config, update)
        self.configured = True
        after = self.config["audio"]["input"]
        if (after["format"], after["turn_detection"]) != (
            before["format"],
            before["turn_detection"],
        ):
            # A new input format or turn detection starts a fresh buffer, in the same audio time.
            self._input = self._new_input(origin_ms=self._input.now_ms)
            self._speech_item = None
        self._send("session.updated", session=copy.deepcopy(self.config))

    def _new_input(self, origin_ms: int) -> _InputStream:
        audio_in = self.config["audio"]["input"]
        return _InputStream(audio_in["format"], origin_ms, audio_in["turn_detection"])

    def _require_configured(self) -> None:
        if not self.configured:
            raise ClientEventError(
                "session_not_configured",
                "Send a session.update and wait for session.updated before sending audio, items "
                "or responses (a strictness of the simulated upstream).",
            )

    # ----------------------------------------------------------------- input audio

    def _on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        self._require_configured()
        data = _audio_bytes(event["audio"], "audio")
        stream = self._input
        for vad_event in stream.append(data):
            if stream is not self._input or self.closed:
                break
            if vad_event.kind == "started":
                self._speech_started(vad_event.sample)
            else:
                self._speech_stopped(vad_event.sample)

    def _speech_started(self, onset: int) -> None:
        stream = self._input
        start = max(stream.buffer_start, onset - stream.prefix_samples)
        stream.drop_before(start)
        self._speech_item = new_id("item")
        self._send(
            "input_audio_buffer.speech_started",
            audio_start_ms=stream.ms(start),
            item_id=self._speech_item,
        )
        turn_detection = stream.turn_detection or {}
        if self.active is not None and turn_detection.get("interrupt_response", True):
            self._cancel(self.active, "turn_detected")

    def _speech_stopped(self, end: int) -> None:
        stream = self._input
        item_id = self._speech_item or new_id("item")
        self._speech_item = None
        self._send(
            "input_audio_buffer.speech_stopped", audio_end_ms=stream.ms(end), item_id=item_id
        )
        self._commit_audio(item_id, stream.take(end))
        turn_detection = stream.turn_detection or {}
        # Like the real API, an auto-response is skipped while one is still running
        # (possible only with interrupt_response false).
        if turn_detection.get("create_response", True) and self.active is None:
            self._start_response({}, event_id=None)

    def _on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        stream = self._input
        buffered = stream.buffered_ms
        if buffered < MIN_COMMIT_MS:
            raise ClientEventError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered:.2f}ms of audio.",
            )
        item_id = self._speech_item or new_id("item")
        self._speech_item = None
        if stream.vad is not None:
            stream.vad.reset()
        self._commit_audio(item_id, stream.take())

    def _on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self._input.take()
        if self._input.vad is not None:
            self._input.vad.reset()
        self._speech_item = None
        self._send("input_audio_buffer.cleared")

    def _commit_audio(self, item_id: str, samples: np.ndarray) -> None:
        stream = self._input
        previous = self._last_item_id()
        self._send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = Item(
            {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
            heard=voice.transcribe(samples, stream.rate, stream.threshold),
            audio_ms=len(samples) * 1000 // stream.rate,
        )
        self._add_item(item, previous)
        transcription = self.config["audio"]["input"]["transcription"]
        if transcription is not None:
            transcript = item.heard or ""
            item.data["content"][0]["transcript"] = transcript
            self._send(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=transcript,
                usage={
                    "type": "tokens",
                    "total_tokens": _tokens(transcript) + item.audio_ms // 100,
                    "input_tokens": item.audio_ms // 100,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": item.audio_ms // 100},
                    "output_tokens": _tokens(transcript),
                },
            )

    # ----------------------------------------------------------------- conversation

    def _last_item_id(self) -> str | None:
        return self.conversation[-1].id if self.conversation else None

    def _find(self, item_id: str) -> Item | None:
        return next((i for i in self.conversation if i.id == item_id), None)

    def _add_item(self, item: Item, previous_item_id: str | None) -> None:
        """Insert after ``previous_item_id`` (None: at the start) and announce it."""
        if previous_item_id is None:
            self.conversation.insert(0, item)
        else:
            position = next(n for n, i in enumerate(self.conversation) if i.id == previous_item_id)
            self.conversation.insert(position + 1, item)
        for event_type in ("conversation.item.added", "conversation.item.done"):
            self._send(event_type, previous_item_id=previous_item_id, item=copy.deepcopy(item.data))

    def _on_conversation_item_create(self, event: dict[str, Any]) -> None:
        self._require_configured()
        raw = event["item"]
        item_id = raw.get("id") or new_id("item")
        if self._find(item_id) is not None:
            raise ClientEventError(
                "invalid_value", f"Item with id '{item_id}' already exists.", "item.id"
            )
        kind = raw["type"]
        if kind == "function_call_output" and not any(
            i.data.get("type") == "function_call" and i.data.get("call_id") == raw["call_id"]
            for i in self.conversation
        ):
            raise ClientEventError(
                "invalid_value",
                f"No tool call found for function call output with call_id '{raw['call_id']}'.",
                "item.call_id",
            )
        for n, part in enumerate(raw.get("content") or []):
            if raw.get("role") == "assistant" and part.get("type") == "output_audio":
                raise ClientEventError(
                    "invalid_value",
                    "Assistant messages with audio content cannot be created.",
                    f"item.content[{n}].type",
                )
        previous = event.get("previous_item_id")
        if previous is None:
            previous = self._last_item_id()
        elif previous == "root":
            previous = None
        elif self._find(previous) is None:
            raise ClientEventError(
                "invalid_value",
                f"Previous item with id '{previous}' not found.",
                "previous_item_id",
            )
        self._add_item(self._item_from_client(raw, item_id), previous)

    def _item_from_client(self, raw: dict[str, Any], item_id: str) -> Item:
        data: dict[str, Any] = {"id": item_id, "type": raw["type"], "status": "completed"}
        data.update(
            {
                k: copy.deepcopy(v)
                for k, v in raw.items()
                if k not in ("id", "object", "status", "type")
            }
        )
        heard = None
        audio_ms = 0
        for n, part in enumerate(data.get("content") or []):
            audio = part.pop("audio", None)  # items are echoed and kept without audio bytes
            if part.get("type") == "input_audio":
                part.setdefault("transcript", None)
                if audio:
                    fmt = self.config["audio"]["input"]["format"]
                    samples = voice.decode(fmt, _audio_bytes(audio, f"item.content[{n}].audio"))
                    heard = voice.transcribe(samples, voice.format_rate(fmt))
                    audio_ms += len(samples) * 1000 // voice.format_rate(fmt)
        return Item(data, heard=heard, audio_ms=audio_ms)

    def _on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        item = self._require_item(event["item_id"])
        self.conversation.remove(item)
        self._send("conversation.item.deleted", item_id=item.id)

    def _on_conversation_item_retrieve(self, event: dict[str, Any]) -> None:
        item = self._require_item(event["item_id"])
        self._send("conversation.item.retrieved", item=copy.deepcopy(item.data))

    def _require_item(self, item_id: str) -> Item:
        item = self._find(item_id)
        if item is None:
            raise ClientEventError(
                "invalid_value", f"Item with item_id '{item_id}' not found.", "item_id"
            )
        return item

    def _on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        item = self._require_item(event["item_id"])
        if item.role != "assistant" or not item.has_audio():
            raise ClientEventError(
                "invalid_value", "Only assistant messages with audio can be truncated.", "item_id"
            )
        if event["content_index"] != 0:
            raise ClientEventError(
                "invalid_value",
                f"Invalid content_index {event['content_index']}: the item has one content part.",
                "content_index",
            )
        end_ms = event["audio_end_ms"]
        if end_ms > item.audio_ms:
            raise ClientEventError(
                "invalid_value",
                f"Audio content of {item.audio_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        item.audio_ms = end_ms
        item.truncated = True
        # The context keeps only what the user heard: the words whose audio had started.
        heard = "".join(word for start, word in item.words if start < end_ms).strip()
        for part in item.data["content"]:
            if part.get("type") == "output_audio":
                part["transcript"] = heard
        self._send(
            "conversation.item.truncated",
            item_id=item.id,
            content_index=0,
            audio_end_ms=end_ms,
        )

    # ----------------------------------------------------------------- responses

    def _on_response_create(self, event: dict[str, Any]) -> None:
        self._require_configured()
        self._start_response(event.get("response") or {}, event.get("event_id"))

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        response = (
            next((r for r in self._responses() if r.id == wanted), None) if wanted else self.active
        )
        if response is None:
            raise ClientEventError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        self._cancel(response, "client_cancelled")

    def _on_output_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        raise ClientEventError(
            "invalid_value",
            "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
            "type",
        )

    def _start_response(self, params: dict[str, Any], event_id: str | None) -> None:
        conversation = params.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise ClientEventError(
                "invalid_value",
                f"Invalid value: '{conversation}'. Supported values are: 'auto' and 'none'.",
                "response.conversation",
            )
        in_conversation = conversation == "auto"
        if in_conversation and self.active is not None:
            raise ClientEventError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        context = self._context(params.get("input"))
        session = self.config
        audio_params = (params.get("audio") or {}).get("output") or {}
        output_format = _normalize_format(
            audio_params.get("format") or session["audio"]["output"]["format"]
        )
        voice_name = audio_params.get("voice") or session["audio"]["output"]["voice"]
        modalities = params.get("output_modalities") or session["output_modalities"]
        max_tokens = params.get("max_output_tokens", session["max_output_tokens"])
        response_id = new_id("resp")
        response = Response(
            id=response_id,
            data={
                "object": "realtime.response",
                "id": response_id,
                "status": "in_progress",
                "status_details": None,
                "output": [],
                "conversation_id": self.conversation_id if in_conversation else None,
                "output_modalities": list(modalities),
                "max_output_tokens": max_tokens,
                "audio": {"output": {"format": output_format, "voice": voice_name}},
                "usage": None,
                "metadata": params.get("metadata"),
            },
            in_conversation=in_conversation,
            context=context,
            output_format=output_format,
            voice=voice_name,
            modality=modalities[0],
        )
        instructions = params.get("instructions")
        response.input_tokens = _tokens(str(instructions or session["instructions"])) + sum(
            _tokens(i.text()) + i.audio_ms // 100 for i in context
        )
        plan = compose_reply(
            instructions,
            context,
            params["tools"] if "tools" in params else session["tools"],
            params.get("tool_choice", session["tool_choice"]),
        )
        if isinstance(max_tokens, int):
            plan = self._limit(response, plan, max_tokens)
        if in_conversation:
            self.active = response
        else:
            self.out_of_band.append(response)
        self._send("response.created", response=copy.deepcopy(response.data))
        response.steps = self._generate(response, plan)
        self._step(response)

    @staticmethod
    def _limit(response: Response, plan: list[Say | Call], max_tokens: int) -> list[Say | Call]:
        """Cut spoken text to ``max_output_tokens`` (about four characters a token)."""
        limited: list[Say | Call] = []
        for part in plan:
            if isinstance(part, Say) and _tokens(part.text) > max_tokens:
                limited.append(Say(part.text[: max_tokens * 4]))
                response.truncated_by_limit = True
                break
            limited.append(part)
        return limited

    def _context(self, given: list[dict[str, Any]] | None) -> list[Item]:
        if given is None:
            return list(self.conversation)
        context = []
        for n, raw in enumerate(given):
            if raw["type"] == "item_reference":
                item = self._find(raw["id"])
                if item is None:
                    raise ClientEventError(
                        "invalid_value",
                        f"Item with id '{raw['id']}' not found.",
                        f"response.input[{n}].id",
                    )
                context.append(item)
            else:
                context.append(self._item_from_client(raw, raw.get("id") or new_id("item")))
        return context

    def _step(self, response: Response) -> None:
        """Run the response up to its next pause, then schedule the rest."""
        response.timer = None
        assert response.steps is not None
        if self.closed or next(response.steps, StopIteration) is StopIteration or self.closed:
            return  # (the step itself may have closed the session: no timer outlives it)
        response.timer = self.clock.callLater(self.chunk_interval, self._step, response)

    def _generate(self, response: Response, plan: list[Say | Call]) -> Generator[None, None, None]:
        """The response's events; every ``yield`` waits one ``chunk_interval``."""
        for index, part in enumerate(plan):
            if isinstance(part, Say):
                yield from self._say(response, index, part.text)
            else:
                yield from self._call(response, index, part)
        if response.truncated_by_limit:
            self._finish(
                response, "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
            )
        else:
            self._finish(response, "completed", None)

    def _open(self, response: Response, index: int, data: dict[str, Any], audio: bool) -> _OpenItem:
        item = Item(data)
        response.items.append(item)
        opened = _OpenItem(index, item, audio=audio)
        response.open_item = opened
        self._send(
            "response.output_item.added",
            response_id=response.id,
            output_index=index,
            item=copy.deepcopy(data),
        )
        if response.in_conversation:
            previous = self._last_item_id()
            self.conversation.append(item)
            self._send(
                "conversation.item.added", previous_item_id=previous, item=copy.deepcopy(data)
            )
        return opened

    def _part_fields(self, response: Response, opened: _OpenItem) -> dict[str, Any]:
        return {
            "response_id": response.id,
            "item_id": opened.item.id,
            "output_index": opened.index,
            "content_index": 0,
        }

    def _say(self, response: Response, index: int, text: str) -> Iterator[None]:
        audio = response.modality == "audio"
        opened = self._open(
            response,
            index,
            {
                "id": new_id("item"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            },
            audio,
        )
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        self._send("response.content_part.added", **self._part_fields(response, opened), part=part)
        if audio:
            yield from self._speak(response, opened, text)
        else:
            yield from self._write(response, opened, text)
        self._close_item(response, "completed")

    def _speak(self, response: Response, opened: _OpenItem, text: str) -> Iterator[None]:
        reply = voice.synthesize_reply(text, response.output_format, response.voice)
        opened.item.words = list(reply.words)
        per_ms = voice.bytes_per_ms(response.output_format)
        chunk = self.audio_chunk_ms * per_ms
        words = list(reply.words)
        for offset in range(0, len(reply.audio), chunk):
            yield
            chunk_end_ms = (offset + chunk) // per_ms
            # The transcript runs slightly ahead of the audio, as the real one does.
            while words and words[0][0] < chunk_end_ms:
                _, word = words.pop(0)
                opened.sent += word
                self._send(
                    "response.output_audio_transcript.delta",
                    **self._part_fields(response, opened),
                    delta=word,
                    obfuscation=secrets.token_urlsafe(9)[:12],
                )
            data = reply.audio[offset : offset + chunk]
            self.audio_produced = True
            if not opened.item.truncated:
                opened.item.audio_ms += len(data) // per_ms
            self._send(
                "response.output_audio.delta",
                **self._part_fields(response, opened),
                delta=base64.b64encode(data).decode("ascii"),
            )

    def _write(self, response: Response, opened: _OpenItem, text: str) -> Iterator[None]:
        tokens = re.findall(r"\S+\s*", text) or [text]
        for start in range(0, len(tokens), 5):
            yield
            delta = "".join(tokens[start : start + 5])
            opened.sent += delta
            self._send(
                "response.output_text.delta", **self._part_fields(response, opened), delta=delta
            )

    def _call(self, response: Response, index: int, call: Call) -> Iterator[None]:
        data = {
            "id": new_id("item"),
            "type": "function_call",
            "status": "in_progress",
            "name": call.name,
            "call_id": new_id("call", 16),
            "arguments": "",
        }
        opened = self._open(response, index, data, audio=False)
        for start in range(0, len(call.arguments), 24):
            yield
            delta = call.arguments[start : start + 24]
            opened.sent += delta
            self._send(
                "response.function_call_arguments.delta",
                response_id=response.id,
                item_id=data["id"],
                output_index=index,
                call_id=data["call_id"],
                delta=delta,
            )
        self._send(
            "response.function_call_arguments.done",
            response_id=response.id,
            item_id=data["id"],
            output_index=index,
            call_id=data["call_id"],
            name=call.name,
            arguments=call.arguments,
        )
        self._close_item(response, "completed")

    def _close_item(self, response: Response, status: str) -> None:
        """Finish the open output item with what was generated so far."""
        opened = response.open_item
        if opened is None:
            return
        response.open_item = None
        data = opened.item.data
        data["status"] = status
        if data["type"] == "function_call":
            data["arguments"] = opened.sent
        else:
            fields = self._part_fields(response, opened)
            if opened.audio:
                self._send("response.output_audio.done", **fields)
                self._send(
                    "response.output_audio_transcript.done", **fields, transcript=opened.sent
                )
                part = {"type": "audio", "transcript": opened.sent}
                data["content"] = [{"type": "output_audio", "transcript": opened.sent}]
                response.output_audio_tokens += opened.item.audio_ms // 50
            else:
                self._send("response.output_text.done", **fields, text=opened.sent)
                part = {"type": "text", "text": opened.sent}
                data["content"] = [{"type": "output_text", "text": opened.sent}]
            self._send("response.content_part.done", **fields, part=part)
        response.output_text_tokens += _tokens(opened.sent)
        self._send(
            "response.output_item.done",
            response_id=response.id,
            output_index=opened.index,
            item=copy.deepcopy(data),
        )
        if response.in_conversation:
            index = self.conversation.index(opened.item) if opened.item in self.conversation else -1
            previous = self.conversation[index - 1].id if index > 0 else None
            self._send(
                "conversation.item.done", previous_item_id=previous, item=copy.deepcopy(data)
            )

    def _cancel(self, response: Response, reason: str) -> None:
        """Stop a response where it is, as the real API does on barge-in or response.cancel."""
        if response.timer is not None and response.timer.active():
            response.timer.cancel()
        response.timer = None
        if response.steps is not None:
            response.steps.close()
        self._close_item(response, "incomplete")
        self._finish(response, "cancelled", {"type": "cancelled", "reason": reason})

    def _finish(self, response: Response, status: str, details: dict[str, Any] | None) -> None:
        output_tokens = response.output_text_tokens + response.output_audio_tokens
        response.data.update(
            status=status,
            status_details=details,
            output=[copy.deepcopy(i.data) for i in response.items],
            usage={
                "total_tokens": response.input_tokens + output_tokens,
                "input_tokens": response.input_tokens,
                "output_tokens": output_tokens,
                "input_token_details": {
                    "text_tokens": response.input_tokens,
                    "audio_tokens": 0,
                    "image_tokens": 0,
                    "cached_tokens": 0,
                    "cached_tokens_details": {
                        "text_tokens": 0,
                        "audio_tokens": 0,
                        "image_tokens": 0,
                    },
                },
                "output_token_details": {
                    "text_tokens": response.output_text_tokens,
                    "audio_tokens": response.output_audio_tokens,
                },
            },
        )
        if self.active is response:
            self.active = None
        elif response in self.out_of_band:
            self.out_of_band.remove(response)
        self._send("response.done", response=copy.deepcopy(response.data))
        used = response.input_tokens + output_tokens
        self._send(
            "rate_limits.updated",
            rate_limits=[
                {
                    "name": "tokens",
                    "limit": TOKEN_RATE_LIMIT,
                    "remaining": max(0, TOKEN_RATE_LIMIT - used),
                    "reset_seconds": round(used * 60 / TOKEN_RATE_LIMIT, 3),
                }
            ],
        )


# --------------------------------------------------------------------------- the socket


def _is_valid_client_event(event: object) -> bool:
    try:
        validate_client_event(event)
    except ClientEventError:
        return False
    return True


class SimulatorProtocol(WebSocketServerProtocol):
    """One simulated Realtime connection: the handshake checks, then a :class:`SimulatedSession`."""

    factory: SimulatorFactory
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.session: SimulatedSession | None = None
        self._model = ""
        self._fatal: tuple[str, str] | None = None
        #: The drop rules of this connection's session, with how often each one's event was seen.
        self._drops: list[tuple[DropRule, list[int]]] = []
        self._drop_timers: list[IDelayedCall] = []
        self.dropped: DropRule | None = None

    def onConnect(self, request: ConnectionRequest) -> str | None:
        if self.factory.azure:
            self._connect_azure(request)
            return None
        if request.path != REALTIME_PATH:
            raise ConnectionDeny(404, "Not Found")
        chosen = None
        key = self.factory.api_key
        if key is not None:
            offered = f"openai-insecure-api-key.{key}"
            header = request.headers.get("authorization", "")
            if "realtime" in request.protocols and any(
                hmac.compare_digest(p.encode(), offered.encode()) for p in request.protocols
            ):
                chosen = "realtime"  # the browser form of authentication
            elif not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
                raise ConnectionDeny(401, "Incorrect API key provided.")
        self._model = (request.params.get("model") or [""])[0]
        if "openai-beta" in request.headers:
            self._fatal = (
                "beta_api_shape_disabled",
                "The beta Realtime API shape is disabled; do not send the OpenAI-Beta header.",
            )
        elif not self._model.startswith("gpt-realtime"):
            self._fatal = (
                "model_not_found",
                f"The model '{self._model}' does not exist or you do not have access to it.",
            )
        return chosen

    def _connect_azure(self, request: ConnectionRequest) -> None:
        """Azure OpenAI's GA shape: ``/openai/v1/realtime?model=<deployment>``, authenticated by an
        ``api-key`` header or a Microsoft Entra ``Authorization: Bearer <token>`` (an OpenAI key sent
        as a bearer token is refused, as Azure refuses it)."""
        if request.path != AZURE_REALTIME_PATH:
            raise ConnectionDeny(404, "Resource not found")
        factory = self.factory
        api_key = request.headers.get("api-key", "")
        authorization = request.headers.get("authorization", "")
        key_ok = factory.api_key is None or hmac.compare_digest(
            api_key.encode(), factory.api_key.encode())
        bearer_ok = factory.entra_token is not None and hmac.compare_digest(
            authorization.encode(), f"Bearer {factory.entra_token}".encode())
        if not (bearer_ok or (key_ok and (api_key or factory.api_key is None))):
            raise ConnectionDeny(401, "Access denied due to invalid subscription key or wrong API endpoint.")
        self._model = (request.params.get("model") or [""])[0]
        if not self._model:
            raise ConnectionDeny(400, "Missing required query parameter: model")
        if factory.azure_deployments is not None and self._model not in factory.azure_deployments:
            raise ConnectionDeny(404, "The API deployment for this resource does not exist.")
        if "openai-beta" in request.headers:
            self._fatal = (
                "beta_api_shape_disabled",
                "The beta Realtime API shape is disabled; do not send the OpenAI-Beta header.",
            )
        return None

    def onOpen(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)  # small events must not wait for Nagle
        if self._fatal is not None:
            code, message = self._fatal
            self._log.info("simulated upstream refuses the session: {code}", code=code)
            self._send_event(
                {
                    "type": "error",
                    "event_id": new_id("event"),
                    "error": {
                        "type": "invalid_request_error",
                        "code": code,
                        "message": message,
                        "param": None,
                        "event_id": None,
                    },
                }
            )
            self.sendClose(FATAL_CLOSE_CODE, code)
            return
        factory = self.factory
        self.session = SimulatedSession(
            factory.clock,
            self._model,
            self._send_event,
            self._close,
            audio_chunk_ms=factory.audio_chunk_ms,
            chunk_interval=factory.chunk_interval,
            max_session_seconds=factory.max_session_seconds,
        )
        factory.sessions.append(self)
        factory.opened += 1
        ordinal = factory.opened
        self._log.debug(
            "simulated session {session_id} opened ({model}, number {ordinal})",
            session_id=self.session.id,
            model=self._model,
            ordinal=ordinal,
        )
        for rule in factory.drops:
            if not rule.applies_to(ordinal):
                continue
            if rule.after is not None:
                self._drop_timers.append(factory.clock.callLater(rule.after, self._drop, rule))
            else:
                self._drops.append((rule, [0]))
        self.session.start()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        if isBinary:
            session.receive_binary()
            return
        try:
            event = json.loads(payload.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            session.receive_unparsable(str(exc))
            return
        if isinstance(event, dict) and self.factory.record_received:
            self.factory.received.append((session.id, event))
        if self._drops and isinstance(event, dict) and self._count(event.get("type")):
            return  # dropped on receipt: the event is never acted on
        script = self.factory.script
        # Only a valid event reaches a script: the simulated API refuses the others as usual.
        if script is not None and _is_valid_client_event(event) and script(session, event):
            return
        try:
            session.receive(event)
        except Exception:
            # A simulator bug: log it loudly (trial reports it) and answer like the API would.
            self._log.failure("simulated session {session_id} failed", session_id=session.id)
            session.error(
                "server_error",
                "The server had an error while processing your request.",
                error_type="server_error",
            )

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_drops()
        if self.session is not None:
            self.session.stop()
            self._log.debug(
                "simulated session {session_id} closed ({code})",
                session_id=self.session.id,
                code=code,
            )
        if self in self.factory.sessions:
            self.factory.sessions.remove(self)

    def _send_event(self, event: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(event).encode("utf-8"), isBinary=False)
            if self._drops:
                self._count(event["type"])

    def _close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            # Autobahn's sendClose takes only 1000 and 3000-4999; 1001 and 1011 are what servers send.
            reason_bytes = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)

    # ----------------------------------------------------------------- fault injection

    def _count(self, event_type: object) -> bool:
        """Count one occurrence of ``event_type``; drop the connection when a rule says so."""
        for rule, seen in self._drops:
            if rule.event == event_type:
                seen[0] += 1
                if seen[0] == rule.nth:
                    self._drop(rule)
                    return True
        return False

    def _drop(self, rule: DropRule) -> None:
        if self.dropped is not None or self.state != self.STATE_OPEN:
            return
        self.dropped = rule
        self._cancel_drops()
        self._log.info(
            "simulated drop of session {session_id} ({rule})",
            session_id=self.session.id if self.session else None,
            rule=rule.describe(),
        )
        if self.session is not None:
            self.session.stop()  # nothing more is sent, no timer of it outlives the connection
        transport: Any = self.transport
        if rule.hang:
            # Silent: read nothing more (no pong, no close answer); released after a bound.
            transport.pauseProducing()
            self._drop_timers.append(
                self.factory.clock.callLater(self.factory.hang_seconds, transport.abortConnection)
            )
        elif rule.close is None:
            transport.abortConnection()
        else:
            self._close(rule.close, "simulated connection drop")

    def _cancel_drops(self) -> None:
        for timer in self._drop_timers:
            if timer.active():
                timer.cancel()
        self._drop_timers = []
        self._drops = []


class SimulatorFactory(WebSocketServerFactory):
    """Serves the simulated OpenAI Realtime (GA) API; see the module docstring.

    With ``azure=True`` it speaks Azure OpenAI's shape instead (``/openai/v1/realtime?model=
    <deployment>``, an ``api-key`` header equal to ``api_key`` or ``Authorization: Bearer
    <entra_token>``; deployments limited to ``azure_deployments`` when given, else any name).

    ``received`` holds ``(session id, client event)`` for every JSON object received, in order
    (tests read it to see what was sent upstream; ``record_received=False`` turns it off for long
    runs). ``sessions`` holds the live :class:`SimulatorProtocol` instances; their ``session``
    attribute is the :class:`SimulatedSession`. ``opened`` counts the sessions opened so far.

    ``max_session_seconds`` is when sessions expire (the real API's 60 minutes by default); ``drops``
    are the :class:`~.faults.DropRule` fault injections applied to each session.
    """

    protocol = SimulatorProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        *,
        api_key: str | None = None,
        audio_chunk_ms: int = 100,
        chunk_interval: float = 0.02,
        url: str | None = None,
        max_session_seconds: float = 3600.0,
        record_received: bool = True,
        script: Callable[[SimulatedSession, dict[str, Any]], bool] | None = None,
        azure: bool = False,
        entra_token: str | None = None,
        azure_deployments: frozenset[str] | None = None,
        drops: tuple[DropRule, ...] = (),
    ) -> None:
        super().__init__(url=url)
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_FRAME_BYTES, maxMessagePayloadSize=MAX_FRAME_BYTES
        )
        self.clock = clock
        self.api_key = api_key
        self.audio_chunk_ms = audio_chunk_ms
        self.chunk_interval = chunk_interval
        self.max_session_seconds = max_session_seconds
        self.record_received = record_received
        #: Tests only: sees each valid client event first and, by returning True, answers it itself
        #: (with :meth:`SimulatedSession.send_scripted`) instead of the simulated API.
        self.script = script
        #: Speak Azure OpenAI's URL and authentication shape instead of OpenAI's.
        self.azure = azure
        #: Azure: the Entra access token accepted as ``Authorization: Bearer``.
        self.entra_token = entra_token
        #: Azure: the deployment names served (None: any).
        self.azure_deployments = azure_deployments
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.sessions: list[SimulatorProtocol] = []
        self.drops = tuple(drops)
        self.opened = 0
        #: Seconds after which a connection silenced by a ``close=hang`` rule is aborted.
        self.hang_seconds = 60.0


def listen_simulator(
    reactor: Any, description: str = "tcp:0:interface=127.0.0.1", **factory_kwargs: Any
) -> Deferred[tuple[IListeningPort, SimulatorFactory]]:
    """Listen on a Twisted server endpoint description; fire with the port and the factory.

    ``factory_kwargs`` go to :class:`SimulatorFactory`; the reactor is also its clock.
    """
    factory = SimulatorFactory(reactor, **factory_kwargs)
    listening: Deferred[IListeningPort] = serverFromString(reactor, description).listen(factory)
    return listening.addCallback(lambda port: (port, factory))
