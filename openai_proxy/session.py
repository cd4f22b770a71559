"""
The per-client session state machine: Deepgram Voice Agent v1 on one side, OpenAI Realtime GA on the other.

It does no I/O.  Each input method (a client frame, an upstream event, the upstream opening or failing, a
timer firing, the client leaving) returns the list of *outputs* the caller must carry out, in order:
frames for the client, events for the upstream, timers to start or cancel, closes and log records.
Time comes from the injected ``now`` callable.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from openai_proxy import errors
from openai_proxy.audio import (
    AppendBatcher,
    InputConverter,
    OutputConverter,
    bytes_per_ms,
    sample_bytes,
)
from openai_proxy.functions import Endpoint
from openai_proxy.translate import messages as m
from openai_proxy.translate.settings import (
    SessionPlan,
    SettingsError,
    choose_model,
    parse_listen_language,
    parse_settings,
    parse_speak,
    parse_think,
    session_changes,
    session_config,
    verbatim_instructions,
)

# -- outputs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendClient:
    """A JSON text frame for the client."""

    message: dict[str, Any]


@dataclass(frozen=True)
class SendClientAudio:
    """A binary frame of agent audio for the client."""

    data: bytes


@dataclass(frozen=True)
class ConnectUpstream:
    """Open the upstream WebSocket for ``model``."""

    model: str


@dataclass(frozen=True)
class SendUpstream:
    """A GA client event for the upstream (the caller holds it until the upstream is open)."""

    event: dict[str, Any]


@dataclass(frozen=True)
class CallFunction:
    """Call a server-side function's endpoint; answer with :meth:`Session.function_result`."""

    call_id: str
    name: str
    arguments: str
    endpoint: Endpoint


@dataclass(frozen=True)
class StartTimer:
    name: str
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True)
class CloseUpstream:
    pass


@dataclass(frozen=True)
class Log:
    """A structured log record: ``level`` is debug|info|warn|error; ``fields`` go to the record."""

    level: str
    format: str
    fields: dict[str, Any] = field(default_factory=dict)


Output = (
    SendClient
    | SendClientAudio
    | ConnectUpstream
    | SendUpstream
    | CallFunction
    | StartTimer
    | CancelTimer
    | CloseClient
    | CloseUpstream
    | Log
)

APPEND_FLUSH_TIMER = "append-flush"
FUNCTION_FOLLOWUP_TIMER = "function-followup"
#: How long a partial append batch may wait for more audio.
APPEND_FLUSH_SECONDS = 0.04
#: Client requests that may wait for the session or for the active response to end.
MAX_WAITING_REQUESTS = 32
#: Longest prompt UpdatePrompt may grow the instructions to (characters).
MAX_INSTRUCTIONS_CHARS = 64 * 1024


@dataclass(frozen=True)
class SessionOptions:
    """What a session needs from the daemon's configuration."""

    default_model: str
    model_allowed: Callable[[str], bool]
    default_voice: str
    transcription_model: str
    audio_buffer_seconds: float = 5.0
    function_call_timeout: float = 10.0
    #: URL prefixes server-side functions may call; empty: functions with an endpoint are refused.
    function_url_prefixes: tuple[str, ...] = ()


class Phase(enum.Enum):
    AWAITING_SETTINGS = "awaiting-settings"
    CONFIGURING = "configuring"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class _PendingUpdate:
    """A ``session.update`` sent and not yet answered."""

    event_id: str
    ack: str | None
    plan: SessionPlan
    #: Only a voice change (sent alone once the agent has spoken): a refusal is a Warning, not an Error.
    voice_only: bool = False


@dataclass
class _QueuedUpdate:
    """An update waiting for the active response to end."""

    ack: str
    plan: SessionPlan


@dataclass
class _ResponseRequest:
    """A ``response.create`` the daemon wants to send once nothing is active."""

    reason: str
    instructions: str | None = None
    #: Item ids that must be confirmed by the upstream before the response may be created.
    after_items: frozenset[str] = frozenset()


@dataclass
class _Response:
    """The one active response, from ``response.created`` to ``response.done``."""

    response_id: str
    call_ids: list[str] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _AudioItem:
    """Agent audio of one assistant item as delivered to the client."""

    item_id: str
    response_id: str
    delivered_bytes: int = 0
    started_at: float = 0.0
    done: bool = False


@dataclass
class _CallRound:
    """The function calls one response asked for, and their outputs."""

    response_id: str
    call_ids: list[str]
    names: dict[str, str]
    arguments: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    #: Calls the daemon runs itself (functions with an endpoint).
    server_side: set[str] = field(default_factory=set)
    output_items: dict[str, str] = field(default_factory=dict)
    response_ended: bool = False


