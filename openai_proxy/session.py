"""
The per-client session: Deepgram Voice Agent v1 on one side, OpenAI Realtime GA on the other.

It does no I/O and imports no Twisted.  Each input method (a client frame, an upstream event, the
upstream opening, failing or closing, a timer firing, the daemon draining, the client leaving) returns
the list of *outputs* (:mod:`openai_proxy.outputs`) the caller must carry out, in order.  Time comes
from the injected ``now`` callable.

This module orchestrates; the parts it owns each keep one set of rules and write only through the
session's :class:`~openai_proxy.outputs.Emitter`:

- :mod:`openai_proxy.translate.client` / :mod:`openai_proxy.translate.upstream`: typed inputs, parsed
  once at the edge;
- :mod:`openai_proxy.scheduling`: the response state machine and the waiting requests;
- :mod:`openai_proxy.replies`: agent audio delivered and heard, per item; barge-in;
- :mod:`openai_proxy.function_calls`: function-call rounds.
"""

from __future__ import annotations

import base64
import enum
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from openai_proxy import errors
from openai_proxy.audio import (
    AppendBatcher,
    InputConverter,
    OutputConverter,
    bytes_per_ms,
    sample_bytes,
)
from openai_proxy.continuity import (
    BackoffPolicy,
    ConversationRecord,
    Decision,
    Failure,
    HeldAudio,
    Reconnection,
    RecordError,
    RolloverAction,
    RolloverSchedule,
    Switch,
    SwitchPhase,
    SwitchReason,
    classify_failure,
    heard_part,
)
from openai_proxy.endpoint import Endpoint
from openai_proxy.function_calls import CallRound, FunctionCalls
from openai_proxy.outputs import (  # noqa: F401  (re-exported: callers use session.<Output>)
    CallFunction,
    CancelTimer,
    CloseClient,
    CloseUpstream,
    ConnectUpstream,
    Count,
    Emitter,
    Log,
    Output,
    SendClient,
    SendClientAudio,
    SendUpstream,
    StartTimer,
    SwapUpstream,
    TimerKey,
    TimerKind,
)
from openai_proxy.recent import RecentIds
from openai_proxy.replies import Replies
from openai_proxy.scheduling import ResponseRequest, ResponseState, Scheduler
from openai_proxy.translate import client
from openai_proxy.translate import messages as m
from openai_proxy.translate import upstream as up
from openai_proxy.translate.settings import (
    SessionPlan,
    SettingsError,
    choose_model,
    ignored_field_hint,
    ignored_settings_fields,
    parse_listen_language,
    parse_settings,
    parse_speak,
    parse_think,
    session_changes,
    session_config,
    verbatim_instructions,
)

APPEND_FLUSH_TIMER = TimerKey(TimerKind.APPEND_FLUSH)
UPDATE_WATCHDOG = TimerKey(TimerKind.UPDATE_WATCHDOG)
ROLLOVER_TIMER = TimerKey(TimerKind.ROLLOVER)
RECONNECT_TIMER = TimerKey(TimerKind.RECONNECT)
SWITCH_TIMER = TimerKey(TimerKind.SWITCH_TIMEOUT)
#: After a rollover that failed while the current upstream session lives, the wait before the next try.
ROLLOVER_RETRY_SECONDS = 2.0
#: While a rollover waits for a quiet moment, how often the session looks again (the end of the agent's
#: playback is no event of its own).
QUIET_POLL_SECONDS = 0.5
#: Upstream events the session may hold during a switch (beyond it the newest are dropped, logged).
MAX_HELD_EVENTS = 256
#: How long a partial append batch may wait for more audio.
APPEND_FLUSH_SECONDS = 0.04
#: Client requests that may wait for the session or for the active response to end.
MAX_WAITING_REQUESTS = 32
#: Longest prompt UpdatePrompt may grow the instructions to (characters).
MAX_INSTRUCTIONS_CHARS = 64 * 1024
#: Housekeeping event ids remembered so that an upstream error answering one is recognised.
MAX_HOUSEKEEPING_IDS = 64
#: How many recent item ids the sets that guard against handling one twice remember.
RECENT_IDS = 64


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
    #: Longest the upstream may stay quiet while a response or a session.update waits on it (s).
    response_timeout: float = 15.0
    #: Seconds after ``session.created`` from which a rollover waits for a quiet moment (SPEC §8).
    #: ``None``: 55 minutes, scaled down for a session that announces a life shorter than 60 minutes.
    rollover_after: float | None = None
    #: Reconnection attempts after an unexpected drop.
    backoff: BackoffPolicy = BackoffPolicy()
    #: A float in [0, 1) per call: the jitter of the backoff.
    random: Callable[[], float] = random.random


@dataclass(frozen=True)
class UpstreamClosure:
    """
    The facts of an upstream connection's end, as the network saw them: whether it had opened, the
    WebSocket close code, the HTTP status of a refused handshake, and whether TLS verification failed.
    """

    was_open: bool
    close_code: int | None = None
    http_status: int | None = None
    tls_failed: bool = False


def upstream_closure_error(closure: UpstreamClosure) -> tuple[str, str]:
    """The client ``Error`` ``(code, description)`` for an upstream's end (SPEC §7)."""
    if closure.was_open:
        code = closure.close_code
        return errors.UPSTREAM_CLOSED, (
            f"the upstream closed the session (code {code})" if code else
            "the upstream closed the session")
    status = closure.http_status
    if closure.tls_failed:
        return errors.UPSTREAM_TLS_FAILED, "the upstream's TLS certificate could not be verified"
    if status in (401, 403):
        return errors.UPSTREAM_AUTH_FAILED, f"the upstream refused the daemon's key (HTTP {status})"
    if status == 429:
        return errors.UPSTREAM_RATE_LIMITED, "the upstream is rate limiting (HTTP 429)"
    if status is not None:
        return errors.UPSTREAM_UNAVAILABLE, f"the upstream refused the connection (HTTP {status})"
    return errors.UPSTREAM_UNAVAILABLE, "the upstream closed before the session started"


class Phase(enum.Enum):
    AWAITING_SETTINGS = "awaiting-settings"
    CONFIGURING = "configuring"
    READY = "ready"
    CLOSED = "closed"


class Ack(enum.Enum):
    """What the client is told when a ``session.update`` is applied."""

    SETTINGS_APPLIED = "SettingsApplied"
    PROMPT_UPDATED = "PromptUpdated"
    SPEAK_UPDATED = "SpeakUpdated"
    THINK_UPDATED = "ThinkUpdated"
    LISTEN_UPDATED = "ListenUpdated"


@dataclass
class _PendingUpdate:
    """A ``session.update`` sent and not yet answered."""

    event_id: str
    ack: Ack | None
    plan: SessionPlan
    #: Only a voice change (sent alone once the agent has spoken): a refusal is a Warning, not an Error.
    voice_only: bool = False


