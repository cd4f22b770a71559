"""
The response/turn lifecycle against event sequences the real API produces (SPEC §4–§6), in memory.

Each class is one kind of fault; its tests are the named sequence and its siblings.  Every event the
session sends upstream is validated with the ``openai`` GA types (the harness does it), and every frame
either way must be strict JSON.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.replies import TRUNCATE_MARGIN_MS
from openai_proxy.scheduling import ResponseState
from openai_proxy.tests.test_session import Harness, settings

WATCHDOG = s.TimerKey(s.TimerKind.RESPONSE_WATCHDOG)


def strict_json(outputs: list[s.Output]) -> None:
    """Every frame either way serialises as RFC 8259 JSON (no NaN/Infinity)."""
    for output in outputs:
        if isinstance(output, s.SendClient):
            json.dumps(output.message, allow_nan=False)
        elif isinstance(output, s.SendUpstream):
            json.dumps(output.event, allow_nan=False)


def ready() -> Harness:
    h = Harness(response_timeout=15.0)
    h.configure()
    return h


def inject_user(h: Harness, content: str) -> str:
    """Send InjectUserMessage; returns the id of the item the daemon created."""
    out = h.text({"type": "InjectUserMessage", "content": content})
    [create] = [e for e in h.upstream(out) if e["type"] == "conversation.item.create"]
    item_id: str = create["item"]["id"]
    return item_id


def response_creates(outputs: list[s.Output]) -> list[dict[str, Any]]:
    return [e for e in Harness.upstream(outputs) if e["type"] == "response.create"]


def done(h: Harness, response_id: str, status: str = "completed", **fields: Any) -> list[s.Output]:
    return h.up("response.done", response={"id": response_id, "status": status, "output": [],
                                           **fields})


def answered_after(h: Harness, content: str = "and now?") -> list[s.Output]:
    """Ask a new question and confirm its item: what the session sends (a response.create, if any)."""
    item = inject_user(h, content)
    return h.confirm_item(item)


class PipelinedInjectionTests(SynchronousTestCase):
    """Fault 1: messages that arrive together are answered by one response."""

    def test_back_to_back_messages_get_one_response(self) -> None:
        h = ready()
        first = inject_user(h, "first question")
        second = inject_user(h, "second question")
        out = h.confirm_item(first)
        self.assertEqual(response_creates(out), [], "a response before every message exists")
        out = h.confirm_item(second)
        self.assertEqual(len(response_creates(out)), 1)
        self.assertEqual(len(response_creates(h.outputs)), 1)
        self.assertNotIn("response.cancel", h.upstream_types(h.outputs))

    def test_message_while_the_requested_response_has_not_started(self) -> None:
        h = ready()
        out = h.confirm_item(inject_user(h, "first question"))
        self.assertEqual(len(response_creates(out)), 1)
        out = h.confirm_item(inject_user(h, "second question"))
        self.assertEqual(response_creates(out), [])
        self.assertNotIn("response.cancel", h.upstream_types(out))
        h.start_response("resp_1")
        out = done(h, "resp_1")
        self.assertEqual(response_creates(out), [])
        self.assertEqual(len(response_creates(h.outputs)), 1)

    def test_three_messages_and_echo_each_once(self) -> None:
        h = ready()
        items = [inject_user(h, f"q{i}") for i in range(3)]
        for item in items:
            h.confirm_item(item)
        self.assertEqual(len(response_creates(h.outputs)), 1)
        echoes = [m["content"] for m in h.client(h.outputs)
                  if m["type"] == "ConversationText" and m["role"] == "user"]
        self.assertEqual(echoes, ["q0", "q1", "q2"])

    def test_message_mid_reply_still_interrupts_and_answers(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "first"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 400)
        h.time += 0.3
        out = h.text({"type": "InjectUserMessage", "content": "second"})
        self.assertIn("response.cancel", h.upstream_types(out))
        h.confirm_item(h.upstream(out)[-1]["item"]["id"])
        out = done(h, "resp_1", "cancelled")
        self.assertEqual(len(response_creates(out)), 1)


class VadRaceTests(SynchronousTestCase):
    """Fault 2: the daemon's response.create loses the race with server VAD's response."""

    def race(self, h: Harness, created_first: bool = True) -> dict[str, Any]:
        out = h.text({"type": "InjectAgentMessage", "message": "Welcome back!"})
        [request] = response_creates(out)
        h.up("input_audio_buffer.speech_started", audio_start_ms=100, item_id="u1")
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="u1")
        h.up("input_audio_buffer.committed", item_id="u1", previous_item_id=None)
        lost = {"type": "invalid_request_error", "code": "conversation_already_has_active_response",
                "message": "Conversation already has an active response in progress.",
                "param": None, "event_id": request["event_id"]}
        if created_first:
            h.start_response("resp_vad")
            out = h.up("error", error=lost)
        else:
            out = h.up("error", error=lost)
            out += h.start_response("resp_vad")
        self.assertEqual(h.client_types(out), [], "a benign race reached the client")
        return request

    def test_agent_message_is_retried_after_the_winning_response(self) -> None:
        h = ready()
        request = self.race(h)
        out = done(h, "resp_vad")
        [retry] = response_creates(out)
        self.assertEqual(retry["response"]["instructions"], request["response"]["instructions"])
        self.assertNotEqual(retry["event_id"], request["event_id"])
        self.assertNotIn("InjectionRefused", h.client_types(h.outputs))

    def test_error_before_the_winners_response_created(self) -> None:
        h = ready()
        self.race(h, created_first=False)
        self.assertEqual(h.session.response_state, ResponseState.ACTIVE)
        out = done(h, "resp_vad")
        self.assertEqual(len(response_creates(out)), 1)

    def test_a_second_loss_refuses_the_message(self) -> None:
        h = ready()
        self.race(h)
        [retry] = response_creates(done(h, "resp_vad"))
        h.start_response("resp_vad2")
        out = h.up("error", error={"type": "invalid_request_error",
                                   "code": "conversation_already_has_active_response",
                                   "message": "busy", "param": None, "event_id": retry["event_id"]})
        self.assertEqual(h.client_types(out), ["InjectionRefused"])
        out = done(h, "resp_vad2")
        self.assertEqual(response_creates(out), [])

    def test_never_two_response_creates_while_one_is_active(self) -> None:
        h = ready()
        self.race(h)
        out = answered_after(h)
        self.assertEqual(response_creates(out), [], "response.create while VAD's response is active")


class StuckResponseTests(SynchronousTestCase):
    """Fault 3 and siblings: no state waits forever on the upstream."""

    def mid_reply_server_error(self) -> Harness:
        h = ready()
        h.confirm_item(inject_user(h, "tell me a story"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 500)
        out = h.up("error", error={"type": "server_error", "code": None,
                                   "message": "The server had an error.", "param": None,
                                   "event_id": None})
        self.assertEqual(h.client(out)[0]["code"], "server_error")
        return h

    def test_cancel_not_active_ends_the_response(self) -> None:
        h = self.mid_reply_server_error()
        h.time += 1.0
        out = h.text({"type": "InjectUserMessage", "content": "hello?"})
        self.assertIn("response.cancel", h.upstream_types(out))
        item = [e for e in h.upstream(out) if e["type"] == "conversation.item.create"][0]
        out = h.up("error", error={"type": "invalid_request_error", "code": "response_cancel_not_active",
                                   "message": "no active response", "param": None,
                                   "event_id": h.upstream(out)[0]["event_id"]})
        self.assertEqual(h.client(out), [])
        out = h.confirm_item(item["item"]["id"])
        self.assertEqual(len(response_creates(out)), 1)

    def test_a_quiet_upstream_is_given_up_on(self) -> None:
        h = self.mid_reply_server_error()
        out = h.text({"type": "InjectAgentMessage", "message": "Are you there?"})
        self.assertEqual(h.client_types(out), ["InjectionRefused"])
        h.time += 15.0
        out = h.timer(WATCHDOG)
        self.assertEqual(h.session.response_state, ResponseState.IDLE)
        self.assertTrue(any(isinstance(o, s.Log) and o.level == "warn" for o in out))
        out = h.text({"type": "InjectAgentMessage", "message": "Are you there?"})
        self.assertEqual(len(response_creates(out)), 1)

    def test_the_watchdog_waits_while_the_response_is_alive(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "long story"))
        h.start_response("resp_1")
        for _ in range(5):
            h.time += 10.0
            h.audio("resp_1", "item_a", 48 * 20)
            out = h.timer(WATCHDOG)
            self.assertEqual(h.session.response_state, ResponseState.ACTIVE)
            self.assertTrue(any(isinstance(o, s.StartTimer) and o.name == WATCHDOG for o in out))

    def test_a_requested_response_that_never_starts(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "hi"))
        self.assertEqual(h.session.response_state, ResponseState.REQUESTED)
        h.time += 16.0
        h.timer(WATCHDOG)
        out = answered_after(h)
        self.assertEqual(len(response_creates(out)), 1)

    def test_a_cancel_never_answered(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "hi"))
        h.start_response("resp_1")
        h.text({"type": "InjectUserMessage", "content": "stop"})
        self.assertEqual(h.session.response_state, ResponseState.CANCELLING)
        h.time += 16.0
        h.timer(WATCHDOG)
        self.assertEqual(h.session.response_state, ResponseState.IDLE)

    def test_timeouts_are_released_when_the_client_leaves(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "hi"))
        out = h.feed(h.session.client_closed())
        self.assertIn(s.CancelTimer(WATCHDOG), out)

    def test_settings_never_answered(self) -> None:
        h = Harness(response_timeout=15.0)
        out = h.text(settings())
        self.assertIn(s.StartTimer(s.TimerKey(s.TimerKind.UPDATE_WATCHDOG), 15.0), out)
        h.time += 15.0
        out = h.timer(s.TimerKey(s.TimerKind.UPDATE_WATCHDOG))
        [error] = h.client(out)
        self.assertEqual(error["code"], errors.UPSTREAM_TIMEOUT)
        # A corrected Settings is still possible.
        out = h.text(settings())
        update = h.upstream(out)[-1]
        out = h.up("session.updated", session=update["session"])
        self.assertIn("SettingsApplied", h.client_types(out))

    def test_settings_answered_by_an_error_without_event_id(self) -> None:
        h = Harness()
        h.text(settings())
        out = h.up("error", error={"type": "invalid_request_error", "code": "invalid_value",
                                   "message": "bad session", "param": None, "event_id": None})
        [error] = h.client(out)
        self.assertEqual((error["type"], error["code"]), ("Error", "invalid_value"))
        self.assertIn(s.CancelTimer(s.TimerKey(s.TimerKind.UPDATE_WATCHDOG)), out)

    def test_update_prompt_never_answered(self) -> None:
        h = ready()
        h.text({"type": "UpdatePrompt", "prompt": "Be brief."})
        h.time += 15.0
        out = h.timer(s.TimerKey(s.TimerKind.UPDATE_WATCHDOG))
        [warning] = h.client(out)
        self.assertEqual((warning["type"], warning["code"]), ("Warning", errors.UPSTREAM_TIMEOUT))
        out = answered_after(h)
        self.assertEqual(len(response_creates(out)), 1)


class CutOffFunctionCallTests(SynchronousTestCase):
    """Fault 4: only calls that completed with JSON arguments are requested."""

    def call_cut_off(self, h: Harness, *, item_done: bool = True) -> list[s.Output]:
        h.confirm_item(inject_user(h, "weather in Paris?"))
        h.start_response("resp_1")
        out = h.up("response.output_item.added", response_id="resp_1", output_index=0, item={
            "id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": "", "status": "in_progress"})
        out += h.up("response.function_call_arguments.delta", response_id="resp_1", item_id="fc_1",
                    output_index=0, call_id="call_1", delta='{"city":"Pa')
        out += h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        out += h.up("response.function_call_arguments.done", response_id="resp_1", item_id="fc_1",
                    output_index=0, call_id="call_1", name="get_weather", arguments='{"city":"Pa')
        incomplete = {"id": "fc_1", "type": "function_call", "call_id": "call_1",
                      "name": "get_weather", "arguments": '{"city":"Pa', "status": "incomplete"}
        if item_done:
            out += h.up("response.output_item.done", response_id="resp_1", output_index=0,
                        item=incomplete)
        out += h.up("response.done", response={"id": "resp_1", "status": "cancelled",
                                               "status_details": {"type": "cancelled",
                                                                  "reason": "turn_detected"},
                                               "output": [incomplete]})
        return out

    def test_cut_off_call_is_not_requested(self) -> None:
        h = ready()
        out = self.call_cut_off(h)
        self.assertNotIn("FunctionCallRequest", h.client_types(out))
        self.assertTrue(any(isinstance(o, s.Log) and "call_1" in str(o.fields) for o in out))
        self.assertEqual(h.session.response_state, ResponseState.IDLE)

    def test_cut_off_call_without_its_item_done(self) -> None:
        h = ready()
        out = self.call_cut_off(h, item_done=False)
        self.assertNotIn("FunctionCallRequest", h.client_types(out))

    def test_completed_call_with_arguments_that_are_not_json(self) -> None:
        h = ready()
        h.start_response("resp_1")
        h.up("response.function_call_arguments.done", response_id="resp_1", item_id="fc",
             output_index=0, call_id="c", name="get_weather", arguments='{"city": NaN}')
        out = h.up("response.output_item.done", response_id="resp_1", output_index=0, item={
            "id": "fc", "type": "function_call", "call_id": "c", "name": "get_weather",
            "arguments": '{"city": NaN}', "status": "completed"})
        self.assertEqual(h.client_types(out), [])

    def test_completed_call_only_in_response_done(self) -> None:
        h = ready()
        h.start_response("resp_1")
        h.up("response.function_call_arguments.done", response_id="resp_1", item_id="fc",
             output_index=0, call_id="c", name="get_weather", arguments='{"city":"Oslo"}')
        out = done(h, "resp_1", output=[{"id": "fc", "type": "function_call", "call_id": "c",
                                          "name": "get_weather", "arguments": '{"city":"Oslo"}',
                                          "status": "completed"}])
        [request] = [m for m in h.client(out) if m["type"] == "FunctionCallRequest"]
        self.assertEqual(request["functions"][0]["arguments"], '{"city":"Oslo"}')


class HousekeepingTests(SynchronousTestCase):
    """Fault 5: truncate with a margin; errors answering the daemon's own events are logged only."""

    def barged(self) -> tuple[Harness, dict[str, Any]]:
        h = ready()
        h.confirm_item(inject_user(h, "story"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 1000)
        h.up("response.output_audio.done", response_id="resp_1", item_id="item_a", output_index=0,
             content_index=0)
        h.time += 5.0  # everything delivered has been heard
        h.text({"type": "InjectUserMessage", "content": "wait"})
        truncate = [e for e in h.upstream(h.outputs) if e["type"] == "conversation.item.truncate"]
        return h, (truncate[0] if truncate else {})

    def test_truncate_leaves_a_margin(self) -> None:
        _, truncate = self.barged()
        self.assertEqual(truncate, {})  # fully heard and complete: nothing to cut

    def test_streaming_item_is_cut_with_a_margin(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "story"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 1000)
        h.time += 5.0
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        [truncate] = h.upstream(out)
        self.assertEqual(truncate["audio_end_ms"], 1000 - TRUNCATE_MARGIN_MS)

    def test_errors_answering_housekeeping_are_not_sent(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "story"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 1000)
        h.time += 0.6
        out = h.text({"type": "InjectUserMessage", "content": "stop"})
        for event in h.upstream(out):
            if event["type"] in ("conversation.item.truncate", "response.cancel"):
                answer = h.up("error", error={
                    "type": "invalid_request_error", "code": "invalid_value",
                    "message": "Audio content of 915ms is already shorter than 1000ms",
                    "param": "audio_end_ms", "event_id": event["event_id"]})
                self.assertEqual(h.client(answer), [], event["type"])
                self.assertTrue(any(isinstance(o, s.Log) for o in answer))

    def test_error_answering_a_delete_is_not_sent(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "story"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 300)
        h.up("response.output_audio.done", response_id="resp_1", item_id="item_a", output_index=0,
             content_index=0)
        h.audio("resp_1", "item_b", 48 * 300)
        h.time += 0.1
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        [delete] = [e for e in h.upstream(out) if e["type"] == "conversation.item.delete"]
        answer = h.up("error", error={"type": "invalid_request_error", "code": "item_not_found",
                                      "message": "no such item", "param": None,
                                      "event_id": delete["event_id"]})
        self.assertEqual(h.client(answer), [])

    def test_an_error_answering_the_clients_own_request_is_still_sent(self) -> None:
        h = ready()
        out = h.text({"type": "InjectUserMessage", "content": "hi"})
        create = h.upstream(out)[0]
        answer = h.up("error", error={"type": "invalid_request_error", "code": "invalid_value",
                                      "message": "bad item", "param": None,
                                      "event_id": create["event_id"]})
        self.assertEqual(h.client_types(answer), ["Error"])


class IgnoredSettingsTests(SynchronousTestCase):
    """Fault 6: every field that is not a v1 setting gets a Warning naming its path."""

    def warnings(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        h = Harness()
        out = h.text(message)
        return [m for m in h.client(out)
                if m["type"] == "Warning" and m["code"] == errors.UNSUPPORTED_SETTING]

    def test_misplaced_and_early_access_fields(self) -> None:
        message = settings()
        message["greeting"] = "Hello!"
        message["agent"]["mip_opt_out"] = True
        message["agent"]["think"]["instructions"] = "You are a pirate."
        del message["agent"]["think"]["prompt"]
        warnings = self.warnings(message)
        self.assertEqual([w["code"] for w in warnings], [errors.UNSUPPORTED_SETTING] * 3)
        text = " ".join(w["description"] for w in warnings)
        for path, hint in [("greeting", "agent.greeting"), ("agent.mip_opt_out", "mip_opt_out"),
                           ("agent.think.instructions", "agent.think.prompt")]:
            self.assertIn(path, text)
            self.assertIn(hint, text)

    def test_misspelled_nested_fields(self) -> None:
        message = settings()
        message["audio"]["input"]["sample_rte"] = 16000
        message["agent"]["think"]["functions"][0]["paramters"] = {}
        warnings = self.warnings(message)
        self.assertEqual(sorted(w["description"].split()[0] for w in warnings),
                         ["agent.think.functions[0].paramters", "audio.input.sample_rte"])

    def test_a_giant_key_gives_a_bounded_warning(self) -> None:
        message = settings()
        message["agent"]["x" * 100_000] = 1
        [warning] = self.warnings(message)
        self.assertLess(len(warning["description"]), 400)

    def test_every_documented_field_is_quiet(self) -> None:
        message = settings(
            language="en",
            greeting="Hi!",
            context={"messages": [{"type": "History", "role": "user", "content": "hello"}]},
            listen={"provider": {"type": "deepgram", "model": "nova-3", "keyterms": ["x"],
                                 "smart_format": True}},
        )
        message.update(tags=["a"], experimental=False, mip_opt_out=True, flags={"history": True})
        message["audio"]["output"]["bitrate"] = 48000
        message["agent"]["think"]["context_length"] = "max"
        message["agent"]["think"]["provider"]["temperature"] = 0.5
        message["agent"]["speak"]["endpoint"] = {"url": "https://tts.example/", "headers": {}}
        self.assertEqual(self.warnings(message), [])


class ResponseStatusTests(SynchronousTestCase):
    """Fault 7: every response.done status and failed transcriptions, as SPEC §5 says."""

    def test_failed_with_an_error_code(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "hi"))
        h.start_response("resp_1")
        out = done(h, "resp_1", "failed", status_details={
            "type": "failed", "error": {"type": "invalid_request_error", "code": "insufficient_quota",
                                        "message": "You exceeded your current quota."}})
        [warning] = [m for m in h.client(out) if m["type"] in ("Warning", "Error")]
        self.assertEqual(warning["code"], "insufficient_quota")
        self.assertEqual(len(response_creates(answered_after(h))), 1)

    def test_failed_without_details(self) -> None:
        h = ready()
        h.start_response("resp_1")
        out = done(h, "resp_1", "failed")
        self.assertEqual([m["code"] for m in h.client(out)], [errors.RESPONSE_FAILED])

    def test_incomplete_names_the_reason(self) -> None:
        for reason in ("max_output_tokens", "content_filter"):
            h = ready()
            h.start_response("resp_1")
            h.audio("resp_1", "item_a", 4800)
            out = done(h, "resp_1", "incomplete",
                       status_details={"type": "incomplete", "reason": reason})
            types = h.client_types(out)
            self.assertEqual(types, ["AgentAudioDone", "Warning"])
            [warning] = [m for m in h.client(out) if m["type"] == "Warning"]
            self.assertEqual(warning["code"], errors.RESPONSE_INCOMPLETE)
            self.assertIn(reason, warning["description"])

    def test_cancelled_is_quiet(self) -> None:
        h = ready()
        h.start_response("resp_1")
        out = done(h, "resp_1", "cancelled",
                   status_details={"type": "cancelled", "reason": "turn_detected"})
        self.assertEqual(h.client(out), [])

    def test_transcription_failed(self) -> None:
        h = ready()
        out = h.up("conversation.item.input_audio_transcription.failed", item_id="u1",
                   content_index=0, error={"type": "transcription_error", "code": "audio_unintelligible",
                                           "message": "Audio could not be transcribed"})
        [warning] = h.client(out)
        self.assertEqual((warning["type"], warning["code"]), ("Warning", errors.TRANSCRIPTION_FAILED))
        self.assertEqual(len(response_creates(answered_after(h))), 1)

    def test_items_accounted_one_by_one(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "two things"))
        h.start_response("resp_1")
        h.up("response.output_item.added", response_id="resp_1", output_index=0, item={
            "id": "item_a", "type": "message", "role": "assistant", "content": [],
            "status": "in_progress"})
        h.audio("resp_1", "item_a", 48 * 1000)
        h.up("response.output_audio.done", response_id="resp_1", item_id="item_a", output_index=0,
             content_index=0)
        h.audio("resp_1", "item_b", 48 * 800)
        h.up("response.output_audio.done", response_id="resp_1", item_id="item_b", output_index=1,
             content_index=0)
        h.audio("resp_1", "item_c", 48 * 500)
        h.up("response.output_item.added", response_id="resp_1", output_index=3, item={
            "id": "item_d", "type": "message", "role": "assistant", "content": [],
            "status": "in_progress"})
        h.time += 1.3  # all of item_a and 300 ms of item_b were heard
        out = h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        events = h.upstream(out)
        self.assertEqual([(e["type"], e["item_id"]) for e in events], [
            ("conversation.item.truncate", "item_b"),
            ("conversation.item.delete", "item_c"),
            ("conversation.item.delete", "item_d"),
        ])
        self.assertEqual(events[0]["audio_end_ms"], 300)