class Session:
    """
    One client's translation state.  Call :meth:`start` first; every method returns outputs to carry out.
    """

    def __init__(
        self,
        options: SessionOptions,
        now: Callable[[], float],
        request_id: str | None = None,
    ) -> None:
        self.options = options
        self._now = now
        self.request_id = request_id or str(uuid.uuid4())
        self.phase = Phase.AWAITING_SETTINGS
        self.plan: SessionPlan | None = None
        self._out: list[Output] = []
        self._event_seq = 0
        self._upstream_requested = False
        self._connected_model: str | None = None
        self._upstream_open = False
        # session.update bookkeeping
        self._in_flight_updates: deque[_PendingUpdate] = deque()
        self._queued_updates: deque[_QueuedUpdate] = deque()
        # response bookkeeping
        self._response: _Response | None = None
        self._response_requested = False
        self._response_queue: deque[_ResponseRequest] = deque()
        self._awaiting_items: set[str] = set()
        #: event_id of each conversation.item.create → its item id, to match upstream errors.
        self._item_events: dict[str, str] = {}
        self._user_echo: dict[str, str] = {}
        # held input before the session is configured
        self._held_audio = bytearray()
        self._held_audio_warned = False
        self._held_injections: list[str] = []
        self._held_history_done = False
        # audio
        self._input: InputConverter | None = None
        self._output: OutputConverter | None = None
        self._batcher: AppendBatcher | None = None
        self._audio_item: _AudioItem | None = None
        self._last_audio_item: _AudioItem | None = None
        #: Responses that ended or were interrupted: their audio is never forwarded (again).
        self._silenced_responses: deque[str] = deque(maxlen=32)
        self._agent_spoke = False
        #: Responses interrupted by barge-in: their assistant text is never sent (docs/protocol.md).
        self._untexted_responses: deque[str] = deque(maxlen=32)
        # turn state
        self._user_speaking = False
        self._turn_end: float | None = None
        self._first_text_at: float | None = None
        self._texted_items: set[str] = set()
        self._requested_calls: set[str] = set()
        self._call_rounds: dict[str, _CallRound] = {}
        self._call_to_round: dict[str, str] = {}
        self._timers: set[str] = set()

    # -- helpers ------------------------------------------------------------------------------------

    def _flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def _next_id(self, prefix: str) -> str:
        self._event_seq += 1
        return f"{prefix}_{self.request_id[:8]}_{self._event_seq}"

    def _client(self, message: dict[str, Any]) -> None:
        self._out.append(SendClient(message))

    def _upstream(self, event: dict[str, Any]) -> None:
        self._out.append(SendUpstream(event))

    def _log(self, level: str, fmt: str, **fields: Any) -> None:
        self._out.append(Log(level, fmt, fields))

    def _error(self, code: str, description: str) -> None:
        self._client(m.error(code, description))
        self._log("info", "client error {error_code}: {description}", error_code=code,
                  description=description)

    def _warning(self, code: str, description: str) -> None:
        self._client(m.warning(code, description))
        self._log("info", "client warning {error_code}: {description}", error_code=code,
                  description=description)

    def _start_timer(self, name: str, seconds: float) -> None:
        self._timers.add(name)
        self._out.append(StartTimer(name, seconds))

    def _cancel_timer(self, name: str) -> None:
        if name in self._timers:
            self._timers.discard(name)
            self._out.append(CancelTimer(name))

    @property
    def response_active(self) -> bool:
        """Whether a response is active upstream or requested and not yet confirmed."""
        return self._response is not None or self._response_requested

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> list[Output]:
        """The client's WebSocket is open: greet it."""
        self._client(m.welcome(self.request_id))
        return self._flush()

    def client_closed(self) -> list[Output]:
        """The client left: release the upstream and every timer."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            for name in sorted(self._timers):
                self._cancel_timer(name)
            if self._upstream_requested:
                self._out.append(CloseUpstream())
        return self._flush()

    def upstream_opened(self) -> list[Output]:
        self._upstream_open = True
        self._log("debug", "upstream open")
        return self._flush()

    def upstream_failed(self, code: str, description: str) -> list[Output]:
        """
        The upstream could not be reached, refused us, or closed.  ``code`` is one of the UPSTREAM_*
        codes of :mod:`openai_proxy.errors`.  The client gets an Error and then a close.
        """
        if self.phase is Phase.CLOSED:
            return self._flush()
        self._error(code, description)
        self.phase = Phase.CLOSED
        for name in sorted(self._timers):
            self._cancel_timer(name)
        self._out.append(CloseClient(1011, description[:120]))
        return self._flush()

    def timer_fired(self, name: str) -> list[Output]:
        self._timers.discard(name)
        if self.phase is Phase.CLOSED:
            return self._flush()
        if name == APPEND_FLUSH_TIMER:
            if self._batcher is not None:
                chunk = self._batcher.flush()
                if chunk:
                    self._append(chunk)
        elif name.startswith(FUNCTION_FOLLOWUP_TIMER):
            response_id = name.split(":", 1)[1]
            round_ = self._call_rounds.get(response_id)
            if round_ is not None:
                self._log(
                    "warn",
                    "response {response_id} never ended after its function calls; following up anyway",
                    response_id=response_id,
                )
                round_.response_ended = True
                if self._response is not None and self._response.response_id == response_id:
                    self._response = None
                self._maybe_follow_up(round_)
                self._pump()
        return self._flush()

    # -- client input -------------------------------------------------------------------------------

    def client_text(self, text: str) -> list[Output]:
        """One text frame from the client."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        try:
            message = json.loads(text)
        except ValueError:
            self._error(errors.UNPARSABLE_CLIENT_MESSAGE, "the message is not valid JSON")
            return self._flush()
        if not isinstance(message, dict):
            self._error(errors.UNPARSABLE_CLIENT_MESSAGE, "the message is not a JSON object")
            return self._flush()
        message_type = message.get("type")
        if not isinstance(message_type, str):
            self._error(
                errors.UNPARSABLE_CLIENT_MESSAGE, "the message has no string 'type' field"
            )
            return self._flush()
        handler = self._client_handlers.get(message_type)
        if handler is None:
            self._error(
                errors.UNSUPPORTED_CLIENT_MESSAGE,
                f"message type {message_type[:64]!r} is not supported",
            )
            return self._flush()
        handler(self, message)
        return self._flush()

    def client_binary(self, data: bytes) -> list[Output]:
        """One binary frame (audio in the client's input encoding)."""
        if self.phase is Phase.CLOSED or not data:
            return self._flush()
        if self.phase is Phase.READY:
            self._feed_audio(data)
        else:
            self._hold_audio(data)
        return self._flush()

    def _hold_audio(self, data: bytes) -> None:
        # Before Settings the encoding is unknown; the default (linear16 at 24 kHz) sets the bound.
        rate = 48.0
        if self.plan is not None:
            fmt = self.plan.input_format
            rate = fmt.sample_rate * (2 if fmt.encoding == "linear16" else 1) / 1000.0
        limit = int(rate * 1000 * self.options.audio_buffer_seconds)
        self._held_audio += data
        overflow = len(self._held_audio) - limit
        if overflow > 0:
            # Drop whole samples from the front so the held audio stays aligned.
            if self.plan is None or self.plan.input_format.encoding == "linear16":
                overflow += overflow % 2
            del self._held_audio[:overflow]
            if not self._held_audio_warned:
                self._held_audio_warned = True
                self._warning(
                    errors.AUDIO_BUFFER_OVERFLOW,
                    "audio sent before the session was configured exceeded "
                    f"{self.options.audio_buffer_seconds:g} s; the oldest audio was dropped",
                )

    def _feed_audio(self, data: bytes) -> None:
        assert self._input is not None and self._batcher is not None
        converted = self._input.feed(data)
        if not converted:
            return
        for chunk in self._batcher.add(converted):
            self._append(chunk)
        if self._batcher.pending_ms > 0 and APPEND_FLUSH_TIMER not in self._timers:
            self._start_timer(APPEND_FLUSH_TIMER, APPEND_FLUSH_SECONDS)
        elif self._batcher.pending_ms == 0:
            self._cancel_timer(APPEND_FLUSH_TIMER)

    def _append(self, chunk: bytes) -> None:
        self._upstream(
            m.input_audio_append(self._next_id("append"), base64.b64encode(chunk).decode("ascii"))
        )

    # Settings ---------------------------------------------------------------------------------------

    def _on_settings(self, message: dict[str, Any]) -> None:
        try:
            plan = parse_settings(
                message,
                default_model=self.options.default_model,
                model_allowed=self.options.model_allowed,
                default_voice=self.options.default_voice,
                function_url_prefixes=self.options.function_url_prefixes,
            )
        except SettingsError as e:
            self._error(errors.INVALID_SETTINGS, e.description)
            return
        if self.plan is None or self.phase is Phase.AWAITING_SETTINGS:
            self._apply_first_settings(plan)
        else:
            self._apply_new_settings(plan)

    def _apply_first_settings(self, plan: SessionPlan) -> None:
        if self._connected_model is not None and plan.model != self._connected_model:
            # A corrected Settings after a refused one: the upstream session's model is fixed.
            self._warning(
                errors.SETTING_NOT_CHANGEABLE,
                f"the model cannot change during a session; still using {self._connected_model!r}",
            )
            plan = replace(plan, model=self._connected_model, replaced_model=None)
        self.plan = plan
        self.phase = Phase.CONFIGURING
        if plan.replaced_model is not None:
            self._warning(
                errors.MODEL_REPLACED,
                f"model {plan.replaced_model!r} is not a realtime model this daemon allows; "
                f"using {plan.model!r}",
            )
        self._input = InputConverter(plan.input_format, plan.upstream_input_format)
        self._output = OutputConverter(plan.upstream_output_format, plan.output_format)
        self._batcher = AppendBatcher(
            bytes_per_ms(plan.upstream_input_format),
            sample_bytes=sample_bytes(plan.upstream_input_format),
        )
        if not self._upstream_requested:
            self._upstream_requested = True
            self._connected_model = plan.model
            self._out.append(ConnectUpstream(plan.model))
        event_id = self._next_id("settings")
        self._in_flight_updates.append(_PendingUpdate(event_id, "SettingsApplied", plan))
        self._upstream(
            m.session_update(
                event_id,
                session_config(plan, transcription_model=self.options.transcription_model),
            )
        )
        self._log("info", "settings accepted; model {model}", model=plan.model)

    def _apply_new_settings(self, plan: SessionPlan) -> None:
        assert self.plan is not None
        current = self._latest_plan()
        if plan.model != current.model:
            self._warning(
                errors.SETTING_NOT_CHANGEABLE,
                f"the model cannot change during a session; still using {current.model!r}",
            )
        if (plan.input_format, plan.output_format) != (current.input_format, current.output_format):
            self._error(
                errors.INVALID_SETTINGS,
                "audio: the audio formats cannot change during a session",
            )
            return
        self._queue_update("SettingsApplied", replace(plan, model=current.model,
                                                      replaced_model=None))

    def _latest_plan(self) -> SessionPlan:
        """The plan including every update sent or queued (what the next update builds on)."""
        if self._queued_updates:
            return self._queued_updates[-1].plan
        if self._in_flight_updates:
            return self._in_flight_updates[-1].plan
        assert self.plan is not None
        return self.plan

    # Update* ------------------------------------------------------------------------------------------

    def _require_settings(self, message_type: str) -> bool:
        if self.plan is None:
            self._error(
                errors.SETTINGS_REQUIRED, f"{message_type} needs a Settings message first"
            )
            return False
        return True

    def _on_update_prompt(self, message: dict[str, Any]) -> None:
        if not self._require_settings("UpdatePrompt"):
            return
        prompt = message.get("prompt")
        if not isinstance(prompt, str):
            self._error(errors.INVALID_CLIENT_MESSAGE, "UpdatePrompt.prompt must be a string")
            return
        plan = self._latest_plan().with_prompt_appended(prompt)
        if len(plan.instructions) > MAX_INSTRUCTIONS_CHARS:
            self._warning(
                errors.PROMPT_TOO_LONG,
                f"the prompt would exceed {MAX_INSTRUCTIONS_CHARS} characters; the update was not applied",
            )
            return
        self._queue_update("PromptUpdated", plan)

    def _on_update_speak(self, message: dict[str, Any]) -> None:
        if not self._require_settings("UpdateSpeak"):
            return
        try:
            speak = parse_speak(message.get("speak"), "speak")
        except SettingsError as e:
            self._error(errors.INVALID_CLIENT_MESSAGE, e.description)
            return
        current = self._latest_plan()
        plan = replace(
            current,
            voice=speak.voice or self.options.default_voice,
            speed=speak.speed if speak.speed is not None else current.speed,
        )
        self._queue_update("SpeakUpdated", plan)

    def _on_update_think(self, message: dict[str, Any]) -> None:
        if not self._require_settings("UpdateThink"):
            return
        try:
            think = parse_think(message.get("think"), "think", self.options.function_url_prefixes)
        except SettingsError as e:
            self._error(errors.INVALID_CLIENT_MESSAGE, e.description)
            return
        current = self._latest_plan()
        # Compare what the model name would resolve to: repeating the Settings' provider (a model the
        # daemon replaced) is no request for a change.
        requested, _ = choose_model(
            think.model, self.options.default_model, self.options.model_allowed
        )
        if think.model is not None and requested != current.model:
            self._warning(
                errors.SETTING_NOT_CHANGEABLE,
                f"the model cannot change during a session; still using {current.model!r}",
            )
        plan = replace(
            current,
            instructions=think.prompt if think.prompt is not None else current.instructions,
            functions=think.functions if think.functions is not None else current.functions,
        )
        self._queue_update("ThinkUpdated", plan)

    def _on_update_listen(self, message: dict[str, Any]) -> None:
        if not self._require_settings("UpdateListen"):
            return
        try:
            language = parse_listen_language(message.get("listen"), "listen")
        except SettingsError as e:
            self._error(errors.INVALID_CLIENT_MESSAGE, e.description)
            return
        listen = message.get("listen")
        provider = listen.get("provider") if isinstance(listen, dict) else None
        ignored = sorted(
            k for k in (provider or {})
            if k not in ("type", "version", "model", "language", "language_hints")
        )
        if ignored:
            self._warning(
                errors.UNSUPPORTED_SETTING,
                "listen.provider." + ", listen.provider.".join(ignored)
                + " cannot be applied: OpenAI's server VAD and transcription have no such setting",
            )
        self._queue_update("ListenUpdated", replace(self._latest_plan(), language=language))

    def _queue_update(self, ack: str, plan: SessionPlan) -> None:
        if len(self._queued_updates) >= MAX_WAITING_REQUESTS:
            self._error(
                errors.TOO_MANY_REQUESTS,
                f"too many updates are waiting for the agent's reply to end; {ack[:-7]} dropped",
            )
            return
        self._queued_updates.append(_QueuedUpdate(ack, plan))
        self._pump()

    def _create_item(self, event: dict[str, Any]) -> str:
        """Send a ``conversation.item.create`` and wait for the upstream to confirm its item."""
        item_id: str = event["item"]["id"]
        self._awaiting_items.add(item_id)
        self._item_events[event["event_id"]] = item_id
        self._upstream(event)
        return item_id

    def _send_update(self, update: _QueuedUpdate) -> None:
        base = self._in_flight_updates[-1].plan if self._in_flight_updates else self.plan
        assert base is not None
        changes = session_changes(
            base, update.plan, transcription_model=self.options.transcription_model
        )
        voice = changes.get("audio", {}).get("output", {}).pop("voice", None)
        if voice is not None and not changes["audio"]["output"]:
            del changes["audio"]["output"]
            if not changes["audio"]:
                del changes["audio"]
        if voice is not None and not self._agent_spoke:
            changes.setdefault("audio", {}).setdefault("output", {})["voice"] = voice
            voice = None
        event_id = self._next_id("update")
        self._in_flight_updates.append(_PendingUpdate(event_id, update.ack, update.plan))
        self._upstream(m.session_update(event_id, changes))
        if voice is not None:
            # Once the agent has spoken the upstream refuses a voice change, and that refusal
            # rejects the whole event: the voice goes alone so the other changes still apply.
            voice_event = self._next_id("voice")
            self._in_flight_updates.append(
                _PendingUpdate(voice_event, None, update.plan, voice_only=True)
            )
            self._upstream(
                m.session_update(
                    voice_event, {"type": "realtime", "audio": {"output": {"voice": voice}}}
                )
            )

    # conversation input -------------------------------------------------------------------------------

    def _on_inject_user_message(self, message: dict[str, Any]) -> None:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            self._error(
                errors.INVALID_CLIENT_MESSAGE, "InjectUserMessage.content must be a non-empty string"
            )
            return
        if self.phase is not Phase.READY:
            if len(self._held_injections) >= MAX_WAITING_REQUESTS:
                self._error(errors.TOO_MANY_REQUESTS,
                            "too many messages are waiting for the session to be configured")
                return
            self._held_injections.append(content)
            return
        self._inject_user_text(content)

    def _inject_user_text(self, content: str) -> None:
        if self._response is not None or self._audio_item is not None:
            self._interrupt_reply(cancel=True)
        item_id = self._create_item(
            m.user_text_item(self._next_id("inject"), self._next_id("item"), content)
        )
        self._user_echo[item_id] = content
        self._turn_end = self._now()
        self._response_queue.append(
            _ResponseRequest("inject-user-message", after_items=frozenset({item_id}))
        )
        self._pump()

    def _on_inject_agent_message(self, message: dict[str, Any]) -> None:
        text = message.get("message")
        if not isinstance(text, str) or not text:
            self._error(
                errors.INVALID_CLIENT_MESSAGE, "InjectAgentMessage.message must be a non-empty string"
            )
            return
        behavior = message.get("behavior", "default")
        if behavior not in ("default", "queue", "interrupt"):
            self._error(
                errors.INVALID_CLIENT_MESSAGE,
                "InjectAgentMessage.behavior must be 'default', 'queue' or 'interrupt'",
            )
            return
        if self.phase is not Phase.READY:
            self._client(m.injection_refused("the session is not configured yet"))
            return
        busy = self._user_speaking or self.response_active or self._audio_item is not None
        if behavior == "default" and busy:
            reason = "the user is speaking" if self._user_speaking else "the agent is replying"
            self._client(m.injection_refused(f"{reason}; the message was not spoken"))
            return
        if len(self._response_queue) >= MAX_WAITING_REQUESTS:
            self._client(m.injection_refused("too many messages are waiting to be spoken"))
            return
        if behavior == "interrupt" and busy:
            self._interrupt_reply(cancel=True)
        self._turn_end = self._now()
        self._response_queue.append(
            _ResponseRequest("inject-agent-message", instructions=verbatim_instructions(text))
        )
        self._pump()

    def _on_function_call_response(self, message: dict[str, Any]) -> None:
        if not self._require_settings("FunctionCallResponse"):
            return
        call_id = message.get("id")
        content = message.get("content")
        if not isinstance(call_id, str) or not call_id:
            self._error(
                errors.INVALID_CLIENT_MESSAGE,
                "FunctionCallResponse.id must be the id of the FunctionCallRequest",
            )
            return
        if not isinstance(content, str):
            self._error(errors.INVALID_CLIENT_MESSAGE, "FunctionCallResponse.content must be a string")
            return
        round_ = self._waiting_round(call_id)
        if round_ is None or call_id in round_.server_side:
            self._error(
                errors.UNKNOWN_FUNCTION_CALL,
                f"no function call {call_id[:64]!r} is waiting for a response",
            )
            return
        self._function_output(round_, call_id, content)

    def function_result(self, call_id: str, content: str) -> list[Output]:
        """A server-side function's endpoint answered (or failed: ``content`` then says why)."""
        round_ = self._waiting_round(call_id)
        if self.phase is Phase.CLOSED or round_ is None:
            return self._flush()
        self._client(m.function_call_response(call_id, round_.names[call_id], content))
        self._function_output(round_, call_id, content)
        return self._flush()

    def _waiting_round(self, call_id: str) -> _CallRound | None:
        round_id = self._call_to_round.get(call_id)
        round_ = self._call_rounds.get(round_id) if round_id else None
        if round_ is None or call_id in round_.outputs:
            return None
        return round_

    def _function_output(self, round_: _CallRound, call_id: str, content: str) -> None:
        round_.outputs[call_id] = content
        round_.output_items[call_id] = self._create_item(
            m.function_call_output_item(
                self._next_id("function"), self._next_id("item"), call_id, content
            )
        )
        self._maybe_follow_up(round_)
        self._pump()

    def _on_keep_alive(self, message: dict[str, Any]) -> None:
        pass

    _client_handlers: dict[str, Callable[[Session, dict[str, Any]], None]] = {
        "Settings": _on_settings,
        "UpdatePrompt": _on_update_prompt,
        "UpdateSpeak": _on_update_speak,
        "UpdateThink": _on_update_think,
        "UpdateListen": _on_update_listen,
        "InjectUserMessage": _on_inject_user_message,
        "InjectAgentMessage": _on_inject_agent_message,
        "FunctionCallResponse": _on_function_call_response,
        "KeepAlive": _on_keep_alive,
    }

    # -- scheduling -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what waits for "no active response": session updates first, then one response."""
        if self.phase is not Phase.READY:
            return
        if self.response_active:
            return
        while self._queued_updates:
            self._send_update(self._queued_updates.popleft())
        if self._response_queue:
            request = self._response_queue[0]
            if request.after_items & self._awaiting_items:
                return
            self._response_queue.popleft()
            self._response_requested = True
            if self._turn_end is None:
                self._turn_end = self._now()
            self._first_text_at = None
            self._upstream(m.response_create(self._next_id("response"), request.instructions))
            self._log("debug", "response requested ({reason})", reason=request.reason)

    def _maybe_follow_up(self, round_: _CallRound) -> None:
        if len(round_.outputs) < len(round_.call_ids):
            return
        timer = f"{FUNCTION_FOLLOWUP_TIMER}:{round_.response_id}"
        if not round_.response_ended:
            if timer not in self._timers:
                self._start_timer(timer, self.options.function_call_timeout)
            return
        self._cancel_timer(timer)
        del self._call_rounds[round_.response_id]
        for call_id in round_.call_ids:
            self._call_to_round.pop(call_id, None)
        if self.plan is not None and self.plan.history_messages:
            self._client(
                m.history_function_calls(
                    [
                        {
                            "id": call_id,
                            "name": round_.names[call_id],
                            "client_side": call_id not in round_.server_side,
                            "arguments": round_.arguments[call_id],
                            "response": round_.outputs[call_id],
                        }
                        for call_id in round_.call_ids
                    ]
                )
            )
        self._turn_end = self._now()
        self._response_queue.append(
            _ResponseRequest(
                "function-call-outputs", after_items=frozenset(round_.output_items.values())
            )
        )

    def _become_ready(self) -> None:
        assert self.plan is not None
        self.phase = Phase.READY
        self._client(m.simple("SettingsApplied"))
        self._send_history(self.plan)
        if self.plan.greeting:
            self._response_queue.append(
                _ResponseRequest(
                    "greeting",
                    instructions=verbatim_instructions(self.plan.greeting),
                    after_items=frozenset(self._awaiting_items),
                )
            )
        if self._held_audio:
            held, self._held_audio = bytes(self._held_audio), bytearray()
            self._feed_audio(held)
        held_injections, self._held_injections = self._held_injections, []
        self._pump()
        for content in held_injections:
            self._inject_user_text(content)

    def _send_history(self, plan: SessionPlan) -> None:
        for entry in plan.history:
            if entry.role is not None and entry.content is not None:
                builder = m.user_text_item if entry.role == "user" else m.assistant_text_item
                self._create_item(builder(self._next_id("history"), self._next_id("item"),
                                          entry.content))
            for call_id, name, arguments, response in entry.function_calls:
                self._create_item(m.function_call_item(
                    self._next_id("history"), self._next_id("item"), call_id, name, arguments))
                self._create_item(m.function_call_output_item(
                    self._next_id("history"), self._next_id("item"), call_id, response))

    # -- barge-in ---------------------------------------------------------------------------------

    def _interrupt_reply(self, *, cancel: bool) -> None:
        """
        Stop the agent's current reply: no more of its audio reaches the client, and the upstream's
        memory of the item is cut to what the client could have heard.
        """
        self._untext_interrupted_reply()
        if self._response is not None:
            self._silenced_responses.append(self._response.response_id)
            self._response.interrupted = True
            if cancel:
                self._upstream(m.response_cancel(self._next_id("cancel")))
        item = self._audio_item or self._last_audio_item
        if item is not None and self.plan is not None and item.delivered_bytes > 0:
            delivered_ms = item.delivered_bytes / bytes_per_ms(self.plan.upstream_output_format)
            if item is self._audio_item and self._output is not None:
                # Audio still inside the resampler never reached the client.
                delivered_ms = min(delivered_ms, self._output.emitted_ms)
            played_ms = (self._now() - item.started_at) * 1000.0
            end_ms = math.floor(min(delivered_ms, max(played_ms, 0.0)))
            if (self._audio_item is not None or played_ms < delivered_ms) and end_ms > 0:
                self._upstream(m.item_truncate(self._next_id("truncate"), item.item_id, end_ms))
                self._log(
                    "debug",
                    "truncated {item_id} at {audio_end_ms} ms",
                    item_id=item.item_id,
                    audio_end_ms=end_ms,
                )
        if self._audio_item is not None and self._output is not None:
            self._output.discard_reply()
        self._audio_item = None
        self._last_audio_item = None

    def _untext_interrupted_reply(self) -> None:
        """
        The reply being interrupted gets no assistant ``ConversationText`` (nor ``History``) from now on:
        it would reach the client after ``UserStartedSpeaking`` / the user's text, which Deepgram never
        does and which clients read as a new reply.  (docs/protocol.md, "Barge-in".)
        """
        for response_id in (
            self._response.response_id if self._response is not None else None,
            self._audio_item.response_id if self._audio_item is not None else None,
        ):
            if response_id is not None and response_id not in self._untexted_responses:
                self._untexted_responses.append(response_id)

    # -- upstream input -----------------------------------------------------------------------------

    def upstream_event(self, event: dict[str, Any]) -> list[Output]:
        """One JSON event from the upstream (already parsed)."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        event_type = event.get("type")
        handler = self._upstream_handlers.get(event_type) if isinstance(event_type, str) else None
        if handler is None:
            self._log("debug", "upstream event {message_type} ignored", message_type=event_type)
        else:
            try:
                handler(self, event)
            except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as e:
                # A malformed upstream event must not take the session down.
                self._log(
                    "warn",
                    "malformed upstream event {message_type}: {problem}",
                    message_type=event_type,
                    problem=repr(e),
                )
        return self._flush()

    def _on_session_updated(self, event: dict[str, Any]) -> None:
        if not self._in_flight_updates:
            return
        update = self._in_flight_updates.popleft()
        if update.voice_only:
            return
        self.plan = update.plan
        if update.ack == "SettingsApplied" and self.phase is Phase.CONFIGURING:
            self._become_ready()
            return
        if update.ack:
            self._client(m.simple(update.ack))
        self._pump()

    def _on_error(self, event: dict[str, Any]) -> None:
        error = event.get("error") or {}
        code = error.get("code") or error.get("type") or errors.UPSTREAM_ERROR
        message = error.get("message") or "the upstream reported an error"
        caused_by = error.get("event_id")
        self._log(
            "warn",
            "upstream error {error_code}: {upstream_message}",
            error_code=code,
            upstream_message=message,
            event_id=caused_by,
        )
        if code in errors.BENIGN_UPSTREAM_CODES:
            if code == "conversation_already_has_active_response" and self._response_requested:
                # Our response.create lost a race with a server-created response; it will be
                # retried once that one ends.
                self._response_requested = False
            return
        update = next((u for u in self._in_flight_updates if u.event_id == caused_by), None)
        if update is not None:
            self._in_flight_updates.remove(update)
            if update.voice_only:
                self._warning(
                    errors.VOICE_LOCKED if code == "cannot_update_voice" else code,
                    f"the voice was not changed: {message}",
                )
                return
            if update.ack == "SettingsApplied" and self.phase is Phase.CONFIGURING:
                # The client may send a corrected Settings.
                self.phase = Phase.AWAITING_SETTINGS
                self._error(code, message)
                return
            self._warning(code, f"{update.ack or 'the update'} was not applied: {message}")
            self._pump()
            return
        refused_item = self._item_events.pop(caused_by, None) if caused_by else None
        if refused_item is not None and refused_item in self._awaiting_items:
            # The item will never exist: nothing may wait for it.
            self._awaiting_items.discard(refused_item)
            self._user_echo.pop(refused_item, None)
            self._response_queue = deque(
                r for r in self._response_queue if refused_item not in r.after_items
            )
        if self._response_requested and caused_by and caused_by.startswith("response_"):
            self._response_requested = False
        self._error(code, message)
        self._pump()

    def _on_speech_started(self, event: dict[str, Any]) -> None:
        self._user_speaking = True
        # Server VAD interrupts a reply that is still being generated, audio or not.
        self._untext_interrupted_reply()
        self._client(m.simple("UserStartedSpeaking"))
        if self._audio_item is not None or self._last_audio_item is not None:
            # Server VAD cancels the response itself (interrupt_response is on).
            self._interrupt_reply(cancel=False)

    def _on_speech_stopped(self, event: dict[str, Any]) -> None:
        self._user_speaking = False
        self._turn_end = self._now()
        audio_end_ms = event.get("audio_end_ms") or 0
        self._client(m.utterance_end(round(float(audio_end_ms) / 1000.0, 3)))

    def _on_transcription_completed(self, event: dict[str, Any]) -> None:
        transcript = event.get("transcript")
        if isinstance(transcript, str) and transcript.strip():
            self._conversation_text("user", transcript.strip())

    def _conversation_text(self, role: str, content: str) -> None:
        self._client(m.conversation_text(role, content))
        if self.plan is not None and self.plan.history_messages:
            self._client(m.history_text(role, content))

    def _on_item_added(self, event: dict[str, Any]) -> None:
        item = event["item"]
        item_id = item.get("id")
        if item_id not in self._awaiting_items:
            return
        self._awaiting_items.discard(item_id)
        for event_id in [e for e, i in self._item_events.items() if i == item_id]:
            del self._item_events[event_id]
        echo = self._user_echo.pop(item_id, None)
        if echo is not None:
            self._conversation_text("user", echo)
        self._pump()

    def _on_response_created(self, event: dict[str, Any]) -> None:
        response_id = event["response"]["id"]
        self._response_requested = False
        self._response = _Response(response_id)
        self._first_text_at = None
        if self._turn_end is None:
            self._turn_end = self._now()

    def _on_response_done(self, event: dict[str, Any]) -> None:
        response = event.get("response") or {}
        response_id = response.get("id")
        if self._audio_item is not None and self._audio_item.response_id == response_id:
            self._finish_audio_item()
        if self._response is not None and (
            response_id is None or self._response.response_id == response_id
        ):
            self._response = None
        elif self._response is None and self._response_requested:
            # The response we asked for ended without our seeing it start.
            self._response_requested = False
        self._turn_end = None
        if response_id and response_id not in self._silenced_responses:
            self._silenced_responses.append(response_id)
        round_ = self._call_rounds.get(response_id) if response_id else None
        if round_ is not None:
            round_.response_ended = True
            self._maybe_follow_up(round_)
        if response_id not in self._untexted_responses:
            for item in response.get("output") or []:
                self._emit_assistant_text_from_item(item)
        self._pump()

    def _first_agent_text(self) -> None:
        if self._first_text_at is None:
            self._first_text_at = self._now()

    def _on_output_audio_delta(self, event: dict[str, Any]) -> None:
        response_id = event["response_id"]
        item_id = event["item_id"]
        if response_id in self._silenced_responses:
            return
        assert self.plan is not None and self._output is not None
        data = base64.b64decode(event["delta"], validate=True)
        if not data:
            return
        if self._audio_item is None or self._audio_item.item_id != item_id:
            if self._audio_item is not None:
                self._finish_audio_item()
            now = self._now()
            self._audio_item = _AudioItem(item_id, response_id, started_at=now)
            self._agent_spoke = True
            turn_end = self._turn_end if self._turn_end is not None else now
            first_text = self._first_text_at if self._first_text_at is not None else now
            ttt = max(0.0, first_text - turn_end)
            total = max(0.0, now - turn_end)
            self._client(m.agent_started_speaking(total, max(0.0, total - ttt), ttt))
            header = self._output.reply_header()
            if header:
                self._out.append(SendClientAudio(header))
        self._audio_item.delivered_bytes += len(data)
        converted = self._output.feed(data)
        if converted:
            self._out.append(SendClientAudio(converted))

    def _finish_audio_item(self) -> None:
        item = self._audio_item
        if item is None or self._output is None:
            return
        tail = self._output.end_reply()
        if tail:
            self._out.append(SendClientAudio(tail))
        item.done = True
        self._last_audio_item = item
        self._audio_item = None
        self._client(m.simple("AgentAudioDone"))

    def _on_output_audio_done(self, event: dict[str, Any]) -> None:
        if self._audio_item is not None and self._audio_item.item_id == event.get("item_id"):
            self._finish_audio_item()

    def _on_text_delta(self, event: dict[str, Any]) -> None:
        self._first_agent_text()

    def _on_transcript_done(self, event: dict[str, Any]) -> None:
        self._first_agent_text()
        text = event.get("transcript")
        if text is None:
            text = event.get("text")
        if event.get("response_id") in self._untexted_responses:
            return
        self._assistant_text(event["item_id"], text)

    def _assistant_text(self, item_id: str, text: Any) -> None:
        if item_id in self._texted_items or not isinstance(text, str) or not text.strip():
            return
        self._texted_items.add(item_id)
        self._conversation_text("assistant", text.strip())

    def _emit_assistant_text_from_item(self, item: Any) -> None:
        if not isinstance(item, dict) or item.get("type") != "message":
            return
        if item.get("role") != "assistant":
            return
        for part in item.get("content") or []:
            if isinstance(part, dict):
                text = part.get("transcript") or part.get("text")
                if text:
                    self._assistant_text(item["id"], text)
                    return

    def _on_output_item_done(self, event: dict[str, Any]) -> None:
        if event.get("response_id") in self._untexted_responses:
            return
        self._emit_assistant_text_from_item(event.get("item"))

    def _on_function_arguments_done(self, event: dict[str, Any]) -> None:
        call_id = event["call_id"]
        name = event["name"]
        arguments = event.get("arguments") or "{}"
        response_id = event["response_id"]
        if call_id in self._requested_calls:
            return
        self._requested_calls.add(call_id)
        self._first_agent_text()
        round_ = self._call_rounds.get(response_id)
        if round_ is None:
            round_ = self._call_rounds[response_id] = _CallRound(response_id, [], {}, {})
        round_.call_ids.append(call_id)
        round_.names[call_id] = name
        round_.arguments[call_id] = arguments
        self._call_to_round[call_id] = response_id
        # The tools the upstream knows are those of the applied plan.
        plan = self.plan
        function = next((f for f in plan.functions if f.name == name), None) if plan else None
        if function is not None and function.endpoint is not None:
            round_.server_side.add(call_id)
            self._client(m.function_call_request(call_id, name, arguments, client_side=False))
            self._out.append(CallFunction(call_id, name, arguments, function.endpoint))
        else:
            self._client(m.function_call_request(call_id, name, arguments))

    _upstream_handlers: dict[str, Callable[[Session, dict[str, Any]], None]] = {
        "session.updated": _on_session_updated,
        "error": _on_error,
        "input_audio_buffer.speech_started": _on_speech_started,
        "input_audio_buffer.speech_stopped": _on_speech_stopped,
        "conversation.item.input_audio_transcription.completed": _on_transcription_completed,
        "conversation.item.added": _on_item_added,
        "conversation.item.done": _on_item_added,
        # The beta-era name, still in the SDK's union: accepted as a confirmation too.
        "conversation.item.created": _on_item_added,
        "response.created": _on_response_created,
        "response.done": _on_response_done,
        "response.output_audio.delta": _on_output_audio_delta,
        "response.output_audio.done": _on_output_audio_done,
        "response.output_audio_transcript.delta": _on_text_delta,
        "response.output_text.delta": _on_text_delta,
        "response.output_audio_transcript.done": _on_transcript_done,
        "response.output_text.done": _on_transcript_done,
        "response.output_item.done": _on_output_item_done,
        "response.function_call_arguments.done": _on_function_arguments_done,
    }
