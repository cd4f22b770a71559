"""Strict validation of OpenAI Realtime (GA) events against the ``openai`` package's types.

The real API refuses a whole client event when any part of it is wrong, and says why with a
structured ``code`` and a dotted ``param`` (``unknown_parameter`` / ``session.voice``). The SDK's
pydantic models are lenient in exactly the ways that hid bugs before: they allow extra fields,
coerce ``"100"`` to ``100`` and treat the tagged unions as untagged, which yields noisy,
order-dependent errors. So validation is done in two passes:

1. A walk over the SDK type annotations that dispatches tagged unions on ``type``, treats every
   unknown key as an error (client events only) and names the failing field the way the API does.
2. The SDK models themselves (``pydantic`` ``TypeAdapter``, ``strict=True``), so nothing the SDK
   rejects is ever accepted, whatever the first pass missed.

A few limits that the types do not express (ranges, the 15 MiB append limit, one output modality)
are checked after both passes. This is the only module of the project that imports ``openai``.
"""

from __future__ import annotations

import functools
import inspect
import operator
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from openai.types.realtime.conversation_item import ConversationItem
from openai.types.realtime.realtime_response_create_params import (
    RealtimeResponseCreateParams,
)
from openai.types.realtime.response_item_reference import ResponseItemReference
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

__all__ = [
    "MAX_APPEND_AUDIO_CHARS",
    "ClientEventError",
    "ServerEventError",
    "validate_client_event",
    "validate_server_event",
]

#: ``input_audio_buffer.append`` carries at most 15 MiB per event.
MAX_APPEND_AUDIO_CHARS = 15 * 1024 * 1024


class ClientEventError(Exception):
    """A client event the real API would refuse, with the API's own error fields.

    ``code`` is one of the API's codes (``unknown_parameter``, ``missing_required_parameter``,
    ``invalid_value``, ``invalid_type``, ``integer_above_max_value``, ...), ``param`` the dotted
    path of the offending field relative to the event (``session.audio.output.voice``,
    ``item.content[0].type``), or ``None`` when the event as a whole is wrong.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        # Kept so that failures of several union members can be merged into one
        # "Supported values are ..." message.
        self.value: object = None
        self.allowed: tuple[object, ...] = ()

    def __repr__(self) -> str:
        return f"ClientEventError({self.code!r}, {self.message!r}, param={self.param!r})"


class ServerEventError(ValueError):
    """A server event that does not match the GA server event types."""


def _union_of(members: tuple[Any, ...]) -> Any:
    return functools.reduce(operator.or_, members)


def _tagged(union: object) -> Any:
    """Re-wrap an SDK-tagged union as a union pydantic really discriminates on ``type``."""
    return typing.Annotated[_union_of(get_args(get_args(union)[0])), Field(discriminator="type")]


_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(_tagged(RealtimeClientEvent))
_SERVER_ADAPTER: TypeAdapter[Any] = TypeAdapter(_tagged(RealtimeServerEvent))
_CLIENT_EVENT_TYPES: tuple[Any, ...] = get_args(get_args(RealtimeClientEvent)[0])
_SERVER_EVENT_TYPES: tuple[Any, ...] = get_args(get_args(RealtimeServerEvent)[0])

# The SDK's model union for ``response.create.response.input`` lacks ``item_reference``, which the
# API accepts there (and only there).
_RESPONSE_INPUT: Any = _union_of(get_args(get_args(ConversationItem)[0]) + (ResponseItemReference,))
_FIELD_OVERRIDES: dict[tuple[type, str], Any] = {
    (RealtimeResponseCreateParams, "input"): list[_RESPONSE_INPUT] | None,  # type: ignore[valid-type]
}


# --------------------------------------------------------------------------- messages


def _quote(value: object) -> str:
    return f"'{value}'"


def _join_values(values: tuple[object, ...]) -> str:
    quoted = [_quote(v) for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _unknown(param: str) -> ClientEventError:
    return ClientEventError("unknown_parameter", f"Unknown parameter: {_quote(param)}.", param)


def _missing(param: str) -> ClientEventError:
    return ClientEventError(
        "missing_required_parameter", f"Missing required parameter: {_quote(param)}.", param
    )


def _bad_type(param: str, expected: str, value: object) -> ClientEventError:
    return ClientEventError(
        "invalid_type",
        f"Invalid type for {_quote(param or 'event')}: expected {expected}, "
        f"but got {_describe(value)} instead.",
        param or None,
    )


def _bad_value(param: str, value: object, allowed: tuple[object, ...]) -> ClientEventError:
    error = ClientEventError(
        "invalid_value",
        f"Invalid value: {_quote(value)}. Supported values are: {_join_values(allowed)}.",
        param or None,
    )
    error.value = value
    error.allowed = allowed
    return error


# --------------------------------------------------------------------------- the walk


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_model(annotation: object) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    members: list[Any] = []
    for member in get_args(annotation):
        member = _strip(member)
        if get_origin(member) in (Union, types.UnionType):
            members.extend(_union_members(member))
        else:
            members.append(member)
    return members


def _type_tags(model: type[BaseModel]) -> tuple[object, ...] | None:
    """The literal values a model's ``type`` field accepts, or None if it has no such field."""
    field = model.model_fields.get("type")
    if field is None:
        return None
    tags: list[object] = []
    for member in [_strip(field.annotation)] + _union_members(_strip(field.annotation)):
        if get_origin(member) is Literal:
            tags.extend(get_args(member))
    return tuple(tags) or None


