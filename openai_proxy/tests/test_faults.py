"""Fault injection in the simulated upstream: early expiry and connection drops.

Driven in memory like ``test_simulator`` (iosim, one ``Clock`` for the simulator and Autobahn). Every
case also checks that nothing is left behind: no delayed call on the clock, no live session.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial import unittest

from openai_proxy.config import ConfigError, build_config
from openai_proxy.simulator import listen_simulator
from openai_proxy.simulator.__main__ import _parse
from openai_proxy.simulator.faults import DropRule, FaultSpecError, parse_drop_rule
from openai_proxy.simulator.server import EXPIRED_CLOSE_CODE, SimulatorFactory, _duration
from openai_proxy.tests.test_simulator import KEY, RecordingClient, SimulatorTestCase

ABNORMAL = 1006


class ParseTests(unittest.TestCase):
    def test_rules_in_every_form(self) -> None:
        self.assertEqual(parse_drop_rule("after=5"), DropRule(after=5.0))
        self.assertEqual(
            parse_drop_rule("event=response.output_audio.delta,nth=3"),
            DropRule(event="response.output_audio.delta", nth=3),
        )
        self.assertEqual(
            parse_drop_rule(" event=session.update , close=1011 , session=2 "),
            DropRule(event="session.update", close=1011, session=2),
        )
        self.assertEqual(parse_drop_rule("after=0.5,close=abort"), DropRule(after=0.5))
        self.assertEqual(parse_drop_rule("after=1,close=1001").close, 1001)
        self.assertEqual(parse_drop_rule("after=1,close=4321").close, 4321)
        self.assertEqual(parse_drop_rule("event=error,every=3"), DropRule(event="error", every=3))
        self.assertEqual(parse_drop_rule("after=2,close=hang"), DropRule(after=2.0, hang=True))
        with self.assertRaisesRegex(FaultSpecError, "hang or a code"):
            DropRule(after=1.0, close=1011, hang=True)

    def test_bad_rules_name_the_key(self) -> None:
        cases = {
            "": "exactly one of",
            "close=1011": "exactly one of",
            "after=1,event=session.update": "exactly one of",
            "after=1,nth=2": "nth: only with event",
            "after=soon": "after: expected seconds",
            "after=0": "after: must be > 0",
            "after=-3": "after: must be > 0",
            "after=nan": "after: must be > 0",
            "after=inf": "after: must be > 0",
            "event=Response.Done": "is not an event type",
            "event=response..done": "is not an event type",
            "event=response.done,nth=0": "nth: must be >= 1",
            "event=response.done,nth=two": "nth: expected an integer",
            "after=1,close=1006": "close: 1006 cannot be sent",
            "after=1,close=1005": "close: 1005 cannot be sent",
            "after=1,close=2500": "close: 2500 cannot be sent",
            "after=1,close=loud": "close: expected an integer",
            "after=1,session=0": "session: must be >= 1",
            "after=1,every=0": "every: must be >= 1",
            "after=1,every=2,session=4": "session and every do not go together",
            "after=1,after=2": "after: given twice",
            "after=1,when=now": "'when': unknown key",
            "after": "expected key=value",
            "after=": "expected key=value",
        }
        for spec, expected in cases.items():
            with self.assertRaises(FaultSpecError, msg=spec) as caught:
                parse_drop_rule(spec)
            self.assertIn(expected, str(caught.exception), spec)

    @given(
        st.one_of(
            st.builds(
                DropRule,
                after=st.floats(min_value=0.001, max_value=1e6, allow_nan=False),
                close=st.one_of(st.none(), st.sampled_from([1000, 1001, 1011, 1012, 1013, 4000])),
                session=st.one_of(st.none(), st.integers(1, 1000)),
            ),
            st.builds(
                DropRule,
                event=st.sampled_from(["response.created", "conversation.item.create"]),
                every=st.integers(1, 100),
                hang=st.booleans(),
            ),
            st.builds(
                DropRule,
                event=st.sampled_from(["response.output_audio.delta", "session.update", "error"]),
                nth=st.integers(1, 1000),
                close=st.one_of(st.none(), st.integers(3000, 4999)),
                session=st.one_of(st.none(), st.integers(1, 1000)),
            ),
        )
    )
    def test_describe_reads_back_as_the_same_rule(self, rule: DropRule) -> None:
        self.assertEqual(parse_drop_rule(rule.describe()), rule)

    def test_simulator_command_line(self) -> None:
        options = _parse(
            ["--expire-after", "20", "--drop-after", "7",
             "--drop", "event=response.output_audio.delta,nth=3,close=1011,session=2"]
        )
        self.assertEqual(options.expire_after, 20.0)
        self.assertEqual(
            options.drops,
            (
                DropRule(event="response.output_audio.delta", nth=3, close=1011, session=2),
                DropRule(after=7.0),
            ),
        )
        self.assertEqual(_parse([]).drops, ())
        self.assertEqual(_parse([]).expire_after, 3600.0)
        self.patch(sys, "stderr", io.StringIO())  # argparse's usage text
        for argv in (["--drop", "after=1,close=1006"], ["--drop-after", "-1"],
                     ["--expire-after", "0"], ["--expire-after", "inf"]):
            with self.assertRaises(SystemExit, msg=argv):
                _parse(argv)

    def test_daemon_options(self) -> None:
        config = build_config(
            {"simulator": True, "simulator-expire-after": "4",
             "simulator-drop": ["event=response.done,nth=2,session=1", "after=9,close=1001"]},
            environ={}, cwd="/nonexistent",
        )
        self.assertEqual(config.simulator_expire_after, 4.0)
        self.assertEqual(
            config.simulator_drops,
            (DropRule(event="response.done", nth=2, session=1), DropRule(after=9.0, close=1001)),
        )
        defaults = build_config({"simulator": True}, environ={}, cwd="/nonexistent")
        self.assertEqual((defaults.simulator_expire_after, defaults.simulator_drops), (3600.0, ()))
        bad: list[tuple[dict[str, Any], str]] = [
            ({"simulator-drop": ["after=1"]}, "--simulator-drop: only with --simulator"),
            ({"simulator-expire-after": "5"}, "--simulator-expire-after: only with --simulator"),
            ({"simulator": True, "simulator-drop": ["after=1,nth=2"]}, "--simulator-drop: 'after=1,nth=2'"),
            ({"simulator": True, "simulator-expire-after": "-5"}, "--simulator-expire-after: must be > 0"),
            ({"simulator": True, "simulator-expire-after": "nan"}, "--simulator-expire-after: must be"),
            ({"simulator": True, "simulator-expire-after": "x"}, "--simulator-expire-after: expected a number"),
        ]
        for options, expected in bad:
            with self.assertRaises(ConfigError, msg=repr(options)) as caught:
                build_config({"api-key-file": None, **options}, environ={"OPENAI_API_KEY": "sk-x"},
                             cwd="/nonexistent")
            self.assertIn(expected, str(caught.exception))


class FaultTestCase(SimulatorTestCase):
    def use(self, **options: Any) -> None:
        self.factory = SimulatorFactory(
            self.clock, api_key=KEY, audio_chunk_ms=100, chunk_interval=0.02, **options
        )

    def assertNothingLeft(self) -> None:
        self.assertEqual(self.factory.sessions, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def advance_until_closed(self, client: RecordingClient, limit: float = 5.0) -> None:
        """Step the clock only until the connection is gone, so a leftover timer is still there."""
        for _ in range(round(limit / 0.02)):
            if client.closed is not None:
                return
            self.advance(0.02)
        self.fail("the connection did not close")

    def reply(self, client: RecordingClient) -> None:
        self.say_text(client, "tell me a long story about the sea")
        self.send(client, {"type": "response.create"})


class ExpiryTests(FaultTestCase):
    def test_expires_like_the_real_api_after_the_chosen_seconds(self) -> None:
        self.use(max_session_seconds=5.0)
        client = self.configured()
        expires_at = client.of("session.created")[0]["session"]["expires_at"]
        self.assertEqual(expires_at, int(self.clock.seconds() + 5))
        self.advance(4.9)
        self.assertIsNone(client.closed)
        self.advance(0.2)
        error = self.last_error(client)
        self.assertEqual(error["code"], "session_expired")
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(error["message"], "Your session hit the maximum duration of 5 seconds.")
        self.assertEqual(client.types()[-1], "error")
        self.assertEqual(client.closed, (True, EXPIRED_CLOSE_CODE, error["message"]))
        self.assertNothingLeft()

    def test_expiry_in_the_middle_of_a_reply_stops_it(self) -> None:
        self.use(max_session_seconds=0.3)
        client = self.configured()
        self.reply(client)
        self.advance(0.1)
        self.assertIn("response.output_audio.delta", client.types())
        self.advance(1.0)
        self.assertEqual(client.types()[-1], "error")
        self.assertNotIn("response.done", client.types())
        assert client.closed is not None
        self.assertEqual(client.closed[1], EXPIRED_CLOSE_CODE)
        self.assertNothingLeft()

    def test_durations_in_the_message(self) -> None:
        for seconds, said in ((60.0, "1 minute"), (120.0, "2 minutes"), (1.0, "1 second"),
                              (90.0, "90 seconds"), (0.25, "0.25 seconds")):
            self.assertEqual(_duration(seconds), said)

    def test_the_hour_is_said_in_minutes(self) -> None:
        client, _ = self.connect()
        self.advance(3600.0, step=10.0)
        self.assertEqual(
            self.last_error(client)["message"], "Your session hit the maximum duration of 60 minutes."
        )
        self.assertNothingLeft()


class DropTests(FaultTestCase):
    def test_drop_after_seconds_aborts_without_a_close_frame(self) -> None:
        self.use(drops=(DropRule(after=2.0),))
        client = self.configured()
        self.advance(1.9)
        self.assertIsNone(client.closed)
        self.advance(0.2)
        assert client.closed is not None
        self.assertEqual(client.closed[:2], (False, ABNORMAL))
        self.assertNotIn("error", client.types())
        self.assertNothingLeft()

    def test_drop_at_the_third_audio_delta(self) -> None:
        self.use(drops=(DropRule(event="response.output_audio.delta", nth=3),))
        client = self.configured()
        self.reply(client)
        self.advance_until_closed(client)
        types = client.types()
        self.assertEqual(types.count("response.output_audio.delta"), 3)
        self.assertEqual(types[-1], "response.output_audio.delta")  # nothing after the 3rd one
        assert client.closed is not None
        self.assertEqual(client.closed[:2], (False, ABNORMAL))
        self.assertNothingLeft()

    def test_drop_with_close_codes(self) -> None:
        for code in (1011, 1001, 1012, 4004):
            self.use(drops=(DropRule(event="response.created", close=code),))
            client = self.configured()
            self.reply(client)
            self.advance(0.5)
            self.assertEqual(client.types()[-1], "response.created", code)
            self.assertEqual(client.closed, (True, code, "simulated connection drop"))
            self.assertNothingLeft()

    def test_drop_at_session_created(self) -> None:
        self.use(drops=(DropRule(event="session.created"),))
        client, _ = self.connect()
        self.assertEqual(client.types(), ["session.created"])
        assert client.closed is not None
        self.assertEqual(client.closed[1], ABNORMAL)
        self.assertNothingLeft()  # the session's expiry timer too

    def test_drop_on_a_client_event_before_acting_on_it(self) -> None:
        self.use(drops=(DropRule(event="session.update", close=1011),))
        client, _ = self.connect()
        self.send(client, {"type": "session.update", "session": {"type": "realtime"}})
        self.assertEqual(client.types(), ["session.created"])  # no session.updated
        self.assertEqual(client.closed, (True, 1011, "simulated connection drop"))
        self.assertNothingLeft()

    def test_drop_between_a_function_call_and_its_output(self) -> None:
        tool = {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        }
        self.use(drops=(DropRule(event="conversation.item.create", nth=2),))
        client = self.configured(tools=[tool])
        self.say_text(client, "What is the weather in Paris")  # the 1st item.create
        self.send(client, {"type": "response.create"})
        self.advance(1.0)
        call = client.of("response.function_call_arguments.done")[0]
        self.assertIn("response.done", client.types())
        count = len(client.events)
        self.send(client, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}})
        self.assertEqual(len(client.events), count)  # the output never reached the conversation
        assert client.closed is not None
        self.assertEqual(client.closed[:2], (False, ABNORMAL))
        self.assertNothingLeft()

    def test_session_selects_one_connection(self) -> None:
        self.use(drops=(DropRule(event="session.updated", session=2),))
        first = self.configured()
        first_pump = self.pump
        second, _ = self.connect()
        self.send(second, {"type": "session.update", "session": {"type": "realtime"}})
        self.assertEqual(second.types()[-1], "session.updated")
        assert second.closed is not None
        self.assertEqual(second.closed[1], ABNORMAL)
        third = self.configured()  # the rule is spent: the third session lives
        self.assertIsNone(third.closed)
        self.assertIsNone(first.closed)
        self.assertEqual(self.factory.opened, 3)
        for client in (first, third):
            client.sendClose(1000)
        first_pump.flush()
        self.pump.flush()
        self.assertNothingLeft()

    def test_every_selects_each_kth_connection(self) -> None:
        self.use(drops=(DropRule(event="session.updated", every=2),))
        clients = []
        for _ in range(5):
            client, pump = self.connect()
            self.send(client, {"type": "session.update", "session": {"type": "realtime"}})
            clients.append((client, pump))
        self.assertEqual([c.closed is not None for c, _ in clients], [False, True, False, True, False])
        for client, pump in clients:
            if client.closed is None:
                client.sendClose(1000)
                pump.flush()
        self.assertNothingLeft()

    def test_nth_counts_per_session(self) -> None:
        self.use(drops=(DropRule(event="conversation.item.added", nth=2),))
        for _ in range(2):
            client = self.configured()
            self.say_text(client, "one")
            self.assertIsNone(client.closed)
            self.say_text(client, "two")
            assert client.closed is not None
            self.assertEqual(client.closed[1], ABNORMAL)
        self.assertNothingLeft()

    def test_a_session_that_ends_first_leaves_no_drop_timer(self) -> None:
        self.use(drops=(DropRule(after=30.0),), max_session_seconds=60.0)
        client = self.configured()
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the drop and the expiry
        client.sendClose(1000)
        self.pump.flush()
        self.assertEqual(client.closed, (True, 1000, None))
        self.assertNothingLeft()

    def test_first_rule_to_fire_wins_and_the_others_are_released(self) -> None:
        self.use(drops=(DropRule(after=10.0, close=1001), DropRule(event="response.created")))
        client = self.configured()
        self.reply(client)
        assert client.closed is not None
        self.assertEqual(client.closed[1], ABNORMAL)
        self.assertNothingLeft()


class HangTests(unittest.TestCase):
    """``close=hang`` on real loopback sockets: only the peer's ping timeout notices."""

    @defer.inlineCallbacks
    def test_a_hung_connection_answers_no_ping_and_is_released_later(self) -> Any:
        port, factory = yield listen_simulator(
            reactor, api_key=KEY, drops=(DropRule(event="session.created", hang=True),))
        self.addCleanup(port.stopListening)
        factory.hang_seconds = 5.0
        client_factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{port.getHost().port}/v1/realtime?model=gpt-realtime",
            headers={"Authorization": f"Bearer {KEY}"})
        client_factory.protocol = RecordingClient
        client_factory.setProtocolOptions(autoPingInterval=0.2, autoPingTimeout=0.3)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(client_factory)
        # Both ends run on this reactor: the client's ping timeout (well under a second) comes
        # before the simulator's release of the hung connection (5 s), whatever the load.
        for _ in range(1000):
            if client.closed is not None and not factory.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert client.closed is not None
        self.assertEqual(client.closed[:2], (False, ABNORMAL))
        self.assertIn("ping timeout", client.closed[2] or "")
        self.assertEqual(client.types(), ["session.created"])
        self.assertEqual(factory.sessions, [])
