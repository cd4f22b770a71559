"""Tests for strict GA client-event validation and lenient server-event validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from openai_proxy.simulator.validation import (
    MAX_APPEND_AUDIO_CHARS,
    ClientEventError,
    ServerEventError,
    validate_client_event,
    validate_server_event,
)

# Frames captured from the real GA API: one server-VAD turn and a refused response.create.
CAPTURE = Path(__file__).parent / "data" / "openai-ga-capture.jsonl"

USER_TEXT = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
FULL_SESSION: dict[str, Any] = {
    "type": "realtime",
    "model": "gpt-realtime",
    "instructions": "Be brief.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "noise_reduction": {"type": "near_field"},
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
                "create_response": True,
                "interrupt_response": True,
            },
        },
        "output": {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.0},
    },
    "tools": [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather for a place.",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        }
    ],
    "tool_choice": "auto",
    "max_output_tokens": 4096,
    "tracing": None,
    "truncation": {"type": "retention_ratio", "retention_ratio": 0.8},
}
# One valid example of every GA client event.
VALID_EVENTS: list[dict[str, Any]] = [
    {"type": "session.update", "event_id": "e1", "session": FULL_SESSION},
    {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
    },
    {"type": "input_audio_buffer.append", "audio": "AAAA"},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "conversation.item.create", "item": USER_TEXT},
    {
        "type": "conversation.item.create",
        "previous_item_id": "root",
        "item": {**USER_TEXT, "id": "item_1"},
    },
    {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": "call_1", "output": "{}"},
    },
    {"type": "conversation.item.retrieve", "item_id": "item_1"},
    {
        "type": "conversation.item.truncate",
        "item_id": "item_1",
        "content_index": 0,
        "audio_end_ms": 1500,
    },
    {"type": "conversation.item.delete", "item_id": "item_1"},
    {"type": "response.create"},
    {
        "type": "response.create",
        "response": {
            "conversation": "none",
            "output_modalities": ["text"],
            "instructions": "Classify.",
            "metadata": {"topic": "classify"},
            "input": [{"type": "item_reference", "id": "item_1"}, USER_TEXT],
            "audio": {"output": {"voice": "alloy", "format": {"type": "audio/pcma"}}},
            "max_output_tokens": "inf",
        },
    },
    {"type": "response.cancel"},
    {"type": "response.cancel", "response_id": "resp_1"},
    {"type": "output_audio_buffer.clear"},
]


def refusal(event: object) -> ClientEventError:
    try:
        validate_client_event(event)
    except ClientEventError as error:
        return error
    raise AssertionError(f"accepted: {event!r}")


class ClientEventTests(unittest.TestCase):
    def assertRefused(self, event: object, code: str, param: str | None) -> ClientEventError:
        error = refusal(event)
        self.assertEqual((error.code, error.param), (code, param), error.message)
        return error

    def test_every_valid_event_passes(self) -> None:
        for event in VALID_EVENTS:
            validate_client_event(copy.deepcopy(event))

    def test_beta_fields_are_unknown_parameters(self) -> None:
        error = self.assertRefused(
            {"type": "session.update", "session": {"type": "realtime", "voice": "alloy"}},
            "unknown_parameter",
            "session.voice",
        )
        self.assertEqual(error.message, "Unknown parameter: 'session.voice'.")
        for field in (
            "modalities",
            "turn_detection",
            "temperature",
            "input_audio_format",
            "max_response_output_tokens",
        ):
            self.assertRefused(
                {"type": "session.update", "session": {"type": "realtime", field: None}},
                "unknown_parameter",
                f"session.{field}",
            )
        self.assertRefused(
            {"type": "response.create", "response": {"voice": "alloy"}},
            "unknown_parameter",
            "response.voice",
        )

    def test_unknown_fields_are_found_at_any_depth(self) -> None:
        self.assertRefused(
            {"type": "input_audio_buffer.commit", "extra": 1}, "unknown_parameter", "extra"
        )
        deep = copy.deepcopy(FULL_SESSION)
        deep["audio"]["input"]["turn_detection"]["min_speech_ms"] = 100
        self.assertRefused(
            {"type": "session.update", "session": deep},
            "unknown_parameter",
            "session.audio.input.turn_detection.min_speech_ms",
        )
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "x", "lang": "en"}],
        }
        self.assertRefused(
            {"type": "conversation.item.create", "item": item},
            "unknown_parameter",
            "item.content[0].lang",
        )
        self.assertRefused(
            {
                "type": "response.create",
                "response": {"input": [{"type": "item_reference", "id": "i", "x": 1}]},
            },
            "unknown_parameter",
            "response.input[0].x",
        )
        tools = [{"type": "function", "name": "f", "strict": True}]
        self.assertRefused(
            {"type": "session.update", "session": {"type": "realtime", "tools": tools}},
            "unknown_parameter",
            "session.tools[0].strict",
        )

    def test_missing_required_parameters(self) -> None:
        error = self.assertRefused(
            {"type": "session.update", "session": {"instructions": "x"}},
            "missing_required_parameter",
            "session.type",
        )
        self.assertEqual(error.message, "Missing required parameter: 'session.type'.")
        self.assertRefused(
            {"type": "conversation.item.create"}, "missing_required_parameter", "item"
        )
        self.assertRefused({"event_id": "e"}, "missing_required_parameter", "type")
        self.assertRefused(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": "c"},
            },
            "missing_required_parameter",
            "item.output",
        )

    def test_invalid_values_name_the_supported_ones(self) -> None:
        error = self.assertRefused({"type": "session.updated"}, "invalid_value", "type")
        self.assertIn("'session.update'", error.message)
        error = self.assertRefused(
            {"type": "session.update", "session": {"type": "session"}},
            "invalid_value",
            "session.type",
        )
        self.assertEqual(
            error.message,
            "Invalid value: 'session'. Supported values are: 'realtime' and 'transcription'.",
        )
        error = self.assertRefused(
            {"type": "conversation.item.create", "item": {**USER_TEXT, "role": "robot"}},
            "invalid_value",
            "item.role",
        )
        self.assertIn("'system', 'user', and 'assistant'", error.message)
        self.assertRefused(
            {"type": "session.update", "session": {"type": "realtime", "tool_choice": "sometimes"}},
            "invalid_value",
            "session.tool_choice",
        )
        self.assertRefused(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            },
            "invalid_value",
            "session.audio.input.format.rate",
        )
        self.assertRefused(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"output": {"format": {"type": "g711_ulaw"}}},
                },
            },
            "invalid_value",
            "session.audio.output.format.type",
        )
        self.assertRefused(
            {"type": "conversation.item.create", "item": {"type": "item_reference", "id": "x"}},
            "invalid_value",
            "item.type",
        )

    def test_types_are_strict(self) -> None:
        truncate = {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0}
        error = self.assertRefused(
            {**truncate, "audio_end_ms": 1500.0}, "invalid_type", "audio_end_ms"
        )
        self.assertEqual(
            error.message,
            "Invalid type for 'audio_end_ms': expected an integer, but got a decimal number instead.",
        )
        self.assertRefused({**truncate, "audio_end_ms": "1500"}, "invalid_type", "audio_end_ms")
        self.assertRefused({**truncate, "audio_end_ms": True}, "invalid_type", "audio_end_ms")
        threshold = {"type": "server_vad", "threshold": "0.5"}
        self.assertRefused(
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"input": {"turn_detection": threshold}}},
            },
            "invalid_type",
            "session.audio.input.turn_detection.threshold",
        )
        self.assertRefused(
            {"type": "input_audio_buffer.append", "audio": 5}, "invalid_type", "audio"
        )
        self.assertRefused({"type": "conversation.item.create", "item": []}, "invalid_type", "item")
        self.assertRefused(["response.create"], "invalid_type", None)

    def test_limits_the_types_do_not_express(self) -> None:
        def session(**fields: Any) -> dict[str, Any]:
            return {"type": "session.update", "session": {"type": "realtime", **fields}}

        self.assertRefused(
            session(max_output_tokens=4097), "integer_above_max_value", "session.max_output_tokens"
        )
        self.assertRefused(
            session(max_output_tokens=0), "integer_below_min_value", "session.max_output_tokens"
        )
        self.assertRefused(
            session(audio={"output": {"speed": 2.0}}),
            "decimal_above_max_value",
            "session.audio.output.speed",
        )
        self.assertRefused(
            session(output_modalities=["text", "audio"]),
            "invalid_value",
            "session.output_modalities",
        )
        self.assertRefused(
            {"type": "response.create", "response": {"metadata": {str(n): "v" for n in range(17)}}},
            "object_above_max_properties",
            "response.metadata",
        )
        self.assertRefused(
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": -1,
            },
            "integer_below_min_value",
            "audio_end_ms",
        )

    def test_append_size_limit(self) -> None:
        validate_client_event(
            {"type": "input_audio_buffer.append", "audio": "A" * MAX_APPEND_AUDIO_CHARS}
        )
        self.assertRefused(
            {"type": "input_audio_buffer.append", "audio": "A" * (MAX_APPEND_AUDIO_CHARS + 1)},
            "string_above_max_length",
            "audio",
        )

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
    def test_any_unknown_top_level_key_is_named(self, key: str) -> None:
        known = {"type", "event_id", "session"}
        if key in known:
            return
        event = {"type": "session.update", "session": {"type": "realtime"}, key: 1}
        error = refusal(event)
        self.assertEqual((error.code, error.param), ("unknown_parameter", key))

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["type", "session", "item", "audio", "response", "x"]),
                children,
                max_size=4,
            )
        ),
        max_leaves=12,
    )

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_arbitrary_json_is_refused_cleanly_or_accepted(self, value: object) -> None:
        try:
            validate_client_event(value)
        except ClientEventError as error:
            self.assertTrue(error.code and error.message)


class ServerEventTests(unittest.TestCase):
    def test_every_captured_frame_validates(self) -> None:
        for line in CAPTURE.read_text().splitlines():
            validate_server_event(json.loads(line))

    def test_extra_fields_are_allowed(self) -> None:
        validate_server_event(
            {
                "type": "response.output_audio_transcript.delta",
                "event_id": "event_1",
                "response_id": "resp_1",
                "item_id": "item_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "Hi",
                "obfuscation": "abc",
                "something_new": {"x": 1},
            }
        )

    def test_wrong_server_events_are_refused(self) -> None:
        good = {
            "type": "input_audio_buffer.speech_started",
            "event_id": "e",
            "audio_start_ms": 10,
            "item_id": "i",
        }
        validate_server_event(good)
        for bad in (
            {**good, "type": "input_audio_buffer.speech_begun"},
            {**good, "audio_start_ms": "10"},
            {k: v for k, v in good.items() if k != "event_id"},
            {
                "type": "response.output_item.added",
                "event_id": "e",
                "response_id": "r",
                "output_index": 0,
                "item": {
                    "id": "i",
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "audio"}],
                },
            },
            "session.created",
        ):
            with self.assertRaises(ServerEventError):
                validate_server_event(bad)
