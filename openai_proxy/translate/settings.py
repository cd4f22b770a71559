"""
Deepgram ``Settings`` (and the ``Update*`` messages) → OpenAI GA session configuration.

Pure functions: they validate a client's message and return plain data, raising :class:`SettingsError`
(naming the offending field) for anything the daemon cannot honour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from openai_proxy.audio import (
    ClientAudioFormat,
    UnsupportedAudioFormat,
    parse_input_format,
    parse_output_format,
    upstream_format_for,
)
from openai_proxy.config import OPENAI_VOICES
from openai_proxy.endpoint import Endpoint, EndpointError, parse_endpoint, url_allowed
from openai_proxy.jsonshape import type_name

#: OpenAI function names: letters, digits, underscores and dashes, at most 64.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: ISO-639-1 language code at the start of a BCP-47 tag such as ``en-US``.
_LANGUAGE = re.compile(r"^([A-Za-z]{2})(?:[-_][A-Za-z0-9]+)*$")


class SettingsError(ValueError):
    """A client message field the daemon cannot accept."""

    def __init__(self, field_path: str, description: str) -> None:
        super().__init__(f"{field_path}: {description}")
        self.field = field_path
        self.description = f"{field_path}: {description}"


@dataclass(frozen=True)
class Function:
    """One function the agent may call (a Deepgram think function / an OpenAI tool)."""

    name: str
    description: str | None
    parameters: Mapping[str, Any] | None
    #: Set for a server-side function: the daemon calls this endpoint itself.
    endpoint: Endpoint | None = None

    def as_tool(self) -> dict[str, Any]:
        """The GA ``session.tools[]`` entry."""
        tool: dict[str, Any] = {"type": "function", "name": self.name}
        if self.description is not None:
            tool["description"] = self.description
        tool["parameters"] = (
            dict(self.parameters)
            if self.parameters is not None
            else {"type": "object", "properties": {}}
        )
        return tool


@dataclass(frozen=True)
class HistoryEntry:
    """One ``agent.context.messages[]`` element, already validated."""

    role: str | None = None
    content: str | None = None
    #: For function-call history: (id, name, arguments, response) tuples.
    function_calls: tuple[tuple[str, str, str, str], ...] = ()


@dataclass(frozen=True)
class SessionPlan:
    """What a Settings message asks for, in the daemon's terms."""

    model: str
    #: The model the client named when the daemon replaced it (reported with one Warning).
    replaced_model: str | None
    instructions: str
    functions: tuple[Function, ...]
    voice: str
    speed: float | None
    language: str | None
    input_format: ClientAudioFormat
    output_format: ClientAudioFormat
    greeting: str | None
    history: tuple[HistoryEntry, ...] = ()
    history_messages: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def upstream_input_format(self) -> dict[str, Any]:
        return upstream_format_for(self.input_format)

    @property
    def upstream_output_format(self) -> dict[str, Any]:
        return upstream_format_for(self.output_format)

    def with_prompt_appended(self, prompt: str) -> SessionPlan:
        """Deepgram's ``UpdatePrompt`` appends to the prompt instead of replacing it."""
        instructions = f"{self.instructions}\n{prompt}" if self.instructions else prompt
        return replace(self, instructions=instructions)


# -- small typed accessors ------------------------------------------------------------------------


def _object(value: Any, path: str, *, required: bool = False) -> dict[str, Any] | None:
    if value is None:
        if required:
            raise SettingsError(path, "is required")
        return None
    if not isinstance(value, dict):
        raise SettingsError(path, f"must be an object, got {type_name(value)}")
    return value


