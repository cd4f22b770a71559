"""
Constructors for the messages the daemon sends: Deepgram v1 messages to the client and GA events upstream.

Keeping every wire shape here means one place to read when checking a shape against a schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

# -- Deepgram v1, daemon → client -----------------------------------------------------------------


def welcome(request_id: str) -> dict[str, Any]:
    return {"type": "Welcome", "request_id": request_id}


def simple(message_type: str) -> dict[str, Any]:
    """Messages without fields: SettingsApplied, PromptUpdated, UserStartedSpeaking, AgentAudioDone …"""
    return {"type": message_type}


def error(code: str, description: str) -> dict[str, Any]:
    return {"type": "Error", "description": description, "code": code}


def warning(code: str, description: str) -> dict[str, Any]:
    return {"type": "Warning", "description": description, "code": code}


def conversation_text(role: str, content: str) -> dict[str, Any]:
    return {"type": "ConversationText", "role": role, "content": content}


def history_text(role: str, content: str) -> dict[str, Any]:
    return {"type": "History", "role": role, "content": content}


def history_function_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "History", "function_calls": calls}


def function_call_request(
    call_id: str, name: str, arguments: str, *, client_side: bool = True
) -> dict[str, Any]:
    return {
        "type": "FunctionCallRequest",
        "functions": [
            {"id": call_id, "name": name, "arguments": arguments, "client_side": client_side}
        ],
    }


def function_call_response(call_id: str, name: str, content: str) -> dict[str, Any]:
    """What a server-side function answered (Deepgram shows it to the client)."""
    return {"type": "FunctionCallResponse", "id": call_id, "name": name, "content": content}


def agent_started_speaking(total: float, tts: float, ttt: float) -> dict[str, Any]:
    return {
        "type": "AgentStartedSpeaking",
        "total_latency": round(total, 4),
        "tts_latency": round(tts, 4),
        "ttt_latency": round(ttt, 4),
    }


def utterance_end(last_word_end: float) -> dict[str, Any]:
    # Compatibility extra read by deepgram-voice-interaction-react; not a v1 message.
    return {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last_word_end}


def injection_refused(message: str) -> dict[str, Any]:
    return {"type": "InjectionRefused", "message": message}


# -- OpenAI GA, daemon → upstream -----------------------------------------------------------------


def session_update(event_id: str, session: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session.update", "event_id": event_id, "session": session}


def input_audio_append(event_id: str, audio_b64: str) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "event_id": event_id, "audio": audio_b64}


_APPEND_HEAD = b'{"type":"input_audio_buffer.append","event_id":"'
_APPEND_KEYS = ("type", "event_id", "audio")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def encode_event(event: dict[str, Any]) -> bytes:
    """The compact JSON text of a GA client event, as UTF-8.

    ``input_audio_buffer.append`` (50 a second per session) is built from a bytes template rather
    than by ``json.dumps``, which would scan every character of the base64 audio for escapes; the
    result is the same bytes.  Its ``event_id`` and ``audio`` never need escaping: the daemon makes
    the id from hex digits, letters and ``_`` (any other id goes through ``json.dumps``), and base64
    has no character JSON escapes.
    """
    if (
        event.get("type") == "input_audio_buffer.append"
        and tuple(event) == _APPEND_KEYS
        and _PLAIN_ID.fullmatch(event["event_id"])
    ):
        return b"".join(
            (_APPEND_HEAD, event["event_id"].encode("ascii"), b'","audio":"',
             event["audio"].encode("ascii"), b'"}')
        )
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _item_create(event_id: str, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "conversation.item.create", "event_id": event_id, "item": item}


def user_text_item(event_id: str, item_id: str, text: str) -> dict[str, Any]:
    return _item_create(
        event_id,
        {
            "id": item_id,
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    )


def assistant_text_item(event_id: str, item_id: str, text: str) -> dict[str, Any]:
    return _item_create(
        event_id,
        {
            "id": item_id,
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text}],
        },
    )


def function_call_item(
    event_id: str, item_id: str, call_id: str, name: str, arguments: str
) -> dict[str, Any]:
    return _item_create(
        event_id,
        {
            "id": item_id,
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
        },
    )


def function_call_output_item(
    event_id: str, item_id: str, call_id: str, output: str
) -> dict[str, Any]:
    return _item_create(
        event_id,
        {
            "id": item_id,
            "type": "function_call_output",
            "call_id": call_id,
            "output": output,
        },
    )


def response_create(event_id: str, instructions: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
    if instructions is not None:
        event["response"] = {"instructions": instructions}
    return event


def response_cancel(event_id: str) -> dict[str, Any]:
    return {"type": "response.cancel", "event_id": event_id}


def item_truncate(event_id: str, item_id: str, audio_end_ms: int) -> dict[str, Any]:
    return {
        "type": "conversation.item.truncate",
        "event_id": event_id,
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": int(audio_end_ms),
    }


def item_delete(event_id: str, item_id: str) -> dict[str, Any]:
    return {"type": "conversation.item.delete", "event_id": event_id, "item_id": item_id}