class UpstreamValueTests(SynchronousTestCase):
    """Upstream values are checked against their GA types before use (SPEC §3, §5)."""

    def test_odd_audio_end_ms(self) -> None:
        for value in (float("nan"), float("inf"), 1e308, 10 ** 400, -5, "12", True, None):
            h = ready()
            out = h.feed(h.session.upstream_event({"type": "input_audio_buffer.speech_stopped",
                                                   "audio_end_ms": value, "item_id": "u"}))
            strict_json(out)
            [end] = h.client(out)
            self.assertEqual(end["last_word_end"], 0.0, repr(value)[:20])
            self.assertEqual(len(response_creates(answered_after(h))), 1)

    def test_response_created_with_a_numeric_id(self) -> None:
        h = ready()
        h.confirm_item(inject_user(h, "hi"))
        out = h.feed(h.session.upstream_event({"type": "response.created", "response": {"id": 5}}))
        self.assertEqual(h.client(out), [])
        self.assertTrue(any(isinstance(o, s.Log) and o.level == "warn" for o in out))
        h.feed(h.session.upstream_event({"type": "response.done", "response": {"id": 5}}))
        h.time += 16.0
        h.timer(WATCHDOG)
        self.assertEqual(len(response_creates(answered_after(h))), 1)

    def test_odd_error_fields(self) -> None:
        for error in ({"type": "server_error", "code": 500, "message": {"text": "x"}},
                      {"type": 7, "code": None, "message": None},
                      {"code": "x" * 10000, "message": "y" * 100000}):
            h = ready()
            out = h.feed(h.session.upstream_event({"type": "error", "error": error}))
            strict_json(out)
            [message] = h.client(out)
            self.assertIsInstance(message["code"], str)
            self.assertIsInstance(message["description"], str)
            self.assertLessEqual(len(message["description"]), 2000)
            self.assertEqual(len(response_creates(answered_after(h))), 1)

    def test_non_json_values_in_audio_and_text(self) -> None:
        h = ready()
        h.start_response("resp_1")
        for event in ({"type": "response.output_audio.delta", "response_id": "resp_1",
                       "item_id": "a", "delta": float("nan")},
                      {"type": "response.output_audio_transcript.done", "response_id": "resp_1",
                       "item_id": "a", "transcript": float("inf")},
                      {"type": "response.function_call_arguments.done", "response_id": "resp_1",
                       "item_id": "f", "call_id": "c", "name": "get_weather", "arguments": None}):
            out = h.feed(h.session.upstream_event(event))
            strict_json(out)
            self.assertEqual(h.client(out), [])