def _string(value: Any, path: str, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise SettingsError(path, "is required")
        return None
    if not isinstance(value, str):
        raise SettingsError(path, f"must be a string, got {type_name(value)}")
    return value


def _number(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(path, f"must be a number, got {type_name(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits is JSON, but no usable number
        raise SettingsError(path, "is out of range") from None


def _bool(value: Any, path: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise SettingsError(path, f"must be a boolean, got {type_name(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SettingsError(path, f"must be an array, got {type_name(value)}")
    return value


def _first(value: Any, path: str) -> tuple[dict[str, Any] | None, str]:
    """Deepgram accepts one provider block or an ordered list of fallbacks; the first one is used."""
    if isinstance(value, list):
        if not value:
            return None, path
        return _object(value[0], f"{path}[0]"), f"{path}[0]"
    return _object(value, path), path


# -- think / speak / listen ----------------------------------------------------------------------


def parse_functions(
    value: Any, path: str, url_prefixes: Sequence[str] = ()
) -> tuple[Function, ...]:
    """
    ``think.functions[]`` → tools.  A function with an ``endpoint`` runs server-side: it is accepted only
    when its URL lies inside one of the operator's ``url_prefixes``.
    """
    functions: list[Function] = []
    seen: set[str] = set()
    for index, raw in enumerate(_list(value, path)):
        item_path = f"{path}[{index}]"
        item = _object(raw, item_path, required=True)
        assert item is not None
        name = _string(item.get("name"), f"{item_path}.name", required=True)
        assert name is not None
        if not _FUNCTION_NAME.match(name):
            raise SettingsError(
                f"{item_path}.name",
                f"{name!r} is not a valid function name (letters, digits, _ and -, at most 64)",
            )
        if name in seen:
            raise SettingsError(f"{item_path}.name", f"function {name!r} is declared twice")
        seen.add(name)
        description = _string(item.get("description"), f"{item_path}.description")
        parameters = _object(item.get("parameters"), f"{item_path}.parameters")
        endpoint = None
        if item.get("endpoint") is not None:
            if not url_prefixes:
                raise SettingsError(
                    f"{item_path}.endpoint",
                    "server-side functions (with an endpoint) are not enabled on this daemon; "
                    "declare the function without an endpoint and answer its FunctionCallRequest",
                )
            try:
                endpoint = parse_endpoint(item["endpoint"])
            except EndpointError as e:
                raise SettingsError(f"{item_path}.endpoint.{e.field}", e.description) from None
            if not url_allowed(endpoint.url, url_prefixes):
                raise SettingsError(
                    f"{item_path}.endpoint.url",
                    "this URL is not in the daemon's allow-list for server-side functions",
                )
        functions.append(Function(name, description, parameters, endpoint))
    return tuple(functions)


@dataclass(frozen=True)
class ThinkPlan:
    model: str | None
    prompt: str | None
    functions: tuple[Function, ...] | None


def parse_think(value: Any, path: str, url_prefixes: Sequence[str] = ()) -> ThinkPlan:
    """``agent.think`` (or ``UpdateThink.think``): provider model, prompt and functions."""
    think, think_path = _first(value, path)
    if think is None:
        return ThinkPlan(None, None, None)
    provider = _object(think.get("provider"), f"{think_path}.provider")
    model = None
    if provider is not None:
        _string(provider.get("type"), f"{think_path}.provider.type")
        model = _string(provider.get("model"), f"{think_path}.provider.model")
        # temperature is accepted and not forwarded: GA rejects it.
        _number(provider.get("temperature"), f"{think_path}.provider.temperature")
    if think.get("endpoint") is not None:
        raise SettingsError(
            f"{think_path}.endpoint",
            "a custom think endpoint is not supported: the daemon thinks with OpenAI Realtime",
        )
    prompt = _string(think.get("prompt"), f"{think_path}.prompt")
    functions = (
        parse_functions(think.get("functions"), f"{think_path}.functions", url_prefixes)
        if "functions" in think
        else None
    )
    return ThinkPlan(model, prompt, functions)


@dataclass(frozen=True)
class SpeakPlan:
    voice: str | None
    speed: float | None


def parse_speak(value: Any, path: str) -> SpeakPlan:
    """``agent.speak`` (or ``UpdateSpeak.speak``): an ``open_ai`` voice and a speed, when present."""
    speak, speak_path = _first(value, path)
    if speak is None:
        return SpeakPlan(None, None)
    provider = _object(speak.get("provider"), f"{speak_path}.provider")
    if provider is None:
        return SpeakPlan(None, None)
    provider_type = _string(provider.get("type"), f"{speak_path}.provider.type")
    voice = None
    if provider_type == "open_ai":
        named = _string(provider.get("voice"), f"{speak_path}.provider.voice")
        if named is not None and named.lower() in OPENAI_VOICES:
            voice = named.lower()
    speed = _number(provider.get("speed"), f"{speak_path}.provider.speed")
    if speed is not None and not 0.25 <= speed <= 1.5:
        raise SettingsError(f"{speak_path}.provider.speed", "must be between 0.25 and 1.5")
    return SpeakPlan(voice, speed)


def parse_language(value: Any, path: str) -> str | None:
    """A Deepgram language tag (``en``, ``en-US``) → ISO-639-1 (``en``); ``multi`` → no hint."""
    language = _string(value, path)
    if language is None or language.lower() in ("multi", ""):
        return None
    match = _LANGUAGE.match(language)
    if not match:
        raise SettingsError(path, f"{language!r} is not a language tag such as 'en' or 'en-US'")
    return match.group(1).lower()


def parse_listen_language(value: Any, path: str) -> str | None:
    listen = _object(value, path)
    if listen is None:
        return None
    provider = _object(listen.get("provider"), f"{path}.provider")
    if provider is None:
        return None
    language = parse_language(provider.get("language"), f"{path}.provider.language")
    if language is None:
        hints = _list(provider.get("language_hints"), f"{path}.provider.language_hints")
        if hints:
            language = parse_language(hints[0], f"{path}.provider.language_hints[0]")
    return language


def parse_history(value: Any, path: str) -> tuple[HistoryEntry, ...]:
    """``agent.context.messages[]``: conversation history the model sees (never echoed)."""
    entries: list[HistoryEntry] = []
    for index, raw in enumerate(_list(value, path)):
        item_path = f"{path}[{index}]"
        item = _object(raw, item_path, required=True)
        assert item is not None
        if "function_calls" in item:
            calls = []
            for call_index, raw_call in enumerate(
                _list(item.get("function_calls"), f"{item_path}.function_calls")
            ):
                call_path = f"{item_path}.function_calls[{call_index}]"
                call = _object(raw_call, call_path, required=True)
                assert call is not None
                calls.append(
                    (
                        _string(call.get("id"), f"{call_path}.id", required=True) or "",
                        _string(call.get("name"), f"{call_path}.name", required=True) or "",
                        _string(call.get("arguments"), f"{call_path}.arguments") or "{}",
                        _string(call.get("response"), f"{call_path}.response") or "",
                    )
                )
            entries.append(HistoryEntry(function_calls=tuple(calls)))
            continue
        role = _string(item.get("role"), f"{item_path}.role", required=True)
        if role not in ("user", "assistant"):
            raise SettingsError(f"{item_path}.role", f"must be 'user' or 'assistant', got {role!r}")
        content = _string(item.get("content"), f"{item_path}.content", required=True)
        entries.append(HistoryEntry(role=role, content=content))
    return tuple(entries)


def parse_settings(
    message: Mapping[str, Any],
    *,
    default_model: str,
    model_allowed: Callable[[str], bool],
    default_voice: str,
    function_url_prefixes: Sequence[str] = (),
) -> SessionPlan:
    """
    Validate a Deepgram ``Settings`` message and return the :class:`SessionPlan` it asks for.

    @raise SettingsError: naming the first field that is of the wrong type or not supported.
    """
    agent_raw = message.get("agent")
    if isinstance(agent_raw, str):
        raise SettingsError(
            "agent",
            "stored agent configurations (an agent id string) are not supported; "
            "send the agent object",
        )
    agent = _object(agent_raw, "agent", required=True)
    assert agent is not None
    audio = _object(message.get("audio"), "audio") or {}
    flags = _object(message.get("flags"), "flags") or {}
    history_flag = _bool(flags.get("history"), "flags.history")

    try:
        input_format = parse_input_format(audio.get("input"))
        output_format = parse_output_format(audio.get("output"))
    except UnsupportedAudioFormat as e:
        raise SettingsError(e.field, _strip_field(e.description, e.field)) from None

    think = parse_think(agent.get("think"), "agent.think", function_url_prefixes)
    speak = parse_speak(agent.get("speak"), "agent.speak")
    language = parse_listen_language(agent.get("listen"), "agent.listen")
    if language is None:
        language = parse_language(agent.get("language"), "agent.language")
    context = _object(agent.get("context"), "agent.context") or {}
    history = parse_history(context.get("messages"), "agent.context.messages")
    greeting = _string(agent.get("greeting"), "agent.greeting")
    if agent.get("think_live") is not None:
        raise SettingsError(
            "agent.think_live",
            "Deepgram's Think Live is not supported: the daemon thinks with OpenAI Realtime; "
            "use agent.think",
        )

    model, replaced = choose_model(think.model, default_model, model_allowed)
    return SessionPlan(
        model=model,
        replaced_model=replaced,
        instructions=think.prompt or "",
        functions=think.functions or (),
        voice=speak.voice or default_voice,
        speed=speak.speed,
        language=language,
        input_format=input_format,
        output_format=output_format,
        greeting=greeting or None,
        history=history,
        history_messages=True if history_flag is None else history_flag,
    )


def _strip_field(description: str, field_path: str) -> str:
    """Drop a leading copy of the field path; :class:`SettingsError` puts it back in front once."""
    if description.startswith(field_path):
        return description[len(field_path):].lstrip(": ")
    return description


def choose_model(
    requested: str | None, default_model: str, model_allowed: Callable[[str], bool]
) -> tuple[str, str | None]:
    """The realtime model to use, and the client's request when it was replaced."""
    if requested is None:
        return default_model, None
    if model_allowed(requested):
        return requested, None
    return default_model, requested


# -- the GA session object -------------------------------------------------------------------------


def session_config(
    plan: SessionPlan, *, transcription_model: str, include_voice: bool = True
) -> dict[str, Any]:
    """The full GA ``session`` object of a ``session.update`` for ``plan``."""
    transcription: dict[str, Any] = {"model": transcription_model}
    if plan.language:
        transcription["language"] = plan.language
    output: dict[str, Any] = {"format": plan.upstream_output_format}
    if include_voice:
        output["voice"] = plan.voice
    if plan.speed is not None:
        output["speed"] = plan.speed
    return {
        "type": "realtime",
        "instructions": plan.instructions,
        "tools": [f.as_tool() for f in plan.functions],
        "audio": {
            "input": {
                "format": plan.upstream_input_format,
                "transcription": transcription,
                "turn_detection": {
                    "type": "server_vad",
                    "create_response": True,
                    "interrupt_response": True,
                },
            },
            "output": output,
        },
    }


def session_changes(
    old: SessionPlan, new: SessionPlan, *, transcription_model: str
) -> dict[str, Any]:
    """
    The GA ``session`` object carrying only what differs between two plans (always ``type``).

    The model and the audio formats of a running session cannot change; callers refuse those first.
    """
    changes: dict[str, Any] = {"type": "realtime"}
    if new.instructions != old.instructions:
        changes["instructions"] = new.instructions
    if new.functions != old.functions:
        changes["tools"] = [f.as_tool() for f in new.functions]
    output: dict[str, Any] = {}
    if new.voice != old.voice:
        output["voice"] = new.voice
    if new.speed != old.speed and new.speed is not None:
        output["speed"] = new.speed
    if output:
        changes.setdefault("audio", {})["output"] = output
    if new.language != old.language:
        transcription: dict[str, Any] = {"model": transcription_model}
        if new.language:
            transcription["language"] = new.language
        changes.setdefault("audio", {})["input"] = {"transcription": transcription}
    return changes


def verbatim_instructions(text: str) -> str:
    """Per-response instructions that make the model say ``text`` word for word."""
    return (
        "Say exactly the following text, word for word, and nothing else. "
        f'Do not answer it or add anything before or after it: "{text}"'
    )


# -- fields the daemon does not know ---------------------------------------------------------------

_ANY = None  # a subtree whose fields are not checked (provider-specific, free-form)
_FUNCTION: dict[str, Any] = {
    "name": _ANY, "description": _ANY, "parameters": _ANY, "endpoint": _ANY,
    "defer_until_eot": _ANY, "initial_agent_filler": _ANY, "agent_filler_max_count": _ANY,
    "agent_filler_interval_ms": _ANY,
}
_THINK: dict[str, Any] = {
    "provider": _ANY, "endpoint": _ANY, "functions": [_FUNCTION], "prompt": _ANY,
    "context_length": _ANY,
}
_SPEAK: dict[str, Any] = {"provider": _ANY, "endpoint": _ANY}
#: The Deepgram Voice Agent v1 ``Settings`` field tree (the API's spec and the SDKs' models).
SETTINGS_FIELDS: dict[str, Any] = {
    "type": _ANY, "tags": _ANY, "experimental": _ANY, "mip_opt_out": _ANY,
    "flags": {"history": _ANY},
    "audio": {
        "input": {"encoding": _ANY, "sample_rate": _ANY},
        "output": {"encoding": _ANY, "sample_rate": _ANY, "bitrate": _ANY, "container": _ANY},
    },
    "agent": {
        "language": _ANY, "context": {"messages": _ANY}, "listen": {"provider": _ANY},
        "think": (_THINK, [_THINK]), "think_live": _ANY, "speak": (_SPEAK, [_SPEAK]),
        "greeting": _ANY,
    },
}
#: Where a misplaced or early-access field belongs in v1.
_HINTS = {
    "greeting": "agent.greeting",
    "agent.mip_opt_out": "mip_opt_out",
    "agent.think.instructions": "agent.think.prompt",
    "agent.think.model": "agent.think.provider.model",
    "agent.listen.model": "agent.listen.provider.model",
    "agent.speak.model": "agent.speak.provider.model",
    "agent.prompt": "agent.think.prompt",
    "agent.functions": "agent.think.functions",
    "context": "agent.context.messages",
}
#: At most this many ignored fields are reported for one message.
MAX_IGNORED_REPORTED = 16


def _unknown_fields(value: object, shape: Any, path: str, found: list[str]) -> None:
    if shape is _ANY or len(found) > MAX_IGNORED_REPORTED:
        return
    if isinstance(shape, tuple):  # an object or a list of them
        _unknown_fields(value, shape[1] if isinstance(value, list) else shape[0], path, found)
        return
    if isinstance(shape, list):
        if isinstance(value, list):
            for index, element in enumerate(value):
                _unknown_fields(element, shape[0], f"{path}[{index}]", found)
        return
    if not isinstance(value, dict):
        return
    for key, child in value.items():
        child_path = f"{path}.{key}" if path else str(key)
        if key in shape:
            _unknown_fields(child, shape[key], child_path, found)
        else:
            found.append(child_path)


def ignored_settings_fields(message: Mapping[str, Any]) -> list[str]:
    """
    The paths of the fields of a ``Settings`` message that are not Deepgram v1 settings (misplaced,
    misspelled, early-access names), each with where it belongs when that is known; at most
    :data:`MAX_IGNORED_REPORTED`.  Source: the v1 ``Settings`` schema (SPEC §4).
    """
    found: list[str] = []
    _unknown_fields(dict(message), SETTINGS_FIELDS, "", found)
    # A path is the client's own text: bounded, so a giant key cannot make a giant Warning.
    return [p if len(p) <= 200 else p[:197] + "..." for p in found[:MAX_IGNORED_REPORTED]]


def ignored_field_hint(path: str) -> str | None:
    """Where ``path`` belongs in Deepgram v1, when it is a known misplacement."""
    return _HINTS.get(re.sub(r"\[\d+\]", "", path))