@dataclass
class _QueuedUpdate:
    """An update waiting for the active response to end."""

    ack: Ack
    plan: SessionPlan


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
        self._emit = Emitter(self.request_id)
        self.phase = Phase.AWAITING_SETTINGS
        self.plan: SessionPlan | None = None
        self._upstream_requested = False
        self._connected_model: str | None = None
        self._upstream_open = False
        # session.update bookkeeping
        self._in_flight_updates: deque[_PendingUpdate] = deque()
        self._queued_updates: deque[_QueuedUpdate] = deque()
        self._update_sent_at = 0.0
        # responses, replies and calls
        self._scheduler = Scheduler(self._emit, now, options.response_timeout, MAX_WAITING_REQUESTS)
        self._replies: Replies | None = None
        self._calls = FunctionCalls(self._emit, options.function_call_timeout)
        #: event_id of each conversation.item.create → its item id, to match upstream errors.
        self._item_events: dict[str, str] = {}
        self._user_echo: dict[str, str] = {}
        #: Events the daemon sent for its own housekeeping (truncate, cancel, delete).
        self._housekeeping: deque[str] = deque(maxlen=MAX_HOUSEKEEPING_IDS)
        # held input before the session is configured
        self._held_audio = bytearray()
        self._held_audio_warned = False
        self._held_injections: list[str] = []
        # audio
        self._input: InputConverter | None = None
        self._output: OutputConverter | None = None
        self._batcher: AppendBatcher | None = None
        #: Responses interrupted by barge-in: their assistant text is never sent (docs/protocol.md).
        self._untexted_responses = RecentIds(32)
        # turn state
        self._user_speaking = False
        #: When the user's turn ended (latency reference for AgentStartedSpeaking).
        self._turn_end: float | None = None
        self._first_text_at: float | None = None
        #: Assistant items whose ConversationText went out (a late duplicate done sends nothing).
        self._texted_items = RecentIds(RECENT_IDS)
        # continuity (SPEC §8): upstream connections are numbered; the current one and a candidate
        self._record = ConversationRecord()
        #: Interrupted items whose text has not arrived yet → the share of their audio the user heard.
        self._heard_share: dict[str, float] = {}
        #: conversation.item.create events not confirmed yet, by item id (resent after a drop).
        self._unconfirmed: dict[str, dict[str, Any]] = {}
        #: Agent text received so far, per item, until the item's text is done.
        self._partial_text: dict[str, list[str]] = {}
        self._generation = 0
        self._next_generation = 1
        self._ever_open = False
        self._expired = False
        self._schedule: RolloverSchedule | None = None
        self._rollover_due = False
        self._switch: Switch | None = None
        self._switch_gen: int | None = None
        self._switch_plan: SessionPlan | None = None
        self._switch_update_id: str | None = None
        self._switch_expires: float | None = None
        #: Set while the current upstream connection is lost and being replaced.
        self._reconnection: Reconnection | None = None
        self._held_input: HeldAudio | None = None
        #: Completed rollovers and reconnections, failed ones, items replayed (also as ``Count``).
        self.stats: dict[str, int] = {}

    # -- helpers ------------------------------------------------------------------------------------

    def _flush(self) -> list[Output]:
        if (self._rollover_due and not self._switching and self.phase is Phase.READY
                and self._quiet()):
            self._rollover_due = False
            self._begin_switch(SwitchReason.ROLLOVER)
        return self._emit.flush()

    def _next_id(self, prefix: str) -> str:
        return self._emit.next_id(prefix)

    def _client(self, message: dict[str, Any]) -> None:
        self._emit.client(message)

    def _upstream(self, event: dict[str, Any]) -> None:
        self._emit.upstream(event)

    def _log(self, level: str, fmt: str, **fields: Any) -> None:
        self._emit.log(level, fmt, **fields)

    def _error(self, code: str, description: str) -> None:
        self._emit.error(code, description)

    def _warning(self, code: str, description: str) -> None:
        self._emit.warning(code, description)

    def _start_timer(self, name: TimerKey, seconds: float) -> None:
        self._emit.start_timer(name, seconds)

    def _cancel_timer(self, name: TimerKey) -> None:
        self._emit.cancel_timer(name)

    def _agent_spoke(self) -> bool:
        return self._replies is not None and self._replies.agent_spoke

    @property
    def response_active(self) -> bool:
        """Whether a response is active upstream, requested and not yet confirmed, or being cancelled."""
        return self._scheduler.busy

    @property
    def response_state(self) -> ResponseState:
        return self._scheduler.state

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> list[Output]:
        """The client's WebSocket is open: greet it."""
        self._client(m.welcome(self.request_id))
        return self._flush()

    def client_closed(self) -> list[Output]:
        """The client left: release the upstream and every timer."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._emit.cancel_all_timers()
            if self._upstream_requested:
                self._emit.emit(CloseUpstream())
        return self._flush()

    def upstream_opened(self, generation: int = 0) -> list[Output]:
        """The upstream connection ``generation`` (see ``ConnectUpstream``) is open."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        if generation == self._switch_gen:
            self._switch_opened()
        elif generation == self._generation:
            self._upstream_open = True
            self._ever_open = True
            self._log("debug", "upstream open")
        return self._flush()

    def upstream_failed(self, code: str, description: str, generation: int = 0) -> list[Output]:
        """
        The upstream could not be reached in time, or the daemon gave up on it.  ``code`` is one of the
        UPSTREAM_* codes of :mod:`openai_proxy.errors`.  The client gets an Error and then a close
        (unless the connection was a candidate for a switch: then the switch failed).
        """
        if self.phase is Phase.CLOSED:
            return self._flush()
        if generation == self._switch_gen:
            self._switch_failed(description, Decision(True, code, description))
            return self._flush()
        if generation != self._generation:
            return self._flush()
        self._give_up(code, description)
        return self._flush()

    def _give_up(self, code: str, description: str) -> None:
        if self._reconnection is not None or self._switch is not None:
            self._count("reconnects_failed" if self._reconnection is not None else "rollovers_failed")
        if self._switch_gen is not None:
            self._emit.emit(CloseUpstream(self._switch_gen))
        self._switch = None
        self._switch_gen = None
        self._reconnection = None
        self._emit.held_upstream = None
        self._held_input = None
        self._error(code, description)
        self.phase = Phase.CLOSED
        self._emit.cancel_all_timers()
        self._emit.emit(CloseClient(1011, description[:120]))

    def upstream_unreachable(self, generation: int = 0) -> list[Output]:
        """The upstream's address could not be connected to (DNS, refused, unreachable)."""
        return self.upstream_failed(errors.UPSTREAM_UNAVAILABLE, "the upstream could not be reached",
                                    generation)

    def upstream_timed_out(self, generation: int = 0) -> list[Output]:
        """The upstream's handshake did not complete within the handshake timeout."""
        return self.upstream_failed(errors.UPSTREAM_TIMEOUT, "the upstream did not answer in time",
                                    generation)

    def upstream_closed(self, closure: UpstreamClosure, generation: int = 0) -> list[Output]:
        """The upstream connection ``generation`` ended.

        The current one, once it had opened, is reconnected when the failure is worth it
        (:func:`~openai_proxy.continuity.classify_failure`, SPEC §8); otherwise, and for a first
        connection that never opened, the client hears :func:`upstream_closure_error` and a close.
        A candidate's end fails its switch.
        """
        if self.phase is Phase.CLOSED:
            return self._flush()
        decision = self._classify(closure)
        if generation == self._switch_gen:
            self._switch_failed(decision.reason, decision)
            return self._flush()
        if generation != self._generation:
            return self._flush()
        if self._reconnection is not None:
            return self._flush()
        if (decision.retry and closure.was_open and self.plan is not None
                and self.phase in (Phase.CONFIGURING, Phase.READY)):
            self._connection_lost(decision.reason)
            return self._flush()
        return self.upstream_failed(*upstream_closure_error(closure), generation=generation)

    def _classify(self, closure: UpstreamClosure) -> Decision:
        if closure.was_open:
            if self._expired:
                return classify_failure(Failure.SESSION_EXPIRED)
            if closure.close_code in (None, 1005, 1006):
                return classify_failure(Failure.CONNECTION_LOST)
            return classify_failure(Failure.CLOSED, close_code=closure.close_code)
        if closure.tls_failed:
            return classify_failure(Failure.TLS_FAILED)
        if closure.http_status is not None:
            return classify_failure(Failure.REFUSED, http_status=closure.http_status)
        return classify_failure(Failure.UNREACHABLE)

    # -- continuity (SPEC §8) ---------------------------------------------------------------------------

    @property
    def _switching(self) -> bool:
        """Whether the conversation is moving to a new upstream session (a switch, or a lost
        connection waiting for its next attempt)."""
        return self._switch is not None or self._reconnection is not None

    def _count(self, name: str, amount: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + amount
        self._emit.emit(Count(name, amount))

    def _quiet(self) -> bool:
        """No response active or waiting, the user not speaking, no function call or update
        outstanding, no agent audio still playing (SPEC §8's quiet moment)."""
        scheduler = self._scheduler
        return (self.phase is Phase.READY and not scheduler.busy and not scheduler.waiting
                and not scheduler.awaiting_items and not self._user_speaking
                and not self._calls.rounds and not self._in_flight_updates
                and not self._queued_updates
                and not (self._replies is not None and self._replies.playing))

    def _on_session_created(self, event: up.SessionCreated) -> None:
        self._expired = False
        self._schedule_rollover(event.expires_at)

    def _schedule_rollover(self, expires_at: float | None) -> None:
        now = self._now()
        schedule = RolloverSchedule.for_session(now, created_at_wall=now, expires_at=expires_at)
        if self.options.rollover_after is not None:
            schedule = replace(schedule, rollover_after=self.options.rollover_after)
        self._schedule = schedule
        self._rollover_due = False
        self._arm_rollover()

    def _arm_rollover(self) -> None:
        if self._schedule is None:
            return
        delay = self._schedule.next_check(self._now())
        if delay is not None:
            self._start_timer(ROLLOVER_TIMER, delay)

    def _rollover_timer_fired(self) -> None:
        if self._schedule is None or self._switching:
            return
        if self.phase is not Phase.READY:
            self._arm_rollover()
            return
        action = self._schedule.action(self._now(), quiet=self._quiet())
        if action is RolloverAction.START:
            self._begin_switch(SwitchReason.ROLLOVER)
        elif action is RolloverAction.WAIT_FOR_QUIET:
            self._rollover_due = True
            until_forced = self._schedule.hard_deadline - self._now()
            self._start_timer(ROLLOVER_TIMER, max(0.0, min(QUIET_POLL_SECONDS, until_forced)))
        elif action is RolloverAction.FORCE:
            self._log("warn", "no quiet moment before the upstream session's hard deadline; "
                      "rolling over now")
            self._cut_reply(cancel=True)
            self._count("rollovers_forced")
            self._begin_switch(SwitchReason.FORCED_ROLLOVER)
        else:
            self._arm_rollover()

    def _cut_reply(self, *, cancel: bool) -> None:
        """End the agent's reply as a barge-in does: ``AgentAudioDone`` for audio that was streaming
        and the text received so far as ``ConversationText``. ``cancel``: the upstream still lives and
        is asked to cancel; otherwise the response is over with its upstream session."""
        replies = self._replies
        if replies is not None and replies.current() is not None:
            replies.finish_item()
        response_id = self._scheduler.active_id or (replies.response_id if replies is not None else None)
        for item_id, parts in list(self._partial_text.items()):
            self._assistant_text(response_id or "", item_id, "".join(parts))
        self._partial_text.clear()
        if replies is not None and (replies.items or replies.announced) or cancel:
            self._interrupt_reply(cancel=cancel)

    def _forget_upstream_session(self) -> None:
        """The upstream session the conversation was in is gone: what was in progress there is over."""
        cut = self._scheduler.upstream_lost()
        if cut is not None:
            self._response_ended(cut)
            round_ = self._calls.rounds.get(cut)
            if round_ is not None:
                round_.response_ended = True
                self._cancel_timer(round_.timer)
                self._maybe_follow_up(round_)
        self._user_speaking = False
        self._partial_text.clear()

    def _hold(self) -> None:
        """From now on upstream events and client audio wait for the new upstream session."""
        if self._batcher is not None and self._emit.held_upstream is None:
            chunk = self._batcher.flush()
            if chunk:
                self._append(chunk)
        self._cancel_timer(APPEND_FLUSH_TIMER)
        if self._emit.held_upstream is None:
            self._emit.held_upstream = []
        if self._held_input is None and self.plan is not None:
            fmt = self.plan.input_format
            frame = 2 if fmt.encoding == "linear16" else 1
            limit = int(fmt.sample_rate * frame * self.options.audio_buffer_seconds)
            self._held_input = HeldAudio(max(limit, frame), frame)

    def _release_hold(self) -> None:
        """Send what was held to the (new) current upstream session, in order."""
        held, self._emit.held_upstream = self._emit.held_upstream or [], None
        if len(held) > MAX_HELD_EVENTS:
            self._log("warn", "{count} upstream events were held during a switch; the newest beyond "
                      "{limit} were dropped", count=len(held), limit=MAX_HELD_EVENTS)
            del held[MAX_HELD_EVENTS:]
        for event in held:
            self._upstream(event)
        audio, self._held_input = self._held_input, None
        if audio is not None:
            if audio.dropped_bytes:
                self._warning(errors.AUDIO_BUFFER_OVERFLOW,
                              f"{audio.dropped_bytes} bytes of audio sent while the upstream was "
                              "being replaced exceeded the buffer and were dropped")
            for chunk in audio.drain():
                if self.phase is Phase.READY:
                    self._feed_audio(chunk)
                else:
                    self._hold_audio(chunk)

    def _connection_lost(self, reason: str) -> None:
        """The current upstream connection failed in a way worth a reconnection."""
        self._log("warn", "upstream connection lost ({reason}); reconnecting", reason=reason)
        self._warning(errors.UPSTREAM_RECONNECTING,
                      f"the connection to the upstream was lost ({reason}); reconnecting")
        self._cut_reply(cancel=False)
        self._forget_upstream_session()
        self._hold()
        self._cancel_timer(ROLLOVER_TIMER)
        self._cancel_timer(UPDATE_WATCHDOG)
        self._rollover_due = False
        self._reconnection = Reconnection(self.options.backoff, self.options.random, self._now())
        if self._switch is None:
            self._next_attempt(reason)

    def _next_attempt(self, reason: str) -> None:
        assert self._reconnection is not None
        delay = self._reconnection.next_delay(self._now())
        if delay is None:
            attempts = self._reconnection.attempts
            self._give_up(errors.UPSTREAM_CLOSED,
                          f"the upstream could not be reconnected after {attempts} attempts ({reason})")
            return
        self._start_timer(RECONNECT_TIMER, delay)

    def _begin_switch(self, reason: SwitchReason) -> None:
        assert self._connected_model is not None
        gen = self._next_generation
        self._next_generation += 1
        self._switch = Switch(reason, self._now())
        self._switch_gen = gen
        self._switch_expires = None
        self._switch_update_id = None
        self._hold()
        self._emit.emit(ConnectUpstream(self._connected_model, gen))
        self._start_timer(SWITCH_TIMER, self._switch.timeout)
        self._log("info", "upstream switch started ({switch_reason})", switch_reason=reason.value,
                  generation=gen)

    def _switch_opened(self) -> None:
        assert self._switch is not None and self._switch_gen is not None
        self._switch.opened()
        plan = self._in_flight_updates[-1].plan if self._in_flight_updates else self.plan
        assert plan is not None
        self._switch_plan = plan
        self._switch_update_id = self._next_id("switch")
        self._emit.upstream_to(self._switch_gen, m.session_update(
            self._switch_update_id,
            session_config(plan, transcription_model=self.options.transcription_model)))

    def _switch_event(self, event: dict[str, Any]) -> None:
        switch, gen = self._switch, self._switch_gen
        assert switch is not None and gen is not None
        parsed = up.parse_upstream_event(event)
        ready = False
        if isinstance(parsed, up.SessionCreated):
            self._switch_expires = parsed.expires_at
        elif isinstance(parsed, up.SessionUpdated) and switch.phase is SwitchPhase.CONFIGURING:
            replay = self._record.replay(lambda: self._next_id("replay"))
            for replayed in replay.events:
                self._emit.upstream_to(gen, replayed)
            ready = switch.configured(replay)
        elif isinstance(parsed, up.ItemAdded):
            ready = switch.item_done(parsed.item_id)
        elif isinstance(parsed, up.UpstreamError):
            if parsed.caused_by is not None and parsed.caused_by == self._switch_update_id:
                self._switch_failed(f"the new session refused the configuration ({parsed.code})",
                                    Decision(False, parsed.code, parsed.message))
                return
            ready = switch.item_refused(parsed.caused_by) if parsed.caused_by else False
            self._log("warn", "upstream error {error_code} during a switch: {upstream_message}",
                      error_code=parsed.code, upstream_message=parsed.message,
                      event_id=parsed.caused_by)
        if ready:
            self._swap()

    def _switch_failed(self, reason: str, decision: Decision) -> None:
        switch, gen = self._switch, self._switch_gen
        if switch is None or gen is None:
            return
        switch.fail(reason)
        self._log("warn", "upstream switch failed ({switch_reason}): {reason}",
                  reason=reason, **switch.log_fields(self._now()))
        self._emit.emit(CloseUpstream(gen))
        self._cancel_timer(SWITCH_TIMER)
        self._switch = None
        self._switch_gen = None
        if self._reconnection is not None:
            if not decision.retry:
                self._give_up(decision.code, decision.reason)
            else:
                self._next_attempt(reason)
            return
        # A rollover: the current session still serves; try again shortly (forced at the deadline), not
        # at the next quiet moment.
        self._count("rollovers_failed")
        self._rollover_due = False
        self._release_hold()
        self._start_timer(ROLLOVER_TIMER, ROLLOVER_RETRY_SECONDS)

    def _switch_timer_fired(self) -> None:
        if self._switch is not None and self._switch.timed_out(self._now()):
            reason = self._switch.failure or "timed out"
            self._switch_failed(reason, Decision(True, errors.UPSTREAM_TIMEOUT, reason))

    def _swap(self) -> None:
        """The new upstream session has the configuration and the conversation: switch to it."""
        switch, gen, plan = self._switch, self._switch_gen, self._switch_plan
        assert switch is not None and gen is not None and plan is not None
        fields = switch.log_fields(self._now())
        self._emit.emit(SwapUpstream(gen))
        self._cancel_timer(SWITCH_TIMER)
        self._generation = gen
        self._switch = None
        self._switch_gen = None
        reconnected = self._reconnection is not None
        self._reconnection = None
        self._forget_upstream_session()
        self._log("info", "switched to a new upstream session ({switch_reason}) in {switch_ms} ms; "
                  "replayed {replayed_items} items ({replayed_chars} characters), "
                  "{dropped_entries} left out by the budget", **fields)
        self._count("reconnects" if reconnected else "rollovers")
        replayed, switch_ms = fields["replayed_items"], fields["switch_ms"]
        assert isinstance(replayed, int) and isinstance(switch_ms, int)
        self._count("replayed_items", replayed)
        self._count("switch_ms", switch_ms)
        if reconnected:
            self._warning(errors.UPSTREAM_RECONNECTED,
                          "the connection to the upstream is back; the conversation goes on")
        self._schedule_rollover(self._switch_expires)
        # Updates that were in flight are part of the configuration the new session confirmed.
        pending = list(self._in_flight_updates)
        self._in_flight_updates.clear()
        self._cancel_timer(UPDATE_WATCHDOG)
        configuring = self.phase is Phase.CONFIGURING
        self.plan = plan
        for update in pending:
            if update.ack is not None and not (configuring and update.ack is Ack.SETTINGS_APPLIED):
                self._client(m.simple(update.ack.value))
        # Items the previous session never confirmed are not in the replay: they are sent again.
        held = self._emit.held_upstream or []
        held_items = {e.get("item", {}).get("id") for e in held
                      if e.get("type") == "conversation.item.create"}
        held[:0] = [e for item_id, e in self._unconfirmed.items() if item_id not in held_items]
        if configuring:
            self._emit.held_upstream = None
            self._become_ready()
            for event in held:
                self._upstream(event)
        else:
            self._emit.held_upstream = held
        self._release_hold()
        self._pump()

    def _record_item(self, event: dict[str, Any]) -> None:
        """A conversation item the daemon created is confirmed: the record keeps it for replays."""
        item = event.get("item")
        if not isinstance(item, dict):
            return
        item_id = str(item.get("id"))
        try:
            if item.get("type") == "message":
                content = item.get("content")
                text = content[0].get("text") if isinstance(content, list) and content else None
                if isinstance(text, str):
                    if item.get("role") == "user":
                        self._record.add_user_text(item_id, text)
                    else:
                        self._record.add_assistant_text(item_id, text)
            elif item.get("type") == "function_call_output":
                self._record.add_function_output(item_id, str(item.get("call_id")),
                                                 str(item.get("output")))
            elif item.get("type") == "function_call":
                self._record.add_function_call(item_id, str(item.get("call_id")),
                                               str(item.get("name")), str(item.get("arguments")))
        except RecordError as e:
            self._log("warn", "conversation record: {problem}", problem=str(e))

    def _record_call(self, item_id: str, call_id: str | None, name: str | None,
                     arguments: str | None) -> None:
        if not item_id or not call_id or name is None:
            return
        try:
            self._record.add_function_call(item_id, call_id, name, arguments or "")
        except RecordError as e:
            self._log("warn", "conversation record: {problem}", problem=str(e))

    def draining(self) -> list[Output]:
        """The daemon is shutting down: tell the client to reconnect elsewhere, then close with 1001."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        self._error(errors.SHUTTING_DOWN, "the server is shutting down; reconnect")
        self._emit.emit(CloseClient(1001, "server shutting down"))
        return self._flush()

    def timer_fired(self, name: object) -> list[Output]:
        self._emit.timers.discard(name)
        if self.phase is Phase.CLOSED or not isinstance(name, TimerKey):
            return self._flush()
        if name.kind is TimerKind.APPEND_FLUSH:
            if self._batcher is not None:
                chunk = self._batcher.flush()
                if chunk:
                    self._append(chunk)
        elif name.kind is TimerKind.FUNCTION_FOLLOWUP:
            round_ = self._calls.rounds.get(name.key)
            if round_ is not None:
                self._log(
                    "warn",
                    "response {response_id} never ended after its function calls; following up anyway",
                    response_id=name.key,
                )
                round_.response_ended = True
                if self._scheduler.active_id == name.key:
                    self._scheduler.done(name.key)
                    self._response_ended(name.key)
                self._maybe_follow_up(round_)
                self._pump()
        elif name.kind is TimerKind.RESPONSE_WATCHDOG:
            active = self._scheduler.active_id
            if self._scheduler.watchdog_fired():
                if active is not None:
                    self._response_ended(active)
                self._pump()
        elif name.kind is TimerKind.UPDATE_WATCHDOG:
            if not self._switching:
                self._update_watchdog_fired()
        elif name.kind is TimerKind.ROLLOVER:
            self._rollover_timer_fired()
        elif name.kind is TimerKind.RECONNECT:
            if self._reconnection is not None and self._switch is None:
                self._begin_switch(SwitchReason.RECONNECT)
        elif name.kind is TimerKind.SWITCH_TIMEOUT:
            self._switch_timer_fired()
        return self._flush()

    # -- client input -------------------------------------------------------------------------------

    def client_text(self, text: str) -> list[Output]:
        """One text frame from the client."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        message = client.parse_client_message(text)
        if isinstance(message, client.ClientMessageError):
            self._error(message.code, message.description)
            return self._flush()
        handler = self._client_handlers[type(message)]
        handler(self, message)
        return self._flush()

    def client_binary(self, data: bytes) -> list[Output]:
        """One binary frame (audio in the client's input encoding)."""
        if self.phase is Phase.CLOSED or not data:
            return self._flush()
        if self.phase is Phase.READY and self._held_input is not None:
            self._held_input.append(data)
        elif self.phase is Phase.READY:
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
        # Per frame: the flush timer is only touched when its state changes.
        armed = APPEND_FLUSH_TIMER in self._emit.timers
        if self._batcher.pending_ms > 0:
            if not armed:
                self._start_timer(APPEND_FLUSH_TIMER, APPEND_FLUSH_SECONDS)
        elif armed:
            self._cancel_timer(APPEND_FLUSH_TIMER)

    def _append(self, chunk: bytes) -> None:
        self._upstream(
            m.input_audio_append(self._next_id("append"), base64.b64encode(chunk).decode("ascii"))
        )

    # Settings ---------------------------------------------------------------------------------------

    def _on_settings(self, message: client.Settings) -> None:
        try:
            plan = parse_settings(
                message.message,
                default_model=self.options.default_model,
                model_allowed=self.options.model_allowed,
                default_voice=self.options.default_voice,
                function_url_prefixes=self.options.function_url_prefixes,
            )
        except SettingsError as e:
            self._error(errors.INVALID_SETTINGS, e.description)
            return
        for path in ignored_settings_fields(message.message):
            hint = ignored_field_hint(path)
            self._warning(
                errors.UNSUPPORTED_SETTING,
                f"{path} is not a Deepgram Voice Agent v1 setting and was ignored"
                + (f"; did you mean {hint}?" if hint else ""),
            )
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
        self._replies = Replies(self._emit, self._now, self._output,
                                bytes_per_ms(plan.upstream_output_format))
        self._batcher = AppendBatcher(
            bytes_per_ms(plan.upstream_input_format),
            sample_bytes=sample_bytes(plan.upstream_input_format),
        )
        if not self._upstream_requested:
            self._upstream_requested = True
            self._connected_model = plan.model
            self._emit.emit(ConnectUpstream(plan.model))
        event_id = self._next_id("settings")
        self._in_flight_updates.append(_PendingUpdate(event_id, Ack.SETTINGS_APPLIED, plan))
        self._watch_updates()
        self._upstream(
            m.session_update(
                event_id,
                session_config(plan, transcription_model=self.options.transcription_model),
            )
        )
        self._log("debug", "settings accepted; model {model}", model=plan.model)

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
        self._queue_update(Ack.SETTINGS_APPLIED, replace(plan, model=current.model,
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

    def _on_update_prompt(self, message: client.UpdatePrompt) -> None:
        if not self._require_settings("UpdatePrompt"):
            return
        prompt = message.prompt
        plan = self._latest_plan().with_prompt_appended(prompt)
        if len(plan.instructions) > MAX_INSTRUCTIONS_CHARS:
            self._warning(
                errors.PROMPT_TOO_LONG,
                f"the prompt would exceed {MAX_INSTRUCTIONS_CHARS} characters; the update was not applied",
            )
            return
        self._queue_update(Ack.PROMPT_UPDATED, plan)

    def _on_update_speak(self, message: client.UpdateSpeak) -> None:
        if not self._require_settings("UpdateSpeak"):
            return
        try:
            speak = parse_speak(message.speak, "speak")
        except SettingsError as e:
            self._error(errors.INVALID_CLIENT_MESSAGE, e.description)
            return
        current = self._latest_plan()
        plan = replace(
            current,
            voice=speak.voice or self.options.default_voice,
            speed=speak.speed if speak.speed is not None else current.speed,
        )
        self._queue_update(Ack.SPEAK_UPDATED, plan)

    def _on_update_think(self, message: client.UpdateThink) -> None:
        if not self._require_settings("UpdateThink"):
            return
        try:
            think = parse_think(message.think, "think", self.options.function_url_prefixes)
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
        self._queue_update(Ack.THINK_UPDATED, plan)

    def _on_update_listen(self, message: client.UpdateListen) -> None:
        if not self._require_settings("UpdateListen"):
            return
        try:
            language = parse_listen_language(message.listen, "listen")
        except SettingsError as e:
            self._error(errors.INVALID_CLIENT_MESSAGE, e.description)
            return
        listen = message.listen
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
        self._queue_update(Ack.LISTEN_UPDATED, replace(self._latest_plan(), language=language))

    def _queue_update(self, ack: Ack, plan: SessionPlan) -> None:
        if len(self._queued_updates) >= MAX_WAITING_REQUESTS:
            self._error(
                errors.TOO_MANY_REQUESTS,
                f"too many updates are waiting for the agent's reply to end; {ack.value[:-7]} dropped",
            )
            return
        if len(self._in_flight_updates) >= MAX_WAITING_REQUESTS:
            # Sent but not confirmed yet: each holds a whole plan (instructions up to 64 Ki characters).
            self._error(
                errors.TOO_MANY_REQUESTS,
                f"too many updates are waiting for the upstream to confirm them; {ack.value[:-7]} dropped",
            )
            return
        self._queued_updates.append(_QueuedUpdate(ack, plan))
        self._pump()

    def _create_item(self, event: dict[str, Any]) -> str:
        """Send a ``conversation.item.create`` and wait for the upstream to confirm its item."""
        item_id: str = event["item"]["id"]
        self._scheduler.awaiting_items.add(item_id)
        self._item_events[event["event_id"]] = item_id
        self._unconfirmed[item_id] = event
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
        if voice is not None and not self._agent_spoke():
            changes.setdefault("audio", {}).setdefault("output", {})["voice"] = voice
            voice = None
        event_id = self._next_id("update")
        self._in_flight_updates.append(_PendingUpdate(event_id, update.ack, update.plan))
        self._watch_updates()
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

    def _watch_updates(self) -> None:
        """A session.update is in flight: it gets an answer within ``response_timeout``."""
        self._update_sent_at = self._now()
        if UPDATE_WATCHDOG not in self._emit.timers:
            self._start_timer(UPDATE_WATCHDOG, self.options.response_timeout)

    def _update_watchdog_fired(self) -> None:
        if not self._in_flight_updates:
            return
        quiet = self._now() - self._update_sent_at
        if quiet < self.options.response_timeout:
            self._start_timer(UPDATE_WATCHDOG, self.options.response_timeout - quiet)
            return
        self._log("warn", "the upstream never answered {count} session.update(s)",
                  count=len(self._in_flight_updates))
        while self._in_flight_updates:
            self._update_refused(self._in_flight_updates.popleft(), errors.UPSTREAM_TIMEOUT,
                                 "the upstream did not answer in time")

    def _update_answered(self) -> None:
        if self._in_flight_updates:
            self._update_sent_at = self._now()
        else:
            self._cancel_timer(UPDATE_WATCHDOG)

    def _update_refused(self, update: _PendingUpdate, code: str, message: str) -> None:
        self._update_answered()
        if update.voice_only:
            self._warning(
                errors.VOICE_LOCKED if code == "cannot_update_voice" else code,
                f"the voice was not changed: {message}",
            )
            return
        if update.ack is Ack.SETTINGS_APPLIED and self.phase is Phase.CONFIGURING:
            # The client may send a corrected Settings.
            self.phase = Phase.AWAITING_SETTINGS
            self._error(code, message)
            return
        self._warning(code, f"{update.ack.value if update.ack else 'the update'} was not applied: "
                      f"{message}")
        self._pump()

    # conversation input -------------------------------------------------------------------------------

    def _on_inject_user_message(self, message: client.InjectUserMessage) -> None:
        if self.phase is not Phase.READY:
            if len(self._held_injections) >= MAX_WAITING_REQUESTS:
                self._error(errors.TOO_MANY_REQUESTS,
                            "too many messages are waiting for the session to be configured")
                return
            self._held_injections.append(message.content)
            return
        if (len(self._user_echo) >= MAX_WAITING_REQUESTS
                or len(self._scheduler.waiting) >= MAX_WAITING_REQUESTS):
            # The upstream has not confirmed the earlier ones yet: the same limit as before Settings.
            self._error(errors.TOO_MANY_REQUESTS,
                        "too many messages are waiting for the upstream to take them")
            return
        self._inject_user_text(message.content)

    def _inject_user_text(self, content: str) -> None:
        # Messages that arrive together are answered by one response (SPEC §4).
        pending = self._scheduler.pending_for("inject-user-message")
        if not pending and (self._scheduler.state is ResponseState.ACTIVE
                            or (self._replies is not None and self._replies.playing)):
            self._interrupt_reply(cancel=True)
        item_id = self._create_item(
            m.user_text_item(self._next_id("inject"), self._next_id("item"), content)
        )
        self._user_echo[item_id] = content
        self._turn_end = self._now()
        waiting = self._scheduler.has_waiting("inject-user-message")
        if waiting is not None:
            waiting.after_items = waiting.after_items | {item_id}
        elif not pending:
            self._scheduler.add(
                ResponseRequest("inject-user-message", after_items=frozenset({item_id})))
        self._pump()

    def _on_inject_agent_message(self, message: client.InjectAgentMessage) -> None:
        if self.phase is not Phase.READY:
            self._client(m.injection_refused("the session is not configured yet"))
            return
        playing = self._replies is not None and self._replies.playing
        busy = self._user_speaking or self._scheduler.busy or playing
        if message.behavior == "default" and busy:
            reason = "the user is speaking" if self._user_speaking else "the agent is replying"
            self._client(m.injection_refused(f"{reason}; the message was not spoken"))
            return
        if message.behavior == "interrupt" and busy:
            self._interrupt_reply(cancel=True)
        text = message.message

        def refused(reason: str) -> None:
            self._client(m.injection_refused(f"{reason}; the message was not spoken"))

        request = ResponseRequest("inject-agent-message", instructions=verbatim_instructions(text),
                                  on_refused=refused)
        if not self._scheduler.add(request):
            self._client(m.injection_refused("too many messages are waiting to be spoken"))
            return
        self._turn_end = self._now()
        self._pump()

    def _on_function_call_response(self, message: client.FunctionCallResponse) -> None:
        if not self._require_settings("FunctionCallResponse"):
            return
        round_ = self._calls.waiting_round(message.call_id)
        if round_ is None or message.call_id in round_.server_side:
            self._error(
                errors.UNKNOWN_FUNCTION_CALL,
                f"no function call {message.call_id[:64]!r} is waiting for a response",
            )
            return
        self._function_output(round_, message.call_id, message.content)

    def function_result(self, call_id: str, content: str) -> list[Output]:
        """A server-side function's endpoint answered (or failed: ``content`` then says why)."""
        round_ = self._calls.waiting_round(call_id)
        if self.phase is Phase.CLOSED or round_ is None:
            return self._flush()
        self._client(m.function_call_response(call_id, round_.names[call_id], content))
        self._function_output(round_, call_id, content)
        return self._flush()

    def _function_output(self, round_: CallRound, call_id: str, content: str) -> None:
        round_.outputs[call_id] = content
        round_.output_items[call_id] = self._create_item(
            m.function_call_output_item(
                self._next_id("function"), self._next_id("item"), call_id, content
            )
        )
        self._maybe_follow_up(round_)
        self._pump()

    def _on_keep_alive(self, message: client.KeepAlive) -> None:
        pass

    _client_handlers: dict[type, Callable[[Session, Any], None]] = {
        client.Settings: _on_settings,
        client.UpdatePrompt: _on_update_prompt,
        client.UpdateSpeak: _on_update_speak,
        client.UpdateThink: _on_update_think,
        client.UpdateListen: _on_update_listen,
        client.InjectUserMessage: _on_inject_user_message,
        client.InjectAgentMessage: _on_inject_agent_message,
        client.FunctionCallResponse: _on_function_call_response,
        client.KeepAlive: _on_keep_alive,
    }

    # -- scheduling -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send what waits for "no active response": session updates first, then one response."""
        if self.phase is not Phase.READY or self._scheduler.busy or self._switching:
            return
        while self._queued_updates:
            self._send_update(self._queued_updates.popleft())
        if self._scheduler.next_request() is not None:
            if self._turn_end is None:
                self._turn_end = self._now()
            self._first_text_at = None

    def _maybe_follow_up(self, round_: CallRound) -> None:
        if not self._calls.ready(round_):
            return
        if self.plan is not None and self.plan.history_messages:
            self._client(m.history_function_calls(self._calls.history(round_)))  # type: ignore[arg-type]
        self._turn_end = self._now()
        self._scheduler.add(
            ResponseRequest(
                "function-call-outputs", after_items=frozenset(round_.output_items.values())
            )
        )

    def _become_ready(self) -> None:
        assert self.plan is not None
        self.phase = Phase.READY
        self._client(m.simple("SettingsApplied"))
        self._send_history(self.plan)
        if self.plan.greeting:
            self._scheduler.add(
                ResponseRequest(
                    "greeting",
                    instructions=verbatim_instructions(self.plan.greeting),
                    after_items=frozenset(self._scheduler.awaiting_items),
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
        memory of it is cut to what the client could have heard (SPEC §6).
        """
        self._untext_interrupted_reply()
        if cancel:
            event_id = self._scheduler.cancel()
            if event_id is not None:
                self._housekeeping.append(event_id)
        if self._replies is not None:
            self._housekeeping.extend(self._replies.barge_in(self._scheduler.active_id))
            self._keep_heard(self._replies.heard)

    def _keep_heard(self, heard: dict[str, float]) -> None:
        """
        The conversation record (what a new upstream session is given, SPEC §8) keeps of an interrupted
        reply what the user heard, as the upstream's own memory does after the truncate (SPEC §6):
        deleted items go, a truncated item's text is cut to the heard share (by the audio's share,
        to a word boundary) once it is known.
        """
        for item_id, share in heard.items():
            if share <= 0.0:
                self._record.remove(item_id)
                continue
            self._heard_share[item_id] = share
            while len(self._heard_share) > MAX_WAITING_REQUESTS:
                del self._heard_share[next(iter(self._heard_share))]
            text = self._record.text_of(item_id)
            if text is not None:
                part = heard_part(text, share)
                if part:
                    self._record.add_assistant_text(item_id, part)
                else:
                    self._record.remove(item_id)

    def _untext_interrupted_reply(self) -> None:
        """
        The reply being interrupted gets no assistant ``ConversationText`` (nor ``History``) from now on:
        it would reach the client after ``UserStartedSpeaking`` / the user's text, which Deepgram never
        does and which clients read as a new reply.  (docs/protocol.md, "Barge-in".)
        """
        playing = self._replies.response_id if self._replies is not None else None
        for response_id in (self._scheduler.active_id, playing):
            if response_id is not None:
                self._untexted_responses.add(response_id)

    # -- upstream input -----------------------------------------------------------------------------

    def upstream_event(self, event: dict[str, Any], generation: int = 0) -> list[Output]:
        """One JSON event from the upstream connection ``generation`` (already parsed from JSON)."""
        if self.phase is Phase.CLOSED:
            return self._flush()
        if generation == self._switch_gen:
            self._switch_event(event)
            return self._flush()
        if generation != self._generation or self._reconnection is not None:
            return self._flush()
        parsed = up.parse_upstream_event(event)
        handler = self._upstream_handlers.get(type(parsed))
        if handler is not None:
            handler(self, parsed)
        return self._flush()

    def _on_malformed(self, event: up.Malformed) -> None:
        self._log("warn", "malformed upstream event {message_type}: {problem}",
                  message_type=event.event_type, problem=event.reason)

    def _on_ignored(self, event: up.Ignored) -> None:
        self._log("debug", "upstream event {message_type} ignored", message_type=event.event_type)

    def _on_session_updated(self, event: up.SessionUpdated) -> None:
        if not self._in_flight_updates:
            return
        update = self._in_flight_updates.popleft()
        self._update_answered()
        if update.voice_only:
            return
        self.plan = update.plan
        if update.ack is Ack.SETTINGS_APPLIED and self.phase is Phase.CONFIGURING:
            self._become_ready()
            return
        if update.ack is not None:
            self._client(m.simple(update.ack.value))
        self._pump()

    def _on_error(self, event: up.UpstreamError) -> None:
        code, message, caused_by = event.code, event.message, event.caused_by
        self._log("warn", "upstream error {error_code}: {upstream_message}", error_code=code,
                  upstream_message=message, event_id=caused_by)
        if code == "conversation_already_has_active_response":
            if caused_by is None or self._scheduler.is_request_event(caused_by):
                self._scheduler.request_lost()
            return
        if code == "response_cancel_not_active":
            self._scheduler.not_active()
            self._pump()
            return
        if code == "session_expired":
            # The upstream closes next; the conversation moves to a new session (SPEC §8).
            self._expired = True
            return
        if code in errors.BENIGN_UPSTREAM_CODES:
            return
        if caused_by is not None and caused_by in self._housekeeping:
            return  # an answer to the daemon's own truncate/cancel/delete: logged only
        update = next((u for u in self._in_flight_updates if u.event_id == caused_by), None)
        if update is None and caused_by is None and self.phase is Phase.CONFIGURING:
            # Nothing else is outstanding before the session is configured.
            update = self._in_flight_updates[0] if self._in_flight_updates else None
        if update is not None:
            self._in_flight_updates.remove(update)
            self._update_refused(update, code, message)
            return
        refused_item = self._item_events.pop(caused_by, None) if caused_by else None
        if refused_item is not None:
            self._unconfirmed.pop(refused_item, None)
        if refused_item is not None and refused_item in self._scheduler.awaiting_items:
            self._scheduler.item_refused(refused_item)
            self._user_echo.pop(refused_item, None)
        if self._scheduler.is_request_event(caused_by):
            self._scheduler.request_refused()
        self._error(code, message)
        self._pump()

    def _on_speech_started(self, event: up.SpeechStarted) -> None:
        self._user_speaking = True
        # Server VAD interrupts a reply that is still being generated, audio or not.
        self._untext_interrupted_reply()
        self._client(m.simple("UserStartedSpeaking"))
        if self._replies is not None and (self._replies.items or self._replies.announced):
            # Server VAD cancels the response itself (interrupt_response is on).
            self._interrupt_reply(cancel=False)

    def _on_speech_stopped(self, event: up.SpeechStopped) -> None:
        self._user_speaking = False
        self._turn_end = self._now()
        if event.audio_end_ms is None:
            self._log("warn", "speech_stopped without a usable audio_end_ms")
        self._client(m.utterance_end(round((event.audio_end_ms or 0) / 1000.0, 3)))

    def _on_committed(self, event: up.Committed) -> None:
        # The spoken turn takes its place in the conversation now; its transcript may come after the
        # reply it triggered (SPEC §8: the replay keeps conversation order).
        try:
            self._record.add_user_audio(event.item_id)
        except RecordError as e:
            self._log("warn", "conversation record: {problem}", problem=str(e))

    def _on_transcription_completed(self, event: up.TranscriptionCompleted) -> None:
        if event.transcript.strip():
            self._conversation_text("user", event.transcript.strip())
            if event.item_id:
                try:
                    self._record.add_user_text(event.item_id, event.transcript.strip())
                except RecordError as e:
                    self._log("warn", "conversation record: {problem}", problem=str(e))

    def _on_transcription_failed(self, event: up.TranscriptionFailed) -> None:
        self._warning(errors.TRANSCRIPTION_FAILED,
                      f"the user's speech could not be transcribed ({event.code}): {event.message}")

    def _conversation_text(self, role: str, content: str) -> None:
        self._client(m.conversation_text(role, content))
        if self.plan is not None and self.plan.history_messages:
            self._client(m.history_text(role, content))

    def _on_item_added(self, event: up.ItemAdded) -> None:
        item_id = event.item_id
        created = self._unconfirmed.pop(item_id, None)
        if created is not None:
            self._record_item(created)
        if not self._scheduler.item_confirmed(item_id):
            return
        for event_id in [e for e, i in self._item_events.items() if i == item_id]:
            del self._item_events[event_id]
        echo = self._user_echo.pop(item_id, None)
        if echo is not None:
            self._conversation_text("user", echo)
        self._pump()

    def _on_response_created(self, event: up.ResponseCreated) -> None:
        self._scheduler.created(event.response_id)
        self._first_text_at = None
        if self._turn_end is None:
            self._turn_end = self._now()

    def _on_response_done(self, event: up.ResponseDone) -> None:
        response_id = event.response_id
        completed = {
            item.call_id: (item.name, item.arguments)
            for item in event.output
            if item.item_type == "function_call" and item.call_id and item.status == "completed"
        }
        ended = self._scheduler.done(response_id)
        self._response_ended(response_id)
        round_ = self._calls.response_ended(response_id, completed, self._endpoint_of)
        for item in event.output:
            if item.item_type == "message" and item.role == "assistant" and item.text:
                self._assistant_text(event.response_id, item.item_id, item.text)
        self._report_status(event)
        if round_ is not None:
            self._maybe_follow_up(round_)
        if ended or not self._scheduler.busy:
            self._pump()

    def _report_status(self, event: up.ResponseDone) -> None:
        """SPEC §5: a failed or incomplete response is reported; a cancelled one is not."""
        if event.status == "failed":
            code = event.error_code or errors.RESPONSE_FAILED
            self._log("warn", "response {response_id} failed: {error_code}",
                      response_id=event.response_id, error_code=code)
            self._warning(code, event.error_message or "the agent's reply failed")
        elif event.status == "incomplete":
            reason = event.reason or "unknown"
            self._warning(errors.RESPONSE_INCOMPLETE,
                          f"the agent's reply was cut short by the upstream ({reason})")

    def _response_ended(self, response_id: str) -> None:
        self._turn_end = None
        self._partial_text.clear()
        if self._replies is not None:
            self._replies.response_ended(response_id)

    def _endpoint_of(self, name: str) -> Endpoint | None:
        # The tools the upstream knows are those of the applied plan.
        plan = self.plan
        function = next((f for f in plan.functions if f.name == name), None) if plan else None
        return function.endpoint if function is not None else None

    def _first_agent_text(self) -> None:
        if self._first_text_at is None:
            self._first_text_at = self._now()

    def _on_output_item_added(self, event: up.OutputItemAdded) -> None:
        self._scheduler.activity()
        if self._replies is not None and event.item.item_type == "message":
            self._replies.announce(event.response_id, event.item.item_id)

    def _on_output_audio_delta(self, event: up.AudioDelta) -> None:
        scheduler = self._scheduler
        if scheduler.active_id is None and scheduler.state in (ResponseState.IDLE,
                                                              ResponseState.REQUESTED):
            scheduler.created(event.response_id)  # its response.created went missing
        elif scheduler.active_id != event.response_id:
            return
        scheduler.activity()
        if self._replies is not None:
            self._replies.deliver(event.response_id, event.item_id, event.data, self._started_speaking)

    def _started_speaking(self) -> None:
        now = self._now()
        turn_end = self._turn_end if self._turn_end is not None else now
        first_text = self._first_text_at if self._first_text_at is not None else now
        ttt = max(0.0, first_text - turn_end)
        total = max(0.0, now - turn_end)
        self._client(m.agent_started_speaking(total, max(0.0, total - ttt), ttt))

    def _on_output_audio_done(self, event: up.AudioDone) -> None:
        self._scheduler.activity()
        if self._replies is not None:
            self._replies.finish_item(event.item_id)

    def _on_text_delta(self, event: up.TextDelta) -> None:
        self._scheduler.activity()
        self._first_agent_text()
        if event.delta and event.item_id not in self._texted_items:
            self._partial_text.setdefault(event.item_id, []).append(event.delta)

    def _on_text_done(self, event: up.TextDone) -> None:
        self._scheduler.activity()
        self._first_agent_text()
        self._assistant_text(event.response_id, event.item_id, event.text)

    def _assistant_text(self, response_id: str, item_id: str, text: str) -> None:
        self._partial_text.pop(item_id, None)
        if item_id in self._texted_items or not text.strip():
            return
        if response_id in self._untexted_responses:
            # Never shown to the client (it was interrupted), but what the user heard of it stays in
            # the conversation a new upstream session is given.
            share = self._heard_share.pop(item_id, None)
            part = heard_part(text.strip(), share) if share is not None else ""
            if part:
                try:
                    self._record.add_assistant_text(item_id, part)
                except RecordError as e:
                    self._log("warn", "conversation record: {problem}", problem=str(e))
            return
        self._texted_items.add(item_id)
        self._conversation_text("assistant", text.strip())
        try:
            self._record.add_assistant_text(item_id, text.strip())
        except RecordError as e:
            self._log("warn", "conversation record: {problem}", problem=str(e))

    def _on_output_item_done(self, event: up.OutputItemDone) -> None:
        self._scheduler.activity()
        item = event.item
        if item.item_type == "message" and item.role == "assistant" and item.text:
            self._assistant_text(event.response_id, item.item_id, item.text)
        elif item.item_type == "function_call":
            if item.status == "completed":
                self._record_call(item.item_id, item.call_id, item.name, item.arguments)
            self._calls.item_done(item.call_id, item.status, item.name, item.arguments,
                                  self._endpoint_of)

    def _on_function_arguments_done(self, event: up.FunctionArgumentsDone) -> None:
        self._scheduler.activity()
        self._first_agent_text()
        self._calls.arguments_done(event.response_id, event.call_id, event.name, event.arguments)

    _upstream_handlers: dict[type, Callable[[Session, Any], None]] = {
        up.Malformed: _on_malformed,
        up.Ignored: _on_ignored,
        up.SessionCreated: _on_session_created,
        up.SessionUpdated: _on_session_updated,
        up.UpstreamError: _on_error,
        up.SpeechStarted: _on_speech_started,
        up.SpeechStopped: _on_speech_stopped,
        up.Committed: _on_committed,
        up.TranscriptionCompleted: _on_transcription_completed,
        up.TranscriptionFailed: _on_transcription_failed,
        up.ItemAdded: _on_item_added,
        up.ResponseCreated: _on_response_created,
        up.ResponseDone: _on_response_done,
        up.OutputItemAdded: _on_output_item_added,
        up.OutputItemDone: _on_output_item_done,
        up.AudioDelta: _on_output_audio_delta,
        up.AudioDone: _on_output_audio_done,
        up.TextDelta: _on_text_delta,
        up.TextDone: _on_text_done,
        up.FunctionArgumentsDone: _on_function_arguments_done,
    }
