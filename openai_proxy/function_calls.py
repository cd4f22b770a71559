"""
Function-call rounds (SPEC §4, §5): the calls one response asked for, their outputs, and the follow-up
``response.create``.

A call is requested from the client (``FunctionCallRequest``) only once its item completed with
arguments that parse as JSON: a call cut off by barge-in (``output_item.done`` ``incomplete``, or a
response that ended without completing it) is dropped and logged, never half-sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from openai_proxy.endpoint import Endpoint
from openai_proxy.outputs import CallFunction, Emitter, TimerKey, TimerKind
from openai_proxy.recent import RecentIds
from openai_proxy.translate import messages as m
from openai_proxy.translate.client import loads_strict


@dataclass
class CallRound:
    """The function calls one response asked for, and their outputs."""

    response_id: str
    call_ids: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    arguments: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    #: Calls the daemon runs itself (functions with an endpoint).
    server_side: set[str] = field(default_factory=set)
    output_items: dict[str, str] = field(default_factory=dict)
    response_ended: bool = False

    @property
    def timer(self) -> TimerKey:
        return TimerKey(TimerKind.FUNCTION_FOLLOWUP, self.response_id)

    @property
    def answered(self) -> bool:
        return len(self.outputs) >= len(self.call_ids)


def arguments_parse(arguments: str) -> bool:
    """Whether ``arguments`` is strict JSON (a cut-off ``{"city":"Pa`` is not)."""
    try:
        loads_strict(arguments)
    except ValueError:
        return False
    return True


#: Recently requested call ids remembered, so that a late duplicate of a call's done event requests
#: nothing (the set must not grow with the session).
RECENT_CALL_IDS = 64


class FunctionCalls:
    """Every round of one session, by the id of the response that asked."""

    def __init__(self, emitter: Emitter, timeout: float) -> None:
        self._emit = emitter
        self.timeout = timeout
        self.rounds: dict[str, CallRound] = {}
        self._by_call: dict[str, str] = {}
        #: call_id -> (response_id, name, arguments) of calls whose item has not completed yet.
        self._pending: dict[str, tuple[str, str, str]] = {}
        #: Calls already requested (recent ones: a late duplicate done requests nothing).
        self._requested = RecentIds(RECENT_CALL_IDS)

    def arguments_done(self, response_id: str, call_id: str, name: str | None,
                       arguments: str) -> None:
        if call_id not in self._requested:
            self._pending[call_id] = (response_id, name or "", arguments or "{}")

    def item_done(self, call_id: str | None, status: str | None, name: str | None,
                  arguments: str | None, endpoint_of: Callable[[str], Endpoint | None]) -> None:
        """The call's item ended with ``status``; request it when it completed with parsable arguments."""
        if call_id is None or call_id in self._requested:
            return
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return
        response_id, pending_name, pending_arguments = pending
        name = pending_name or name or ""
        arguments = pending_arguments if arguments is None else (arguments or "{}")
        if status not in (None, "completed"):
            self._emit.log("info", "function call {call_id} ended {status}; not requested",
                           call_id=call_id, status=status)
            return
        if not name or not arguments_parse(arguments):
            self._emit.log("warn", "function call {call_id} has arguments that are not JSON; "
                           "not requested", call_id=call_id)
            return
        self._request(response_id, call_id, name, arguments, endpoint_of(name))

    def _request(self, response_id: str, call_id: str, name: str, arguments: str,
                 endpoint: Endpoint | None) -> None:
        self._requested.add(call_id)
        round_ = self.rounds.setdefault(response_id, CallRound(response_id))
        round_.call_ids.append(call_id)
        round_.names[call_id] = name
        round_.arguments[call_id] = arguments
        self._by_call[call_id] = response_id
        if endpoint is not None:
            round_.server_side.add(call_id)
            self._emit.client(m.function_call_request(call_id, name, arguments, client_side=False))
            self._emit.emit(CallFunction(call_id, name, arguments, endpoint))
        else:
            self._emit.client(m.function_call_request(call_id, name, arguments))

    def response_ended(self, response_id: str, completed: dict[str, tuple[str | None, str | None]],
                       endpoint_of: Callable[[str], Endpoint | None]) -> CallRound | None:
        """
        The response ended; ``completed`` maps the call ids of its completed call items to their
        ``(name, arguments)``.  Calls never completed are dropped.  Returns its round, if any.
        """
        for call_id, (pending_response, _, _) in list(self._pending.items()):
            if pending_response != response_id:
                continue
            if call_id in completed:
                name, arguments = completed[call_id]
                self.item_done(call_id, "completed", name, arguments, endpoint_of)
            else:
                self._pending.pop(call_id)
                self._emit.log("info", "function call {call_id} was cut off; not requested",
                               call_id=call_id)
        round_ = self.rounds.get(response_id)
        if round_ is not None:
            round_.response_ended = True
        return round_

    def waiting_round(self, call_id: str) -> CallRound | None:
        response_id = self._by_call.get(call_id)
        round_ = self.rounds.get(response_id) if response_id else None
        if round_ is None or call_id in round_.outputs:
            return None
        return round_

    def ready(self, round_: CallRound) -> bool:
        """Whether the round may be followed up now; starts its timeout while its response runs."""
        if not round_.answered:
            return False
        if not round_.response_ended:
            if round_.timer not in self._emit.timers:
                self._emit.start_timer(round_.timer, self.timeout)
            return False
        self._emit.cancel_timer(round_.timer)
        del self.rounds[round_.response_id]
        for call_id in round_.call_ids:
            self._by_call.pop(call_id, None)
        return True

    def history(self, round_: CallRound) -> list[dict[str, object]]:
        return [
            {
                "id": call_id,
                "name": round_.names[call_id],
                "client_side": call_id not in round_.server_side,
                "arguments": round_.arguments[call_id],
                "response": round_.outputs[call_id],
            }
            for call_id in round_.call_ids
        ]


__all__ = ["CallRound", "FunctionCalls", "arguments_parse"]
