"""
Client text frame -> a typed Deepgram Voice Agent v1 message, parsed once at the edge (SPEC §4).

JSON is read strictly: ``NaN``, ``Infinity`` and numbers that overflow to infinity (``1e999``) are not
JSON (RFC 8259) and are refused, and nesting too deep for the parser is refused, both as
``UNPARSABLE_CLIENT_MESSAGE``.  A frame that parses but is not a message the daemon knows, or whose
fields have the wrong type, becomes a :class:`ClientMessageError` with a stable code.  The shapes that
need the session's configuration (``Settings``, ``UpdateSpeak``, ``UpdateThink``, ``UpdateListen``) keep
their object for :mod:`openai_proxy.translate.settings`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from openai_proxy import errors


@dataclass(frozen=True)
class ClientMessageError:
    """A frame that is no usable message: the client gets ``Error {code, description}``."""

    code: str
    description: str


@dataclass(frozen=True)
class Settings:
    message: dict[str, Any]


@dataclass(frozen=True)
class UpdatePrompt:
    prompt: str


@dataclass(frozen=True)
class UpdateSpeak:
    speak: object


@dataclass(frozen=True)
class UpdateThink:
    think: object


@dataclass(frozen=True)
class UpdateListen:
    listen: object


@dataclass(frozen=True)
class InjectUserMessage:
    content: str


@dataclass(frozen=True)
class InjectAgentMessage:
    message: str
    #: ``default`` (refused while busy), ``queue`` or ``interrupt``.
    behavior: str


@dataclass(frozen=True)
class FunctionCallResponse:
    call_id: str
    content: str


@dataclass(frozen=True)
class KeepAlive:
    pass


ClientMessage = (
    Settings | UpdatePrompt | UpdateSpeak | UpdateThink | UpdateListen | InjectUserMessage
    | InjectAgentMessage | FunctionCallResponse | KeepAlive
)


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"the number {text[:32]} is too large for JSON")
    return value


def loads_strict(text: str) -> Any:
    """
    ``json.loads`` as RFC 8259 reads JSON: raises :class:`ValueError` for ``NaN``/``Infinity``, numbers
    that overflow a double, and nesting deeper than the parser can follow.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise _NotJSON("it is nested too deeply") from None


def _error(code: str, description: str) -> ClientMessageError:
    return ClientMessageError(code, description)


def _invalid(description: str) -> ClientMessageError:
    return ClientMessageError(errors.INVALID_CLIENT_MESSAGE, description)


def _inject_user(message: dict[str, Any]) -> ClientMessage | ClientMessageError:
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return _invalid("InjectUserMessage.content must be a non-empty string")
    return InjectUserMessage(content)


def _inject_agent(message: dict[str, Any]) -> ClientMessage | ClientMessageError:
    text = message.get("message")
    if not isinstance(text, str) or not text:
        return _invalid("InjectAgentMessage.message must be a non-empty string")
    behavior = message.get("behavior", "default")
    if behavior not in ("default", "queue", "interrupt"):
        return _invalid("InjectAgentMessage.behavior must be 'default', 'queue' or 'interrupt'")
    return InjectAgentMessage(text, behavior)


def _update_prompt(message: dict[str, Any]) -> ClientMessage | ClientMessageError:
    prompt = message.get("prompt")
    if not isinstance(prompt, str):
        return _invalid("UpdatePrompt.prompt must be a string")
    return UpdatePrompt(prompt)


def _function_call_response(message: dict[str, Any]) -> ClientMessage | ClientMessageError:
    call_id = message.get("id")
    content = message.get("content")
    if not isinstance(call_id, str) or not call_id:
        return _invalid("FunctionCallResponse.id must be the id of the FunctionCallRequest")
    if not isinstance(content, str):
        return _invalid("FunctionCallResponse.content must be a string")
    return FunctionCallResponse(call_id, content)


_PARSERS: dict[str, Any] = {
    "Settings": Settings,
    "UpdatePrompt": _update_prompt,
    "UpdateSpeak": lambda m: UpdateSpeak(m.get("speak")),
    "UpdateThink": lambda m: UpdateThink(m.get("think")),
    "UpdateListen": lambda m: UpdateListen(m.get("listen")),
    "InjectUserMessage": _inject_user,
    "InjectAgentMessage": _inject_agent,
    "FunctionCallResponse": _function_call_response,
    "KeepAlive": lambda m: KeepAlive(),
}


def parse_client_message(text: str) -> ClientMessage | ClientMessageError:
    """The typed message of one client text frame; never raises."""
    try:
        message = loads_strict(text)
    except _NotJSON as e:
        return _error(errors.UNPARSABLE_CLIENT_MESSAGE, f"the message is not valid JSON: {e}")
    except ValueError:
        return _error(errors.UNPARSABLE_CLIENT_MESSAGE, "the message is not valid JSON")
    if not isinstance(message, dict):
        return _error(errors.UNPARSABLE_CLIENT_MESSAGE, "the message is not a JSON object")
    message_type = message.get("type")
    if not isinstance(message_type, str):
        return _error(errors.UNPARSABLE_CLIENT_MESSAGE, "the message has no string 'type' field")
    parser = _PARSERS.get(message_type)
    if parser is None:
        return _error(errors.UNSUPPORTED_CLIENT_MESSAGE,
                      f"message type {message_type[:64]!r} is not supported")
    parsed: ClientMessage | ClientMessageError = parser(message)
    return parsed