class StrictClientJsonTests(SynchronousTestCase):
    """Client JSON that is not RFC 8259 JSON is refused with a clear Error."""

    def test_non_finite_numbers(self) -> None:
        for bad in ("NaN", "Infinity", "-Infinity", "1e999", "-1e400"):
            h = Harness()
            message = json.dumps(settings()).replace('"required": ["city"]',
                                                    f'"required": ["city"], "maximum": {bad}')
            self.assertIn(bad, message)
            [error] = h.client(h.text(message))
            self.assertEqual(error["code"], errors.UNPARSABLE_CLIENT_MESSAGE, bad)
            self.assertEqual(h.upstream(h.outputs), [])
            strict_json(h.outputs)

    def test_deep_nesting(self) -> None:
        h = Harness()
        depth = 100_000
        message = '{"type": "Settings", "agent": ' + "[" * depth + "]" * depth + "}"
        out = h.text(message)
        [error] = h.client(out)
        self.assertEqual(error["code"], errors.UNPARSABLE_CLIENT_MESSAGE)
        self.assertNotIn("error", [o.level for o in out if isinstance(o, s.Log)])
        out = h.configure()
        self.assertIn("SettingsApplied", h.client_types(out))

    def test_big_integers_are_json(self) -> None:
        h = Harness()
        message = json.dumps(settings()).replace('"required": ["city"]',
                                                '"required": ["city"], "maximum": ' + "9" * 400)
        out = h.text(message)
        strict_json(out)
        [update] = h.upstream(out)
        self.assertEqual(update["type"], "session.update")


