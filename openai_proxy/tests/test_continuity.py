"""Tests for :mod:`openai_proxy.continuity`: the conversation record and its replay, the rollover
schedule, and the reconnection policy. Replayed events are validated strictly with the openai GA types
and fed to a simulated upstream session, as a new upstream would receive them."""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from openai_proxy import errors
from openai_proxy.continuity import (
    _RESERVE_ITEMS,
    BackoffPolicy,
    ConversationRecord,
    Failure,
    HeldAudio,
    Reconnection,
    RecordError,
    Replay,
    ReplayBudget,
    RolloverAction,
    RolloverSchedule,
    Switch,
    SwitchError,
    SwitchPhase,
    SwitchReason,
    classify_failure,
)
from openai_proxy.simulator.server import SimulatedSession
from openai_proxy.simulator.validation import validate_client_event


def event_ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"replay_{next(counter)}"


def summary(replay: Replay) -> list[tuple[str, ...]]:
    """Each replayed item as (type, id, role or call_id, text/arguments/output)."""
    out: list[tuple[str, ...]] = []
    for event in replay.events:
        assert event["type"] == "conversation.item.create"
        item: Any = event["item"]
        if item["type"] == "message":
            out.append(("message", item["id"], item["role"], item["content"][0]["text"]))
        elif item["type"] == "function_call":
            out.append(("function_call", item["id"], item["call_id"], item["name"], item["arguments"]))
        else:
            out.append(("function_call_output", item["id"], item["call_id"], item["output"]))
    return out


def upstream_accepts(testcase: unittest.TestCase, replay: Replay) -> SimulatedSession:
    """Feed the replay to a configured simulated session; every item must be accepted, in order."""
    sent: list[dict[str, Any]] = []
    session = SimulatedSession(Clock(), "gpt-realtime", sent.append, lambda code, reason: None)
    session.start()
    session.receive({"type": "session.update", "session": {"type": "realtime"}})
    for event in replay.events:
        validate_client_event(event)
        session.receive(event)
    testcase.assertEqual([e for e in sent if e["type"] == "error"], [])
    testcase.assertEqual([item.id for item in session.conversation], list(replay.item_ids))
    return session


def a_conversation() -> ConversationRecord:
    record = ConversationRecord()
    record.add_user_text("item_h1", "My name is Ada.")          # Settings history
    record.add_assistant_text("item_h2", "Nice to meet you, Ada.")
    record.add_user_audio("item_a1")                            # committed; transcript comes later
    record.add_assistant_text("item_r1", "The weather where?")
    record.set_transcript("item_a1", "What is the weather like?")
    record.add_user_text("item_u2", "In Paris")
    record.add_function_call("item_c1", "call_1", "get_weather", '{"location":"Paris"}')
    record.add_function_output("item_o1", "call_1", '{"temp":21}')
    record.add_assistant_text("item_r2", "It is 21 degrees in Paris.")
    return record


