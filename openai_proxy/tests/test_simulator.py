"""Tests for the simulated OpenAI Realtime (GA) upstream.

Most tests drive the simulator in memory (``twisted.test.iosim``) with a real Autobahn client and a
``Clock`` for both the simulator's pacing and Autobahn's own timers; every event the simulator sends
is validated with ``validate_server_event`` as it arrives. The last tests use loopback sockets and
the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial import unittest
from txaio.testutil import replace_loop

from openai_proxy.simulator import SimulatorFactory, listen_simulator, voice
from openai_proxy.simulator.server import (
    DEFAULT_INSTRUCTIONS,
    EXPIRED_CLOSE_CODE,
    FATAL_CLOSE_CODE,
    GREETING,
    Call,
    Item,
    Say,
    compose_reply,
    default_session,
    merge_session,
    tool_matches,
    verbatim_request,
)
from openai_proxy.simulator.validation import ServerEventError, validate_server_event

txaio.use_twisted()

# Frames captured from the real GA API: one server-VAD turn and a refused response.create.
CAPTURE = Path(__file__).parent / "data" / "openai-ga-capture.jsonl"
KEY = "sk-test-key"
URL = "ws://127.0.0.1:9000/v1/realtime?model=gpt-realtime"
PCM = {"type": "audio/pcm", "rate": 24000}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a place.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
}
TIME_TOOL = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
}
# The order of a spoken reply, §2.1 of the GA reference (deltas collapsed).
SPOKEN_REPLY = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "deltas",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
    "rate_limits.updated",
]


def _capture() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CAPTURE.read_text().splitlines() if line.strip()]


def shape(value: object) -> object:
    """The key structure of a JSON value (keys and nesting, not values)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return None


def collapse(types: list[str]) -> list[str]:
    """Event types with every run of streaming deltas collapsed to one "deltas"."""
    out: list[str] = []
    for t in types:
        if t.endswith(".delta"):
            t = "deltas"
        if not out or out[-1] != t or t != "deltas":
            out.append(t)
    return out


class RecordingClient(WebSocketClientProtocol):
    """A GA client that validates and keeps every server event."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self.opened = False
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.invalid.append("binary frame from the simulator")
            return
        event = json.loads(payload)
        try:
            validate_server_event(event)
        except ServerEventError as error:
            self.invalid.append(str(error))
        self.events.append(event)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]


class SimulatorTestCase(unittest.TestCase):
    """In-memory connections to a SimulatorFactory driven by a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        loop = replace_loop(self.clock)  # Autobahn's timers on the same clock
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.factory = SimulatorFactory(
            self.clock, api_key=KEY, audio_chunk_ms=100, chunk_interval=0.02
        )
        self.clients: list[RecordingClient] = []

    def tearDown(self) -> None:
        for client in self.clients:
            self.assertEqual(client.invalid, [], "the simulator sent invalid GA events")

    def connect(
        self, url: str = URL, headers: dict[str, str] | None = None
    ) -> tuple[RecordingClient, iosim.IOPump]:
        factory = WebSocketClientFactory(
            url=url, headers={"Authorization": f"Bearer {KEY}"} if headers is None else headers
        )
        factory.protocol = RecordingClient
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9000))
        client = cast(
            RecordingClient, factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        )
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=self.clock,
        )
        pump.flush()
        self.clients.append(client)
        self.pump = pump
        return client, pump

    def send(self, client: RecordingClient, event: dict[str, Any]) -> None:
        client.sendMessage(json.dumps(event).encode("utf-8"))
        self.pump.flush()

    def advance(self, seconds: float, step: float = 0.02) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.pump.flush()

    def configured(self, **session: Any) -> RecordingClient:
        client, _ = self.connect()
        self.send(client, {"type": "session.update", "session": {"type": "realtime", **session}})
        self.assertEqual(client.types()[-1], "session.updated")
        return client

    def append(self, client: RecordingClient, audio: bytes, chunk_ms: int = 100) -> None:
        chunk = 48 * chunk_ms
        for start in range(0, len(audio), chunk):
            self.send(
                client,
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(audio[start : start + chunk]).decode(),
                },
            )

    def say_text(self, client: RecordingClient, text: str, item_id: str | None = None) -> None:
        item: dict[str, Any] = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        }
        if item_id:
            item["id"] = item_id
        self.send(client, {"type": "conversation.item.create", "item": item})

    def last_error(self, client: RecordingClient) -> dict[str, Any]:
        errors = client.of("error")
        self.assertTrue(errors, f"no error event among {client.types()}")
        return errors[-1]["error"]

    def since(self, client: RecordingClient, count: int) -> list[str]:
        return client.types()[count:]


# --------------------------------------------------------------------------- handshake


