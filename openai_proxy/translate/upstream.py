"""
Upstream JSON event -> a typed OpenAI Realtime GA server event, parsed once at the edge.

Only the events the daemon acts on get a type; every value the daemon uses is checked against the GA
type it must have (``openai.types.realtime``): an id is a string, ``audio_end_ms`` an integer in range,
``delta`` base64 (decoded here, once).  An event that fails the check becomes :class:`Malformed` (the
session logs it and goes on); an event the daemon does not act on becomes :class:`Ignored`.  The rest of
the session core trusts these types and never catches ``KeyError``/``TypeError`` around a handler.
"""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass
from typing import Any

#: The longest ``audio_end_ms`` taken as meaningful: a day of audio.
MAX_AUDIO_MS = 24 * 3600 * 1000
#: The longest upstream string (a message, a code) kept for a log line or a client frame.
MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class Malformed:
    """An event the daemon acts on whose shape is not GA's: logged, otherwise ignored."""

    event_type: str | None
    reason: str


@dataclass(frozen=True)
class Ignored:
    """An event the daemon does not act on (logged at debug)."""

    event_type: str | None


@dataclass(frozen=True)
class SessionCreated:
    """``session.created``: ``expires_at`` is the session's end (unix seconds) when it gives a number."""

    expires_at: float | None


@dataclass(frozen=True)
class SessionUpdated:
    """``session.updated``: answers the oldest ``session.update`` in flight."""


@dataclass(frozen=True)
class UpstreamError:
    """``error``: ``code`` is the upstream's ``error.code`` (else its ``type``, else ``UPSTREAM_ERROR``)."""

    code: str
    message: str
    #: The ``event_id`` of the client event that caused it, when the upstream names one.
    caused_by: str | None


@dataclass(frozen=True)
class SpeechStarted:
    """``input_audio_buffer.speech_started``."""


@dataclass(frozen=True)
class SpeechStopped:
    """``input_audio_buffer.speech_stopped``; ``audio_end_ms`` is ``None`` when the upstream's was unusable."""

    audio_end_ms: int | None


@dataclass(frozen=True)
class Committed:
    """``input_audio_buffer.committed``: the user's spoken turn became conversation item ``item_id``."""

    item_id: str


@dataclass(frozen=True)
class TranscriptionCompleted:
    """``conversation.item.input_audio_transcription.completed``."""

    item_id: str
    transcript: str


@dataclass(frozen=True)
class TranscriptionFailed:
    """``conversation.item.input_audio_transcription.failed``."""

    item_id: str
    code: str
    message: str


@dataclass(frozen=True)
class ItemAdded:
    """``conversation.item.added`` / ``.done`` / ``.created``: the upstream holds item ``item_id``."""

    item_id: str


@dataclass(frozen=True)
class OutputItem:
    """One output item of a response (``response.output_item.*`` or ``response.done``'s ``output``)."""

    item_id: str
    #: ``message``, ``function_call``, or another GA item type.
    item_type: str
    #: ``completed``, ``incomplete``, ``in_progress`` (GA), or ``None`` when absent.
    status: str | None
    role: str | None = None
    #: The assistant text of a message (its first transcript or text part), if any.
    text: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True)
class ResponseDone:
    """``response.done`` with ``status`` (``completed``, ``cancelled``, ``failed``, ``incomplete``)."""

    response_id: str
    status: str
    #: ``status_details.reason`` (e.g. ``max_output_tokens``, ``turn_detected``).
    reason: str | None
    #: ``status_details.error.code`` (else its ``type``) for a failed response.
    error_code: str | None
    error_message: str | None
    output: tuple[OutputItem, ...]


@dataclass(frozen=True)
class OutputItemAdded:
    response_id: str
    item: OutputItem


@dataclass(frozen=True)
class OutputItemDone:
    response_id: str
    item: OutputItem


@dataclass(frozen=True)
class AudioDelta:
    """``response.output_audio.delta`` with its audio decoded (bytes of the session's output format)."""

    response_id: str
    item_id: str
    data: bytes


