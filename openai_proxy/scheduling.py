"""
The response state machine: at most one response is active upstream, and every response the daemon
wants waits its turn (SPEC §4, §5).

States and every transition live here, in :data:`TRANSITIONS` (the way h11's ``_state.py`` keeps
everything that affects its state machine in one table); an input that has no transition from the
current state is answered explicitly (logged, state unchanged).  The scheduler also holds the queue of
waiting requests, the items they wait for, the one request in flight (so a request that lost the race with
server VAD is made again), and a watchdog: no state waits forever on the upstream.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from openai_proxy.outputs import Emitter, TimerKey, TimerKind
from openai_proxy.translate import messages as m


class ResponseState(enum.Enum):
    #: No response upstream and none asked for.
    IDLE = "idle"
    #: The daemon sent ``response.create``; ``response.created`` has not arrived.
    REQUESTED = "requested"
    #: A response (ours or server VAD's) is in progress.
    ACTIVE = "active"
    #: The daemon sent ``response.cancel``; ``response.done`` has not arrived.
    CANCELLING = "cancelling"


class Trigger(enum.Enum):
    REQUEST_SENT = "request-sent"
    CREATED = "created"
    DONE = "done"
    CANCEL_SENT = "cancel-sent"
    #: ``conversation_already_has_active_response`` answered our request: another response is active.
    REQUEST_LOST = "request-lost"
    #: Another upstream error answered our ``response.create``.
    REQUEST_REFUSED = "request-refused"
    #: ``response_cancel_not_active``: the upstream has no active response.
    NOT_ACTIVE = "not-active"
    #: The watchdog fired: the upstream went quiet.
    TIMED_OUT = "timed-out"


S, T = ResponseState, Trigger

#: (state, trigger) -> next state.  Every transition of the response lifecycle is in this table.
TRANSITIONS: dict[tuple[ResponseState, Trigger], ResponseState] = {
    (S.IDLE, T.REQUEST_SENT): S.REQUESTED,
    (S.IDLE, T.CREATED): S.ACTIVE,  # server VAD started a response
    (S.REQUESTED, T.CREATED): S.ACTIVE,
    (S.ACTIVE, T.CREATED): S.ACTIVE,  # a newer response replaced the tracked one
    (S.CANCELLING, T.CREATED): S.ACTIVE,
    (S.REQUESTED, T.DONE): S.IDLE,
    (S.ACTIVE, T.DONE): S.IDLE,
    (S.CANCELLING, T.DONE): S.IDLE,
    (S.ACTIVE, T.CANCEL_SENT): S.CANCELLING,
    (S.REQUESTED, T.REQUEST_LOST): S.ACTIVE,  # the winner's response.created is still to come
    (S.ACTIVE, T.REQUEST_LOST): S.ACTIVE,
    (S.CANCELLING, T.REQUEST_LOST): S.CANCELLING,
    (S.REQUESTED, T.REQUEST_REFUSED): S.IDLE,
    (S.ACTIVE, T.NOT_ACTIVE): S.IDLE,
    (S.CANCELLING, T.NOT_ACTIVE): S.IDLE,
    (S.REQUESTED, T.TIMED_OUT): S.IDLE,
    (S.ACTIVE, T.TIMED_OUT): S.IDLE,
    (S.CANCELLING, T.TIMED_OUT): S.IDLE,
}

WATCHDOG = TimerKey(TimerKind.RESPONSE_WATCHDOG)


@dataclass
class ResponseRequest:
    """A ``response.create`` the daemon wants to send once nothing is active."""

    reason: str
    instructions: str | None = None
    #: Item ids the upstream must confirm before the response may be created.
    after_items: frozenset[str] = frozenset()
    #: A request lost to server VAD is made again once; a second loss refuses it.
    retried: bool = False
    #: Called when the request is given up (an agent message is then refused to the client).
    on_refused: Callable[[str], None] | None = None


class Scheduler:
    """
    The response lifecycle of one session.  ``now`` is the session clock (seconds); ``timeout`` the
    longest the upstream may stay quiet while a response is requested, active or cancelling.
    """

    def __init__(self, emitter: Emitter, now: Callable[[], float], timeout: float,
                 max_waiting: int) -> None:
        self._emit = emitter
        self._now = now
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.state = ResponseState.IDLE
        #: The id of the response in progress (``None`` while unknown).
        self.active_id: str | None = None
        #: Every response seen to start and not yet end, oldest first (the API runs one at a time in
        #: a conversation; should two overlap, the state stays ACTIVE until both ended).
        self._open: list[str] = []
        self.waiting: deque[ResponseRequest] = deque()
        self.awaiting_items: set[str] = set()
        self._in_flight: ResponseRequest | None = None
        self._in_flight_event: str | None = None
        self._last_activity = 0.0

    # -- the state machine ----------------------------------------------------------------------

    def _fire(self, trigger: Trigger) -> bool:
        """Apply ``trigger``; ``False`` (logged) when the current state has no such transition."""
        new = TRANSITIONS.get((self.state, trigger))
        if new is None:
            self._emit.log("debug", "response {trigger} ignored in state {state}",
                           trigger=trigger.value, state=self.state.value)
            return False
        self.state = new
        self._last_activity = self._now()
        if new is ResponseState.IDLE:
            self.active_id = None
            self._open = []
            self._emit.cancel_timer(WATCHDOG)
        elif WATCHDOG not in self._emit.timers:
            self._emit.start_timer(WATCHDOG, self.timeout)
        return True

    @property
    def busy(self) -> bool:
        """Whether a response is requested, active or being cancelled."""
        return self.state is not ResponseState.IDLE

    def is_request_event(self, event_id: str | None) -> bool:
        return event_id is not None and event_id == self._in_flight_event

    def activity(self) -> None:
        """An event of the response in progress arrived (cheap: no timer is touched)."""
        self._last_activity = self._now()

    # -- inputs -------------------------------------------------------------------------------------

    def created(self, response_id: str) -> None:
        # The request in flight is kept until its response ends: response.created does not say whose
        # it is, and an error may still tell that ours lost the race to server VAD's.
        if self._fire(Trigger.CREATED):
            self.active_id = response_id
            if response_id not in self._open:
                self._open.append(response_id)

    def done(self, response_id: str) -> bool:
        """``response.done``: ``True`` when it ended the tracked response."""
        if self.state is ResponseState.IDLE:
            return False
        if response_id in self._open and len(self._open) > 1:
            self._open.remove(response_id)
            self.active_id = self._open[-1]
            return False
        if self.active_id is not None and response_id != self.active_id:
            self._emit.log("debug", "response.done for untracked response {response_id}",
                           response_id=response_id)
            return False
        self._in_flight = None
        self._in_flight_event = None
        return self._fire(Trigger.DONE)

    def cancel(self) -> str | None:
        """Cancel the active response (barge-in by an injected message); the cancel's event id."""
        if self.state is not ResponseState.ACTIVE:
            return None
        event_id = self._emit.next_id("cancel")
        self._emit.upstream(m.response_cancel(event_id))
        self._fire(Trigger.CANCEL_SENT)
        return event_id

    def request_lost(self) -> None:
        """Our ``response.create`` met ``conversation_already_has_active_response``."""
        lost, self._in_flight, self._in_flight_event = self._in_flight, None, None
        if not self._fire(Trigger.REQUEST_LOST):
            return
        if lost is None:
            return
        if lost.retried:
            if lost.on_refused is not None:
                lost.on_refused("the agent was replying")
            return
        lost.retried = True
        self.waiting.appendleft(lost)
        self._emit.log("info", "response request ({reason}) lost to another response; retrying "
                       "when it ends", reason=lost.reason)

    def request_refused(self) -> None:
        self._in_flight, self._in_flight_event = None, None
        self._fire(Trigger.REQUEST_REFUSED)

    def not_active(self) -> None:
        """``response_cancel_not_active``: whatever we tracked is over."""
        self._fire(Trigger.NOT_ACTIVE)

    def watchdog_fired(self) -> bool:
        """The watchdog timer fired: ``True`` when the response is now treated as ended."""
        self._emit.timers.discard(WATCHDOG)
        if self.state is ResponseState.IDLE:
            return False
        quiet = self._now() - self._last_activity
        if quiet < self.timeout:
            self._emit.start_timer(WATCHDOG, self.timeout - quiet)
            return False
        self._emit.log("warn", "the upstream went quiet for {seconds} s in response state {state}; "
                       "treating the response as ended", seconds=round(quiet, 3),
                       state=self.state.value)
        self._in_flight, self._in_flight_event = None, None
        return self._fire(Trigger.TIMED_OUT)

    def upstream_lost(self) -> str | None:
        """The upstream session is gone (a drop, or a switch to a new one): whatever was requested,
        active or cancelling there is over. A request that had not started yet is made again in the
        next session. Returns the id of the response that was cut, if any."""
        cut = self.active_id
        request, self._in_flight, self._in_flight_event = self._in_flight, None, None
        if request is not None and self.state is ResponseState.REQUESTED:
            self.waiting.appendleft(request)
            cut = None
        self.state = ResponseState.IDLE
        self.active_id = None
        self._open = []
        self._emit.cancel_timer(WATCHDOG)
        return cut

    # -- the queue ----------------------------------------------------------------------------------

    def add(self, request: ResponseRequest) -> bool:
        """Queue ``request``; ``False`` when too many wait."""
        if len(self.waiting) >= self.max_waiting:
            return False
        self.waiting.append(request)
        return True

    def has_waiting(self, reason: str) -> ResponseRequest | None:
        return next((r for r in self.waiting if r.reason == reason), None)

    def pending_for(self, reason: str) -> bool:
        """Whether a request for ``reason`` waits, or is in flight and not started."""
        return self.has_waiting(reason) is not None or (
            self.state is ResponseState.REQUESTED and self._in_flight is not None
            and self._in_flight.reason == reason)

    def item_confirmed(self, item_id: str) -> bool:
        if item_id not in self.awaiting_items:
            return False
        self.awaiting_items.discard(item_id)
        return True

    def item_refused(self, item_id: str) -> None:
        """The item will never exist: nothing may wait for it."""
        self.awaiting_items.discard(item_id)
        self.waiting = deque(r for r in self.waiting if item_id not in r.after_items)

    def next_request(self) -> ResponseRequest | None:
        """Send the first waiting request when nothing is active and its items exist."""
        if self.busy or not self.waiting:
            return None
        request = self.waiting[0]
        if request.after_items & self.awaiting_items:
            return None
        self.waiting.popleft()
        event_id = self._emit.next_id("response")
        self._emit.upstream(m.response_create(event_id, request.instructions))
        self._emit.log("debug", "response requested ({reason})", reason=request.reason)
        self._in_flight, self._in_flight_event = request, event_id
        self._fire(Trigger.REQUEST_SENT)
        return request
