"""The daemon (in process, on loopback) in front of a simulated upstream that fails at each stage of a
turn: before ``session.updated``, during agent audio, between a function call and its output, at the
session's expiry, on an idle session. Each case checks what the client is told and that nothing is
left behind: no session in the registry, no simulated upstream session, no upstream socket (trial
fails a test that leaves a timer or a connection in the reactor)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor

from openai_proxy import errors
from openai_proxy.simulator.faults import DropRule
from openai_proxy.tests.helpers import connect_client, default_settings, wait
from openai_proxy.tests.test_relay import _DaemonTestCase


class FaultStageTests(_DaemonTestCase):
    @defer.inlineCallbacks
    def client_of_failing_upstream(self, **simulator_options: Any) -> Any:
        yield self.start(simulator_options=simulator_options)
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        return client

    @defer.inlineCallbacks
    def assertToldAndReleased(self, client: Any, close_code: int | str) -> Any:
        error = yield client.expect("Error", code=errors.UPSTREAM_CLOSED)
        self.assertIn(f"code {close_code}", error["description"])
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1011)
        registry, simulator = self.daemon.registry, self.daemon.simulator
        assert registry is not None and simulator is not None
        deadline = reactor.seconds() + 5.0
        while (len(registry) or simulator.sessions) and reactor.seconds() < deadline:
            yield wait(0.01)
        self.assertEqual(len(registry), 0)
        self.assertEqual(simulator.sessions, [])
        return error

    @defer.inlineCallbacks
    def test_before_session_updated(self) -> None:
        client = yield self.client_of_failing_upstream(drops=(DropRule(event="session.update"),))
        yield self.assertToldAndReleased(client, 1006)
        self.assertNotIn("SettingsApplied", [m["type"] for m in client.messages])

    @defer.inlineCallbacks
    def test_during_agent_audio(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(event="response.output_audio.delta", nth=3),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": "Tell me about the sea"})
        yield self.assertToldAndReleased(client, 1006)
        self.assertTrue(client.audio, "some agent audio arrived before the drop")

    @defer.inlineCallbacks
    def test_between_a_function_call_and_its_output(self) -> None:
        client = yield self.client_of_failing_upstream(
            drops=(DropRule(event="response.function_call_arguments.done", close=1011),))
        yield client.expect("SettingsApplied")
        client.send_json({"type": "InjectUserMessage", "content": "What is the weather in Paris?"})
        yield self.assertToldAndReleased(client, 1011)

    @defer.inlineCallbacks
    def test_at_the_session_expiry(self) -> None:
        client = yield self.client_of_failing_upstream(max_session_seconds=1.0)
        yield client.expect("SettingsApplied")
        expired = yield client.expect("Error", code="session_expired")
        self.assertEqual(expired["description"], "Your session hit the maximum duration of 1 second.")
        yield self.assertToldAndReleased(client, 1001)

    @defer.inlineCallbacks
    def test_idle_session_going_away(self) -> None:
        client = yield self.client_of_failing_upstream(drops=(DropRule(after=0.5, close=1001),))
        yield client.expect("SettingsApplied")
        yield self.assertToldAndReleased(client, 1001)