@dataclass(frozen=True)
class AudioDone:
    response_id: str
    item_id: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of the agent's text (transcript or text delta): its timing, and ``delta`` is kept until
    the item's text is done (a reply cut by an upstream drop is reported with the text it had)."""

    response_id: str
    item_id: str
    delta: str = ""


@dataclass(frozen=True)
class TextDone:
    """``response.output_audio_transcript.done`` / ``response.output_text.done``."""

    response_id: str
    item_id: str
    text: str


@dataclass(frozen=True)
class FunctionArgumentsDone:
    response_id: str
    item_id: str
    call_id: str
    name: str | None
    arguments: str


UpstreamEvent = (
    Malformed | Ignored | SessionUpdated | UpstreamError | SpeechStarted | SpeechStopped | Committed
    | TranscriptionCompleted | TranscriptionFailed | ItemAdded | ResponseCreated | ResponseDone
    | OutputItemAdded | OutputItemDone | AudioDelta | AudioDone | TextDelta | TextDone
    | FunctionArgumentsDone | SessionCreated
)


class _Bad(Exception):
    """A field of the event is not what GA says (internal to this module)."""


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Bad(f"{key} must be a string")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Bad(f"{key} must be a string")
    return value


def _obj(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise _Bad(f"{key} must be an object")
    return value


def _text_or(value: object, default: str) -> str:
    """A string the upstream sent, bounded, or ``default`` when it sent something else."""
    if isinstance(value, str) and value:
        return value[:MAX_TEXT_CHARS]
    return default


def _output_item(raw: object) -> OutputItem:
    if not isinstance(raw, dict):
        raise _Bad("item must be an object")
    item_type = _str(raw, "type")
    text = None
    if item_type == "message":
        content = raw.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    candidate = part.get("transcript") or part.get("text")
                    if isinstance(candidate, str) and candidate:
                        text = candidate
                        break
    return OutputItem(
        item_id=_str(raw, "id"),
        item_type=item_type,
        status=_opt_str(raw, "status"),
        role=_opt_str(raw, "role"),
        text=text,
        call_id=_opt_str(raw, "call_id") if item_type == "function_call" else None,
        name=_opt_str(raw, "name") if item_type == "function_call" else None,
        arguments=_opt_str(raw, "arguments") if item_type == "function_call" else None,
    )


def _error(event: dict[str, Any]) -> UpstreamError:
    error = event.get("error")
    if not isinstance(error, dict):
        raise _Bad("error must be an object")
    code = error.get("code")
    if not (isinstance(code, str) and code):
        code = error.get("type")
    caused_by = error.get("event_id")
    return UpstreamError(
        code=_text_or(code, "UPSTREAM_ERROR")[:100],
        message=_text_or(error.get("message"), "the upstream reported an error"),
        caused_by=caused_by if isinstance(caused_by, str) and caused_by else None,
    )


def _speech_stopped(event: dict[str, Any]) -> SpeechStopped:
    value = event.get("audio_end_ms")
    # bool is an int in Python but not in JSON; NaN/inf/huge values are not GA integers.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_AUDIO_MS:
        return SpeechStopped(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() \
            and 0 <= value <= MAX_AUDIO_MS:
        return SpeechStopped(int(value))
    return SpeechStopped(None)


def _response_done(event: dict[str, Any]) -> ResponseDone:
    response = _obj(event, "response")
    status = _text_or(response.get("status"), "completed")
    details = response.get("status_details")
    reason = error_code = error_message = None
    if isinstance(details, dict):
        reason = details.get("reason") if isinstance(details.get("reason"), str) else None
        error = details.get("error")
        if isinstance(error, dict):
            code = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
            error_code = code[:100] if isinstance(code, str) and code else None
            message = error.get("message")
            error_message = message[:MAX_TEXT_CHARS] if isinstance(message, str) else None
    output: list[OutputItem] = []
    raw_output = response.get("output")
    if isinstance(raw_output, list):
        for raw in raw_output:
            try:
                output.append(_output_item(raw))
            except _Bad:
                continue  # one odd item does not hide the response's end
    return ResponseDone(_str(response, "id"), status, reason, error_code, error_message,
                        tuple(output))


def _audio_delta(event: dict[str, Any]) -> AudioDelta:
    try:
        data = binascii.a2b_base64(_str(event, "delta"), strict_mode=True)
    except binascii.Error as e:
        raise _Bad("delta must be base64") from e
    return AudioDelta(_str(event, "response_id"), _str(event, "item_id"), data)


def _text_done(event: dict[str, Any]) -> TextDone:
    text = event.get("transcript")
    if text is None:
        text = event.get("text")
    if not isinstance(text, str):
        raise _Bad("transcript/text must be a string")
    return TextDone(_str(event, "response_id"), _str(event, "item_id"), text)


def _arguments_done(event: dict[str, Any]) -> FunctionArgumentsDone:
    return FunctionArgumentsDone(
        _str(event, "response_id"), _str(event, "item_id"), _str(event, "call_id"),
        _opt_str(event, "name"), _str(event, "arguments"),
    )


def _transcription_failed(event: dict[str, Any]) -> TranscriptionFailed:
    error = event.get("error")
    if not isinstance(error, dict):
        error = {}
    code = error.get("code") if isinstance(error.get("code"), str) and error.get("code") else error.get("type")
    return TranscriptionFailed(
        _text_or(event.get("item_id"), ""),
        _text_or(code, "transcription_failed")[:100],
        _text_or(error.get("message"), "the transcription failed"),
    )


def _item_added(event: dict[str, Any]) -> ItemAdded:
    return ItemAdded(_str(_obj(event, "item"), "id"))


def _text_delta(event: dict[str, Any]) -> TextDelta:
    delta = event.get("delta")
    return TextDelta(_str(event, "response_id"), _str(event, "item_id"),
                     delta[:MAX_TEXT_CHARS] if isinstance(delta, str) else "")


def _session_created(event: dict[str, Any]) -> SessionCreated:
    session = event.get("session")
    expires = session.get("expires_at") if isinstance(session, dict) else None
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        return SessionCreated(None)
    return SessionCreated(float(expires))


_PARSERS: dict[str, Any] = {
    "session.created": _session_created,
    "session.updated": lambda e: SessionUpdated(),
    "error": _error,
    "input_audio_buffer.speech_started": lambda e: SpeechStarted(),
    "input_audio_buffer.speech_stopped": _speech_stopped,
    "input_audio_buffer.committed": lambda e: Committed(_str(e, "item_id")),
    "conversation.item.input_audio_transcription.completed": lambda e: TranscriptionCompleted(
        _str(e, "item_id"), _str(e, "transcript")),
    "conversation.item.input_audio_transcription.failed": _transcription_failed,
    "conversation.item.added": _item_added,
    "conversation.item.done": _item_added,
    # The beta-era name, still in the SDK's union: accepted as a confirmation too.
    "conversation.item.created": _item_added,
    "response.created": lambda e: ResponseCreated(_str(_obj(e, "response"), "id")),
    "response.done": _response_done,
    "response.output_item.added": lambda e: OutputItemAdded(
        _str(e, "response_id"), _output_item(e.get("item"))),
    "response.output_item.done": lambda e: OutputItemDone(
        _str(e, "response_id"), _output_item(e.get("item"))),
    "response.output_audio.delta": _audio_delta,
    "response.output_audio.done": lambda e: AudioDone(_str(e, "response_id"), _str(e, "item_id")),
    "response.output_audio_transcript.delta": _text_delta,
    "response.output_text.delta": _text_delta,
    "response.output_audio_transcript.done": _text_done,
    "response.output_text.done": _text_done,
    "response.function_call_arguments.done": _arguments_done,
}


def parse_upstream_event(event: dict[str, Any]) -> UpstreamEvent:
    """The typed form of one upstream JSON object; never raises."""
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return Malformed(None, "the event has no string type")
    parser = _PARSERS.get(event_type)
    if parser is None:
        return Ignored(event_type[:100])
    try:
        parsed: UpstreamEvent = parser(event)
    except _Bad as e:
        return Malformed(event_type, str(e))
    return parsed