class HandshakeTests(SimulatorTestCase):
    def test_wrong_key_is_refused_with_401(self) -> None:
        client, _ = self.connect(headers={"Authorization": "Bearer sk-wrong"})
        self.assertFalse(client.opened)
        assert client.closed is not None
        self.assertIn("[401]", client.closed[2] or "")

    def test_missing_key_is_refused_with_401(self) -> None:
        client, _ = self.connect(headers={})
        self.assertFalse(client.opened)
        assert client.closed is not None
        self.assertIn("[401]", client.closed[2] or "")

    def test_no_key_configured_accepts_any_client(self) -> None:
        self.factory.api_key = None
        client, _ = self.connect(headers={})
        self.assertEqual(client.types(), ["session.created"])

    def test_other_path_is_404(self) -> None:
        client, _ = self.connect(url="ws://127.0.0.1:9000/v1/chat?model=gpt-realtime")
        self.assertFalse(client.opened)
        assert client.closed is not None
        self.assertIn("[404]", client.closed[2] or "")

    def test_beta_header_gets_error_and_close_4000(self) -> None:
        client, _ = self.connect(
            headers={"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "realtime=v1"}
        )
        self.assertEqual(client.types(), ["error"])
        self.assertEqual(client.events[0]["error"]["code"], "beta_api_shape_disabled")
        assert client.closed is not None
        self.assertEqual(client.closed[1], FATAL_CLOSE_CODE)
        self.assertEqual(self.factory.sessions, [])

    def test_unknown_or_missing_model_gets_model_not_found(self) -> None:
        for url in (
            "ws://127.0.0.1:9000/v1/realtime?model=gpt-4o",
            "ws://127.0.0.1:9000/v1/realtime",
        ):
            client, _ = self.connect(url=url)
            self.assertEqual(client.types(), ["error"], url)
            self.assertEqual(client.events[0]["error"]["code"], "model_not_found")
            assert client.closed is not None
            self.assertEqual(client.closed[1], FATAL_CLOSE_CODE)

    def test_closed_session_is_forgotten(self) -> None:
        client, pump = self.connect()
        self.assertEqual(len(self.factory.sessions), 1)
        client.sendClose(1000)
        pump.flush()
        self.assertEqual(self.factory.sessions, [])

    def test_session_expires_after_an_hour(self) -> None:
        client, _ = self.connect()
        self.advance(3599.0, step=1.0)
        self.assertIsNone(client.closed)
        self.advance(1.0, step=1.0)
        self.assertEqual(self.last_error(client)["code"], "session_expired")
        assert client.closed is not None
        # Public reports of the real API: "received 1001 (going away) Your session hit the maximum
        # duration of 60 minutes."
        self.assertEqual(client.closed[1], EXPIRED_CLOSE_CODE)
        self.assertEqual(client.closed[2], "Your session hit the maximum duration of 60 minutes.")


# --------------------------------------------------------------------------- shapes vs capture


class CaptureShapeTests(SimulatorTestCase):
    def test_session_created_has_the_captured_shape(self) -> None:
        captured = _capture()[0]
        client, _ = self.connect()
        (created,) = client.events
        self.assertEqual(shape(created), shape(captured))
        session = created["session"]
        self.assertRegex(created["event_id"], r"^event_[A-Za-z0-9]{21}$")
        self.assertRegex(session["id"], r"^sess_[A-Za-z0-9]{21}$")
        self.assertEqual(session["model"], "gpt-realtime")
        self.assertEqual(session["expires_at"], 3600)
        self.assertEqual(session["audio"], captured["session"]["audio"])
        self.assertEqual(session["instructions"], DEFAULT_INSTRUCTIONS)

    def test_ids_are_random(self) -> None:
        first, _ = self.connect()
        second, _ = self.connect()
        self.assertNotEqual(first.events[0]["session"]["id"], second.events[0]["session"]["id"])

    def test_vad_turn_events_have_the_captured_key_sets(self) -> None:
        """Replay: every event type of the real VAD turn, emitted with the same keys."""
        captured = {e["type"]: e for e in _capture()}
        client = self.configured()
        self.append(client, voice.silence(1000) + voice.speak_words("hello") + voice.silence(400))
        self.advance(2.0)
        self.send(client, {"type": "response.create"})
        self.send(client, {"type": "response.create"})  # refused: the captured error
        self.advance(2.0)
        emitted: dict[str, dict[str, Any]] = {}
        for event in client.events:
            emitted.setdefault(event["type"], event)
        missing = sorted(set(captured) - set(emitted))
        self.assertEqual(missing, [])
        for event_type, real in captured.items():
            self.assertEqual(shape(emitted[event_type]), shape(real), event_type)


# --------------------------------------------------------------------------- strictness


class StrictnessTests(SimulatorTestCase):
    def test_beta_voice_field_is_refused_whole(self) -> None:
        client, _ = self.connect()
        self.send(
            client,
            {
                "type": "session.update",
                "event_id": "evt_1",
                "session": {"type": "realtime", "instructions": "Be brief.", "voice": "marin"},
            },
        )
        error = self.last_error(client)
        self.assertEqual(
            (error["code"], error["param"], error["event_id"]),
            ("unknown_parameter", "session.voice", "evt_1"),
        )
        self.assertNotIn("session.updated", client.types())
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertEqual(session.config["instructions"], DEFAULT_INSTRUCTIONS)
        self.assertFalse(session.configured)

    def test_beta_shaped_fields_each_name_their_param(self) -> None:
        client, _ = self.connect()
        for field, value in (
            ("modalities", ["text", "audio"]),
            ("turn_detection", {"type": "server_vad"}),
            ("input_audio_transcription", {"model": "whisper-1"}),
            ("input_audio_format", "pcm16"),
            ("max_response_output_tokens", 100),
            ("temperature", 0.8),
        ):
            self.send(
                client, {"type": "session.update", "session": {"type": "realtime", field: value}}
            )
            error = self.last_error(client)
            self.assertEqual(
                (error["code"], error["param"]), ("unknown_parameter", f"session.{field}")
            )
        self.assertNotIn("session.updated", client.types())

    def test_missing_session_type(self) -> None:
        client, _ = self.connect()
        self.send(client, {"type": "session.update", "session": {"instructions": "x"}})
        error = self.last_error(client)
        self.assertEqual(
            (error["code"], error["param"]), ("missing_required_parameter", "session.type")
        )

    def test_unknown_event_type_and_wrong_types(self) -> None:
        client, _ = self.connect()
        self.send(client, {"type": "response.audio.delta", "event_id": "e9"})
        error = self.last_error(client)
        self.assertEqual(
            (error["code"], error["param"], error["event_id"]), ("invalid_value", "type", "e9")
        )
        self.send(
            client,
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"output": {"speed": "fast"}}},
            },
        )
        self.assertEqual(self.last_error(client)["code"], "invalid_type")

    def test_input_rate_other_than_24000_is_refused(self) -> None:
        client, _ = self.connect()
        self.send(
            client,
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            },
        )
        error = self.last_error(client)
        self.assertEqual(
            (error["code"], error["param"]), ("invalid_value", "session.audio.input.format.rate")
        )

    def test_model_cannot_change(self) -> None:
        client, _ = self.connect()
        self.send(
            client,
            {"type": "session.update", "session": {"type": "realtime", "model": "gpt-realtime"}},
        )
        self.assertEqual(client.types()[-1], "session.updated")
        self.send(
            client,
            {
                "type": "session.update",
                "session": {"type": "realtime", "model": "gpt-realtime-mini"},
            },
        )
        self.assertEqual(self.last_error(client)["param"], "session.model")

    def test_transcription_session_update_is_refused(self) -> None:
        client, _ = self.connect()
        self.send(client, {"type": "session.update", "session": {"type": "transcription"}})
        self.assertIn("transcription session update", self.last_error(client)["message"])

    def test_audio_items_and_responses_wait_for_session_update(self) -> None:
        client, _ = self.connect()
        self.send(client, {"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "a"})
        self.say_text(client, "hello")
        self.send(client, {"type": "response.create", "event_id": "r"})
        codes = [(e["error"]["code"], e["error"]["event_id"]) for e in client.of("error")]
        self.assertEqual(
            codes,
            [
                ("session_not_configured", "a"),
                ("session_not_configured", None),
                ("session_not_configured", "r"),
            ],
        )
        self.assertEqual(client.types().count("response.created"), 0)

    def test_second_response_while_one_is_active(self) -> None:
        client = self.configured()
        self.say_text(client, "hello")
        self.send(client, {"type": "response.create"})
        self.send(client, {"type": "response.create", "event_id": "again"})
        error = self.last_error(client)
        self.assertEqual(error["code"], "conversation_already_has_active_response")
        self.assertEqual(error["event_id"], "again")
        active = self.factory.sessions[0].session.active  # type: ignore[union-attr]
        assert active is not None
        self.assertIn(active.id, error["message"])
        self.advance(3.0)
        self.assertEqual(client.types().count("response.created"), 1)
        self.assertEqual(client.types().count("response.done"), 1)

    def test_out_of_band_response_may_run_beside_the_default_one(self) -> None:
        client = self.configured()
        self.say_text(client, "hello")
        self.send(client, {"type": "response.create"})
        self.send(
            client,
            {
                "type": "response.create",
                "response": {
                    "conversation": "none",
                    "output_modalities": ["text"],
                    "metadata": {"k": "v"},
                },
            },
        )
        self.assertEqual(client.types().count("response.created"), 2)
        self.advance(3.0)
        done = client.of("response.done")
        self.assertEqual(len(done), 2)
        oob = next(d["response"] for d in done if d["response"]["conversation_id"] is None)
        self.assertEqual(oob["metadata"], {"k": "v"})
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertEqual(len(session.conversation), 2)  # the user item and one assistant reply

    def test_cancel_with_nothing_active(self) -> None:
        client = self.configured()
        self.send(client, {"type": "response.cancel"})
        self.assertEqual(self.last_error(client)["code"], "response_cancel_not_active")

    def test_commit_under_100ms(self) -> None:
        client = self.configured(audio={"input": {"turn_detection": None}})
        self.append(client, voice.silence(90))
        self.send(client, {"type": "input_audio_buffer.commit"})
        error = self.last_error(client)
        self.assertEqual(error["code"], "input_audio_buffer_commit_empty")
        self.assertIn("only has 90.00ms", error["message"])

    def test_append_over_15_mib(self) -> None:
        client = self.configured()
        self.send(
            client, {"type": "input_audio_buffer.append", "audio": "A" * (15 * 1024 * 1024 + 4)}
        )
        self.assertEqual(self.last_error(client)["code"], "string_above_max_length")

    def test_append_of_bad_base64(self) -> None:
        client = self.configured()
        self.send(client, {"type": "input_audio_buffer.append", "audio": "not base64!"})
        self.assertEqual(self.last_error(client)["param"], "audio")

    def test_bad_json_and_binary_frames(self) -> None:
        client, pump = self.connect()
        client.sendMessage(b"{not json")
        pump.flush()
        self.assertEqual(self.last_error(client)["code"], "invalid_json")
        client.sendMessage(b"\x00\x01", isBinary=True)
        pump.flush()
        self.assertEqual(self.last_error(client)["code"], "unsupported_frame")
        self.assertIsNone(client.closed)

    def test_received_records_every_client_event_in_order(self) -> None:
        client = self.configured()
        self.send(client, {"type": "bogus"})
        self.say_text(client, "hi")
        session_id = self.factory.sessions[0].session.id  # type: ignore[union-attr]
        self.assertEqual(
            [(sid, e["type"]) for sid, e in self.factory.received],
            [
                (session_id, "session.update"),
                (session_id, "bogus"),
                (session_id, "conversation.item.create"),
            ],
        )


# --------------------------------------------------------------------------- conversation and replies


class ConversationTests(SimulatorTestCase):
    def test_item_create_keeps_the_client_id_and_order(self) -> None:
        client = self.configured()
        self.say_text(client, "first", item_id="item_first")
        self.say_text(client, "second", item_id="item_second")
        added = client.of("conversation.item.added")
        self.assertEqual([a["item"]["id"] for a in added], ["item_first", "item_second"])
        self.assertEqual([a["previous_item_id"] for a in added], [None, "item_first"])
        self.assertEqual(client.types()[-2:], ["conversation.item.added", "conversation.item.done"])
        self.send(
            client,
            {
                "type": "conversation.item.create",
                "previous_item_id": "root",
                "item": {
                    "type": "message",
                    "role": "system",
                    "content": [{"type": "input_text", "text": "s"}],
                },
            },
        )
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertEqual([i.role for i in session.conversation], ["system", "user", "user"])

    def test_duplicate_item_id_and_unknown_previous_item(self) -> None:
        client = self.configured()
        self.say_text(client, "first", item_id="item_same")
        self.say_text(client, "again", item_id="item_same")
        self.assertEqual(self.last_error(client)["param"], "item.id")
        self.send(
            client,
            {
                "type": "conversation.item.create",
                "previous_item_id": "item_nope",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "x"}],
                },
            },
        )
        self.assertEqual(self.last_error(client)["param"], "previous_item_id")

    def test_assistant_audio_items_cannot_be_created(self) -> None:
        client = self.configured()
        self.send(
            client,
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_audio", "transcript": "x"}],
                },
            },
        )
        self.assertEqual(self.last_error(client)["param"], "item.content[0].type")

    def test_text_turn_gets_a_spoken_reply_in_ga_order(self) -> None:
        client = self.configured()
        self.say_text(client, "hello there", item_id="item_user")
        before = len(client.events)
        self.send(client, {"type": "response.create"})
        self.assertEqual(
            self.since(client, before),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "response.content_part.added",
            ],
        )
        self.advance(3.0)
        self.assertEqual(collapse(self.since(client, before)), SPOKEN_REPLY)
        deltas = [t for t in self.since(client, before) if t.endswith(".delta")]
        self.assertIn("response.output_audio_transcript.delta", deltas)
        # Transcript and audio deltas interleave.
        self.assertLess(
            deltas.index("response.output_audio.delta"),
            len(deltas) - deltas[::-1].index("response.output_audio_transcript.delta"),
        )
        transcript = client.of("response.output_audio_transcript.done")[0]["transcript"]
        self.assertEqual(transcript, "You said: hello there")
        audio = b"".join(
            base64.b64decode(d["delta"]) for d in client.of("response.output_audio.delta")
        )
        self.assertEqual(len(audio) // 48, 60 * len(transcript))  # pcm16 24 kHz, 60 ms a character
        done = client.of("response.done")[0]["response"]
        self.assertEqual(done["status"], "completed")
        self.assertGreater(done["usage"]["output_token_details"]["audio_tokens"], 0)
        self.assertEqual(
            done["output"][0]["content"], [{"type": "output_audio", "transcript": transcript}]
        )
        added = client.of("conversation.item.added")[-1]
        self.assertEqual(added["previous_item_id"], "item_user")
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertIsNone(session.active)
        self.assertTrue(session.audio_produced)

    def test_audio_is_paced_by_the_clock(self) -> None:
        client = self.configured()
        self.say_text(client, "hello there")
        self.send(client, {"type": "response.create"})
        self.assertEqual(len(client.of("response.output_audio.delta")), 0)
        self.advance(0.1)  # five chunk intervals: five chunks of 100 ms
        chunks = client.of("response.output_audio.delta")
        self.assertEqual(len(chunks), 5)
        self.assertEqual(len(base64.b64decode(chunks[0]["delta"])), 4800)

    def test_g711_output_format(self) -> None:
        client = self.configured(audio={"output": {"format": {"type": "audio/pcmu"}}})
        self.say_text(client, "hi")
        self.send(client, {"type": "response.create"})
        self.advance(2.0)
        audio = b"".join(
            base64.b64decode(d["delta"]) for d in client.of("response.output_audio.delta")
        )
        self.assertEqual(len(audio), 8 * 60 * len("You said: hi"))
        self.assertEqual(
            client.of("response.done")[0]["response"]["audio"]["output"]["format"],
            {"type": "audio/pcmu"},
        )

    def test_text_modality(self) -> None:
        client = self.configured(output_modalities=["text"])
        self.say_text(client, "hello")
        before = len(client.events)
        self.send(client, {"type": "response.create"})
        self.advance(1.0)
        types = self.since(client, before)
        self.assertNotIn("response.output_audio.delta", types)
        self.assertEqual(
            collapse(types)[4:7],
            ["deltas", "response.output_text.done", "response.content_part.done"],
        )
        self.assertEqual(client.of("response.output_text.done")[0]["text"], "You said: hello")
        self.assertEqual(client.of("response.content_part.added")[0]["part"]["type"], "text")
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertFalse(session.audio_produced)

    def test_verbatim_instructions_are_said(self) -> None:
        client = self.configured()
        self.send(
            client,
            {
                "type": "response.create",
                "response": {"instructions": 'Greet the user. Say exactly: "Welcome back, "Sam"!"'},
            },
        )
        self.advance(3.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"],
            'Welcome back, "Sam"!',
        )

    def test_response_without_user_message_greets(self) -> None:
        client = self.configured()
        self.send(client, {"type": "response.create"})
        self.advance(3.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"], GREETING
        )

    def test_max_output_tokens_ends_incomplete(self) -> None:
        client = self.configured()
        self.say_text(client, "hello there this is a long sentence")
        self.send(client, {"type": "response.create", "response": {"max_output_tokens": 2}})
        self.advance(3.0)
        done = client.of("response.done")[0]["response"]
        self.assertEqual(done["status"], "incomplete")
        self.assertEqual(done["status_details"]["reason"], "max_output_tokens")

    def test_cancel_stops_a_reply(self) -> None:
        client = self.configured()
        self.say_text(client, "hello there")
        self.send(client, {"type": "response.create"})
        self.advance(0.04)
        self.send(client, {"type": "response.cancel"})
        done = client.of("response.done")[0]["response"]
        self.assertEqual(
            done["status_details"], {"type": "cancelled", "reason": "client_cancelled"}
        )
        count = len(client.events)
        self.advance(1.0)
        self.assertEqual(len(client.events), count)  # nothing more of that response

    def test_created_audio_item_is_heard_and_echoed_without_audio(self) -> None:
        client = self.configured()

        def audio_item(audio: str) -> dict[str, Any]:
            content = [{"type": "input_audio", "audio": audio}]
            return {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": content},
            }

        self.send(client, audio_item("%%%"))
        self.assertEqual(self.last_error(client)["param"], "item.content[0].audio")
        self.send(client, audio_item(base64.b64encode(voice.speak_words("hello")).decode()))
        added = client.of("conversation.item.added")[-1]["item"]
        self.assertEqual(added["content"], [{"type": "input_audio", "transcript": None}])
        self.send(client, {"type": "response.create"})
        self.advance(3.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"], "You said: hello"
        )

    def test_delete_and_retrieve(self) -> None:
        client = self.configured()
        self.say_text(client, "x", item_id="item_x")
        self.send(client, {"type": "conversation.item.retrieve", "item_id": "item_x"})
        self.assertEqual(client.of("conversation.item.retrieved")[0]["item"]["id"], "item_x")
        self.send(client, {"type": "conversation.item.delete", "item_id": "item_x"})
        self.assertEqual(client.of("conversation.item.deleted")[0]["item_id"], "item_x")
        self.send(client, {"type": "conversation.item.delete", "item_id": "item_x"})
        self.assertEqual(self.last_error(client)["param"], "item_id")


class FunctionCallTests(SimulatorTestCase):
    def test_tool_call_then_output_then_answer(self) -> None:
        client = self.configured(tools=[WEATHER_TOOL])
        self.say_text(client, "What is the weather in Paris today?")
        before = len(client.events)
        self.send(client, {"type": "response.create"})
        self.advance(1.0)
        self.assertEqual(
            collapse(self.since(client, before)),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "deltas",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done",
                "rate_limits.updated",
            ],
        )
        added = client.of("response.output_item.added")[0]["item"]
        self.assertEqual(
            (added["type"], added["arguments"], added["name"]), ("function_call", "", "get_weather")
        )
        call = client.of("response.function_call_arguments.done")[0]
        self.assertRegex(call["call_id"], r"^call_[A-Za-z0-9]+$")
        self.assertEqual(json.loads(call["arguments"]), {"location": "Paris", "unit": "celsius"})
        deltas = "".join(d["delta"] for d in client.of("response.function_call_arguments.delta"))
        self.assertEqual(deltas, call["arguments"])
        self.assertEqual(
            client.of("response.output_item.done")[0]["item"]["arguments"], call["arguments"]
        )

        self.send(
            client,
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "function_call_output",
                    "call_id": call["call_id"],
                    "output": "21 C",
                },
            },
        )
        self.send(client, {"type": "response.create"})
        self.advance(4.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"],
            "Here is what I found: 21 C",
        )

    def test_two_matching_tools_in_one_response(self) -> None:
        client = self.configured(tools=[WEATHER_TOOL, TIME_TOOL])
        self.say_text(client, "tell me the time and the weather in Tokyo")
        self.send(client, {"type": "response.create"})
        self.advance(1.0)
        calls = client.of("response.function_call_arguments.done")
        self.assertEqual([c["name"] for c in calls], ["get_weather", "get_time"])
        self.assertEqual([c["output_index"] for c in calls], [0, 1])
        self.assertEqual(len(client.of("response.done")[0]["response"]["output"]), 2)

    def test_output_for_unknown_call_id(self) -> None:
        client = self.configured()
        self.send(
            client,
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": "call_nope", "output": "x"},
            },
        )
        self.assertEqual(self.last_error(client)["param"], "item.call_id")

    def test_tool_choice_none_and_answered_turns_do_not_call(self) -> None:
        client = self.configured(tools=[WEATHER_TOOL], tool_choice="none")
        self.say_text(client, "weather please")
        self.send(client, {"type": "response.create"})
        self.advance(3.0)
        self.assertEqual(client.of("response.function_call_arguments.done"), [])


