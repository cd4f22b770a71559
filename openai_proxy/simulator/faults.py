"""Faults the simulated upstream can inject: connections that drop at a chosen point.

A :class:`DropRule` says *when* a simulated session's connection drops and *how*:

* when: ``after`` seconds of the simulator's clock once ``session.created`` was sent, or at the
  ``nth`` occurrence of an ``event`` type. A **server** event type (``response.output_audio.delta``)
  drops the connection right after that event was sent; a **client** event type
  (``session.update``, ``conversation.item.create``) drops it on receipt, before the event is acted
  on. The two sets of GA type names do not overlap, so one ``event`` key serves both.
* how: ``close=abort`` (the default) ends the TCP connection without a closing handshake, which the
  peer's WebSocket library reports as 1006 (abnormal closure), like a reset or a dead network path;
  ``close=CODE`` sends a close frame with that code (1011 internal error, 1001 going away, 1012
  service restart, …) and closes after the peer's answer; ``close=hang`` leaves the connection open
  but silent: nothing more is sent and nothing more is read, so the peer's pings go unanswered (a
  dead upstream that only a ping timeout can detect). The simulator aborts a hung connection after
  ``SimulatorFactory.hang_seconds`` (60 s) so that it holds no dead socket itself.
* which sessions: every one, only the ``session``-th one the simulator opened (1-based, in order
  of opening), so that a test can drop a connection once and let the reconnection live, or
  ``every``-th one (the sessions whose number is a multiple of it), for soaks.

Rules are written on the command line as comma-separated ``key=value`` pairs, e.g.::

    after=5                                     every session drops (TCP abort) 5 s after it opened
    event=response.output_audio.delta,nth=3    abort at the 3rd audio delta of every session
    event=session.update,close=1011,session=1   the first session closes 1011 on its first update
    event=response.created,every=10             every 10th session aborts at its first response

Session expiry is separate: it is the real API's own behaviour (an ``error`` ``session_expired``,
then a close), only sooner; see ``SimulatorFactory(max_session_seconds=...)``.

This module is pure (no Twisted); :mod:`.server` applies the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DropRule", "FaultSpecError", "SENDABLE_CLOSE_CODES", "parse_drop_rule"]

#: Close codes a drop may send in a close frame: RFC 6455 §7.4.1 codes a server sends when it ends a
#: connection (1000 normal, 1001 going away, 1008 policy, 1011 internal error, 1012 service restart,
#: 1013 try again later), plus the application range 3000-4999 (checked separately). 1006 is never
#: sent on the wire: ``close=abort`` is how a peer gets to see it.
SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013})

_KEYS = ("after", "event", "nth", "close", "session", "every")


class FaultSpecError(ValueError):
    """A fault specification that cannot be understood; ``str(error)`` names the key and the problem."""


@dataclass(frozen=True)
class DropRule:
    """When and how one simulated connection drops (see the module docstring).

    Exactly one of ``after`` (seconds, > 0) and ``event`` (a GA event type) is set. ``nth`` (>= 1)
    counts occurrences of ``event`` within one session. ``close`` is ``None`` for a TCP abort, else
    the close code to send; ``hang`` (with ``close`` ``None``) silences the connection instead.
    ``session`` is ``None`` for every session, else the 1-based ordinal of
    the one session the rule applies to; ``every`` (not with ``session``) limits it to the sessions
    whose ordinal is a multiple of ``every``.
    """

    after: float | None = None
    event: str | None = None
    nth: int = 1
    close: int | None = None
    session: int | None = None
    every: int | None = None
    hang: bool = False

    def __post_init__(self) -> None:
        if (self.after is None) == (self.event is None):
            raise FaultSpecError("a drop needs exactly one of after=SECONDS or event=TYPE")
        if self.after is not None and not (math.isfinite(self.after) and self.after > 0):
            raise FaultSpecError(f"after: must be > 0 seconds, got {self.after!r}")
        if self.event is not None and (not self.event or not _is_event_type(self.event)):
            raise FaultSpecError(f"event: {self.event!r} is not an event type")
        if self.nth < 1:
            raise FaultSpecError(f"nth: must be >= 1, got {self.nth!r}")
        if self.close is not None and not (
            self.close in SENDABLE_CLOSE_CODES or 3000 <= self.close <= 4999
        ):
            raise FaultSpecError(
                f"close: {self.close!r} cannot be sent in a close frame (use abort for 1006; "
                f"one of {', '.join(map(str, sorted(SENDABLE_CLOSE_CODES)))} or 3000-4999)"
            )
        if self.hang and self.close is not None:
            raise FaultSpecError("close: hang or a code, not both")
        if self.session is not None and self.session < 1:
            raise FaultSpecError(f"session: must be >= 1, got {self.session!r}")
        if self.every is not None and self.every < 1:
            raise FaultSpecError(f"every: must be >= 1, got {self.every!r}")
        if self.every is not None and self.session is not None:
            raise FaultSpecError("session and every do not go together")

    def applies_to(self, ordinal: int) -> bool:
        """Whether the rule holds for the ``ordinal``-th session the simulator opened (1-based)."""
        if self.every is not None:
            return ordinal % self.every == 0
        return self.session is None or self.session == ordinal

    @property
    def manner(self) -> str:
        """``"abort"``, ``"hang"`` or ``"close CODE"`` (for logs)."""
        if self.hang:
            return "hang"
        return "abort" if self.close is None else f"close {self.close}"

    def describe(self) -> str:
        """The rule in the command-line syntax :func:`parse_drop_rule` reads."""
        parts = [f"after={self.after!r}"] if self.after is not None else [f"event={self.event}"]
        if self.event is not None and self.nth != 1:
            parts.append(f"nth={self.nth}")
        parts.append(f"close={self.close}" if self.close is not None else f"close={self.manner}")
        if self.session is not None:
            parts.append(f"session={self.session}")
        if self.every is not None:
            parts.append(f"every={self.every}")
        return ",".join(parts)


def _is_event_type(name: str) -> bool:
    # GA event types are dotted lower-case words: "response.output_audio.delta".
    return all(part and part.replace("_", "").isalpha() and part.islower() for part in name.split("."))


def _integer(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FaultSpecError(f"{key}: expected an integer, got {value!r}") from None


def parse_drop_rule(spec: str) -> DropRule:
    """Read one drop rule: comma-separated ``key=value`` pairs with the keys ``after``, ``event``,
    ``nth``, ``close`` (``abort``, ``hang`` or a code), ``session`` and ``every``.

    @raise FaultSpecError: an unknown or repeated key, a malformed value, or an impossible rule.
    """
    values: dict[str, str] = {}
    for pair in spec.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise FaultSpecError(f"{pair!r}: expected key=value")
        if key not in _KEYS:
            raise FaultSpecError(f"{key!r}: unknown key (one of {', '.join(_KEYS)})")
        if key in values:
            raise FaultSpecError(f"{key}: given twice")
        values[key] = value
    after: float | None = None
    if "after" in values:
        try:
            after = float(values["after"])
        except ValueError:
            raise FaultSpecError(f"after: expected seconds, got {values['after']!r}") from None
    close: int | None = None
    manner = values.get("close", "abort")
    if manner not in ("abort", "hang"):
        close = _integer("close", manner)
    if "nth" in values and "event" not in values:
        raise FaultSpecError("nth: only with event=TYPE")
    return DropRule(
        after=after,
        event=values.get("event"),
        nth=_integer("nth", values["nth"]) if "nth" in values else 1,
        close=close,
        session=_integer("session", values["session"]) if "session" in values else None,
        every=_integer("every", values["every"]) if "every" in values else None,
        hang=manner == "hang",
    )