class OverlappingResponsesTests(SynchronousTestCase):
    """Found by the property tests: two responses seen to start before either ended."""

    def test_no_request_until_both_ended(self) -> None:
        h = ready()
        self.assertEqual(len(response_creates(h.text({"type": "InjectAgentMessage",
                                                      "message": "One."}))), 1)
        h.text({"type": "InjectAgentMessage", "message": "Two.", "behavior": "queue"})
        h.start_response("resp_1")
        h.start_response("resp_2")
        self.assertEqual(response_creates(done(h, "resp_2")), [])
        self.assertEqual(len(response_creates(done(h, "resp_1"))), 1)


class HugeClientNumbersTests(SynchronousTestCase):
    """A 400-digit integer is valid JSON: where the daemon needs a number it is refused by name."""

    BIG = "9" * 400

    def test_speed_in_settings_and_update_speak(self) -> None:
        h = Harness()
        message = settings(speak={"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy",
                                               "speed": 1.0}})
        [error] = h.client(h.text(json.dumps(message).replace('"speed": 1.0', '"speed": ' + self.BIG)))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        self.assertIn("agent.speak.provider.speed", error["description"])
        h = ready()
        out = h.text('{"type": "UpdateSpeak", "speak": {"provider": {"type": "open_ai", '
                     '"model": "tts-1", "voice": "alloy", "speed": ' + self.BIG + "}}}")
        [error] = h.client(out)
        self.assertEqual(error["code"], errors.INVALID_CLIENT_MESSAGE)
        self.assertIn("speak.provider.speed", error["description"])

    def test_sample_rate_and_behavior(self) -> None:
        h = Harness()
        message = json.dumps(settings()).replace('"sample_rate": 24000', '"sample_rate": ' + self.BIG, 1)
        [error] = h.client(h.text(message))
        self.assertEqual(error["code"], errors.INVALID_SETTINGS)
        h = ready()
        out = h.text('{"type": "InjectAgentMessage", "message": "x", "behavior": ' + self.BIG + "}")
        self.assertEqual(h.client(out)[0]["code"], errors.INVALID_CLIENT_MESSAGE)