class VadTests(SimulatorTestCase):
    def test_vad_turn_from_tone_and_silence(self) -> None:
        client = self.configured(audio={"input": {"transcription": {"model": "gpt-4o-transcribe"}}})
        self.append(client, voice.silence(1000) + voice.speak_words("hello") + voice.silence(300))
        started = client.of("input_audio_buffer.speech_started")[0]
        stopped = client.of("input_audio_buffer.speech_stopped")[0]
        self.assertEqual(started["audio_start_ms"], 1000 - 300)  # onset minus prefix padding
        self.assertEqual(stopped["audio_end_ms"], 1200 + 200)  # end of speech plus the silence
        self.assertEqual(started["item_id"], stopped["item_id"])
        turn = client.types()[client.types().index("input_audio_buffer.speech_stopped") :]
        self.assertEqual(
            turn[:6],
            [
                "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done",
                "conversation.item.input_audio_transcription.completed",
                "response.created",
            ],
        )
        user_item = client.of("conversation.item.added")[0]["item"]
        self.assertEqual(user_item["content"], [{"type": "input_audio", "transcript": None}])
        self.assertEqual(
            client.of("conversation.item.input_audio_transcription.completed")[0]["transcript"],
            "hello",
        )
        self.advance(3.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"], "You said: hello"
        )

    def test_spoken_question_calls_a_tool(self) -> None:
        client = self.configured(tools=[WEATHER_TOOL])
        self.append(client, voice.speak_words("what is the weather in london") + voice.silence(300))
        self.advance(1.0)
        call = client.of("response.function_call_arguments.done")[0]
        self.assertEqual(json.loads(call["arguments"])["location"], "London")

    def test_no_transcription_events_unless_enabled_and_no_response_unless_asked(self) -> None:
        client = self.configured(
            audio={"input": {"turn_detection": {"type": "server_vad", "create_response": False}}}
        )
        self.append(client, voice.speak_words("hello") + voice.silence(600))
        self.assertIn("input_audio_buffer.committed", client.types())
        self.assertNotIn("conversation.item.input_audio_transcription.completed", client.types())
        self.assertNotIn("response.created", client.types())

    def test_manual_commit_without_vad(self) -> None:
        client = self.configured(audio={"input": {"turn_detection": None}})
        self.append(client, voice.speak_words("yes") + voice.silence(600))
        self.assertNotIn("input_audio_buffer.speech_started", client.types())
        self.send(client, {"type": "input_audio_buffer.commit"})
        self.assertEqual(
            client.types()[-3:],
            ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"],
        )
        self.send(client, {"type": "response.create"})
        self.advance(3.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[0]["transcript"], "You said: yes"
        )
        self.send(client, {"type": "input_audio_buffer.commit"})
        self.assertEqual(self.last_error(client)["code"], "input_audio_buffer_commit_empty")

    def test_g711_input(self) -> None:
        pcma = {"type": "audio/pcma"}
        client = self.configured(
            audio={"input": {"format": pcma, "transcription": {"model": "whisper-1"}}}
        )
        audio = voice.speak_words("thanks", pcma) + voice.silence(600, pcma)
        for start in range(0, len(audio), 800):
            self.send(
                client,
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(audio[start : start + 800]).decode(),
                },
            )
        self.assertEqual(
            client.of("conversation.item.input_audio_transcription.completed")[0]["transcript"],
            "thanks",
        )

    def test_barge_in_cancels_the_reply(self) -> None:
        client = self.configured()
        self.say_text(client, "please tell me a long story about the sea")
        self.send(client, {"type": "response.create"})
        self.advance(0.06)  # three chunks of the reply
        before = len(client.events)
        self.append(client, voice.speak_words("stop"))
        self.assertEqual(
            self.since(client, before),
            [
                "input_audio_buffer.speech_started",
                "response.output_audio.done",
                "response.output_audio_transcript.done",
                "response.content_part.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done",
                "rate_limits.updated",
            ],
        )
        done = client.of("response.done")[0]["response"]
        self.assertEqual(done["status"], "cancelled")
        self.assertEqual(done["status_details"], {"type": "cancelled", "reason": "turn_detected"})
        item = client.of("response.output_item.done")[0]["item"]
        self.assertEqual(item["status"], "incomplete")
        partial = client.of("response.output_audio_transcript.done")[0]["transcript"]
        self.assertTrue("You said: please tell me a long story about the sea".startswith(partial))
        self.assertLess(len(partial), 40)
        self.append(client, voice.silence(300))
        self.advance(2.0)
        self.assertEqual(
            client.of("response.output_audio_transcript.done")[-1]["transcript"], "You said: stop"
        )

    def test_no_barge_in_when_interrupt_response_is_off(self) -> None:
        client = self.configured(
            audio={"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}}
        )
        self.say_text(client, "hello there")
        self.send(client, {"type": "response.create"})
        self.advance(0.04)
        self.append(client, voice.speak_words("stop") + voice.silence(600))
        self.assertIn("input_audio_buffer.speech_started", client.types())
        self.assertEqual(client.of("response.done"), [])
        self.advance(3.0)
        self.assertEqual(client.of("response.done")[0]["response"]["status"], "completed")
        self.assertEqual(client.types().count("response.created"), 1)  # no auto-response during one

    def test_clear_drops_buffered_speech(self) -> None:
        client = self.configured(audio={"input": {"turn_detection": None}})
        self.append(client, voice.speak_words("hello"))
        self.send(client, {"type": "input_audio_buffer.clear"})
        self.assertEqual(client.types()[-1], "input_audio_buffer.cleared")
        self.send(client, {"type": "input_audio_buffer.commit"})
        self.assertEqual(self.last_error(client)["code"], "input_audio_buffer_commit_empty")


class TruncateAndVoiceTests(SimulatorTestCase):
    def reply(self, client: RecordingClient) -> dict[str, Any]:
        self.say_text(client, "hello there")
        self.send(client, {"type": "response.create"})
        self.advance(3.0)
        return client.of("response.output_item.done")[-1]["item"]

    def test_truncate_beyond_the_audio_is_refused(self) -> None:
        client = self.configured()
        item = self.reply(client)
        length = 60 * len("You said: hello there")
        self.send(
            client,
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": length + 1,
            },
        )
        error = self.last_error(client)
        self.assertEqual(error["code"], "invalid_value")
        self.assertEqual(
            error["message"], f"Audio content of {length}ms is already shorter than {length + 1}ms"
        )

    def test_truncate_keeps_the_heard_part(self) -> None:
        client = self.configured()
        item = self.reply(client)
        self.send(
            client,
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 500,
            },
        )
        truncated = client.of("conversation.item.truncated")[0]
        self.assertEqual((truncated["item_id"], truncated["audio_end_ms"]), (item["id"], 500))
        self.send(client, {"type": "conversation.item.retrieve", "item_id": item["id"]})
        self.assertEqual(
            client.of("conversation.item.retrieved")[0]["item"]["content"][0]["transcript"],
            "You said:",
        )
        self.send(
            client,
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 501,
            },
        )
        self.assertIn("Audio content of 500ms", self.last_error(client)["message"])

    def test_truncate_needs_an_assistant_audio_item_and_an_integer(self) -> None:
        client = self.configured()
        self.say_text(client, "x", item_id="item_user")
        self.send(
            client,
            {
                "type": "conversation.item.truncate",
                "item_id": "item_user",
                "content_index": 0,
                "audio_end_ms": 0,
            },
        )
        self.assertEqual(self.last_error(client)["param"], "item_id")
        item = self.reply(client)
        self.send(
            client,
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 100.5,
            },
        )
        error = self.last_error(client)
        self.assertEqual((error["code"], error["param"]), ("invalid_type", "audio_end_ms"))

    def test_voice_locks_after_assistant_audio(self) -> None:
        client = self.configured()
        self.send(
            client,
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
            },
        )
        self.assertEqual(
            client.of("session.updated")[-1]["session"]["audio"]["output"]["voice"], "marin"
        )
        self.reply(client)
        self.send(
            client,
            {
                "type": "session.update",
                "event_id": "voice2",
                "session": {
                    "type": "realtime",
                    "tools": [WEATHER_TOOL],
                    "audio": {"output": {"voice": "cedar"}},
                },
            },
        )
        error = self.last_error(client)
        self.assertEqual((error["code"], error["event_id"]), ("cannot_update_voice", "voice2"))
        session = self.factory.sessions[0].session
        assert session is not None
        self.assertEqual(session.config["tools"], [])  # the whole update was refused
        self.assertEqual(session.config["audio"]["output"]["voice"], "marin")
        self.send(
            client,
            {"type": "session.update", "session": {"type": "realtime", "tools": [WEATHER_TOOL]}},
        )
        self.assertEqual(client.of("session.updated")[-1]["session"]["tools"], [WEATHER_TOOL])