_EXPECTED = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _check(value: object, annotation: Any, path: str, allow_extra: bool) -> None:
    annotation = _strip(annotation)
    origin = get_origin(annotation)
    if annotation is Any or annotation is object:
        return
    if annotation is type(None):
        if value is not None:
            raise _bad_type(path, "null", value)
        return
    if origin in (Union, types.UnionType):
        _check_union(value, _union_members(annotation), path, allow_extra)
        return
    if origin is Literal:
        allowed = get_args(annotation)
        if any(type(value) is type(a) and value == a for a in allowed):
            return
        kinds = {type(a) for a in allowed}
        if len(kinds) == 1 and not isinstance(value, tuple(kinds)):
            raise _bad_type(path, _EXPECTED.get(kinds.pop(), "a constant"), value)
        raise _bad_value(path, value, allowed)
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise _bad_type(path, "an array", value)
        (item_type,) = get_args(annotation) or (Any,)
        for index, item in enumerate(value):
            _check(item, item_type, f"{path}[{index}]", allow_extra)
        return
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _bad_type(path, "an object", value)
        key_type, value_type = get_args(annotation) or (Any, Any)
        for key, item in value.items():
            _check(key, key_type, path, allow_extra)
            _check(item, value_type, _join(path, str(key)), allow_extra)
        return
    if _is_model(annotation):
        _check_model(value, annotation, path, allow_extra)
        return
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is str:
        ok = isinstance(value, str)
    else:  # a type the SDK does not use today: leave it to pydantic
        return
    if not ok:
        raise _bad_type(path, _EXPECTED[annotation], value)


def _check_model(value: object, model: type[BaseModel], path: str, allow_extra: bool) -> None:
    if not isinstance(value, dict):
        raise _bad_type(path, "an object", value)
    fields = model.model_fields
    if not allow_extra:
        for key in value:
            if key not in fields:
                raise _unknown(_join(path, str(key)))
    # Constant-valued fields ("type", "role") first, so that a union member which does not fit
    # fails early and shallowly, and the member that does fit reports the deeper, telling error.
    ordered = sorted(
        fields.items(), key=lambda kv: get_origin(_strip(kv[1].annotation)) is not Literal
    )
    for name, field in ordered:
        if name not in value:
            if field.is_required():
                raise _missing(_join(path, name))
            continue
        annotation = _FIELD_OVERRIDES.get((model, name), field.annotation)
        _check(value[name], annotation, _join(path, name), allow_extra)


