"""
Property tests of the response lifecycle: arbitrary interleavings of client messages, upstream events
(including the fault sequences, reordered and cut short), time passing and timers firing.

Whatever the order, the session never raises, sends only valid frames both ways (the Deepgram SDK's
v1 models for the client, the ``openai`` GA types upstream, strict JSON everywhere), never sends
``response.create`` while it has seen a response start and not end, and always comes back to a state
in which a new question is answered.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import session as s
from openai_proxy.tests.test_session import Harness
from openai_proxy.tests.test_session import settings as agent_settings
from tests.support import check_server_frame

CLIENT_MESSAGES = [
    {"type": "InjectUserMessage", "content": "What is the weather in Paris?"},
    {"type": "InjectUserMessage", "content": "and tomorrow?"},
    {"type": "InjectAgentMessage", "message": "One moment."},
    {"type": "InjectAgentMessage", "message": "Queued.", "behavior": "queue"},
    {"type": "InjectAgentMessage", "message": "Stop!", "behavior": "interrupt"},
    {"type": "UpdatePrompt", "prompt": "Be brief."},
    {"type": "KeepAlive"},
    '{"type": "InjectUserMessage", "content": NaN}',
    "[" * 5000,
]

ERROR_CODES = ["conversation_already_has_active_response", "response_cancel_not_active",
               "server_error", "invalid_value", None, 5]
STATUSES = ["completed", "cancelled", "failed", "incomplete", "in_progress"]

#: One step: a tag and a small integer choosing among the things the tag can do.
steps = st.lists(
    st.tuples(
        st.sampled_from(["client", "confirm", "created", "audio", "audio_done", "item_added",
                         "call", "call_item_done", "done", "error", "speech_started",
                         "speech_stopped", "transcript", "transcription_failed", "updated",
                         "malformed", "time", "timer", "function_response"]),
        st.integers(min_value=0, max_value=7),
    ),
    max_size=40,
)


class Driver:
    """Feeds one interleaving to a session and checks every output as it comes."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.h = Harness(response_timeout=15.0, function_call_timeout=10.0)
        self.responses = 0
        #: Responses the session has been told started and not ended (the upstream's view).
        self.open: list[str] = []
        self.last_response = "resp_0"
        self.items: list[str] = []
        self.calls: list[str] = []
        self.checked = len(self.h.outputs)
        self.h.configure(agent_settings())
        self.check()

    def check(self) -> None:
        new, self.checked = self.h.outputs[self.checked:], len(self.h.outputs)
        for output in new:
            if isinstance(output, s.SendClient):
                json.dumps(output.message, allow_nan=False)
                check_server_frame(output.message)
            elif isinstance(output, s.SendUpstream):
                json.dumps(output.event, allow_nan=False)
                event = output.event
                if event["type"] == "response.create":
                    self.test.assertEqual(self.open, [], "response.create while a response is active")
                elif event["type"] == "conversation.item.create":
                    self.items.append(event["item"]["id"])
            elif isinstance(output, s.Log) and "treating the response as ended" in output.format:
                self.open = []

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in Harness.upstream(self.h.outputs) if e["type"] == kind]

    def step(self, tag: str, n: int) -> None:
        h = self.h
        response = self.open[-1] if self.open else self.last_response
        if tag == "client":
            message = CLIENT_MESSAGES[n % len(CLIENT_MESSAGES)]
            h.text(message)
        elif tag == "confirm" and self.items:
            h.confirm_item(self.items.pop(n % len(self.items)))
        elif tag == "created":
            self.responses += 1
            self.last_response = f"resp_{self.responses}"
            self.open.append(self.last_response)
            h.start_response(self.last_response)
        elif tag == "audio":
            h.audio(response, f"item_{response}_{n % 2}", 48 * 20 * (n + 1))
        elif tag == "audio_done":
            h.up("response.output_audio.done", response_id=response,
                 item_id=f"item_{response}_{n % 2}", output_index=0, content_index=0)
        elif tag == "item_added":
            h.up("response.output_item.added", response_id=response, output_index=n, item={
                "id": f"item_{response}_{n % 2}", "type": "message", "role": "assistant",
                "content": [], "status": "in_progress"})
        elif tag == "call":
            call_id = f"call_{response}_{n % 2}"
            arguments = '{"city":"Paris"}' if n % 3 else '{"city":"Pa'
            h.up("response.function_call_arguments.done", response_id=response,
                 item_id=f"fc_{call_id}", output_index=1, call_id=call_id, name="get_weather",
                 arguments=arguments)
            self.calls.append(call_id)
        elif tag == "call_item_done" and self.calls:
            call_id = self.calls[n % len(self.calls)]
            h.up("response.output_item.done", response_id=response, output_index=1, item={
                "id": f"fc_{call_id}", "type": "function_call", "call_id": call_id,
                "name": "get_weather", "arguments": '{"city":"Paris"}',
                "status": "completed" if n % 2 else "incomplete"})
        elif tag == "function_response" and self.calls:
            h.text({"type": "FunctionCallResponse", "id": self.calls[n % len(self.calls)],
                    "name": "get_weather", "content": '{"temp": 21}'})
        elif tag == "done":
            if response in self.open:
                self.open.remove(response)
            h.up("response.done", response={"id": response, "status": STATUSES[n % 4],
                                            "output": []})
        elif tag == "error":
            code = ERROR_CODES[n % len(ERROR_CODES)]
            sent = Harness.upstream(h.outputs)
            caused_by = sent[-1 - (n % len(sent))]["event_id"] if sent and n % 2 else None
            if code == "response_cancel_not_active":
                self.open = []
            h.up("error", error={"type": "invalid_request_error", "code": code,
                                 "message": "simulated", "param": None, "event_id": caused_by})
        elif tag == "speech_started":
            h.up("input_audio_buffer.speech_started", audio_start_ms=n * 100, item_id=f"u{n}")
        elif tag == "speech_stopped":
            h.feed(h.session.upstream_event({"type": "input_audio_buffer.speech_stopped",
                                             "audio_end_ms": [n * 100, float("nan"), 10 ** 400][n % 3],
                                             "item_id": f"u{n}"}))
        elif tag == "transcript":
            h.up("conversation.item.input_audio_transcription.completed", item_id=f"u{n}",
                 content_index=0, transcript="hello", usage={"type": "duration", "seconds": 1})
        elif tag == "transcription_failed":
            h.up("conversation.item.input_audio_transcription.failed", item_id=f"u{n}",
                 content_index=0, error={"type": "transcription_error", "code": "x", "message": "y"})
        elif tag == "updated":
            updates = self.sent("session.update")
            if updates:
                h.up("session.updated", session=updates[-1]["session"])
        elif tag == "malformed":
            h.feed(h.session.upstream_event([
                {"type": "response.created", "response": {"id": 5}},
                {"type": "response.done", "response": []},
                {"type": "response.output_audio.delta", "response_id": response, "item_id": "x",
                 "delta": "!!"},
                {"type": "error", "error": {"code": 7, "message": {"a": 1}}},
                {"type": 5},
            ][n % 5]))
        elif tag == "time":
            h.time += [0.05, 0.5, 5.0, 16.0][n % 4]
        elif tag == "timer":
            running = [o.name for o in h.outputs if isinstance(o, s.StartTimer)]
            if running:
                h.timer(running[-1 - (n % len(running))])
        self.check()

    def settle(self) -> None:
        """The upstream answers everything and goes quiet; every timer runs out."""
        h = self.h
        for _ in range(4):
            for response in list(self.open):
                self.open.remove(response)
                h.up("response.done", response={"id": response, "status": "completed",
                                                "output": []})
            for item in list(self.items):
                self.items.remove(item)
                h.confirm_item(item)
            for update in self.sent("session.update")[-3:]:
                h.up("session.updated", session=update["session"])
            h.time += 60.0
            for name in sorted({o.name for o in h.outputs if isinstance(o, s.StartTimer)}, key=repr):
                h.timer(name)
            self.check()

    def answers_a_new_question(self) -> bool:
        before = len(self.sent("response.create"))
        self.step("client", 0)
        self.settle()
        return len(self.sent("response.create")) > before