# --------------------------------------------------------------------------- pure parts


class ReplyRuleTests(unittest.TestCase):
    def user(self, text: str) -> Item:
        return Item(
            {
                "id": "u",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }
        )

    def test_verbatim_patterns(self) -> None:
        self.assertEqual(verbatim_request('Say exactly: "Hi there!"'), "Hi there!")
        self.assertEqual(
            verbatim_request("Repeat this greeting verbatim: “Good morning.”"), "Good morning."
        )
        self.assertEqual(verbatim_request('Say "Hello" word for word.'), "Hello")
        self.assertIsNone(verbatim_request('Answer "politely".'))
        self.assertIsNone(verbatim_request(None))

    def test_tool_matching(self) -> None:
        self.assertTrue(tool_matches("get_weather", "How is the weather?"))
        self.assertTrue(tool_matches("lookupOrderStatus", "where is my order"))
        self.assertFalse(tool_matches("get_weather", "get me a coffee"))

    def test_compose_reply_rules(self) -> None:
        self.assertEqual(compose_reply(None, [], [], "auto"), [Say(GREETING)])
        self.assertEqual(
            compose_reply(None, [self.user("hi")], [WEATHER_TOOL], "auto"), [Say("You said: hi")]
        )
        self.assertEqual(
            compose_reply(None, [self.user("hi")], [WEATHER_TOOL], "required"),
            [Call("get_weather", json.dumps({"location": "hi", "unit": "celsius"}))],
        )
        forced = compose_reply(
            None,
            [self.user("weather in Rome")],
            [WEATHER_TOOL, TIME_TOOL],
            {"type": "function", "name": "get_time"},
        )
        self.assertEqual([c.name for c in forced if isinstance(c, Call)], ["get_time"])
        output = Item(
            {"id": "o", "type": "function_call_output", "call_id": "c", "output": "sunny"}
        )
        self.assertEqual(
            compose_reply(None, [self.user("weather?"), output], [WEATHER_TOOL], "auto"),
            [Say("Here is what I found: sunny")],
        )

    def test_compose_reply_answers_what_was_said_first(self) -> None:
        context = [self.user("Tell me about the sea"), self.user("and the mountains"),
                   self.user("So, WHAT did I say first?!")]
        self.assertEqual(compose_reply(None, context, [WEATHER_TOOL], "auto"),
                         [Say("You first said: Tell me about the sea")])
        # Only that question: other messages are echoed as before.
        self.assertEqual(compose_reply(None, context[:2], [], "auto"),
                         [Say("You said: and the mountains")])

    def test_merge_session_changes_only_what_was_sent(self) -> None:
        base = default_session("sess_x", "gpt-realtime", 0)
        merged = merge_session(
            base,
            {
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "turn_detection": {"type": "server_vad", "threshold": 0.7},
                    },
                    "output": {"voice": "marin"},
                },
            },
        )
        self.assertEqual(merged["instructions"], "Be brief.")
        self.assertEqual(merged["audio"]["input"]["format"], {"type": "audio/pcmu"})
        self.assertEqual(merged["audio"]["input"]["turn_detection"]["threshold"], 0.7)
        self.assertEqual(merged["audio"]["input"]["turn_detection"]["prefix_padding_ms"], 300)
        self.assertEqual(merged["audio"]["output"], {"format": PCM, "voice": "marin", "speed": 1.0})
        self.assertEqual(merged["tools"], [])
        self.assertEqual(base["instructions"], DEFAULT_INSTRUCTIONS)  # not modified in place
        cleared = merge_session(
            merged, {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        self.assertIsNone(cleared["audio"]["input"]["turn_detection"])


class VoiceTests(unittest.TestCase):
    def test_g711_tables_match_the_standard(self) -> None:
        try:
            import audioop  # deprecated, gone in Python 3.13
        except ImportError:
            raise unittest.SkipTest("audioop is not available") from None
        codes = bytes(range(256))
        for fmt, reference in (("audio/pcmu", audioop.ulaw2lin), ("audio/pcma", audioop.alaw2lin)):
            expected = np.frombuffer(reference(codes, 2), dtype="<i2")
            np.testing.assert_array_equal(voice.decode({"type": fmt}, codes), expected)

    def test_g711_encode_round_trips_every_level(self) -> None:
        for fmt in ({"type": "audio/pcmu"}, {"type": "audio/pcma"}):
            levels = voice.decode(fmt, bytes(range(256)))
            np.testing.assert_array_equal(voice.decode(fmt, voice.encode(fmt, levels)), levels)

    def test_words_survive_every_format(self) -> None:
        text = "what is the weather in paris"
        for fmt in (PCM, {"type": "audio/pcmu"}, {"type": "audio/pcma"}):
            samples = voice.decode(fmt, voice.speak_words(text, fmt))
            self.assertEqual(voice.transcribe(samples, voice.format_rate(fmt)), text)

    def test_silence_and_unknown_tones_are_unintelligible(self) -> None:
        self.assertEqual(
            voice.transcribe(np.zeros(24000, dtype=np.int16), 24000), voice.UNINTELLIGIBLE
        )
        t = np.arange(4800) / 24000
        off_tune = (np.sin(2 * np.pi * 4000 * t) * 10000).astype(np.int16)
        self.assertEqual(voice.transcribe(off_tune, 24000), voice.UNINTELLIGIBLE)
        with self.assertRaises(ValueError):
            voice.speak_words("supercalifragilistic")

    def test_reply_duration_grows_with_text_and_is_capped(self) -> None:
        short = voice.synthesize_reply("hi", PCM)
        longer = voice.synthesize_reply("hello there, friend", PCM)
        self.assertEqual(short.duration_ms, 120)
        self.assertEqual(len(longer.audio), 48 * 60 * len("hello there, friend"))
        capped = voice.synthesize_reply("x" * 1000, PCM, max_ms=5000)
        self.assertEqual(capped.duration_ms, 5000)
        self.assertNotEqual(
            voice.synthesize_reply("hi", PCM, "alloy").audio,
            voice.synthesize_reply("hi", PCM, "cedar").audio,
        )

    def test_vad_threshold_sets_the_level(self) -> None:
        quiet = (np.sin(2 * np.pi * 500 * np.arange(24000) / 24000) * 300).astype(np.int16)
        loud_vad = voice.VoiceActivityDetector(24000, 0.0, 200)
        strict_vad = voice.VoiceActivityDetector(24000, 0.5, 200)
        self.assertEqual([e.kind for e in loud_vad.feed(quiet)], ["started"])
        self.assertEqual(strict_vad.feed(quiet), [])

    def test_vad_is_independent_of_chunking(self) -> None:
        audio = voice.decode(PCM, voice.speak_words("yes no") + voice.silence(500))
        whole = voice.VoiceActivityDetector(24000, 0.5, 200).feed(audio)
        chunked_vad = voice.VoiceActivityDetector(24000, 0.5, 200)
        chunked = [
            e
            for start in range(0, len(audio), 777)
            for e in chunked_vad.feed(audio[start : start + 777])
        ]
        self.assertEqual(whole, chunked)
        self.assertEqual([e.kind for e in whole], ["started", "stopped"])


# --------------------------------------------------------------------------- loopback, official client


class LoopbackTests(unittest.TestCase):
    """Real sockets on the trial reactor; the official openai client runs in a thread."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.port, self.factory = yield listen_simulator(reactor, api_key=KEY, chunk_interval=0.001)
        self.addCleanup(self.port.stopListening)
        self.base = f"ws://127.0.0.1:{self.port.getHost().port}/v1"

    def run_async(self, coroutine_function: Any) -> defer.Deferred[Any]:
        return threads.deferToThread(lambda: asyncio.run(coroutine_function()))

    @defer.inlineCallbacks
    def tearDown(self) -> Any:  # type: ignore[override]
        # Let the server side see every close before trial checks the reactor.
        for _ in range(100):
            if not self.factory.sessions:
                break
            yield deferLater(0.01)

    @defer.inlineCallbacks
    def test_official_client_has_a_conversation(self) -> Any:
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise unittest.SkipTest("the openai package is not installed") from None

        async def conversation() -> list[Any]:
            client = AsyncOpenAI(api_key=KEY, websocket_base_url=self.base)
            events = []
            async with client.realtime.connect(model="gpt-realtime") as connection:
                await connection.session.update(
                    session={"type": "realtime", "output_modalities": ["text"]}
                )
                await connection.conversation.item.create(
                    item={
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "hello"}],
                    }
                )
                async for event in connection:
                    events.append(event)
                    if (
                        event.type == "conversation.item.done"
                        and getattr(event.item, "role", None) == "user"
                    ):
                        await connection.response.create()
                    if event.type == "response.done":
                        break
            return events

        events = yield self.run_async(conversation)
        types = [e.type for e in events]
        self.assertEqual(types[:2], ["session.created", "session.updated"])
        self.assertEqual(events[-1].response.status, "completed")
        text = next(e for e in events if e.type == "response.output_text.done").text
        self.assertEqual(text, "You said: hello")
        self.assertEqual(
            [e["type"] for _, e in self.factory.received],
            ["session.update", "conversation.item.create", "response.create"],
        )

    @defer.inlineCallbacks
    def test_official_client_with_a_wrong_key_is_refused(self) -> Any:
        try:
            from openai import AsyncOpenAI
        except ImportError:
            raise unittest.SkipTest("the openai package is not installed") from None

        async def connect() -> str:
            client = AsyncOpenAI(api_key="sk-wrong", websocket_base_url=self.base)
            try:
                async with client.realtime.connect(model="gpt-realtime") as connection:
                    await connection.recv()
            except Exception as exc:  # the websockets library reports the HTTP status
                return str(exc)
            return "connected"

        outcome = yield self.run_async(connect)
        self.assertTrue(re.search(r"\b401\b", outcome), outcome)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