def _check_union(value: object, members: list[Any], path: str, allow_extra: bool) -> None:
    if (value is None and type(None) in members) or object in members or Any in members:
        return
    members = [m for m in members if m is not type(None)]
    models = [m for m in members if _is_model(m)]
    others = [m for m in members if not _is_model(m)]
    if isinstance(value, dict) and models:
        tagged = [(m, _type_tags(m)) for m in models]
        if len(models) > 1 and all(tags is not None for _, tags in tagged):
            # A tagged union: dispatch on "type" like the API does (which, unlike the SDK
            # types, needs "type" even where one member could do without it).
            if "type" not in value:
                raise _missing(_join(path, "type"))
            tag = value["type"]
            candidates = [m for m, tags in tagged if tags and tag in tags]
            if not candidates:
                every_tag: list[object] = []
                for _, tags in tagged:
                    every_tag.extend(t for t in tags or () if t not in every_tag)
                if not isinstance(tag, str):
                    raise _bad_type(_join(path, "type"), "a string", tag)
                raise _bad_value(_join(path, "type"), tag, tuple(every_tag))
        else:
            candidates = models
    elif isinstance(value, dict) and not any(get_origin(m) is dict for m in others):
        candidates = models
        if not candidates:
            raise _bad_type(path, _expected_of(others), value)
    else:
        candidates = [m for m in others if not _is_model(m)]
        if not candidates:
            raise _bad_type(path, "an object", value)
    errors: list[ClientEventError] = []
    for candidate in candidates:
        try:
            _check(value, candidate, path, allow_extra)
            return
        except ClientEventError as error:
            errors.append(error)
    raise _best(errors)


def _expected_of(members: list[Any]) -> str:
    for member in members:
        if member in _EXPECTED:
            return _EXPECTED[member]
        if get_origin(member) is list:
            return "an array"
    return "a constant"


def _best(errors: list[ClientEventError]) -> ClientEventError:
    """Pick the most telling failure among a union's members."""
    if len(errors) == 1:
        return errors[0]
    params = {e.param for e in errors}
    if len(params) == 1 and all(e.code == "invalid_value" and e.allowed for e in errors):
        # e.g. a message role that fits none of system/user/assistant: name every supported value.
        allowed: list[object] = []
        for error in errors:
            allowed.extend(a for a in error.allowed if a not in allowed)
        return _bad_value(errors[0].param or "", errors[0].value, tuple(allowed))
    # The member that got furthest before failing is the one the sender meant.
    deepest = max(len(e.param or "") for e in errors)
    furthest = [e for e in errors if len(e.param or "") == deepest]
    typed = [e for e in furthest if e.code != "invalid_type"]
    return (typed or furthest)[0]


# --------------------------------------------------------------------------- limits

_RANGES: dict[str, tuple[float, float]] = {
    "session.max_output_tokens": (1, 4096),
    "response.max_output_tokens": (1, 4096),
    "session.audio.output.speed": (0.25, 1.5),
    "session.audio.input.turn_detection.threshold": (0.0, 1.0),
    "session.audio.input.turn_detection.prefix_padding_ms": (0, 10_000),
    "session.audio.input.turn_detection.silence_duration_ms": (0, 10_000),
    "session.audio.input.turn_detection.idle_timeout_ms": (0, 3_600_000),
    "session.audio.input.noise_reduction.strength": (0.0, 1.0),
    "audio_end_ms": (0, 2**31 - 1),
    "content_index": (0, 2**31 - 1),
}


def _leaves(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, _join(path, str(key)))
    else:
        yield path, value


def _check_limits(event: dict[str, Any]) -> None:
    for path, value in _leaves(event):
        bounds = _RANGES.get(path)
        if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = bounds
        kind = "integer" if isinstance(value, int) else "decimal"
        if value < low:
            raise ClientEventError(
                f"{kind}_below_min_value",
                f"Invalid {_quote(path)}: {kind} below minimum value. "
                f"Expected a value >= {low:g}, but got {value} instead.",
                path,
            )
        if value > high:
            raise ClientEventError(
                f"{kind}_above_max_value",
                f"Invalid {_quote(path)}: {kind} above maximum value. "
                f"Expected a value <= {high:g}, but got {value} instead.",
                path,
            )
    for scope in ("session", "response"):
        config = event.get(scope)
        if not isinstance(config, dict):
            continue
        modalities = config.get("output_modalities")
        if isinstance(modalities, list) and len(modalities) != 1:
            raise ClientEventError(
                "invalid_value",
                f"Invalid modalities: {modalities}. Supported combinations are: "
                "['text'] and ['audio'].",
                f"{scope}.output_modalities",
            )
        metadata = config.get("metadata")
        if isinstance(metadata, dict):
            if len(metadata) > 16:
                raise ClientEventError(
                    "object_above_max_properties",
                    f"Invalid '{scope}.metadata': too many properties. Expected an object "
                    f"with at most 16 properties, but got an object with {len(metadata)} "
                    "properties instead.",
                    f"{scope}.metadata",
                )
            for key, item in metadata.items():
                if len(key) > 64 or (isinstance(item, str) and len(item) > 512):
                    raise ClientEventError(
                        "string_above_max_length",
                        f"Invalid '{scope}.metadata.{key}': string too long.",
                        f"{scope}.metadata.{key}",
                    )
    audio = event.get("audio")
    is_append = event.get("type") == "input_audio_buffer.append"
    if is_append and isinstance(audio, str) and len(audio) > MAX_APPEND_AUDIO_CHARS:
        raise ClientEventError(
            "string_above_max_length",
            "Invalid 'audio': string too long. Expected a string with maximum length "
            f"{MAX_APPEND_AUDIO_CHARS}, but got a string with length {len(audio)} instead.",
            "audio",
        )