class LifecycleProperties(SynchronousTestCase):
    # Bounded and derandomized: the same 200 interleavings on every run keep the suite fast and
    # deterministic (found by hunting with max_examples in the thousands).
    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(steps)
    def test_any_interleaving(self, sequence: list[tuple[str, int]]) -> None:
        driver = Driver(self)
        for tag, n in sequence:
            driver.step(tag, n)
        driver.settle()
        self.assertTrue(driver.answers_a_new_question(), "the session no longer answers")


#: The steps above, and the upstream connection's end and the moves to a new upstream session.
switch_steps = st.lists(
    st.tuples(
        st.sampled_from(["client", "confirm", "created", "audio", "audio_done", "item_added",
                         "call", "call_item_done", "done", "error", "speech_started",
                         "speech_stopped", "transcript", "updated", "time", "timer",
                         "function_response", "drop", "switch", "switch", "rollover_due",
                         "candidate_drop", "binary"]),
        st.integers(min_value=0, max_value=7),
    ),
    max_size=40,
)


class SwitchDriver(Driver):
    """The driver above, whose upstream events go to the session's current connection, with drops
    of it and of a candidate, rollovers coming due, and switches advanced step by step."""

    def __init__(self, test: SynchronousTestCase) -> None:
        super().__init__(test)
        self.swaps: list[int] = []
        session = self.h.session
        plain = session.upstream_event

        def current(event: Any, generation: int | None = None) -> list[s.Output]:
            return plain(event, session._generation if generation is None else generation)

        session.upstream_event = current  # type: ignore[method-assign]
        self.h.feed(session.upstream_event({"type": "session.created", "event_id": "e0",
                                            "session": {"expires_at": 3600}}))
        self.check()

    def check(self) -> None:
        new = self.h.outputs[self.checked:]
        for output in new:
            if isinstance(output, s.SwapUpstream):
                self.test.assertGreater(output.generation, (self.swaps or [0])[-1])
                self.swaps.append(output.generation)
                self.open = []
                self.items = []
        # Events for a candidate connection are validated, not tracked as the current one's.
        kept = [o for o in new if not (isinstance(o, s.SendUpstream) and o.generation is not None)]
        for output in new:
            if isinstance(output, s.SendUpstream) and output.generation is not None:
                json.dumps(output.event, allow_nan=False)
        outputs, self.h.outputs = self.h.outputs, self.h.outputs[:self.checked] + kept
        try:
            super().check()
        finally:
            self.h.outputs = outputs
            self.checked = len(outputs)

    def advance_switch(self) -> None:
        h, session = self.h, self.h.session
        gen = session._switch_gen
        if gen is None:
            if session._reconnection is not None:
                h.timer(s.TimerKey(s.TimerKind.RECONNECT))
            return
        switch = session._switch
        assert switch is not None
        if switch.phase.value == "connecting":
            h.feed(session.upstream_opened(gen))
        elif switch.phase.value == "configuring":
            h.feed(session.upstream_event({"type": "session.updated", "event_id": "e1",
                                           "session": {}}, gen))
        else:
            for output in list(h.outputs):
                if (isinstance(output, s.SendUpstream) and output.generation == gen
                        and output.event["type"] == "conversation.item.create"
                        and session._switch_gen == gen):
                    h.feed(session.upstream_event({"type": "conversation.item.done",
                                                   "event_id": "e2",
                                                   "item": output.event["item"]}, gen))

    def step(self, tag: str, n: int) -> None:
        h, session = self.h, self.h.session
        if tag == "drop":
            h.feed(session.upstream_closed(
                s.UpstreamClosure(was_open=True, close_code=[None, 1000, 1011, 1008][n % 4]),
                session._generation))
            self.open = []
        elif tag == "candidate_drop" and session._switch_gen is not None:
            h.feed(session.upstream_closed(s.UpstreamClosure(was_open=n % 2 == 0),
                                           session._switch_gen))
        elif tag == "switch":
            self.advance_switch()
        elif tag == "rollover_due":
            h.time += 3300.0
            h.timer(s.TimerKey(s.TimerKind.ROLLOVER))
        elif tag == "binary":
            h.binary(b"\x00\x01" * 480 * (n + 1))
        else:
            super().step(tag, n)
            return
        self.check()

    def finish_switches(self) -> None:
        for _ in range(12):
            if self.h.session.phase is s.Phase.CLOSED:
                return
            self.advance_switch()
            self.check()


class SwitchProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(switch_steps)
    def test_any_interleaving_with_drops_and_switches(self, sequence: list[tuple[str, int]]) -> None:
        driver = SwitchDriver(self)
        for tag, n in sequence:
            driver.step(tag, n)
        session = driver.h.session
        driver.finish_switches()
        if session.phase is not s.Phase.CLOSED:
            self.assertIsNone(session._switch)
            self.assertIsNone(session._reconnection)
            driver.settle()
            self.assertTrue(driver.answers_a_new_question(), "the session no longer answers")
        driver.h.feed(session.client_closed())
        self.assertEqual(session._emit.timers, set(), "a timer outlived the session")
        self.assertIsNone(session._emit.held_upstream)