class HeardPartRecordedTests(SynchronousTestCase):
    """
    After a barge-in the conversation a new upstream session is given (SPEC §8) holds what the user
    heard of the interrupted reply, as the upstream's own memory does after the truncate (SPEC §6).
    """

    TEXT = "one two three four five six seven eight nine ten"

    def interrupted(self, transcript_first: bool) -> tuple[Harness, s.Session]:
        h = ready()
        h.confirm_item(inject_user(h, "count to ten"))
        h.start_response("resp_1")
        h.audio("resp_1", "item_a", 48 * 2000)  # 2 s of 24 kHz pcm16
        if transcript_first:
            h.up("response.output_audio_transcript.done", response_id="resp_1", item_id="item_a",
                 output_index=0, content_index=0, transcript=self.TEXT)
        h.audio("resp_1", "item_b", 48 * 1000)  # a second item, never heard
        h.time += 1.0  # half of item_a heard
        h.up("input_audio_buffer.speech_started", audio_start_ms=10, item_id="u2")
        if not transcript_first:
            h.up("response.output_audio_transcript.done", response_id="resp_1", item_id="item_a",
                 output_index=0, content_index=0, transcript=self.TEXT)
        h.up("response.output_audio_transcript.done", response_id="resp_1", item_id="item_b",
             output_index=1, content_index=0, transcript="never heard")
        return h, h.session

    def test_text_arriving_after_the_interruption_is_recorded_as_heard(self) -> None:
        h, session = self.interrupted(transcript_first=False)
        heard = session._record.text_of("item_a")
        self.assertIsNotNone(heard)
        assert heard is not None
        self.assertTrue(heard.endswith(" …"), heard)
        self.assertTrue(self.TEXT.startswith(heard[:-2]), heard)
        self.assertLess(len(heard), len(self.TEXT) * 0.6)
        self.assertIsNone(session._record.text_of("item_b"))
        # The client was never shown the interrupted reply's text.
        self.assertNotIn(self.TEXT, json.dumps(h.client(h.outputs)))

    def test_text_recorded_before_the_interruption_is_cut_to_the_heard_part(self) -> None:
        _, session = self.interrupted(transcript_first=True)
        heard = session._record.text_of("item_a")
        assert heard is not None
        self.assertTrue(heard.endswith(" …"), heard)
        self.assertLess(len(heard), len(self.TEXT) * 0.6)
        self.assertIsNone(session._record.text_of("item_b"))


