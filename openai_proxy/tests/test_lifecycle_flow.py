"""
The response lifecycle through the daemon on loopback sockets: a Deepgram v1 client, the daemon, and
the strict simulator, scripted where a test needs a race or a failure of the real API.  Every event
the daemon sends upstream is validated with the ``openai`` GA types (by the simulator and again here),
every scripted server event too, and every frame the client gets with the Deepgram SDK's v1 models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from openai_proxy import errors
from openai_proxy.config import Limits
from openai_proxy.simulator.server import SimulatedSession, new_id
from openai_proxy.tests.helpers import Daemon, connect_client, default_settings, wait
from tests.support import check_server_frame

Script = Callable[[SimulatedSession, dict[str, Any]], bool]


def response_object(response_id: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"id": response_id, "object": "realtime.response", "status": status, "output": [],
            **fields}


def error_object(code: str, message: str, event_id: str | None = None,
                 error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": error_type, "code": code, "message": message, "param": None,
            "event_id": event_id}


class _FlowTestCase(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def client(self, script: Script | None = None, settings: dict[str, Any] | None = None) -> Any:
        self.daemon = Daemon()
        yield self.daemon.start(limits=Limits(handshake_timeout=5.0, ping_interval=0),
                                simulator_options={"script": script})
        self.addCleanup(self.daemon.stop)
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        client.send_json(settings or default_settings())
        yield client.expect("SettingsApplied")
        return client

    @defer.inlineCallbacks
    def _close(self, client: Any) -> Any:
        if getattr(client.transport, "connected", False):
            client.dropConnection(abort=True)
        yield wait(0.01)

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.daemon.upstream_events() if e["type"] == kind]

    def check_frames(self, client: Any) -> None:
        for message in client.messages:
            check_server_frame(message)

    @defer.inlineCallbacks
    def settle(self, seconds: float = 0.2) -> Any:
        assert self.daemon.simulator is not None
        count = -1
        while count != len(self.daemon.simulator.received):
            count = len(self.daemon.simulator.received)
            yield wait(seconds)


class PipelinedFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_back_to_back_messages_get_one_reply(self) -> Any:
        client = yield self.client()
        client.send_json({"type": "InjectUserMessage", "content": "first question"})
        client.send_json({"type": "InjectUserMessage", "content": "second question"})
        yield client.expect("AgentAudioDone", timeout=10)
        yield self.settle()
        self.assertEqual(len(self.sent("response.create")), 1)
        self.assertEqual(len([m for m in client.messages if m["type"] == "AgentStartedSpeaking"]), 1)
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])
        self.check_frames(client)


class VadRaceFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_agent_message_lost_to_vad_is_spoken_after(self) -> Any:
        raced: list[str] = []

        def script(session: SimulatedSession, event: dict[str, Any]) -> bool:
            if event["type"] != "response.create" or raced:
                return False
            raced.append(event["event_id"])
            vad = new_id("resp")
            session.send_scripted("input_audio_buffer.speech_started", audio_start_ms=100,
                                  item_id="item_user1")
            session.send_scripted("input_audio_buffer.speech_stopped", audio_end_ms=900,
                                  item_id="item_user1")
            session.send_scripted("input_audio_buffer.committed", item_id="item_user1",
                                  previous_item_id=None)
            session.send_scripted("response.created", response=response_object(vad, "in_progress"))
            session.send_scripted("error", error=error_object(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress.", event["event_id"]))
            session.send_scripted("response.done", response=response_object(vad, "completed"))
            return True

        client = yield self.client(script)
        client.send_json({"type": "InjectAgentMessage", "message": "Welcome back to the demo!"})
        text = yield client.expect("ConversationText", role="assistant", timeout=10)
        self.assertIn("Welcome back", text["content"])
        creates = self.sent("response.create")
        self.assertEqual(len(creates), 2)
        self.assertEqual(creates[0]["response"]["instructions"], creates[1]["response"]["instructions"])
        self.assertNotIn("InjectionRefused", [m["type"] for m in client.messages])
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])
        self.check_frames(client)


class StuckResponseFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_server_error_mid_reply_then_cancel_not_active(self) -> Any:
        stuck: list[str] = []

        def script(session: SimulatedSession, event: dict[str, Any]) -> bool:
            if event["type"] == "response.create" and not stuck:
                stuck.append(new_id("resp"))
                session.send_scripted("response.created",
                                      response=response_object(stuck[0], "in_progress"))
                session.send_scripted("error", error=error_object(
                    "server_error", "The server had an error while processing your request.",
                    error_type="server_error"))
                return True
            if event["type"] == "response.cancel":
                session.send_scripted("error", error=error_object(
                    "response_cancel_not_active", "Cancellation failed: no active response found",
                    event["event_id"]))
                return True
            return False

        client = yield self.client(script)
        client.send_json({"type": "InjectUserMessage", "content": "tell me a story"})
        error = yield client.expect("Error", timeout=10)
        self.assertEqual(error["code"], "server_error")
        client.send_json({"type": "InjectUserMessage", "content": "hello?"})
        yield client.expect("AgentAudioDone", timeout=10)
        self.assertEqual(len(self.sent("response.create")), 2)
        self.assertEqual(len(self.sent("response.cancel")), 1)
        self.assertEqual([m["code"] for m in client.messages if m["type"] == "Error"], ["server_error"])
        self.check_frames(client)


class CutOffCallFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_barge_in_during_arguments(self) -> Any:
        def script(session: SimulatedSession, event: dict[str, Any]) -> bool:
            if event["type"] != "response.create":
                return False
            rid, fc, call = new_id("resp"), new_id("item"), new_id("call")
            item = {"id": fc, "object": "realtime.item", "type": "function_call", "call_id": call,
                    "name": "get_weather", "arguments": "", "status": "in_progress"}
            session.send_scripted("response.created", response=response_object(rid, "in_progress"))
            session.send_scripted("response.output_item.added", response_id=rid, output_index=0,
                                  item=item)
            session.send_scripted("response.function_call_arguments.delta", response_id=rid,
                                  item_id=fc, output_index=0, call_id=call, delta='{"city":"Pa')
            session.send_scripted("input_audio_buffer.speech_started", audio_start_ms=10,
                                  item_id="item_user2")
            session.send_scripted("response.function_call_arguments.done", response_id=rid,
                                  item_id=fc, output_index=0, call_id=call, name="get_weather",
                                  arguments='{"city":"Pa')
            cut = {**item, "arguments": '{"city":"Pa', "status": "incomplete"}
            session.send_scripted("response.output_item.done", response_id=rid, output_index=0,
                                  item=cut)
            session.send_scripted("response.done", response=response_object(
                rid, "cancelled", status_details={"type": "cancelled", "reason": "turn_detected"},
                output=[cut]))
            return True

        client = yield self.client(script)
        client.send_json({"type": "InjectUserMessage", "content": "weather in Paris?"})
        yield client.expect("UserStartedSpeaking", timeout=10)
        yield self.settle()
        self.assertNotIn("FunctionCallRequest", [m["type"] for m in client.messages])
        self.check_frames(client)


class HousekeepingFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_refused_truncate_is_not_the_clients_error(self) -> Any:
        def script(session: SimulatedSession, event: dict[str, Any]) -> bool:
            if event["type"] != "conversation.item.truncate":
                return False
            session.send_scripted("error", error=error_object(
                "invalid_value", "Audio content of 915ms is already shorter than 1000ms",
                event["event_id"]))
            return True

        client = yield self.client(script)
        client.send_json({"type": "InjectUserMessage",
                          "content": "Please read me a long story about a quiet harbour town"})
        yield client.expect("AgentStartedSpeaking", timeout=10)
        while len(client.audio) < 24000 * 2 * 0.5:
            yield wait(0.01)
        yield wait(0.4)
        client.send_json({"type": "InjectUserMessage", "content": "stop"})
        yield client.expect("AgentStartedSpeaking", timeout=10)
        yield client.expect("AgentAudioDone", timeout=10)
        yield self.settle()
        [truncate] = self.sent("conversation.item.truncate")
        self.assertGreater(truncate["audio_end_ms"], 0)
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])
        self.check_frames(client)


class SettingsFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_misplaced_fields_are_named(self) -> Any:
        self.daemon = Daemon()
        yield self.daemon.start(limits=Limits(handshake_timeout=5.0, ping_interval=0))
        self.addCleanup(self.daemon.stop)
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        settings = default_settings(mip_opt_out=True)
        settings["greeting"] = "Hello!"
        settings["agent"]["think"]["instructions"] = settings["agent"]["think"].pop("prompt")
        client.send_json(settings)
        yield client.expect("SettingsApplied")
        warnings = [m for m in client.messages if m["type"] == "Warning"
                    and m["code"] == errors.UNSUPPORTED_SETTING]
        described = " ".join(w["description"] for w in warnings)
        for path in ("greeting", "agent.mip_opt_out", "agent.think.instructions"):
            self.assertIn(path, described)
        self.assertEqual(len(warnings), 3)
        self.check_frames(client)


class StatusFlowTests(_FlowTestCase):
    @defer.inlineCallbacks
    def test_failed_response_and_failed_transcription(self) -> Any:
        def script(session: SimulatedSession, event: dict[str, Any]) -> bool:
            if event["type"] != "response.create" or event.get("response", {}).get("instructions"):
                return False
            rid = new_id("resp")
            session.send_scripted("response.created", response=response_object(rid, "in_progress"))
            session.send_scripted("conversation.item.input_audio_transcription.failed",
                                  item_id="item_user1", content_index=0, error={
                                      "type": "transcription_error", "code": "audio_unintelligible",
                                      "message": "Audio could not be transcribed", "param": None})
            session.send_scripted("response.done", response=response_object(
                rid, "failed", status_details={"type": "failed", "error": {
                    "type": "insufficient_quota", "code": "insufficient_quota"}}))
            return True

        client = yield self.client(script)
        client.send_json({"type": "InjectUserMessage", "content": "hi"})
        failed = yield client.expect("Warning", code="insufficient_quota", timeout=10)
        self.assertIn("description", failed)
        self.assertIn(errors.TRANSCRIPTION_FAILED,
                      [m.get("code") for m in client.messages if m["type"] == "Warning"])
        # The session goes on: an agent message is spoken.
        client.send_json({"type": "InjectAgentMessage", "message": "Still here."})
        yield client.expect("AgentAudioDone", timeout=10)
        self.check_frames(client)
