"""
Keeping a conversation going across upstream sessions (SPEC §8): what is replayed into a new upstream
session, when a session is rolled over before OpenAI ends it, and when and how fast a lost connection
is reconnected.

Pure and sans-IO like the session: no Twisted, no clock of its own (times are passed in, in seconds of
whatever clock the caller uses), no randomness of its own (a ``random`` callable is passed in).

Three parts, each usable alone:

* :class:`ConversationRecord`: the conversation as the model knows it, in conversation order (user text
  from typed messages and transcripts, assistant text from transcripts, function calls with their
  arguments and outputs), and :meth:`ConversationRecord.replay`, the GA ``conversation.item.create``
  events that rebuild it in a new upstream session, trimmed oldest first to a :class:`ReplayBudget`.
* :class:`RolloverSchedule`: the soft deadline after which a rollover waits for a quiet moment, and the
  hard deadline at which it is forced.
* :class:`BackoffPolicy`, :class:`Reconnection` and :func:`classify_failure`: which upstream failures are
  worth a reconnection, and bounded exponential backoff with full jitter between attempts.
* :class:`Switch` and :class:`HeldAudio`: the progress of one move to a new upstream session (connect,
  configure, replay, then swap), and the client audio held meanwhile.

docs/reliability.md describes the behaviour these parts give the daemon.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from openai_proxy import errors
from openai_proxy.translate import messages as m

__all__ = [
    "BackoffPolicy",
    "ConversationRecord",
    "Decision",
    "Failure",
    "HeldAudio",
    "RecordError",
    "Reconnection",
    "Replay",
    "ReplayBudget",
    "RolloverAction",
    "RolloverSchedule",
    "Switch",
    "SwitchPhase",
    "SwitchReason",
    "classify_failure",
]


# -- the conversation record ------------------------------------------------------------------------


class RecordError(ValueError):
    """A record update that contradicts the record (an output for an unknown call, a reused call id)."""


class Role(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(slots=True)
class _Message:
    item_id: str
    role: Role
    #: ``None`` while a user audio turn waits for its transcript (it is not replayed until then).
    text: str | None


@dataclass(slots=True)
class _FunctionRound:
    """A function call and, once answered, its output: replayed or dropped together."""

    item_id: str
    call_id: str
    name: str
    arguments: str
    output_item_id: str | None = None
    output: str | None = None


_Entry = _Message | _FunctionRound


def _replayable(entry: _Entry) -> bool:
    # A user turn without a transcript (or a blank one) gives a new session nothing to read.
    return not isinstance(entry, _Message) or bool(entry.text and entry.text.strip())

#: Characters per token the budget assumes (OpenAI's rule of thumb for English text).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class ReplayBudget:
    """How much of a conversation a replay carries, newest first.

    ``max_chars`` bounds the text of the replayed items (message text; a call's name, arguments and
    output), ``max_items`` the number of ``conversation.item.create`` events (a function round is two).
    ``max_entry_chars`` caps one text: a longer one is cut and ends with ``" […]"``, so the newest
    turn always fits.

    The defaults: 48 000 characters, about 12 000 tokens at :data:`CHARS_PER_TOKEN`, a little under half
    of the 28 672 input tokens gpt-realtime has beside its 4 096 output tokens (GA reference §4), so the
    instructions, the tools and the turns after the switch still fit; 120 items keep the switch itself
    short (each item is one event and one acknowledgement).
    """

    max_chars: int = 48_000
    max_items: int = 120
    max_entry_chars: int = 12_000

    def __post_init__(self) -> None:
        if self.max_chars < 1 or self.max_items < 2 or self.max_entry_chars < 8:
            raise ValueError(
                "ReplayBudget: max_chars >= 1, max_items >= 2 (a function round is two items) and "
                "max_entry_chars >= 8 are required"
            )
        if self.max_entry_chars * 3 > self.max_chars:
            # A function round holds up to three capped texts; the newest round must always fit.
            raise ValueError("ReplayBudget: max_entry_chars must be at most a third of max_chars")

    @property
    def approximate_tokens(self) -> int:
        return self.max_chars // CHARS_PER_TOKEN


_CUT_MARK = " […]"
#: Beyond one budget's worth of the newest entries, the record keeps this many more items and
#: characters (see ``ConversationRecord._compact``): enough for the few recent items a barge-in
#: deletes to be replaced by older ones, small next to the budget (memory per session, SPEC §7).
_RESERVE_ITEMS = 8
_RESERVE_CHARS = 6_000


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(_CUT_MARK)] + _CUT_MARK


@dataclass(frozen=True)
class Replay:
    """What :meth:`ConversationRecord.replay` produced.

    ``events``: the ``conversation.item.create`` events, oldest first, each with its own ``event_id``
    and the original ``item.id``. ``item_ids``: the items the new session must confirm
    (``conversation.item.done``) before the switch. ``chars``/``items``: what the replay carries.
    ``dropped``: conversation entries (a message, or a function round) left out to fit the budget.
    """

    events: tuple[dict[str, object], ...]
    item_ids: tuple[str, ...]
    chars: int
    dropped: int

    @property
    def items(self) -> int:
        return len(self.events)


def heard_part(text: str, share: float) -> str:
    """
    The part of an assistant ``text`` the user heard when its audio was cut at ``share`` (0.0–1.0) of
    its length: the text's share in characters (speech runs at a roughly even rate), cut back to the
    last whole word, with `` …`` marking the cut.  An empty result means nothing whole was heard.
    """
    if share >= 1.0:
        return text
    cut = int(len(text) * max(0.0, share))
    if cut < len(text) and not text[cut:cut + 1].isspace():
        cut = text.rfind(" ", 0, cut)
    heard = text[:max(cut, 0)].rstrip()
    return heard + " …" if heard else ""


class ConversationRecord:
    """The conversation the model knows, kept so that a new upstream session can be given it again.

    The session feeds it in conversation order, by item id:

    * :meth:`add_user_text`: an ``InjectUserMessage``, or a user message from the ``Settings`` history;
    * :meth:`add_user_audio` when a user audio item enters the conversation (input buffer committed),
      and :meth:`set_transcript` when its transcription completes (a turn without a transcript is not
      replayed: the model heard it, but there is no text to give a new session);
    * :meth:`add_assistant_text` from the assistant's transcript or text (again with the heard part
      after a barge-in truncation);
    * :meth:`add_function_call` and :meth:`add_function_output`;
    * :meth:`remove` for an item deleted from the conversation (unheard items after a barge-in).

    Adding an item id that is already recorded replaces its text in place. Updates for item ids the
    record does not hold (compacted away, see below) are ignored.

    Memory is bounded: after each addition, old entries are forgotten so that the record holds at most
    the budget's text and items plus a small reserve (8 items, 6 000 characters; ``max_items + 8``
    entries in all). A removal of recent items can bring older ones back into the replay only within
    that reserve.
    """

    def __init__(self, budget: ReplayBudget | None = None) -> None:
        self.budget = budget or ReplayBudget()
        self._entries: list[_Entry] = []
        self._by_item: dict[str, _Entry] = {}
        self._by_call: dict[str, _FunctionRound] = {}
        #: Entries forgotten by compaction since the record began.
        self.forgotten = 0

    # -- feeding

    def add_user_text(self, item_id: str, text: str) -> None:
        self._put_message(item_id, Role.USER, text)

    def add_user_audio(self, item_id: str) -> None:
        if item_id not in self._by_item:
            self._put_message(item_id, Role.USER, None)

    def set_transcript(self, item_id: str, text: str) -> None:
        entry = self._by_item.get(item_id)
        if isinstance(entry, _Message):
            entry.text = text
            self._compact()

    def add_assistant_text(self, item_id: str, text: str) -> None:
        self._put_message(item_id, Role.ASSISTANT, text)

    def add_function_call(self, item_id: str, call_id: str, name: str, arguments: str) -> None:
        """@raise RecordError: ``call_id`` is already recorded under another item."""
        known = self._by_call.get(call_id)
        if known is not None:
            if known.item_id != item_id:
                raise RecordError(f"call_id {call_id!r} is already recorded as item {known.item_id!r}")
            known.name, known.arguments = name, arguments
            return
        self._check_new(item_id)
        entry = _FunctionRound(item_id, call_id, name, arguments)
        self._append(entry)
        self._by_call[call_id] = entry

    def add_function_output(self, item_id: str, call_id: str, output: str) -> None:
        """@raise RecordError: no call ``call_id`` is recorded (and none was forgotten), or it was
        already answered by another item."""
        entry = self._by_call.get(call_id)
        if entry is None:
            if self.forgotten:
                return  # its call may have been compacted away: the output goes with it
            raise RecordError(f"no function call {call_id!r} is recorded")
        if entry.output_item_id not in (None, item_id):
            raise RecordError(f"function call {call_id!r} already has an output")
        if entry.output_item_id is None:
            self._check_new(item_id)
            entry.output_item_id = item_id
            self._by_item[item_id] = entry
        entry.output = output
        self._compact()

    def text_of(self, item_id: str) -> str | None:
        """The recorded text of message ``item_id``, or ``None`` (unknown item, or no text yet)."""
        entry = self._by_item.get(item_id)
        return entry.text if isinstance(entry, _Message) else None

    def remove(self, item_id: str) -> None:
        """Forget an item deleted from the conversation; a function round goes as a whole."""
        entry = self._by_item.get(item_id)
        if entry is None:
            return
        self._entries.remove(entry)
        self._forget(entry)

    # -- reading

    def __len__(self) -> int:
        """Conversation entries held (a function round with its output counts once)."""
        return len(self._entries)

    @property
    def pending_calls(self) -> tuple[str, ...]:
        """Call ids recorded without an output, oldest first."""
        return tuple(
            e.call_id for e in self._entries if isinstance(e, _FunctionRound) and e.output is None
        )

    def replay(self, next_event_id: Callable[[], str]) -> Replay:
        """The events that rebuild the conversation in a new upstream session, within the budget.

        The newest entries are kept; older ones are dropped whole (a function call is never separated
        from its output); messages without text (a user audio turn still without a transcript, a blank
        one) are skipped. When entries had to
        be dropped, the replay starts at the oldest kept user turn, so the model never begins with an
        answer to a question it cannot see (unless no user turn is kept at all). A call that has no
        output yet is replayed alone, so that the output the client sends later finds its call.

        ``next_event_id()`` gives each event's ``event_id``. Item ids are the recorded ones, so the
        session's bookkeeping by item id stays true after the switch.
        """
        kept: list[tuple[_Entry, int, int]] = []  # entry, chars, items
        chars = items = 0
        replayable = [e for e in self._entries if _replayable(e)]
        for entry in reversed(replayable):
            cost, count = self._cost(entry)
            if chars + cost > self.budget.max_chars or items + count > self.budget.max_items:
                break
            kept.append((entry, cost, count))
            chars += cost
            items += count
        kept.reverse()
        if len(kept) < len(replayable) or self.forgotten:
            first_user = next(
                (i for i, (e, _, _) in enumerate(kept)
                 if isinstance(e, _Message) and e.role is Role.USER),
                None,
            )
            if first_user:
                for _, cost, count in kept[:first_user]:
                    chars -= cost
                    items -= count
                kept = kept[first_user:]
        events: list[dict[str, object]] = []
        item_ids: list[str] = []
        for entry, _, _ in kept:
            for event, item_id in self._events(entry, next_event_id):
                events.append(event)
                item_ids.append(item_id)
        return Replay(tuple(events), tuple(item_ids), chars, self.forgotten + len(replayable) - len(kept))

    # -- inside

    def _events(
        self, entry: _Entry, next_event_id: Callable[[], str]
    ) -> Iterator[tuple[dict[str, object], str]]:
        limit = self.budget.max_entry_chars
        if isinstance(entry, _Message):
            assert entry.text is not None
            builder = m.user_text_item if entry.role is Role.USER else m.assistant_text_item
            yield builder(next_event_id(), entry.item_id, _clip(entry.text, limit)), entry.item_id
            return
        yield m.function_call_item(
            next_event_id(), entry.item_id, entry.call_id, _clip(entry.name, limit),
            _clip(entry.arguments, limit),
        ), entry.item_id
        if entry.output is not None and entry.output_item_id is not None:
            yield m.function_call_output_item(
                next_event_id(), entry.output_item_id, entry.call_id, _clip(entry.output, limit)
            ), entry.output_item_id

    def _cost(self, entry: _Entry) -> tuple[int, int]:
        limit = self.budget.max_entry_chars
        if isinstance(entry, _Message):
            return min(len(entry.text or ""), limit), 1
        chars = min(len(entry.name), limit) + min(len(entry.arguments), limit)
        if entry.output is None:
            return chars, 1
        return chars + min(len(entry.output), limit), 2

    def _check_new(self, item_id: str) -> None:
        if item_id in self._by_item:
            raise RecordError(f"item {item_id!r} is already recorded as another kind of item")

    def _put_message(self, item_id: str, role: Role, text: str | None) -> None:
        entry = self._by_item.get(item_id)
        if isinstance(entry, _Message) and entry.role is role:
            entry.text = text
            self._compact()
            return
        self._check_new(item_id)
        self._append(_Message(item_id, role, text))

    def _append(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self._by_item[entry.item_id] = entry
        self._compact()

    def _compact(self) -> None:
        # Forget what no replay could carry any more: every entry older than the newest replayable
        # ones that fill the budget and its reserve (the reserve lets a removal of recent items, as
        # after a barge-in, bring older ones back into reach). Messages without text (a user turn
        # waiting for a transcript that may never come) are kept only among the newest entries.
        entries = self._entries
        max_chars = self.budget.max_chars + _RESERVE_CHARS
        max_items = self.budget.max_items + _RESERVE_ITEMS
        if len(entries) > max_items:
            cutoff = len(entries) - max_items
            stale = [e for e in entries[:cutoff] if not _replayable(e)]
            if stale:
                for entry in stale:
                    self._forget(entry)
                gone = {id(e) for e in stale}
                entries = self._entries = [e for e in entries if id(e) not in gone]
        chars = items = 0
        keep_from = len(entries)
        for index in range(len(entries) - 1, -1, -1):
            entry = entries[index]
            if _replayable(entry):
                cost, count = self._cost(entry)
                if chars + cost > max_chars or items + count > max_items:
                    break
                chars += cost
                items += count
            keep_from = index
        if keep_from == 0:
            return
        for entry in entries[:keep_from]:
            self._forget(entry)
            if _replayable(entry):
                self.forgotten += 1
        del entries[:keep_from]

    def _forget(self, entry: _Entry) -> None:
        self._by_item.pop(entry.item_id, None)
        if isinstance(entry, _FunctionRound):
            self._by_call.pop(entry.call_id, None)
            if entry.output_item_id is not None:
                self._by_item.pop(entry.output_item_id, None)


# -- rollover ----------------------------------------------------------------------------------------


#: OpenAI ends every Realtime session after 60 minutes (GA reference §0, §4).
UPSTREAM_MAX_AGE = 3600.0
#: Default age at which a rollover starts waiting for a quiet moment: 55 minutes.
DEFAULT_ROLLOVER_AFTER = 3300.0
#: Default margin before the upstream's expiry at which a rollover is forced: 2 minutes, room for a
#: switch (connect, configure, replay) and one more attempt if the first one fails.
DEFAULT_FORCE_MARGIN = 120.0


class RolloverAction(enum.Enum):
    """What :meth:`RolloverSchedule.action` asks of the session."""

    #: Not yet.
    NONE = "none"
    #: Past the soft deadline and the session is quiet: roll over now.
    START = "start"
    #: Past the soft deadline, not quiet: roll over at the next quiet moment.
    WAIT_FOR_QUIET = "wait_for_quiet"
    #: Past the hard deadline: roll over now, interrupting what is going on (a reply is cut and
    #: reported as for barge-in; held audio and a pending function call carry over).
    FORCE = "force"


#: The shortest session life (seconds) an ``expires_at`` is believed for (see :meth:`RolloverSchedule.for_session`).
MIN_ANNOUNCED_AGE = 0.5


@dataclass(frozen=True)
class RolloverSchedule:
    """When one upstream session is rolled over (times in seconds of the caller's clock).

    ``opened_at``: when the upstream session was created (``session.created``). ``max_age``: its
    lifetime, 60 minutes, or what ``session.created``'s ``expires_at`` says (see :meth:`for_session`).
    The soft deadline is ``opened_at + rollover_after`` (never later than the hard one); the hard
    deadline is ``opened_at + max_age - force_margin``.

    @raise ValueError: a non-positive or non-finite setting, or a margin that leaves no time.
    """

    opened_at: float
    rollover_after: float = DEFAULT_ROLLOVER_AFTER
    max_age: float = UPSTREAM_MAX_AGE
    force_margin: float = DEFAULT_FORCE_MARGIN

    def __post_init__(self) -> None:
        for name in ("rollover_after", "max_age", "force_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RolloverSchedule.{name}: must be a finite number > 0, got {value!r}")
        if self.force_margin >= self.max_age:
            raise ValueError("RolloverSchedule.force_margin: must be less than max_age")

    @classmethod
    def for_session(
        cls,
        opened_at: float,
        *,
        created_at_wall: float,
        expires_at: float | None,
        rollover_after: float = DEFAULT_ROLLOVER_AFTER,
        force_margin: float = DEFAULT_FORCE_MARGIN,
    ) -> RolloverSchedule:
        """A schedule from ``session.created``: ``expires_at`` (unix seconds, when given and sane) sets
        the lifetime, measured from ``created_at_wall`` (the wall-clock time the event arrived).

        ``rollover_after`` and ``force_margin`` are meant for OpenAI's 60-minute sessions. A session
        announced shorter than that (the simulator's ``--simulator-expire-after``) gets both scaled in
        proportion, so a 10-second session rolls over after about 9.2 s, forced at about 9.7 s.
        """
        max_age = UPSTREAM_MAX_AGE
        # An expiry under half a second away (a clock far off the upstream's, or whole-second rounding)
        # is not believed: it would roll every new session over at once, in a loop.
        if (expires_at is not None and math.isfinite(expires_at)
                and expires_at - created_at_wall >= MIN_ANNOUNCED_AGE):
            max_age = min(expires_at - created_at_wall, UPSTREAM_MAX_AGE)
        scale = max_age / UPSTREAM_MAX_AGE
        return cls(
            opened_at,
            rollover_after=rollover_after * scale,
            max_age=max_age,
            force_margin=min(force_margin * scale, max_age / 2),
        )

    @property
    def hard_deadline(self) -> float:
        return self.opened_at + self.max_age - self.force_margin

    @property
    def soft_deadline(self) -> float:
        return min(self.opened_at + self.rollover_after, self.hard_deadline)

    @property
    def expires_at(self) -> float:
        return self.opened_at + self.max_age

    def action(self, now: float, *, quiet: bool) -> RolloverAction:
        """What to do at ``now``; ``quiet``: no response active, the user not speaking, no function call
        outstanding (SPEC §8)."""
        if now >= self.hard_deadline:
            return RolloverAction.FORCE
        if now >= self.soft_deadline:
            return RolloverAction.START if quiet else RolloverAction.WAIT_FOR_QUIET
        return RolloverAction.NONE

    def next_check(self, now: float) -> float | None:
        """Seconds until the next deadline that changes :meth:`action` (for a timer), or ``None``."""
        for deadline in (self.soft_deadline, self.hard_deadline):
            if now < deadline:
                return deadline - now
        return None


# -- reconnection ------------------------------------------------------------------------------------


class Failure(enum.Enum):
    """How an upstream connection failed, as the relay reports it."""

    #: The TCP connection ended without a closing handshake (reset, dead path): close 1006 at our end.
    CONNECTION_LOST = "connection_lost"
    #: The upstream closed with a close frame (``close_code`` says which).
    CLOSED = "closed"
    #: The upstream sent ``error`` ``session_expired`` (it closes next).
    SESSION_EXPIRED = "session_expired"
    #: WebSocket pings went unanswered.
    PING_TIMEOUT = "ping_timeout"
    #: The opening handshake did not finish in time.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    #: The connection could not be made (DNS, refused, unreachable).
    UNREACHABLE = "unreachable"
    #: The upgrade was refused with an HTTP status (``http_status`` says which).
    REFUSED = "refused"
    #: The upstream's TLS certificate did not verify.
    TLS_FAILED = "tls_failed"


#: Close codes after which reconnecting may help: normal/unasked-for closure, going away, abnormal
#: closure, internal error, service restart, try again later, bad gateway (RFC 6455 §7.4.1, IANA).
RETRYABLE_CLOSE_CODES = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014})
#: HTTP statuses of a refused upgrade after which reconnecting may help: timeouts, rate limits, 5xx.
RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Decision:
    """Whether to reconnect after a failure; if not, the ``code`` the client's ``Error`` carries."""

    retry: bool
    code: str
    reason: str


def classify_failure(
    failure: Failure, *, close_code: int | None = None, http_status: int | None = None
) -> Decision:
    """Which upstream failures are worth a reconnection (SPEC §8, §7).

    Retried: a lost connection, ``session_expired``, a ping or handshake timeout, an unreachable
    upstream, a close with a code of :data:`RETRYABLE_CLOSE_CODES`, a refused upgrade with a status of
    :data:`RETRYABLE_HTTP_STATUSES`. Not retried, because another attempt would meet the same answer:
    401/403 (the key; ``UPSTREAM_AUTH_FAILED``), other refusals (``UPSTREAM_UNAVAILABLE``), a TLS
    failure (``UPSTREAM_TLS_FAILED``), a close for a protocol or policy violation or with an
    application code such as 4000 (``UPSTREAM_CLOSED``).
    """
    if failure is Failure.REFUSED:
        if http_status in (401, 403):
            return Decision(
                False, errors.UPSTREAM_AUTH_FAILED, f"the upstream refused the key (HTTP {http_status})"
            )
        retry = http_status in RETRYABLE_HTTP_STATUSES
        return Decision(
            retry, errors.UPSTREAM_UNAVAILABLE, f"the upstream refused the connection (HTTP {http_status})"
        )
    if failure is Failure.TLS_FAILED:
        return Decision(
            False, errors.UPSTREAM_TLS_FAILED, "the upstream's TLS certificate could not be verified"
        )
    if failure is Failure.CLOSED:
        return Decision(
            close_code in RETRYABLE_CLOSE_CODES,
            errors.UPSTREAM_CLOSED,
            f"the upstream closed the session (code {close_code})",
        )
    return Decision(True, errors.UPSTREAM_CLOSED, f"the upstream connection failed ({failure.value})")


@dataclass(frozen=True)
class BackoffPolicy:
    """Bounded exponential backoff with full jitter.

    Attempt ``n`` (1-based) waits a uniformly random time in ``[0, min(cap, base * 2**(n-1))]``
    seconds ("full jitter": clients that lost the same upstream at the same moment do not come back
    together). At most ``max_attempts`` attempts, and none that would start more than ``max_elapsed``
    seconds after the failure. Defaults: 0.25 s, 8 s, 6 attempts, 30 s.
    """

    base: float = 0.25
    cap: float = 8.0
    max_attempts: int = 6
    max_elapsed: float = 30.0

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap and math.isfinite(self.cap)):
            raise ValueError("BackoffPolicy: 0 < base <= cap, both finite")
        if self.max_attempts < 1 or not (math.isfinite(self.max_elapsed) and self.max_elapsed > 0):
            raise ValueError("BackoffPolicy: max_attempts >= 1 and a finite max_elapsed > 0")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (1-based)."""
        return min(self.cap, self.base * 2 ** min(attempt - 1, 62))


@dataclass
class Reconnection:
    """The attempts after one failure. ``random()`` returns a float in ``[0, 1)`` (``random.random``
    or a seeded generator's); ``started_at`` is the failure's time on the caller's clock.

    Call :meth:`next_delay` before each attempt; ``None`` means give up (``UPSTREAM_CLOSED``).
    """

    policy: BackoffPolicy
    random: Callable[[], float]
    started_at: float
    attempts: int = field(default=0, init=False)

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when attempts are exhausted."""
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = self.random() * self.policy.ceiling(self.attempts + 1)
        if now + delay - self.started_at > self.policy.max_elapsed:
            return None
        self.attempts += 1
        return delay


# -- the switch --------------------------------------------------------------------------------------


#: Seconds a switch may take (connect, configure, replay) before it is abandoned.
DEFAULT_SWITCH_TIMEOUT = 15.0


class SwitchReason(enum.Enum):
    ROLLOVER = "rollover"
    FORCED_ROLLOVER = "forced_rollover"
    RECONNECT = "reconnect"


class SwitchPhase(enum.Enum):
    """Where a :class:`Switch` is. Transitions: CONNECTING → CONFIGURING → REPLAYING → READY, or to
    FAILED from any phase before READY."""

    #: The new upstream connection is being opened.
    CONNECTING = "connecting"
    #: It is open; the current configuration was sent (``session.update``) and waits for
    #: ``session.updated``.
    CONFIGURING = "configuring"
    #: The replay was sent; each item waits for its ``conversation.item.done``.
    REPLAYING = "replaying"
    #: Every replayed item is confirmed (or refused): the session may swap connections now.
    READY = "ready"
    FAILED = "failed"


class SwitchError(RuntimeError):
    """A :class:`Switch` input that its phase does not allow (a bug in the caller)."""


@dataclass
class Switch:
    """One move of the conversation to a new upstream session, as the session drives it.

    The session opens a new upstream connection and calls :meth:`opened` once it is open (then sends
    ``session.update`` with the current configuration), :meth:`configured` with the :class:`Replay` on
    its ``session.updated`` (then sends the replay's events), and :meth:`item_done` for each
    ``conversation.item.done`` (or :meth:`item_refused` for an ``error`` whose ``event_id`` is a replay
    event's: that item is given up, the rest goes on). When :meth:`item_done` returns ``True`` the
    switch is READY: the session swaps connections in one step (the old one closed, held audio and
    held events sent to the new one in order). :meth:`fail` or :meth:`timed_out` end it otherwise.
    """

    reason: SwitchReason
    started_at: float
    timeout: float = DEFAULT_SWITCH_TIMEOUT
    phase: SwitchPhase = field(default=SwitchPhase.CONNECTING, init=False)
    replay: Replay | None = field(default=None, init=False)
    #: Replayed item ids not confirmed yet.
    waiting: set[str] = field(default_factory=set, init=False)
    #: Replayed item ids the new session refused.
    refused: list[str] = field(default_factory=list, init=False)
    failure: str | None = field(default=None, init=False)
    _item_of_event: dict[str, str] = field(default_factory=dict, init=False)

    def _expect(self, *phases: SwitchPhase) -> None:
        if self.phase not in phases:
            raise SwitchError(f"switch is {self.phase.value}, not {' or '.join(p.value for p in phases)}")

    def opened(self) -> None:
        self._expect(SwitchPhase.CONNECTING)
        self.phase = SwitchPhase.CONFIGURING

    def configured(self, replay: Replay) -> bool:
        """The new session is configured; ``replay`` is about to be sent. ``True``: nothing to replay,
        the switch is READY."""
        self._expect(SwitchPhase.CONFIGURING)
        self.replay = replay
        self.waiting = set(replay.item_ids)
        self._item_of_event = {
            str(event["event_id"]): item_id
            for event, item_id in zip(replay.events, replay.item_ids, strict=True)
        }
        self.phase = SwitchPhase.REPLAYING
        return self._settle()

    def item_done(self, item_id: str) -> bool:
        """A ``conversation.item.done`` (items the switch did not send are ignored). ``True`` when the
        switch became READY with it."""
        if self.phase is not SwitchPhase.REPLAYING or item_id not in self.waiting:
            return False
        self.waiting.discard(item_id)
        return self._settle()

    def item_refused(self, event_id: str) -> bool:
        """An ``error`` answering the replay event ``event_id``. ``True`` when the switch became READY."""
        item_id = self._item_of_event.get(event_id)
        if self.phase is not SwitchPhase.REPLAYING or item_id not in self.waiting:
            return False
        self.waiting.discard(item_id)
        self.refused.append(item_id)
        return self._settle()

    def _settle(self) -> bool:
        if not self.waiting:
            self.phase = SwitchPhase.READY
            return True
        return False

    def fail(self, reason: str) -> None:
        """The new connection failed or closed before the swap."""
        if self.phase is not SwitchPhase.READY:
            self.phase = SwitchPhase.FAILED
            self.failure = reason

    def timed_out(self, now: float) -> bool:
        """Whether the switch ran out of time (and is now FAILED)."""
        if self.phase in (SwitchPhase.READY, SwitchPhase.FAILED):
            return False
        if now - self.started_at >= self.timeout:
            self.fail(f"not ready after {self.timeout:g} s ({self.phase.value})")
            return True
        return False

    def deadline(self) -> float:
        return self.started_at + self.timeout

    def duration(self, now: float) -> float:
        return now - self.started_at

    def log_fields(self, now: float) -> dict[str, object]:
        """What the switch's log record says: why, how long, what was replayed."""
        replay = self.replay
        return {
            "switch_reason": self.reason.value,
            "switch_phase": self.phase.value,
            "switch_ms": round(self.duration(now) * 1000),
            "replayed_items": replay.items - len(self.refused) if replay else 0,
            "replayed_chars": replay.chars if replay else 0,
            "dropped_entries": replay.dropped if replay else 0,
            "refused_items": len(self.refused),
        }


class HeldAudio:
    """Client audio held while no upstream session can take it (during a switch), in order and bounded.

    ``max_bytes`` bounds what is held; when more arrives the oldest chunks are dropped whole (a chunk
    larger than the bound keeps its newest ``max_bytes``, rounded down to ``frame_bytes`` so samples
    stay aligned: 2 for pcm16, 1 for G.711). ``dropped_bytes`` counts what was lost.
    """

    def __init__(self, max_bytes: int, frame_bytes: int = 2) -> None:
        if max_bytes < frame_bytes or frame_bytes < 1:
            raise ValueError("HeldAudio: max_bytes >= frame_bytes >= 1")
        self.max_bytes = max_bytes
        self.frame_bytes = frame_bytes
        self._chunks: deque[bytes] = deque()
        self.held_bytes = 0
        self.dropped_bytes = 0

    def append(self, chunk: bytes) -> None:
        if len(chunk) > self.max_bytes:
            keep = self.max_bytes - self.max_bytes % self.frame_bytes
            self.dropped_bytes += len(chunk) - keep + self.held_bytes
            self._chunks.clear()
            self.held_bytes = 0
            chunk = chunk[len(chunk) - keep:]
        self._chunks.append(chunk)
        self.held_bytes += len(chunk)
        while self.held_bytes > self.max_bytes:
            oldest = self._chunks.popleft()
            self.held_bytes -= len(oldest)
            self.dropped_bytes += len(oldest)

    def drain(self) -> list[bytes]:
        """Everything held, oldest first; the hold is empty afterwards (``dropped_bytes`` stays)."""
        chunks = list(self._chunks)
        self._chunks.clear()
        self.held_bytes = 0
        return chunks