class HeardPartTests(SynchronousTestCase):
    def test_share_of_the_text_to_a_word_boundary(self) -> None:
        from openai_proxy.continuity import heard_part

        self.assertEqual(heard_part("one two three four", 1.0), "one two three four")
        self.assertEqual(heard_part("one two three four", 0.5), "one two …")
        self.assertEqual(heard_part("one two three four", 0.3), "one …")
        self.assertEqual(heard_part("one two three four", 0.0), "")
        self.assertEqual(heard_part("onetwothree", 0.5), "")


class SpokenTurnOrderTests(SynchronousTestCase):
    def test_a_late_transcript_keeps_the_spoken_turn_before_its_reply(self) -> None:
        """SPEC §8: the replay keeps conversation order, whenever the transcript arrives."""
        h = ready()
        h.up("input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_user")
        h.up("input_audio_buffer.speech_stopped", audio_end_ms=900, item_id="item_user")
        h.up("input_audio_buffer.committed", previous_item_id=None, item_id="item_user")
        h.start_response("resp_1")
        h.up("response.output_audio_transcript.done", response_id="resp_1", item_id="item_reply",
             output_index=0, content_index=0, transcript="It is sunny.")
        done(h, "resp_1")
        h.up("conversation.item.input_audio_transcription.completed", item_id="item_user",
             content_index=0, transcript="What is the weather?")
        events = h.session._record.replay(lambda: "replay_1").events
        self.assertEqual([e["item"]["id"] for e in events], ["item_user", "item_reply"])