class ReplayTests(unittest.TestCase):
    def test_replay_rebuilds_the_conversation_in_order(self) -> None:
        replay = a_conversation().replay(event_ids())
        self.assertEqual(
            summary(replay),
            [
                ("message", "item_h1", "user", "My name is Ada."),
                ("message", "item_h2", "assistant", "Nice to meet you, Ada."),
                ("message", "item_a1", "user", "What is the weather like?"),
                ("message", "item_r1", "assistant", "The weather where?"),
                ("message", "item_u2", "user", "In Paris"),
                ("function_call", "item_c1", "call_1", "get_weather", '{"location":"Paris"}'),
                ("function_call_output", "item_o1", "call_1", '{"temp":21}'),
                ("message", "item_r2", "assistant", "It is 21 degrees in Paris."),
            ],
        )
        self.assertEqual([e["event_id"] for e in replay.events], [f"replay_{n}" for n in range(1, 9)])
        self.assertEqual(replay.dropped, 0)
        self.assertEqual(replay.items, 8)
        self.assertEqual(replay.chars, sum(len(t[-1]) for t in summary(replay)) + len("get_weather"))
        upstream_accepts(self, replay)

    def test_a_new_session_answers_from_the_replayed_output(self) -> None:
        record = ConversationRecord()
        record.add_user_text("item_u1", "What is the weather in Paris")
        record.add_function_call("item_c1", "call_1", "get_weather", '{"location":"Paris"}')
        record.add_function_output("item_o1", "call_1", "sunny")
        session = upstream_accepts(self, record.replay(event_ids()))
        self.assertEqual(session.conversation[-1].data["type"], "function_call_output")

    def test_turns_without_text_are_not_replayed(self) -> None:
        record = ConversationRecord()
        record.add_user_audio("item_a1")                    # transcription never came
        record.add_user_audio("item_a2")
        record.set_transcript("item_a2", "   ")             # silence
        record.add_user_audio("item_a3")
        record.set_transcript("item_a3", "hello")
        record.add_assistant_text("item_r3", "hi")
        self.assertEqual([s[1] for s in summary(record.replay(event_ids()))], ["item_a3", "item_r3"])

    def test_same_item_again_replaces_its_text_in_place(self) -> None:
        record = ConversationRecord()
        record.add_user_text("item_u1", "Tell me a story")
        record.add_assistant_text("item_r1", "Once upon a time there was a long story")
        record.add_user_text("item_u2", "stop")
        record.add_assistant_text("item_r1", "Once upon a time")  # what was heard before barge-in
        record.add_user_audio("item_u2")                        # a duplicate notice changes nothing
        self.assertEqual(
            [s[3] for s in summary(record.replay(event_ids()))],
            ["Tell me a story", "Once upon a time", "stop"],
        )

    def test_removed_items_are_not_replayed_and_a_round_goes_whole(self) -> None:
        record = a_conversation()
        record.remove("item_r2")
        record.remove("item_o1")  # an output's removal takes its call with it
        record.remove("item_unknown")
        ids = [s[1] for s in summary(record.replay(event_ids()))]
        self.assertEqual(ids, ["item_h1", "item_h2", "item_a1", "item_r1", "item_u2"])
        self.assertEqual(record.pending_calls, ())
        record.add_function_call("item_c9", "call_1", "get_weather", "{}")  # the call id is free again

    def test_a_call_waiting_for_its_output_is_replayed_alone_and_answered_later(self) -> None:
        record = ConversationRecord()
        record.add_user_text("item_u1", "What is the weather in Paris")
        record.add_function_call("item_c1", "call_1", "get_weather", '{"location":"Paris"}')
        self.assertEqual(record.pending_calls, ("call_1",))
        first = record.replay(event_ids())
        self.assertEqual([s[0] for s in summary(first)], ["message", "function_call"])
        upstream_accepts(self, first)
        record.add_function_output("item_o1", "call_1", "sunny")
        self.assertEqual(record.pending_calls, ())
        self.assertEqual(summary(record.replay(event_ids()))[-1][0], "function_call_output")

    def test_contradictions_are_refused(self) -> None:
        record = a_conversation()
        with self.assertRaisesRegex(RecordError, "no function call 'call_x'"):
            record.add_function_output("item_o9", "call_x", "{}")
        with self.assertRaisesRegex(RecordError, "already recorded as item 'item_c1'"):
            record.add_function_call("item_c2", "call_1", "get_weather", "{}")
        with self.assertRaisesRegex(RecordError, "already has an output"):
            record.add_function_output("item_o2", "call_1", "{}")
        with self.assertRaisesRegex(RecordError, "another kind of item"):
            record.add_assistant_text("item_h1", "not a user message")
        with self.assertRaisesRegex(RecordError, "another kind of item"):
            record.add_function_call("item_u2", "call_2", "f", "{}")
        record.add_function_output("item_o1", "call_1", '{"temp":22}')  # the same output item: an update
        self.assertIn(("function_call_output", "item_o1", "call_1", '{"temp":22}'),
                      summary(record.replay(event_ids())))

    def test_budget_keeps_the_newest_and_starts_at_a_user_turn(self) -> None:
        budget = ReplayBudget(max_chars=60, max_items=20, max_entry_chars=20)
        record = ConversationRecord(budget)
        record.add_user_text("item_u1", "u" * 10)
        record.add_assistant_text("item_r1", "r" * 10)
        record.add_user_text("item_u2", "v" * 10)
        record.add_assistant_text("item_r2", "s" * 18)
        record.add_function_call("item_c1", "call_1", "f", "{}")  # 3 characters
        record.add_function_output("item_o1", "call_1", "o" * 10)
        record.add_assistant_text("item_r3", "t" * 10)
        replay = record.replay(event_ids())
        # Newest first: r3 10, round 13, r2 18, u2 10 = 51; r1 would make 61 > 60.
        self.assertEqual([s[1] for s in summary(replay)],
                         ["item_u2", "item_r2", "item_c1", "item_o1", "item_r3"])
        self.assertEqual((replay.chars, replay.dropped), (51, 2))

        record.add_assistant_text("item_r4", "w" * 12)
        # Now r4 12 + r3 10 + round 13 + r2 18 = 53 fit, u2 does not: the replay may not begin with
        # r2 (an answer to a question it would not show) and no user turn is left, so r2.. is kept.
        replay = record.replay(event_ids())
        self.assertEqual([s[1] for s in summary(replay)],
                         ["item_r2", "item_c1", "item_o1", "item_r3", "item_r4"])
        upstream_accepts(self, replay)

    def test_leading_answers_are_dropped_when_a_user_turn_is_kept(self) -> None:
        budget = ReplayBudget(max_chars=30, max_items=20, max_entry_chars=10)
        record = ConversationRecord(budget)
        for n in range(3):
            record.add_user_text(f"item_u{n}", "q" * 5)
            record.add_assistant_text(f"item_r{n}", "a" * 9)
        # Fits: r2 9, u2 5, r1 9 = 23; u1 would make 28, r0 37. Kept r1? No: it starts at u1.
        replay = record.replay(event_ids())
        self.assertEqual([s[1] for s in summary(replay)], ["item_u1", "item_r1", "item_u2", "item_r2"])
        self.assertEqual(replay.dropped, 2)

    def test_item_count_bounds_the_replay_and_a_round_is_two_items(self) -> None:
        budget = ReplayBudget(max_chars=10_000, max_items=4, max_entry_chars=100)
        record = ConversationRecord(budget)
        record.add_user_text("item_u1", "question")
        record.add_function_call("item_c1", "call_1", "f", "{}")
        record.add_function_output("item_o1", "call_1", "x")
        record.add_user_text("item_u2", "again")
        record.add_function_call("item_c2", "call_2", "f", "{}")
        record.add_function_output("item_o2", "call_2", "y")
        replay = record.replay(event_ids())
        self.assertEqual([s[1] for s in summary(replay)], ["item_u2", "item_c2", "item_o2"])

    def test_a_text_longer_than_an_entry_may_be_is_cut_and_still_replayed(self) -> None:
        budget = ReplayBudget(max_chars=300, max_items=10, max_entry_chars=100)
        record = ConversationRecord(budget)
        record.add_user_text("item_u1", "x" * 5000)
        replay = record.replay(event_ids())
        text = summary(replay)[0][3]
        self.assertEqual(len(text), 100)
        self.assertTrue(text.endswith(" […]"))
        self.assertEqual(replay.chars, 100)
        upstream_accepts(self, replay)

    def test_memory_stays_bounded_over_a_very_long_conversation(self) -> None:
        budget = ReplayBudget(max_chars=3000, max_items=40, max_entry_chars=1000)
        record = ConversationRecord(budget)
        for n in range(5000):
            record.add_user_text(f"item_u{n}", f"question {n}")
            record.add_function_call(f"item_c{n}", f"call_{n}", "lookup", f'{{"n":{n}}}')
            record.add_function_output(f"item_o{n}", f"call_{n}", f"answer {n}")
            record.add_assistant_text(f"item_r{n}", f"reply {n}")
            self.assertLessEqual(len(record), 40 + _RESERVE_ITEMS)
        self.assertGreater(record.forgotten, 4900 * 3)
        # A late output for a call forgotten long ago is ignored, not an error.
        record.add_function_output("item_late", "call_3", "late")
        replay = record.replay(event_ids())
        self.assertEqual(summary(replay)[-1], ("message", "item_r4999", "assistant", "reply 4999"))
        self.assertEqual(replay.dropped, record.forgotten + len(record) -
                         sum(1 for s in summary(replay) if s[0] != "function_call_output"))
        upstream_accepts(self, replay)

    def test_the_reserve_refills_a_replay_after_recent_items_are_deleted(self) -> None:
        # A barge-in deletes the unheard items at the end; older ones, kept in the reserve, take their
        # place, so the replay still fills its item budget.
        budget = ReplayBudget(max_chars=10_000, max_items=10, max_entry_chars=1000)
        record = ConversationRecord(budget)
        for n in range(30):
            record.add_user_text(f"item_u{n}", f"question {n}")
            record.add_assistant_text(f"item_r{n}", f"reply {n}")
        self.assertEqual(len(record), 10 + _RESERVE_ITEMS)
        record.remove("item_r29")
        record.remove("item_u29")
        replay = record.replay(event_ids())
        self.assertEqual(replay.items, 10)
        self.assertEqual(summary(replay)[-1], ("message", "item_r28", "assistant", "reply 28"))
        upstream_accepts(self, replay)

    def test_budget_settings_are_checked(self) -> None:
        for bad in ({"max_chars": 0}, {"max_items": 1}, {"max_entry_chars": 7},
                    {"max_chars": 100, "max_entry_chars": 40}):
            with self.assertRaises(ValueError, msg=bad):
                ReplayBudget(**bad)
        self.assertEqual(ReplayBudget().approximate_tokens, 12_000)


