"""
Unit tests of the session state machine: inputs in, outputs read, no sockets and no reactor.

Every event the session sends upstream is validated strictly with the ``openai`` package's GA types.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.replies import TRUNCATE_MARGIN_MS
from openai_proxy.simulator.validation import validate_client_event

FORBIDDEN_SESSION_KEYS = {"voice", "turn_detection", "temperature", "modalities",
                          "input_audio_format", "output_audio_format"}


def settings(**agent: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": 24000},
            "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
        },
        "agent": {
            "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
            "think": {
                "provider": {"type": "open_ai", "model": "gpt-4o-mini", "temperature": 0.7},
                "prompt": "You are helpful.",
                "functions": [
                    {
                        "name": "get_weather",
                        "description": "Weather for a city",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    }
                ],
            },
            "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
        },
    }
    message["agent"].update(agent)
    return message


class Harness:
    """A session with a hand-driven clock, collecting outputs by kind."""

    def __init__(self, **options: Any) -> None:
        self.time = 1000.0
        defaults: dict[str, Any] = dict(
            default_model="gpt-realtime",
            model_allowed=lambda name: name.startswith("gpt-realtime"),
            default_voice="marin",
            transcription_model="gpt-4o-mini-transcribe",
            audio_buffer_seconds=1.0,
            function_call_timeout=10.0,
        )
        defaults.update(options)
        self.session = s.Session(s.SessionOptions(**defaults), now=lambda: self.time)
        self.outputs: list[s.Output] = []
        self.feed(self.session.start())

    def feed(self, outputs: list[s.Output]) -> list[s.Output]:
        for output in outputs:
            if isinstance(output, s.SendUpstream):
                validate_client_event(output.event)
        self.outputs.extend(outputs)
        return outputs

    def text(self, message: Any) -> list[s.Output]:
        raw = message if isinstance(message, str) else json.dumps(message)
        return self.feed(self.session.client_text(raw))

    def binary(self, data: bytes) -> list[s.Output]:
        return self.feed(self.session.client_binary(data))

    def up(self, event_type: str, **fields: Any) -> list[s.Output]:
        event = {"type": event_type, "event_id": f"event_{uuid.uuid4().hex[:8]}", **fields}
        return self.feed(self.session.upstream_event(event))

    def timer(self, name: object) -> list[s.Output]:
        return self.feed(self.session.timer_fired(name))

    # views ------------------------------------------------------------------------------------

    @staticmethod
    def client(outputs: list[s.Output]) -> list[dict[str, Any]]:
        return [o.message for o in outputs if isinstance(o, s.SendClient)]

    @staticmethod
    def client_types(outputs: list[s.Output]) -> list[str]:
        return [o.message["type"] for o in outputs if isinstance(o, s.SendClient)]

    @staticmethod
    def upstream(outputs: list[s.Output]) -> list[dict[str, Any]]:
        return [o.event for o in outputs if isinstance(o, s.SendUpstream)]

    @staticmethod
    def upstream_types(outputs: list[s.Output]) -> list[str]:
        return [o.event["type"] for o in outputs if isinstance(o, s.SendUpstream)]

    # common flows -----------------------------------------------------------------------------

    def configure(self, message: dict[str, Any] | None = None) -> list[s.Output]:
        out = self.text(message or settings())
        out += self.feed(self.session.upstream_opened())
        update = self.upstream(out)[-1]
        out += self.up("session.updated", session=update["session"])
        return out

    def confirm_item(self, item_id: str, role: str = "user") -> list[s.Output]:
        item = {"id": item_id, "type": "message", "role": role, "content": []}
        out = self.up("conversation.item.added", item=item)
        out += self.up("conversation.item.done", item=item)
        return out

    def start_response(self, response_id: str = "resp_1") -> list[s.Output]:
        return self.up("response.created", response={"id": response_id, "status": "in_progress"})

    def audio(self, response_id: str, item_id: str, nbytes: int) -> list[s.Output]:
        delta = base64.b64encode(b"\x01\x00" * (nbytes // 2)).decode()
        return self.up(
            "response.output_audio.delta",
            response_id=response_id, item_id=item_id, output_index=0, content_index=0, delta=delta,
        )


class WelcomeAndSettingsTests(SynchronousTestCase):
    def test_welcome_first_with_uuid_request_id(self) -> None:
        h = Harness()
        [welcome] = h.client(h.outputs)
        self.assertEqual(welcome["type"], "Welcome")
        self.assertEqual(str(uuid.UUID(welcome["request_id"])), welcome["request_id"])

    def test_settings_sends_one_ga_session_update_and_waits_for_updated(self) -> None:
        h = Harness()
        out = h.text(settings())
        connect = [o for o in out if isinstance(o, s.ConnectUpstream)]
        self.assertEqual(connect, [s.ConnectUpstream("gpt-realtime")])
        [update] = h.upstream(out)
        self.assertEqual(update["type"], "session.update")
        session = update["session"]
        self.assertEqual(session["type"], "realtime")
        self.assertEqual(session["instructions"], "You are helpful.")
        self.assertEqual(
            session["tools"],
            [{
                "type": "function", "name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]},
            }],
        )
        self.assertFalse(FORBIDDEN_SESSION_KEYS & set(session))
        self.assertNotIn("temperature", json.dumps(update))
        audio = session["audio"]
        self.assertEqual(audio["input"]["format"], {"type": "audio/pcm", "rate": 24000})
        self.assertEqual(audio["output"]["format"], {"type": "audio/pcm", "rate": 24000})
        self.assertEqual(audio["output"]["voice"], "marin")
        self.assertEqual(audio["input"]["transcription"]["model"], "gpt-4o-mini-transcribe")
        vad = audio["input"]["turn_detection"]
        self.assertEqual(
            (vad["type"], vad["create_response"], vad["interrupt_response"]),
            ("server_vad", True, True),
        )
        self.assertNotIn("SettingsApplied", h.client_types(out))
        out = h.feed(h.session.upstream_opened())
        out += h.up("session.updated", session=session)
        self.assertEqual(h.client_types(out), ["SettingsApplied"])

    def test_model_replaced_reported_once_and_allowed_model_used(self) -> None:
        h = Harness()
        out = h.text(settings())
        warnings = [m for m in h.client(out) if m["type"] == "Warning"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["code"], errors.MODEL_REPLACED)
        self.assertIn("gpt-4o-mini", warnings[0]["description"])

        h = Harness()
        message = settings()
        message["agent"]["think"]["provider"]["model"] = "gpt-realtime-mini"
        out = h.text(message)
        self.assertIn(s.ConnectUpstream("gpt-realtime-mini"), out)
        self.assertNotIn("Warning", h.client_types(out))

    def test_open_ai_voice_speed_and_language(self) -> None:
        h = Harness()
        out = h.text(settings(
            speak={"provider": {"type": "open_ai", "model": "tts-1", "voice": "Cedar", "speed": 1.2}},
            listen={"provider": {"type": "deepgram", "model": "nova-3", "language": "fr-FR"}},
        ))
        session = h.upstream(out)[0]["session"]
        self.assertEqual(session["audio"]["output"]["voice"], "cedar")
        self.assertEqual(session["audio"]["output"]["speed"], 1.2)
        self.assertEqual(session["audio"]["input"]["transcription"]["language"], "fr")

    def test_unknown_voice_uses_default(self) -> None:
        h = Harness(default_voice="alloy")
        out = h.text(settings(speak={"provider": {"type": "open_ai", "model": "x", "voice": "nova"}}))
        self.assertEqual(h.upstream(out)[0]["session"]["audio"]["output"]["voice"], "alloy")

    def test_invalid_settings_names_field_and_corrected_settings_work(self) -> None:
        h = Harness()
        bad = settings()
        bad["agent"]["think"]["prompt"] = 42
        out = h.text(bad)
        [error] = h.client(out)
        self.assertEqual(error["type"], "Error")
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("agent.think.prompt", error["description"])
        self.assertEqual(h.upstream(out), [])
        out = h.configure()
        self.assertIn("SettingsApplied", h.client_types(out))

    def test_unsupported_audio_encoding_refused_naming_field(self) -> None:
        h = Harness()
        bad = settings()
        bad["audio"]["output"] = {"encoding": "opus", "sample_rate": 48000}
        [error] = h.client(h.text(bad))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("audio.output.encoding", error["description"])

    def test_agent_id_string_refused(self) -> None:
        h = Harness()
        message = settings()
        message["agent"] = "0f4c5d1e-agent-id"
        [error] = h.client(h.text(message))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("agent", error["description"])

    def test_context_history_added_not_echoed_and_greeting_after(self) -> None:
        h = Harness()
        out = h.configure(settings(
            context={"messages": [
                {"type": "History", "role": "user", "content": "My name is Ana."},
                {"type": "History", "role": "assistant", "content": "Hello Ana."},
            ]},
            greeting="Welcome back!",
        ))
        self.assertEqual(h.client_types(out).count("ConversationText"), 0)
        items = [e for e in h.upstream(out) if e["type"] == "conversation.item.create"]
        self.assertEqual([i["item"]["role"] for i in items], ["user", "assistant"])
        self.assertEqual(items[1]["item"]["content"][0]["type"], "output_text")
        # The greeting waits until the history is confirmed.
        self.assertNotIn("response.create", h.upstream_types(out))
        h.confirm_item(items[0]["item"]["id"])
        out = h.confirm_item(items[1]["item"]["id"], role="assistant")
        [create] = h.upstream(out)
        self.assertEqual(create["type"], "response.create")
        self.assertIn('"Welcome back!"', create["response"]["instructions"])
        self.assertEqual(h.client_types(out), [])


class ClientMessageTests(SynchronousTestCase):
    def test_unparsable(self) -> None:
        for raw in ["{not json", "[1, 2]", '"text"', '{"no": "type"}', '{"type": 5}']:
            h = Harness()
            out = h.text(raw)
            self.assertEqual(
                [(m["type"], m["code"]) for m in h.client(out)],
                [("Error", errors.UNPARSABLE_CLIENT_MESSAGE)],
                raw,
            )
            self.assertEqual(h.upstream(out), [])

    def test_unsupported_type_named_and_session_continues(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "Dance"})
        [error] = h.client(out)
        self.assertEqual(error["code"], errors.UNSUPPORTED_CLIENT_MESSAGE)
        self.assertIn("Dance", error["description"])
        self.assertEqual(h.upstream(out), [])
        out = h.text({"type": "InjectUserMessage", "content": "hi"})
        self.assertIn("conversation.item.create", h.upstream_types(out))

    def test_keep_alive_sends_nothing(self) -> None:
        h = Harness()
        h.configure()
        self.assertEqual(h.text({"type": "KeepAlive"}), [])


class InjectUserMessageTests(SynchronousTestCase):
    def test_held_until_configured_then_item_then_response_after_confirmation(self) -> None:
        h = Harness()
        out = h.text({"type": "InjectUserMessage", "content": "What time is it?"})
        self.assertEqual(h.upstream(out), [])
        out = h.configure()
        [item] = [e for e in h.upstream(out) if e["type"] == "conversation.item.create"]
        self.assertEqual(item["item"]["role"], "user")
        self.assertEqual(item["item"]["content"], [{"type": "input_text", "text": "What time is it?"}])
        self.assertNotIn("response.create", h.upstream_types(out))
        out = h.confirm_item(item["item"]["id"])
        self.assertEqual(h.upstream_types(out), ["response.create"])
        self.assertEqual(
            h.client(out),
            [{"type": "ConversationText", "role": "user", "content": "What time is it?"},
             {"type": "History", "role": "user", "content": "What time is it?"}],
        )

    def test_history_messages_off_with_flag(self) -> None:
        h = Harness()
        message = settings()
        message["flags"] = {"history": False}
        h.configure(message)
        out = h.text({"type": "InjectUserMessage", "content": "hi"})
        item_id = h.upstream(out)[0]["item"]["id"]
        out = h.confirm_item(item_id)
        self.assertEqual(h.client_types(out), ["ConversationText"])

    def test_mid_reply_interrupts_first(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 4800 * 3)  # 300 ms delivered
        h.time += 0.25
        out = h.text({"type": "InjectUserMessage", "content": "stop"})
        types = h.upstream_types(out)
        self.assertEqual(types[:3], ["response.cancel", "conversation.item.truncate",
                                     "conversation.item.create"])
        truncate = h.upstream(out)[1]
        self.assertEqual(truncate["item_id"], "item_a")
        self.assertIsInstance(truncate["audio_end_ms"], int)
        self.assertEqual(truncate["audio_end_ms"], min(250, 300 - TRUNCATE_MARGIN_MS))
        # No response.create until the cancelled response is done.
        item_id = h.upstream(out)[2]["item"]["id"]
        out = h.confirm_item(item_id)
        self.assertNotIn("response.create", h.upstream_types(out))
        out = h.up("response.done", response={"id": "resp_1", "status": "cancelled", "output": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])
        # Audio of the interrupted reply is no longer forwarded.
        out = h.audio("resp_1", "item_a", 4800)
        self.assertEqual(len([o for o in out if isinstance(o, s.SendClientAudio)]), 0)


class AgentOutputTests(SynchronousTestCase):
    def test_reply_order_latency_and_single_conversation_text(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "InjectUserMessage", "content": "hello"})
        item_id = h.upstream(out)[0]["item"]["id"]
        h.confirm_item(item_id)
        h.time += 0.2
        h.start_response("resp_1")
        h.up("response.output_audio_transcript.delta", response_id="resp_1", item_id="item_a",
             output_index=0, content_index=0, delta="Hi")
        h.time += 0.3
        out = h.audio("resp_1", "item_a", 960)
        out += h.audio("resp_1", "item_a", 960)
        kinds = [type(o).__name__ for o in out if isinstance(o, (s.SendClient, s.SendClientAudio))]
        self.assertEqual(kinds[0], "SendClient")
        started = h.client(out)[0]
        self.assertEqual(started["type"], "AgentStartedSpeaking")
        self.assertAlmostEqual(started["total_latency"], 0.5, places=3)
        self.assertAlmostEqual(started["ttt_latency"], 0.2, places=3)
        self.assertAlmostEqual(started["tts_latency"], 0.3, places=3)
        audio = b"".join(o.data for o in out if isinstance(o, s.SendClientAudio))
        self.assertEqual(audio, b"\x01\x00" * 960)
        out = h.up("response.output_audio.done", response_id="resp_1", item_id="item_a",
                   output_index=0, content_index=0)
        self.assertEqual(h.client_types(out), ["AgentAudioDone"])
        texts = []
        for event_type, extra in [
            ("response.output_audio_transcript.done", {"transcript": "Hi there"}),
            ("response.output_item.done", {}),
        ]:
            if event_type == "response.output_item.done":
                out = h.up(event_type, response_id="resp_1", output_index=0, item={
                    "id": "item_a", "type": "message", "role": "assistant",
                    "content": [{"type": "output_audio", "transcript": "Hi there"}]})
            else:
                out = h.up(event_type, response_id="resp_1", item_id="item_a", output_index=0,
                           content_index=0, **extra)
            texts += [m for m in h.client(out) if m["type"] == "ConversationText"]
        out = h.up("response.done", response={"id": "resp_1", "status": "completed", "output": [
            {"id": "item_a", "type": "message", "role": "assistant",
             "content": [{"type": "output_audio", "transcript": "Hi there"}]}]})
        texts += [m for m in h.client(out) if m["type"] == "ConversationText"]
        self.assertEqual(texts, [{"type": "ConversationText", "role": "assistant",
                                  "content": "Hi there"}])

    def test_agent_audio_done_when_response_ends_without_audio_done(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 960)
        out = h.up("response.done", response={"id": "resp_1", "status": "completed", "output": []})
        self.assertEqual(h.client_types(out), ["AgentAudioDone"])


class FunctionCallTests(SynchronousTestCase):
    def _call(self, h: Harness, call_id: str = "call_1", response_id: str = "resp_1") -> None:
        out = h.up("response.function_call_arguments.done", response_id=response_id,
                   item_id="fc_1", output_index=0, call_id=call_id, name="get_weather",
                   arguments='{"city":"Paris"}')
        # Requested once its item completed (SPEC §5), not while it may still be cut off.
        self.assertEqual(h.client_types(out), [])
        out = h.up("response.output_item.done", response_id=response_id, output_index=0, item={
            "id": "fc_1", "type": "function_call", "call_id": call_id, "name": "get_weather",
            "arguments": '{"city":"Paris"}', "status": "completed"})
        self.assertEqual(h.client_types(out), ["FunctionCallRequest"])

    def test_round_trip_waits_for_response_end_and_item_confirmation(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        self._call(h)
        requests = [m for m in h.client(h.outputs) if m["type"] == "FunctionCallRequest"]
        self.assertEqual(requests, [{"type": "FunctionCallRequest", "functions": [
            {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}',
             "client_side": True}]}])
        out = h.text({"type": "FunctionCallResponse", "id": "call_1", "name": "get_weather",
                      "content": '{"temp": 21}'})
        [item] = h.upstream(out)
        self.assertEqual(item["item"]["type"], "function_call_output")
        self.assertEqual((item["item"]["call_id"], item["item"]["output"]), ("call_1", '{"temp": 21}'))
        out = h.confirm_item(item["item"]["id"], role="tool")
        self.assertEqual(h.upstream(out), [])
        out = h.up("response.done", response={"id": "resp_1", "status": "completed", "output": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])
        history = [m for m in h.client(out) if m["type"] == "History"]
        self.assertEqual(history[0]["function_calls"][0]["response"], '{"temp": 21}')

    def test_two_calls_wait_for_both_outputs(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        self._call(h, "call_1")
        self._call(h, "call_2")
        h.up("response.done", response={"id": "resp_1", "status": "completed", "output": []})
        out = h.text({"type": "FunctionCallResponse", "id": "call_1", "name": "get_weather",
                      "content": "a"})
        h.confirm_item(h.upstream(out)[0]["item"]["id"])
        self.assertNotIn("response.create", h.upstream_types(h.outputs))
        out = h.text({"type": "FunctionCallResponse", "id": "call_2", "name": "get_weather",
                      "content": "b"})
        out = h.confirm_item(h.upstream(out)[0]["item"]["id"])
        self.assertEqual(h.upstream_types(out), ["response.create"])

    def test_timeout_fallback_when_response_never_ends(self) -> None:
        h = Harness(function_call_timeout=7.0)
        h.configure()
        h.start_response("resp_1")
        self._call(h)
        out = h.text({"type": "FunctionCallResponse", "id": "call_1", "name": "get_weather",
                      "content": "x"})
        timers = [o for o in out if isinstance(o, s.StartTimer)]
        self.assertEqual(timers, [s.StartTimer(s.TimerKey(s.TimerKind.FUNCTION_FOLLOWUP, "resp_1"),
                                               7.0)])
        h.confirm_item(h.upstream(out)[0]["item"]["id"])
        out = h.timer(s.TimerKey(s.TimerKind.FUNCTION_FOLLOWUP, "resp_1"))
        self.assertEqual(h.upstream_types(out), ["response.create"])
        self.assertTrue(any(isinstance(o, s.Log) and o.level == "warn" for o in out))

    def test_unknown_call_id(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "FunctionCallResponse", "id": "nope", "name": "x", "content": "y"})
        self.assertEqual(h.client(out)[0]["code"], errors.UNKNOWN_FUNCTION_CALL)
        self.assertEqual(h.upstream(out), [])


class ActiveResponseTests(SynchronousTestCase):
    def test_never_two_response_creates_in_flight(self) -> None:
        h = Harness()
        h.configure(settings(greeting="Hi!"))
        self.assertEqual(h.upstream_types(h.outputs).count("response.create"), 1)
        # A client message while the greeting is requested but not created yet: queued.
        out = h.text({"type": "InjectAgentMessage", "message": "Hold on."})
        self.assertEqual(h.client_types(out), ["InjectionRefused"])
        h.start_response("resp_g")
        out = h.text({"type": "UpdatePrompt", "prompt": "Be brief."})
        self.assertEqual(h.upstream(out), [])
        out = h.up("response.done", response={"id": "resp_g", "status": "completed", "output": []})
        [update] = h.upstream(out)
        self.assertEqual(update["session"], {"type": "realtime",
                                             "instructions": "You are helpful.\nBe brief."})
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["PromptUpdated"])

    def test_server_created_response_blocks_ours(self) -> None:
        h = Harness()
        h.configure()
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=1200, item_id="u1")
        h.start_response("resp_vad")
        out = h.text({"type": "InjectAgentMessage", "message": "x", "behavior": "queue"})
        self.assertNotIn("response.create", h.upstream_types(out))
        out = h.up("response.done", response={"id": "resp_vad", "status": "completed", "output": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])


class UpstreamErrorTests(SynchronousTestCase):
    def test_benign_codes_are_silent(self) -> None:
        h = Harness()
        h.configure()
        for code in sorted(errors.BENIGN_UPSTREAM_CODES):
            out = h.up("error", error={"type": "invalid_request_error", "code": code, "message": "m"})
            self.assertEqual(h.client(out), [], code)

    def test_other_errors_pass_code_through(self) -> None:
        h = Harness()
        h.configure()
        out = h.up("error", error={"type": "invalid_request_error", "code": "rate_limit_exceeded",
                                   "message": "Slow down"})
        self.assertEqual(h.client(out), [{"type": "Error", "description": "Slow down",
                                          "code": "rate_limit_exceeded"}])

    def test_error_answering_settings_lets_client_retry(self) -> None:
        h = Harness()
        out = h.text(settings())
        event_id = h.upstream(out)[0]["event_id"]
        out = h.up("error", error={"type": "invalid_request_error", "code": "unknown_parameter",
                                   "message": "Unknown parameter", "event_id": event_id})
        self.assertEqual(h.client(out)[0]["code"], "unknown_parameter")
        self.assertEqual(h.session.phase, s.Phase.AWAITING_SETTINGS)
        out = h.text(settings())
        update = h.upstream(out)[-1]
        out = h.up("session.updated", session=update["session"])
        self.assertIn("SettingsApplied", h.client_types(out))

    def test_upstream_failure_errors_then_closes(self) -> None:
        h = Harness()
        h.text(settings())
        out = h.feed(h.session.upstream_failed(errors.UPSTREAM_AUTH_FAILED, "refused"))
        self.assertEqual(h.client(out), [{"type": "Error", "description": "refused",
                                          "code": errors.UPSTREAM_AUTH_FAILED}])
        self.assertTrue(any(isinstance(o, s.CloseClient) for o in out))

    def test_malformed_upstream_event_does_not_break_session(self) -> None:
        h = Harness()
        h.configure()
        h.up("response.output_audio.delta", response_id="r", item_id="i")  # no delta
        h.up("response.created", response="not an object")
        out = h.text({"type": "InjectUserMessage", "content": "still here"})
        self.assertIn("conversation.item.create", h.upstream_types(out))


class AudioTests(SynchronousTestCase):
    def test_audio_held_until_ready_then_flushed_in_order(self) -> None:
        h = Harness()
        h.text(settings())
        first = bytes(range(0, 200, 2)) * 20
        second = bytes(range(1, 200, 2)) * 20
        self.assertEqual(h.upstream(h.binary(first)), [])
        h.binary(second)
        out = h.feed(h.session.upstream_opened())
        update = h.upstream(h.outputs)[0]
        out = h.up("session.updated", session=update["session"])
        out += h.timer(s.APPEND_FLUSH_TIMER)
        appended = b"".join(
            base64.b64decode(e["audio"]) for e in h.upstream(out)
            if e["type"] == "input_audio_buffer.append"
        )
        self.assertEqual(appended, first + second)

    def test_overflow_drops_oldest_with_one_warning(self) -> None:
        h = Harness(audio_buffer_seconds=0.1)  # 4800 bytes at 24 kHz linear16
        h.text(settings())
        out = []
        for i in range(4):
            out += h.binary(bytes([i]) * 2000)
        warnings = [m for m in h.client(out) if m["type"] == "Warning"]
        self.assertEqual([w["code"] for w in warnings], [errors.AUDIO_BUFFER_OVERFLOW])
        update = h.upstream(h.outputs)[0]
        out = h.up("session.updated", session=update["session"])
        out += h.timer(s.APPEND_FLUSH_TIMER)
        appended = b"".join(
            base64.b64decode(e["audio"]) for e in h.upstream(out)
            if e["type"] == "input_audio_buffer.append"
        )
        self.assertEqual(len(appended), 4800)
        self.assertEqual(appended[-2000:], bytes([3]) * 2000)

    def test_vad_events(self) -> None:
        h = Harness()
        h.configure()
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=100, item_id="u1")
        self.assertEqual(h.client_types(out), ["UserStartedSpeaking"])
        out = h.up("input_audio_buffer.speech_stopped", audio_end_ms=2350, item_id="u1")
        self.assertEqual(h.client(out), [{"type": "UtteranceEnd", "channel": [0, 1],
                                          "last_word_end": 2.35}])
        out = h.up("conversation.item.input_audio_transcription.completed", item_id="u1",
                   content_index=0, transcript=" Hello there ", usage={"type": "duration",
                                                                       "seconds": 1})
        self.assertEqual(h.client(out)[0], {"type": "ConversationText", "role": "user",
                                            "content": "Hello there"})

    def test_barge_in_truncates_to_delivered_audio(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 300)  # 300 ms sent
        h.time += 5.0  # far more wall time than audio: the bound is what was sent
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        self.assertEqual(h.client_types(out), ["UserStartedSpeaking"])
        [truncate] = h.upstream(out)
        self.assertEqual(truncate, {"type": "conversation.item.truncate",
                                    "event_id": truncate["event_id"], "item_id": "item_a",
                                    "content_index": 0,
                                    "audio_end_ms": 300 - TRUNCATE_MARGIN_MS})
        out = h.audio("resp_1", "item_a", 4800)
        self.assertEqual(len([o for o in out if isinstance(o, s.SendClientAudio)]), 0)

    def test_no_truncate_when_nothing_could_have_been_heard(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 960)  # delivered, but no time has passed since
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        self.assertEqual(h.upstream(out), [])

    def test_no_truncate_without_delivered_audio(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        self.assertEqual(h.upstream(out), [])


class LifecycleTests(SynchronousTestCase):
    def test_client_close_releases_upstream_and_timers(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.up("response.function_call_arguments.done", response_id="resp_1", item_id="f",
             output_index=0, call_id="c1", name="get_weather", arguments="{}")
        h.up("response.output_item.done", response_id="resp_1", output_index=0, item={
            "id": "f", "type": "function_call", "call_id": "c1", "name": "get_weather",
            "arguments": "{}", "status": "completed"})
        h.text({"type": "FunctionCallResponse", "id": "c1", "name": "get_weather", "content": "x"})
        out = h.feed(h.session.client_closed())
        self.assertIn(s.CancelTimer(s.TimerKey(s.TimerKind.FUNCTION_FOLLOWUP, "resp_1")), out)
        self.assertIn(s.CloseUpstream(), out)
        self.assertEqual(h.text({"type": "KeepAlive"}), [])


class BoundsAndRefusalTests(SynchronousTestCase):
    def test_refused_item_does_not_block_later_responses(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "InjectUserMessage", "content": "first"})
        create = h.upstream(out)[0]
        out = h.up("error", error={"type": "invalid_request_error", "code": "invalid_value",
                                   "message": "bad item", "event_id": create["event_id"]})
        self.assertEqual(h.client(out)[0]["code"], "invalid_value")
        self.assertNotIn("response.create", h.upstream_types(out))
        out = h.text({"type": "InjectUserMessage", "content": "second"})
        out = h.confirm_item(h.upstream(out)[0]["item"]["id"])
        self.assertEqual(h.upstream_types(out), ["response.create"])

    def test_waiting_messages_are_bounded(self) -> None:
        h = Harness()
        errors_seen = []
        for i in range(s.MAX_WAITING_REQUESTS + 3):
            out = h.text({"type": "InjectUserMessage", "content": f"m{i}"})
            errors_seen += [m["code"] for m in h.client(out)]
        self.assertEqual(errors_seen, [errors.TOO_MANY_REQUESTS] * 3)

        h.configure()
        h.start_response("resp_long")
        codes = []
        for i in range(s.MAX_WAITING_REQUESTS + 2):
            out = h.text({"type": "UpdatePrompt", "prompt": f"p{i}"})
            codes += [m["code"] for m in h.client(out)]
        self.assertEqual(codes, [errors.TOO_MANY_REQUESTS] * 2)

    def test_prompt_growth_is_bounded(self) -> None:
        h = Harness()
        h.configure()
        chunk = "x" * (s.MAX_INSTRUCTIONS_CHARS // 2)
        out = h.text({"type": "UpdatePrompt", "prompt": chunk})
        self.assertEqual(h.upstream_types(out), ["session.update"])
        h.up("session.updated", session={})
        out = h.text({"type": "UpdatePrompt", "prompt": chunk})
        self.assertEqual([m["code"] for m in h.client(out)], [errors.PROMPT_TOO_LONG])
        self.assertEqual(h.upstream(out), [])

    def test_corrected_settings_keep_the_connected_model(self) -> None:
        h = Harness()
        message = settings()
        message["agent"]["think"]["provider"]["model"] = "gpt-realtime-mini"
        out = h.text(message)
        event_id = h.upstream(out)[0]["event_id"]
        h.up("error", error={"type": "invalid_request_error", "code": "invalid_value",
                             "message": "no", "event_id": event_id})
        out = h.text(settings())
        self.assertFalse(any(isinstance(o, s.ConnectUpstream) for o in out))
        self.assertIn(errors.SETTING_NOT_CHANGEABLE,
                      [m.get("code") for m in h.client(out)])


class RuntimeUpdateTests(SynchronousTestCase):
    def test_update_speak_before_agent_audio_changes_voice_in_one_event(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "UpdateSpeak", "speak": {"provider": {"type": "open_ai", "model": "x",
                                                                    "voice": "coral"}}})
        [update] = h.upstream(out)
        self.assertEqual(update["session"], {"type": "realtime",
                                             "audio": {"output": {"voice": "coral"}}})
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["SpeakUpdated"])

    def test_voice_goes_alone_after_agent_audio_and_refusal_warns(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 960)
        h.up("response.done", response={"id": "resp_1", "status": "completed", "output": []})
        out = h.text({"type": "UpdateSpeak", "speak": {"provider": {
            "type": "open_ai", "model": "x", "voice": "coral", "speed": 1.3}}})
        first, second = h.upstream(out)
        self.assertEqual(first["session"], {"type": "realtime", "audio": {"output": {"speed": 1.3}}})
        self.assertEqual(second["session"], {"type": "realtime",
                                             "audio": {"output": {"voice": "coral"}}})
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["SpeakUpdated"])
        out = h.up("error", error={"type": "invalid_request_error", "code": "cannot_update_voice",
                                   "message": "Cannot update voice", "event_id": second["event_id"]})
        [warning] = h.client(out)
        self.assertEqual((warning["type"], warning["code"]), ("Warning", errors.VOICE_LOCKED))

    def test_update_think_replaces_prompt_and_tools(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "UpdateThink", "think": {
            "provider": {"type": "open_ai", "model": "gpt-realtime"},
            "prompt": "New prompt.",
            "functions": [{"name": "lookup", "description": "Look up",
                           "parameters": {"type": "object", "properties": {}}}]}})
        [update] = h.upstream(out)
        self.assertEqual(update["session"]["instructions"], "New prompt.")
        self.assertEqual([t["name"] for t in update["session"]["tools"]], ["lookup"])
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["ThinkUpdated"])

    def test_update_listen_language_and_unsupported_fields(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "UpdateListen", "listen": {"provider": {
            "type": "deepgram", "version": "v2", "model": "flux-general-multi",
            "language_hints": ["de"], "eot_threshold": 0.8}}})
        [warning] = h.client(out)
        self.assertEqual(warning["code"], errors.UNSUPPORTED_SETTING)
        self.assertIn("eot_threshold", warning["description"])
        [update] = h.upstream(out)
        self.assertEqual(update["session"]["audio"]["input"]["transcription"]["language"], "de")
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["ListenUpdated"])

    def test_second_settings_applies_changes(self) -> None:
        h = Harness()
        h.configure()
        out = h.text(settings(think={"provider": {"type": "open_ai", "model": "gpt-4o-mini"},
                                     "prompt": "Changed."}))
        [update] = h.upstream(out)
        self.assertEqual(update["session"]["instructions"], "Changed.")
        self.assertEqual(update["session"]["tools"], [])
        out = h.up("session.updated", session={})
        self.assertEqual(h.client_types(out), ["SettingsApplied"])

    def test_update_before_settings_is_an_error(self) -> None:
        h = Harness()
        out = h.text({"type": "UpdatePrompt", "prompt": "x"})
        self.assertEqual(h.client(out)[0]["code"], errors.SETTINGS_REQUIRED)


class InjectAgentMessageTests(SynchronousTestCase):
    def test_spoken_verbatim_when_idle(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "InjectAgentMessage", "message": "One moment please."})
        [create] = h.upstream(out)
        self.assertEqual(create["type"], "response.create")
        self.assertIn('"One moment please."', create["response"]["instructions"])

    def test_refused_while_user_speaks_or_agent_replies(self) -> None:
        h = Harness()
        h.configure()
        h.up("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u")
        out = h.text({"type": "InjectAgentMessage", "message": "Hi"})
        self.assertEqual(h.client_types(out), ["InjectionRefused"])
        self.assertEqual(h.upstream(out), [])
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=500, item_id="u")
        h.start_response("resp_1")
        out = h.text({"type": "InjectAgentMessage", "message": "Hi"})
        self.assertEqual(h.client_types(out), ["InjectionRefused"])

    def test_interrupt_behaviour_cancels_the_reply(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 400)
        h.time += 0.3
        out = h.text({"type": "InjectAgentMessage", "message": "Stop.", "behavior": "interrupt"})
        self.assertEqual(h.upstream_types(out)[:2], ["response.cancel", "conversation.item.truncate"])
        out = h.up("response.done", response={"id": "resp_1", "status": "cancelled", "output": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])


class ServerSideFunctionTests(SynchronousTestCase):
    PREFIX = "https://tools.example.com/api"

    def settings_with_endpoint(self, url: str) -> dict[str, Any]:
        message = settings()
        message["agent"]["think"]["functions"] = [{
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "endpoint": {"url": url, "method": "POST", "headers": {"authorization": "Bearer t0k"}},
        }]
        return message

    def test_refused_when_not_enabled(self) -> None:
        h = Harness()
        [error] = h.client(h.text(self.settings_with_endpoint(self.PREFIX + "/weather")))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("agent.think.functions[0].endpoint", error["description"])

    def test_refused_outside_the_allow_list(self) -> None:
        h = Harness(function_url_prefixes=(self.PREFIX,))
        for url in ["https://evil.example.com/api/weather", self.PREFIX + "x/weather",
                    "https://tools.example.com@evil.example.com/api/weather"]:
            [error] = h.client(h.text(self.settings_with_endpoint(url)))
            self.assertEqual(error["code"], errors.INVALID_SETTINGS, url)
            self.assertIn("agent.think.functions[0].endpoint", error["description"])
            self.assertNotIn("t0k", error["description"])

    def test_daemon_calls_the_endpoint_and_reports_both_halves(self) -> None:
        h = Harness(function_url_prefixes=(self.PREFIX,))
        out = h.configure(self.settings_with_endpoint(self.PREFIX + "/weather"))
        [update] = [e for e in h.upstream(out) if e["type"] == "session.update"]
        self.assertNotIn("endpoint", json.dumps(update))
        h.start_response("resp_1")
        h.up("response.function_call_arguments.done", response_id="resp_1", item_id="fc",
             output_index=0, call_id="call_9", name="get_weather", arguments='{"city":"Oslo"}')
        out = h.up("response.output_item.done", response_id="resp_1", output_index=0, item={
            "id": "fc", "type": "function_call", "call_id": "call_9", "name": "get_weather",
            "arguments": '{"city":"Oslo"}', "status": "completed"})
        [request] = h.client(out)
        self.assertFalse(request["functions"][0]["client_side"])
        [call] = [o for o in out if isinstance(o, s.CallFunction)]
        self.assertEqual((call.call_id, call.endpoint.url), ("call_9", self.PREFIX + "/weather"))
        # The client may not answer a server-side call itself.
        out = h.text({"type": "FunctionCallResponse", "id": "call_9", "name": "get_weather",
                      "content": "forged"})
        self.assertEqual(h.client(out)[0]["code"], errors.UNKNOWN_FUNCTION_CALL)
        out = h.feed(h.session.function_result("call_9", '{"temp": 3}'))
        self.assertEqual(h.client(out), [{"type": "FunctionCallResponse", "id": "call_9",
                                          "name": "get_weather", "content": '{"temp": 3}'}])
        [item] = h.upstream(out)
        self.assertEqual(item["item"]["output"], '{"temp": 3}')
        h.confirm_item(item["item"]["id"])
        out = h.up("response.done", response={"id": "resp_1", "status": "completed", "output": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])
        [history] = [m for m in h.client(out) if m["type"] == "History"]
        self.assertFalse(history["function_calls"][0]["client_side"])


class TolerantUpstreamTests(SynchronousTestCase):
    def test_response_done_without_created_unblocks_the_next_response(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "InjectUserMessage", "content": "one"})
        h.confirm_item(h.upstream(out)[0]["item"]["id"])
        h.up("response.done", response={"id": "resp_x", "status": "completed", "output": []})
        out = h.text({"type": "InjectUserMessage", "content": "two"})
        out = h.confirm_item(h.upstream(out)[0]["item"]["id"])
        self.assertEqual(h.upstream_types(out), ["response.create"])

    def test_beta_item_created_confirms_an_item(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "InjectUserMessage", "content": "hi"})
        item_id = h.upstream(out)[0]["item"]["id"]
        out = h.up("conversation.item.created", item={"id": item_id, "type": "message",
                                                      "role": "user", "content": []})
        self.assertEqual(h.upstream_types(out), ["response.create"])


class UpdateThinkModelTests(SynchronousTestCase):
    def test_repeating_a_replaced_model_is_no_change(self) -> None:
        h = Harness()
        h.configure()  # names gpt-4o-mini, replaced by gpt-realtime
        out = h.text({"type": "UpdateThink", "think": {
            "provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "prompt": "New."}})
        self.assertNotIn("Warning", h.client_types(out))

    def test_asking_for_another_realtime_model_warns(self) -> None:
        h = Harness()
        h.configure()
        out = h.text({"type": "UpdateThink", "think": {
            "provider": {"type": "open_ai", "model": "gpt-realtime-mini"}, "prompt": "New."}})
        self.assertEqual([m["code"] for m in h.client(out) if m["type"] == "Warning"],
                         [errors.SETTING_NOT_CHANGEABLE])


class UnsupportedSettingsTests(SynchronousTestCase):
    def test_think_live_refused_naming_it(self) -> None:
        h = Harness()
        [error] = h.client(h.text(settings(think_live={"provider": {"type": "deepgram",
                                                                    "version": "v1"}})))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertTrue(error["description"].startswith("agent.think_live"))

    def test_custom_think_endpoint_refused(self) -> None:
        h = Harness()
        message = settings()
        message["agent"]["think"]["endpoint"] = {"url": "https://llm.example.com/v1"}
        [error] = h.client(h.text(message))
        self.assertTrue(error["description"].startswith("agent.think.endpoint"))


class InterruptedReplyTextTests(SynchronousTestCase):
    """
    An interrupted reply's assistant text never follows the interruption (docs/protocol.md,
    "Barge-in"): Deepgram sends an utterance's text before its audio, never after
    ``UserStartedSpeaking``, and the React component reads late assistant text as a new reply.
    """

    @staticmethod
    def finish(h: Harness, response_id: str, item_id: str, transcript: str,
               status: str = "cancelled") -> list[s.Output]:
        """What the upstream sends when a response with one spoken item ends."""
        item = {"id": item_id, "type": "message", "role": "assistant",
                "content": [{"type": "output_audio", "transcript": transcript}]}
        out = h.up("response.output_audio_transcript.done", response_id=response_id, item_id=item_id,
                   output_index=0, content_index=0, transcript=transcript)
        out += h.up("response.output_item.done", response_id=response_id, output_index=0, item=item)
        out += h.up("response.done", response={"id": response_id, "status": status, "output": [item]})
        return out

    @staticmethod
    def texts(out: list[s.Output]) -> list[dict[str, Any]]:
        return [m for m in Harness.client(out) if m["type"] in ("ConversationText", "History")]

    def test_barge_in_during_audio(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 300)
        h.time += 0.2
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        self.assertEqual(h.client_types(out), ["UserStartedSpeaking"])
        out = self.finish(h, "resp_1", "item_a", "Let me tell you about the weather in")
        self.assertEqual(self.texts(out), [])
        # The user's turn and the next reply are reported as usual.
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u2")
        out = h.up("conversation.item.input_audio_transcription.completed", item_id="u2",
                   content_index=0, transcript="stop", usage={"type": "duration", "seconds": 1})
        self.assertEqual(self.texts(out)[0], {"type": "ConversationText", "role": "user",
                                              "content": "stop"})
        h.start_response("resp_2")
        h.audio("resp_2", "item_b", 960)
        out = self.finish(h, "resp_2", "item_b", "Okay.", status="completed")
        self.assertEqual([m for m in self.texts(out) if m["type"] == "ConversationText"],
                         [{"type": "ConversationText", "role": "assistant", "content": "Okay."}])

    def test_barge_in_before_any_audio(self) -> None:
        # Server VAD cancels a reply still being generated: its text would come after the user spoke.
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        out = self.finish(h, "resp_1", "item_a", "Sure")
        self.assertEqual(self.texts(out), [])

    def test_inject_user_message_interrupts(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 4800)
        h.time += 0.05
        h.text({"type": "InjectUserMessage", "content": "stop"})
        out = self.finish(h, "resp_1", "item_a", "Here is a long story")
        self.assertEqual([m for m in self.texts(out) if m.get("role") == "assistant"], [])

    def test_inject_agent_message_interrupts(self) -> None:
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 960)
        h.time += 0.01
        h.text({"type": "InjectAgentMessage", "message": "Stop.", "behavior": "interrupt"})
        out = self.finish(h, "resp_1", "item_a", "Once upon a time")
        self.assertEqual(self.texts(out), [])

    def test_speech_after_the_reply_ended_keeps_its_text(self) -> None:
        # The reply's text was sent when it ended; speaking while it still plays takes nothing back
        # and does not silence the next reply.
        h = Harness()
        h.configure()
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 960)
        out = self.finish(h, "resp_1", "item_a", "Hello!", status="completed")
        self.assertEqual(len([m for m in self.texts(out) if m["type"] == "ConversationText"]), 1)
        h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=500, item_id="u2")
        h.start_response("resp_2")
        out = self.finish(h, "resp_2", "item_b", "Yes?", status="completed")
        self.assertEqual([m["content"] for m in self.texts(out) if m["type"] == "ConversationText"],
                         ["Yes?"])