# --------------------------------------------------------------------------- public API


def _without_item_references(event: dict[str, Any]) -> dict[str, Any]:
    """A copy pydantic can take: the SDK model union lacks ``item_reference``."""
    response = event.get("response")
    if event.get("type") != "response.create" or not isinstance(response, dict):
        return event
    items = response.get("input")
    if not isinstance(items, list):
        return event
    kept = [i for i in items if not (isinstance(i, dict) and i.get("type") == "item_reference")]
    return {**event, "response": {**response, "input": kept}}


_TYPE_NAMES = frozenset(("str", "int", "float", "bool", "list", "dict", "none"))


def _is_union_member_name(part: str) -> bool:
    """Whether a pydantic location part names a union member rather than a field."""
    return (
        "." in part
        or part[:1].isupper()
        or part.startswith(("literal[", "function-"))
        or part in _TYPE_NAMES
    )


def _pydantic_param(error: dict[str, Any]) -> str | None:
    """Turn a pydantic location into the API's dotted path, dropping union member names."""
    path = ""
    for part in error["loc"][1:]:  # the first part is the event's tag
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_union_member_name(part):
            path = _join(path, part)
    return path or None


def validate_client_event(event: object) -> None:
    """Validate one client->server event strictly against ``openai.types.realtime`` GA types.

    Raises ClientEventError with the real API's codes: unknown or beta-shaped fields give
    ``unknown_parameter`` with ``param`` such as ``session.voice``; a missing ``session.type`` gives
    ``missing_required_parameter`` with ``param`` ``session.type``; an unknown event type or a bad
    enum value gives ``invalid_value``; a wrong JSON type (``"100"`` for an integer, ``100.0`` for
    ``audio_end_ms``) gives ``invalid_type``. Ranges the types do not express give the API's range
    codes (``integer_above_max_value`` ...), and an append over 15 MiB gives
    ``string_above_max_length``.
    """
    if not isinstance(event, dict):
        raise _bad_type("", "an object", event)
    _check_union(event, list(_CLIENT_EVENT_TYPES), "", allow_extra=False)
    try:
        _CLIENT_ADAPTER.validate_python(_without_item_references(event), strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ClientEventError(
            "invalid_value", str(first["msg"]), _pydantic_param(dict(first))
        ) from None
    _check_limits(event)


def validate_server_event(event: object) -> None:
    """Validate one server->client event against the GA server event types, leniently.

    Extra fields are allowed (the real API adds some, e.g. ``obfuscation`` on transcript deltas),
    but the event type must be one of the GA union and every declared field must have the declared
    shape and JSON type. Raises ServerEventError.
    """
    if not isinstance(event, dict):
        raise ServerEventError(f"a server event must be a JSON object, not {_describe(event)}")
    try:
        _check_union(event, list(_SERVER_EVENT_TYPES), "", allow_extra=True)
    except ClientEventError as error:
        raise ServerEventError(f"{event.get('type')}: {error.message}") from None
    try:
        _SERVER_ADAPTER.validate_python(event, strict=True)
    except ValidationError as exc:
        raise ServerEventError(f"{event.get('type')}: {exc}") from None