# -- the invariants, for any conversation and budget ------------------------------------------------

_texts = st.text(alphabet="abc xyz", min_size=0, max_size=40)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("user"), _texts),
        st.tuples(st.just("audio"), _texts, st.booleans()),
        st.tuples(st.just("assistant"), _texts),
        st.tuples(st.just("call"), _texts, st.booleans()),
        st.tuples(st.just("remove"), st.integers(0, 200)),
    ),
    max_size=60,
)


def _apply(record: ConversationRecord, operations: list[Any]) -> None:
    ids: list[str] = []
    for n, op in enumerate(operations):
        kind = op[0]
        if kind == "user":
            record.add_user_text(f"item_{n}", op[1])
        elif kind == "audio":
            record.add_user_audio(f"item_{n}")
            if op[2]:
                record.set_transcript(f"item_{n}", op[1])
        elif kind == "assistant":
            record.add_assistant_text(f"item_{n}", op[1])
        elif kind == "call":
            record.add_function_call(f"item_{n}", f"call_{n}", "lookup", op[1])
            if op[2]:
                record.add_function_output(f"item_{n}_out", f"call_{n}", op[1][::-1])
        else:
            if ids:
                record.remove(ids[op[1] % len(ids)])
            continue
        ids.append(f"item_{n}")


class ReplayInvariantTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        _operations,
        st.integers(30, 400),
        st.integers(2, 12),
    )
    def test_within_budget_newest_kept_rounds_whole(
        self, operations: list[Any], max_chars: int, max_items: int
    ) -> None:
        budget = ReplayBudget(max_chars=max_chars, max_items=max_items, max_entry_chars=max_chars // 3)
        record = ConversationRecord(budget)
        _apply(record, operations)
        unbounded = ConversationRecord(ReplayBudget(10**9, 10**6, 10**8))
        _apply(unbounded, operations)
        replay = record.replay(event_ids())
        full = unbounded.replay(event_ids())
        items = summary(replay)

        # Never over the budget.
        self.assertLessEqual(replay.items, max_items)
        self.assertLessEqual(replay.chars, max_chars)
        # The texts are what the budget counted.
        self.assertEqual(replay.chars, sum(len(s[-1]) for s in items)
                         + sum(len(s[3]) for s in items if s[0] == "function_call"))
        # A contiguous run of the newest items of the whole conversation, in order. (Removing recent
        # items may bring back older ones the record already forgot: the run is then shorter.)
        ids = list(replay.item_ids)
        if full.item_ids and (not any(op[0] == "remove" for op in operations) or not record.forgotten):
            self.assertTrue(ids, "the newest entry always fits")
            self.assertEqual(ids, list(full.item_ids[len(full.item_ids) - len(ids):]))
        if ids:
            self.assertEqual(ids[-1], full.item_ids[-1], "the newest item is replayed")
        # A call and its output together: every output right after its call, every answered call
        # followed by its output.
        for index, item in enumerate(items):
            if item[0] == "function_call_output":
                self.assertEqual(items[index - 1][:1] + items[index - 1][2:3], ("function_call", item[2]))
        answered = {s[2] for s in summary(full) if s[0] == "function_call_output"}
        for index, item in enumerate(items):
            if item[0] == "function_call" and item[2] in answered:
                self.assertEqual(items[index + 1][:1], ("function_call_output",))
        # When something was dropped and a user turn was kept, the replay starts with one.
        if replay.dropped and any(s[0] == "message" and s[2] == "user" for s in items):
            self.assertEqual(items[0][:1] + items[0][2:3], ("message", "user"))
        for event in replay.events:
            validate_client_event(event)


# -- rollover ----------------------------------------------------------------------------------------


class RolloverScheduleTests(unittest.TestCase):
    def test_defaults_for_an_hour_long_session(self) -> None:
        schedule = RolloverSchedule(opened_at=100.0)
        self.assertEqual(schedule.soft_deadline, 100.0 + 55 * 60)
        self.assertEqual(schedule.hard_deadline, 100.0 + 58 * 60)
        self.assertEqual(schedule.expires_at, 100.0 + 60 * 60)
        self.assertEqual(schedule.action(100.0 + 3299, quiet=True), RolloverAction.NONE)
        self.assertEqual(schedule.action(100.0 + 3300, quiet=True), RolloverAction.START)
        self.assertEqual(schedule.action(100.0 + 3300, quiet=False), RolloverAction.WAIT_FOR_QUIET)
        self.assertEqual(schedule.action(100.0 + 3479, quiet=False), RolloverAction.WAIT_FOR_QUIET)
        self.assertEqual(schedule.action(100.0 + 3480, quiet=False), RolloverAction.FORCE)
        self.assertEqual(schedule.action(100.0 + 3480, quiet=True), RolloverAction.FORCE)
        self.assertEqual(schedule.next_check(100.0), 3300.0)
        self.assertEqual(schedule.next_check(100.0 + 3400), 80.0)
        self.assertIsNone(schedule.next_check(100.0 + 3480))

    def test_a_setting_past_the_hard_deadline_means_the_hard_deadline(self) -> None:
        schedule = RolloverSchedule(opened_at=0.0, rollover_after=3590.0)
        self.assertEqual(schedule.soft_deadline, schedule.hard_deadline)
        self.assertEqual(schedule.action(3480.0, quiet=True), RolloverAction.FORCE)

    def test_from_session_created(self) -> None:
        # The real API: expires_at one hour after session.created.
        schedule = RolloverSchedule.for_session(5.0, created_at_wall=1_000_000.0, expires_at=1_003_600)
        self.assertEqual((schedule.soft_deadline, schedule.hard_deadline), (3305.0, 3485.0))
        # A simulator session expiring after 10 s: the settings scale with it.
        short = RolloverSchedule.for_session(0.0, created_at_wall=1_000_000.0, expires_at=1_000_010)
        self.assertAlmostEqual(short.soft_deadline, 10 * 3300 / 3600)
        self.assertAlmostEqual(short.hard_deadline, 10 - 10 * 120 / 3600)
        self.assertLess(short.soft_deadline, short.hard_deadline)
        # expires_at missing, in the past, or absurd: the 60 minutes.
        for expires_at in (None, 999_999.0, float("nan"), float("inf")):
            schedule = RolloverSchedule.for_session(
                0.0, created_at_wall=1_000_000.0, expires_at=expires_at)
            self.assertEqual(schedule.expires_at, 3600.0, expires_at)

    def test_settings_are_checked(self) -> None:
        for bad in ({"rollover_after": 0}, {"rollover_after": float("nan")}, {"max_age": -1},
                    {"force_margin": 3600.0}, {"force_margin": float("inf")}):
            with self.assertRaises(ValueError, msg=bad):
                RolloverSchedule(0.0, **bad)


# -- reconnection -----------------------------------------------------------------------------------


class ClassifyTests(unittest.TestCase):
    def test_what_is_retried(self) -> None:
        retried = [
            (Failure.CONNECTION_LOST, {}),
            (Failure.SESSION_EXPIRED, {}),
            (Failure.PING_TIMEOUT, {}),
            (Failure.HANDSHAKE_TIMEOUT, {}),
            (Failure.UNREACHABLE, {}),
            *[(Failure.CLOSED, {"close_code": code}) for code in (1000, 1001, 1006, 1011, 1012, 1013, 1014)],
            *[(Failure.REFUSED, {"http_status": s}) for s in (408, 425, 429, 500, 502, 503, 504)],
        ]
        for failure, details in retried:
            self.assertTrue(classify_failure(failure, **details).retry, (failure, details))

    def test_what_is_not_and_the_code_the_client_gets(self) -> None:
        final = [
            (Failure.REFUSED, {"http_status": 401}, errors.UPSTREAM_AUTH_FAILED),
            (Failure.REFUSED, {"http_status": 403}, errors.UPSTREAM_AUTH_FAILED),
            (Failure.REFUSED, {"http_status": 404}, errors.UPSTREAM_UNAVAILABLE),
            (Failure.REFUSED, {"http_status": 400}, errors.UPSTREAM_UNAVAILABLE),
            (Failure.TLS_FAILED, {}, errors.UPSTREAM_TLS_FAILED),
            *[(Failure.CLOSED, {"close_code": c}, errors.UPSTREAM_CLOSED)
              for c in (1002, 1003, 1007, 1008, 1009, 1010, 3000, 4000, 4999, None)],
        ]
        for failure, details, code in final:
            decision = classify_failure(failure, **details)
            self.assertFalse(decision.retry, (failure, details))
            self.assertEqual(decision.code, code, (failure, details))
        self.assertIn("HTTP 401", classify_failure(Failure.REFUSED, http_status=401).reason)
        self.assertIn("code 4000", classify_failure(Failure.CLOSED, close_code=4000).reason)


class BackoffTests(unittest.TestCase):
    def test_ceilings_double_up_to_the_cap(self) -> None:
        policy = BackoffPolicy()
        self.assertEqual([policy.ceiling(n) for n in range(1, 9)],
                         [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(policy.ceiling(10_000), 8.0)

    def test_attempts_are_bounded(self) -> None:
        reconnection = Reconnection(BackoffPolicy(), random=lambda: 0.5, started_at=0.0)
        delays = []
        now = 0.0
        while (delay := reconnection.next_delay(now)) is not None:
            delays.append(delay)
            now += delay + 1.0  # each attempt takes a second to fail
        self.assertEqual(delays, [0.125, 0.25, 0.5, 1.0, 2.0, 4.0])
        self.assertEqual(reconnection.attempts, 6)
        self.assertIsNone(reconnection.next_delay(now))

    def test_elapsed_time_is_bounded(self) -> None:
        policy = BackoffPolicy(max_elapsed=10.0, max_attempts=100)
        reconnection = Reconnection(policy, random=lambda: 0.999, started_at=50.0)
        self.assertIsNotNone(reconnection.next_delay(55.0))
        self.assertIsNone(reconnection.next_delay(59.9))  # 59.9 + ~0.5 > 60
        self.assertEqual(reconnection.attempts, 1)

    @given(st.integers(0, 2**32 - 1), st.floats(0.01, 2.0), st.floats(2.0, 60.0), st.integers(1, 20))
    def test_full_jitter_stays_within_its_ceiling(
        self, seed: int, base: float, cap: float, attempts: int
    ) -> None:
        policy = BackoffPolicy(base=base, cap=cap, max_attempts=attempts, max_elapsed=10**6)
        reconnection = Reconnection(policy, random=random.Random(seed).random, started_at=0.0)
        n = 0
        while (delay := reconnection.next_delay(0.0)) is not None:
            n += 1
            self.assertGreaterEqual(delay, 0.0)
            self.assertLessEqual(delay, min(cap, base * 2 ** (n - 1)))
        self.assertEqual(n, attempts)

    def test_policy_settings_are_checked(self) -> None:
        for bad in ({"base": 0}, {"base": 10.0, "cap": 5.0}, {"cap": float("inf")},
                    {"max_attempts": 0}, {"max_elapsed": 0}, {"max_elapsed": float("nan")}):
            with self.assertRaises(ValueError, msg=bad):
                BackoffPolicy(**bad)


# -- the switch -------------------------------------------------------------------------------------


class SwitchTests(unittest.TestCase):
    def drive(self, replay: Replay) -> tuple[Switch, list[dict[str, Any]]]:
        """A whole switch against a simulated upstream session, as the session would drive it."""
        sent: list[dict[str, Any]] = []
        upstream = SimulatedSession(Clock(), "gpt-realtime", sent.append, lambda code, reason: None)
        switch = Switch(SwitchReason.ROLLOVER, started_at=100.0)
        upstream.start()                                  # session.created: the connection is open
        switch.opened()
        upstream.receive({"type": "session.update", "event_id": "settings_1",
                          "session": {"type": "realtime", "instructions": "Be brief."}})
        self.assertEqual(sent[-1]["type"], "session.updated")
        ready = switch.configured(replay)
        for event in replay.events:
            upstream.receive(event)
        for event in sent:
            if event["type"] == "conversation.item.done":
                ready = switch.item_done(event["item"]["id"]) or ready
            elif event["type"] == "error" and event["error"]["event_id"]:
                ready = switch.item_refused(event["error"]["event_id"]) or ready
        self.assertTrue(ready)
        return switch, sent

    def test_a_rollover_replays_and_becomes_ready(self) -> None:
        replay = a_conversation().replay(event_ids())
        switch, _ = self.drive(replay)
        self.assertIs(switch.phase, SwitchPhase.READY)
        self.assertEqual(switch.waiting, set())
        self.assertEqual(switch.log_fields(100.25), {
            "switch_reason": "rollover", "switch_phase": "ready", "switch_ms": 250,
            "replayed_items": 8, "replayed_chars": replay.chars, "dropped_entries": 0,
            "refused_items": 0})

    def test_a_refused_item_is_given_up_and_the_rest_goes_on(self) -> None:
        good = a_conversation().replay(event_ids())
        # An output whose call the new session does not have: refused with an error naming the event.
        orphan = {"type": "conversation.item.create", "event_id": "replay_orphan",
                  "item": {"id": "item_orphan", "type": "function_call_output",
                           "call_id": "call_gone", "output": "{}"}}
        replay = Replay(good.events[:4] + (orphan,) + good.events[4:],
                        good.item_ids[:4] + ("item_orphan",) + good.item_ids[4:], good.chars, 0)
        switch, sent = self.drive(replay)
        errors_sent = [e["error"] for e in sent if e["type"] == "error"]
        self.assertEqual([e["event_id"] for e in errors_sent], ["replay_orphan"])
        self.assertIs(switch.phase, SwitchPhase.READY)
        self.assertEqual(switch.refused, ["item_orphan"])
        self.assertEqual(switch.log_fields(100.0)["replayed_items"], 8)
        self.assertEqual(switch.log_fields(100.0)["refused_items"], 1)

    def test_nothing_to_replay_is_ready_at_once(self) -> None:
        switch = Switch(SwitchReason.RECONNECT, started_at=0.0)
        switch.opened()
        self.assertTrue(switch.configured(ConversationRecord().replay(event_ids())))
        self.assertIs(switch.phase, SwitchPhase.READY)

    def test_unknown_items_and_events_are_ignored(self) -> None:
        switch = Switch(SwitchReason.ROLLOVER, started_at=0.0)
        switch.opened()
        switch.configured(a_conversation().replay(event_ids()))
        self.assertFalse(switch.item_done("item_from_someone_else"))
        self.assertFalse(switch.item_refused("settings_1"))
        self.assertEqual(len(switch.waiting), 8)

    def test_phases_are_enforced(self) -> None:
        switch = Switch(SwitchReason.ROLLOVER, started_at=0.0)
        with self.assertRaisesRegex(SwitchError, "connecting, not configuring"):
            switch.configured(ConversationRecord().replay(event_ids()))
        switch.opened()
        with self.assertRaisesRegex(SwitchError, "configuring, not connecting"):
            switch.opened()

    def test_timeout_and_failure(self) -> None:
        switch = Switch(SwitchReason.FORCED_ROLLOVER, started_at=10.0, timeout=5.0)
        self.assertEqual(switch.deadline(), 15.0)
        self.assertFalse(switch.timed_out(14.9))
        switch.opened()
        self.assertTrue(switch.timed_out(15.0))
        self.assertIs(switch.phase, SwitchPhase.FAILED)
        self.assertEqual(switch.failure, "not ready after 5 s (configuring)")
        self.assertFalse(switch.timed_out(99.0))  # once
        other = Switch(SwitchReason.RECONNECT, started_at=0.0)
        other.fail("closed 1011")
        self.assertEqual((other.phase, other.failure), (SwitchPhase.FAILED, "closed 1011"))
        self.assertFalse(other.item_done("item_h1"))
        ready = Switch(SwitchReason.RECONNECT, started_at=0.0)
        ready.opened()
        ready.configured(ConversationRecord().replay(event_ids()))
        ready.fail("too late")  # a switch that is READY has succeeded
        self.assertIs(ready.phase, SwitchPhase.READY)
        self.assertFalse(ready.timed_out(1000.0))


class HeldAudioTests(unittest.TestCase):
    def test_in_order_and_bounded_dropping_the_oldest(self) -> None:
        held = HeldAudio(max_bytes=10)
        for chunk in (b"aaaa", b"bbbb", b"cc"):
            held.append(chunk)
        self.assertEqual((held.held_bytes, held.dropped_bytes), (10, 0))
        held.append(b"dd")
        self.assertEqual(held.drain(), [b"bbbb", b"cc", b"dd"])
        self.assertEqual((held.held_bytes, held.dropped_bytes), (0, 4))
        self.assertEqual(held.drain(), [])

    def test_a_chunk_larger_than_the_bound_keeps_its_newest_whole_frames(self) -> None:
        held = HeldAudio(max_bytes=7, frame_bytes=2)
        held.append(b"xx")
        held.append(b"0123456789")
        self.assertEqual(held.drain(), [b"456789"])
        self.assertEqual(held.dropped_bytes, 2 + 4)

    @given(st.lists(st.binary(max_size=50), max_size=40), st.integers(1, 120))
    def test_never_over_the_bound_and_nothing_reordered(self, chunks: list[bytes], max_bytes: int) -> None:
        held = HeldAudio(max_bytes=max_bytes, frame_bytes=1)
        for chunk in chunks:
            held.append(chunk)
            self.assertLessEqual(held.held_bytes, max_bytes)
        out = b"".join(held.drain())
        everything = b"".join(chunks)
        self.assertTrue(everything.endswith(out))
        self.assertEqual(len(out) + held.dropped_bytes, len(everything))

    def test_settings_are_checked(self) -> None:
        with self.assertRaises(ValueError):
            HeldAudio(max_bytes=1, frame_bytes=2)
        with self.assertRaises(ValueError):
            HeldAudio(max_bytes=10, frame_bytes=0)


class AnnouncedExpiryTests(unittest.SynchronousTestCase):
    def test_an_expiry_under_a_second_away_is_not_believed(self) -> None:
        """A clock far off the upstream's, or whole-second rounding, must not roll every session over
        at once (no rollover loop)."""
        from openai_proxy.continuity import MIN_ANNOUNCED_AGE, UPSTREAM_MAX_AGE, RolloverSchedule

        for expires_in in (0.0, 0.3, MIN_ANNOUNCED_AGE - 0.01, -5.0):
            schedule = RolloverSchedule.for_session(100.0, created_at_wall=1000.0,
                                                    expires_at=1000.0 + expires_in)
            self.assertEqual(schedule.max_age, UPSTREAM_MAX_AGE, expires_in)
            self.assertEqual(schedule.action(100.5, quiet=True).value, "none")
        short = RolloverSchedule.for_session(100.0, created_at_wall=1000.0, expires_at=1004.0)
        self.assertEqual(short.max_age, 4.0)
