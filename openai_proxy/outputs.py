"""
What the session core asks its caller to do (the *outputs*), and the emitter every part of the core
writes them through.

Outputs are frozen values carried out in order by the caller (:mod:`openai_proxy.relay` on the network,
the tests in memory): frames for the client, events for the upstream, timers to start or cancel, closes
and structured log records.  Timers are named by :class:`TimerKey` values, never by strings.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from openai_proxy.endpoint import Endpoint
from openai_proxy.translate import messages as m


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
    """Open an upstream WebSocket for ``model``.

    ``generation`` tags the connection: 0 is the session's first; a later one is a candidate that
    replaces the current connection on :class:`SwapUpstream` (a rollover or a reconnection, SPEC §8).
    Every input from a connection carries its generation back to the session.
    """

    model: str
    generation: int = 0


@dataclass(frozen=True)
class SendUpstream:
    """A GA client event for the upstream (the caller holds it until the upstream is open).

    ``generation``: the connection it is for; ``None``, the current one.
    """

    event: dict[str, Any]
    generation: int | None = None


@dataclass(frozen=True)
class SwapUpstream:
    """Make the connection ``generation`` the current one and close the previous one, in one step."""

    generation: int


@dataclass(frozen=True)
class Count:
    """Add ``amount`` to the daemon-wide counter ``name`` (rollovers, reconnects, replayed items...)."""

    name: str
    amount: int = 1


@dataclass(frozen=True)
class CallFunction:
    """Call a server-side function's endpoint; answer with ``Session.function_result``."""

    call_id: str
    name: str
    arguments: str
    endpoint: Endpoint


class TimerKind(enum.Enum):
    """What a session timer is for."""

    #: A partial batch of input audio waits for more (``APPEND_FLUSH_SECONDS``).
    APPEND_FLUSH = "append-flush"
    #: A function-call round waits for its response to end (``function_call_timeout``).
    FUNCTION_FOLLOWUP = "function-followup"
    #: A requested, active or cancelled response waits for the upstream (``response_timeout``).
    RESPONSE_WATCHDOG = "response-watchdog"
    #: A ``session.update`` waits for its answer (``response_timeout``).
    UPDATE_WATCHDOG = "update-watchdog"
    #: The upstream session's next rollover deadline (soft, then hard; SPEC §8).
    ROLLOVER = "rollover"
    #: The wait before the next reconnection attempt (backoff).
    RECONNECT = "reconnect"
    #: A switch to a new upstream session must be ready by then.
    SWITCH_TIMEOUT = "switch-timeout"


@dataclass(frozen=True)
class TimerKey:
    """A timer's name: its kind and, for per-round timers, the key of what it watches."""

    kind: TimerKind
    key: str = ""


@dataclass(frozen=True)
class StartTimer:
    """Start (or restart) the timer ``name``; when it fires, call ``Session.timer_fired(name)``."""

    name: Hashable
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    name: Hashable


@dataclass(frozen=True)
class CloseClient:
    code: int
    reason: str


@dataclass(frozen=True)
class CloseUpstream:
    """Close an upstream connection: ``generation``, or every one when ``None``."""

    generation: int | None = None


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
    | SwapUpstream
    | Count
    | Log
)


class Emitter:
    """
    Collects one input's outputs in order; the parts of the session core write only through it.

    It also owns the session's event ids (``<prefix>_<request id prefix>_<n>``) and the set of running
    timers.
    """

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._out: list[Output] = []
        self._seq = 0
        self.timers: set[Hashable] = set()
        #: While not ``None``, upstream events are kept here instead of sent (during a switch).
        self.held_upstream: list[dict[str, Any]] | None = None

    def flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}_{self._request_id[:8]}_{self._seq}"

    def emit(self, output: Output) -> None:
        self._out.append(output)

    def client(self, message: dict[str, Any]) -> None:
        self._out.append(SendClient(message))

    def audio(self, data: bytes) -> None:
        self._out.append(SendClientAudio(data))

    def upstream(self, event: dict[str, Any]) -> None:
        if self.held_upstream is not None:
            self.held_upstream.append(event)
        else:
            self._out.append(SendUpstream(event))

    def upstream_to(self, generation: int, event: dict[str, Any]) -> None:
        """An event for the connection ``generation`` (never held)."""
        self._out.append(SendUpstream(event, generation))

    def log(self, level: str, fmt: str, **fields: Any) -> None:
        self._out.append(Log(level, fmt, fields))

    def error(self, code: str, description: str) -> None:
        """An ``Error`` for the client (SPEC §7), logged at info."""
        self.client(m.error(code, description))
        self.log("info", "client error {error_code}: {description}", error_code=code,
                 description=description)

    def warning(self, code: str, description: str) -> None:
        """A ``Warning`` for the client (SPEC §7), logged at info."""
        self.client(m.warning(code, description))
        self.log("info", "client warning {error_code}: {description}", error_code=code,
                 description=description)

    def start_timer(self, name: Hashable, seconds: float) -> None:
        self.timers.add(name)
        self._out.append(StartTimer(name, seconds))

    def cancel_timer(self, name: Hashable) -> None:
        if name in self.timers:
            self.timers.discard(name)
            self._out.append(CancelTimer(name))

    def cancel_all_timers(self) -> None:
        for name in sorted(self.timers, key=repr):
            self.cancel_timer(name)
