"""
System tests of the Deepgram Voice Agent v1 control surface: runtime updates, a second ``Settings``,
agent injection, ``History``, several function calls in one response, server-side functions and
refused ``Settings``.

Each test drives the real ``twistd -n openai-proxy`` process with the official ``deepgram-sdk`` agent
client, in front of the simulated upstream (``python -m openai_proxy.simulator``). Every frame the
client receives is validated with the SDK's models and every event that reached the upstream with the
``openai`` package's GA types. To keep the run short, the simulator and the daemon are started once per
test class and shared by its tests; each test has its own client connection (so its own upstream
session) and reads only the upstream events and daemon log records of that session.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from deepgram.agent.v1.types import (
    AgentV1InjectAgentMessage,
    AgentV1UpdateListen,
    AgentV1UpdatePrompt,
    AgentV1UpdateSpeak,
    AgentV1UpdateThink,
)
from twisted.trial.unittest import FailTest

from .support import (
    API_KEY,
    GET_WEATHER,
    START_TIMEOUT,
    TIMEOUT,
    Agent,
    Daemon,
    Simulator,
    SystemTestCase,
    agent_settings,
    audio_of,
    check_server_frames,
    check_upstream_events,
    clean_environment,
    connect_agent,
    texts,
    types_of,
)

#: A model the daemon allows and the simulator serves, so that no MODEL_REPLACED warning is mixed in.
MODEL = "gpt-realtime"
PROMPT = "You are a helpful voice assistant. Keep answers short."

GET_TIME = {
    "name": "get_time",
    "description": "Get the current local time in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city"}},
        "required": ["city"],
    },
}

#: A user message whose echo ("You said: ...") is spoken for about ten seconds of audio, which the
#: simulator delivers in about two seconds: long enough to act while the reply is in progress.
LONG_MESSAGE = (
    "Please remember that my cousin arrives on the late train from the coast on Thursday evening, "
    "that she prefers a quiet room facing the garden, and that she will stay until Sunday afternoon."
)

Frame = dict[str, Any] | bytes


# --------------------------------------------------------------------------- frame helpers


def messages_of(frames: Sequence[Frame], kind: str) -> list[dict[str, Any]]:
    """The text frames of type ``kind``."""
    return [f for f in frames if isinstance(f, dict) and f.get("type") == kind]


def index_of(frames: Sequence[Frame], kind: str, **fields: Any) -> int:
    """The position of the first text frame of type ``kind`` (with ``fields``)."""
    for index, frame in enumerate(frames):
        if isinstance(frame, dict) and frame.get("type") == kind and all(
                frame.get(k) == v for k, v in fields.items()):
            return index
    raise FailTest(f"no {kind} {fields or ''} in {types_of(frames)}")


def problems_of(frames: Sequence[Frame]) -> list[dict[str, Any]]:
    """Every ``Error`` and ``Warning``."""
    return [f for f in frames if isinstance(f, dict) and f.get("type") in ("Error", "Warning")]


def counts(*wanted: tuple[str, int]) -> Callable[[list[Frame]], bool]:
    """A ``read_until`` condition: at least ``n`` frames of each ``(type, n)`` have arrived."""

    def done(got: list[Frame]) -> bool:
        kinds = types_of(got)
        return all(kinds.count(kind) >= n for kind, n in wanted)

    return done


def session_updates(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``session`` object of each ``session.update`` that reached the upstream."""
    return [e["session"] for e in events if e["type"] == "session.update"]


def function_outputs(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``function_call_output`` items created upstream."""
    return [e["item"] for e in events if e["type"] == "conversation.item.create"
            and e["item"].get("type") == "function_call_output"]


def spoken_turn_ok(test: SystemTestCase, frames: Sequence[Frame]) -> None:
    """One ``AgentStartedSpeaking``, then audio, then ``AgentAudioDone``, with enough audio for a
    short sentence (24 kHz pcm16)."""
    started = index_of(frames, "AgentStartedSpeaking")
    done = index_of(frames, "AgentAudioDone")
    audio = [i for i, f in enumerate(frames) if isinstance(f, bytes)]
    test.assertTrue(audio, "no agent audio")
    test.assertLess(started, audio[0])
    test.assertLess(audio[-1], done)
    test.assertGreater(len(audio_of(frames)), 4800)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something true (bounded); that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FailTest(f"{what}: not within {timeout}s")
        time.sleep(0.02)


# --------------------------------------------------------------------------- shared processes


class _Shared:
    """The processes (and in-process servers) every test of one class uses; stopped after the last
    test of the class has run, or when the test run ends."""

    def __init__(self, simulator: Simulator, daemon: Daemon, remaining: int,
                 closers: list[Callable[[], Any]]) -> None:
        self.simulator = simulator
        self.daemon = daemon
        self.remaining = remaining
        self._closers = closers

    def release(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.stop()

    def stop(self) -> None:
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            closer()


_SHARED: dict[type, _Shared] = {}


@atexit.register
def _stop_shared() -> None:
    # Stops what is still running when a run selected only some of a class's tests.
    for shared in list(_SHARED.values()):
        shared.stop()


class SharedDaemonTestCase(SystemTestCase):
    """
    A :class:`SystemTestCase` whose simulator and daemon (``LOG_LEVEL=debug``) are shared by all the
    tests of the class.  :meth:`conversation` opens this test's client; :meth:`upstream_events` and
    :meth:`daemon_trace` then give what that session sent upstream and the daemon's per-message log.
    """

    simulator: Simulator
    daemon: Daemon

    def extra_daemon_options(self, closers: list[Callable[[], Any]]) -> list[str]:
        """Options added to the shared daemon's command line; servers started here register their
        stop in ``closers``."""
        return []

    def setUp(self) -> None:
        super().setUp()
        cls = type(self)
        shared = _SHARED.get(cls)
        if shared is None:
            shared = _SHARED[cls] = self._start_shared()
        self.addCleanup(shared.release)
        self.simulator, self.daemon = shared.simulator, shared.daemon
        self.processes += [shared.simulator, shared.daemon]
        for process in self.processes:
            if process.exited() is not None:
                raise FailTest(f"a shared process has exited\n{process.describe()}")
        self._mark = 0
        self._request_id = ""

    def _start_shared(self) -> _Shared:
        closers: list[Callable[[], Any]] = []
        tests = [n for n in dir(type(self)) if n.startswith("test") and callable(getattr(self, n))]
        try:
            simulator = Simulator(self.directory)
            closers.append(simulator.stop)
            simulator.start()
            options = ["--shutdown-grace", "1", "--upstream-url", simulator.upstream_url(),
                       *self.extra_daemon_options(closers)]
            daemon = Daemon(self.directory, options,
                            env=clean_environment(OPENAI_API_KEY=API_KEY, LOG_LEVEL="debug"))
            closers.append(daemon.stop)
            daemon.start(START_TIMEOUT)
        except BaseException:
            for closer in reversed(closers):
                closer()
            raise
        return _Shared(simulator, daemon, len(tests), closers)

    # -- this test's session

    def _record(self) -> list[tuple[str, dict[str, Any]]]:
        """``(upstream session id, event)`` for every event the simulator received, in order."""
        path = self.simulator.record_path
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.endswith("\n")]
        return [(e["session"], e["event"]) for e in entries]

    @contextmanager
    def conversation(self) -> Iterator[Agent]:
        """This test's SDK client, past ``Welcome``; its frames are validated when it closes."""
        self._mark = len(self._record())
        with connect_agent(self.daemon.base_url) as agent:
            self._request_id = agent.expect("Welcome")["request_id"]
            yield agent
        check_server_frames(agent.frames)

    def _recorded_since_mark(self) -> list[tuple[str, dict[str, Any]]]:
        return self._record()[self._mark:]

    def upstream_events(self) -> list[dict[str, Any]]:
        """Every event this test's session sent upstream, once the simulator has seen the session
        close (so nothing is still in flight); all of them strict GA client events."""
        sessions = {session for session, _ in self._recorded_since_mark()}
        closes = [f"simulated session {session} closed" for session in sessions]
        wait_for(lambda: all(close in self.simulator.stderr() for close in closes),
                 "the close of this test's upstream session")
        events = [event for _, event in self._recorded_since_mark()]
        check_upstream_events(events)
        return events

    def _daemon_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.daemon.stdout().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            attributes = record.get("attributes") or {}
            if attributes.get("connection_id") == self._request_id:
                records.append(record)
        return records

    def daemon_trace(self, *, closed: bool = True) -> list[tuple[str, str]]:
        """``(direction, message type)`` of every message of this test's session, in the order the
        daemon handled them (its debug records); with ``closed``, once the client's close is logged."""
        if closed:
            wait_for(lambda: any(str(r.get("body", "")).startswith("client closed")
                                 for r in self._daemon_records()),
                     "the daemon's 'client closed' record")
        trace = []
        for record in self._daemon_records():
            attributes = record["attributes"]
            direction, kind = attributes.get("direction"), attributes.get("message_type")
            if direction and record.get("body") == f"{direction} {kind}":
                trace.append((str(direction), str(kind)))
        return trace

    # -- common steps

    def configure(self, agent: Agent, settings: dict[str, Any] | None = None) -> None:
        agent.send_settings(settings or agent_settings(model=MODEL))
        agent.expect("SettingsApplied")

    def goes_on(self, agent: Agent) -> list[Frame]:
        """The session still converses: an injected "Hello" gets its spoken answer."""
        agent.inject("Hello")
        turn = agent.turn()
        self.assertEqual(texts(turn, "assistant"), ["You said: Hello"])
        spoken_turn_ok(self, turn)
        return turn


def _update_speak(voice: str, speed: float) -> AgentV1UpdateSpeak:
    return AgentV1UpdateSpeak.model_validate({
        "type": "UpdateSpeak",
        "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": voice, "speed": speed}},
    })


# --------------------------------------------------------------------------- the control surface


class ControlSurfaceTests(SharedDaemonTestCase):
    """Runtime updates, a second Settings, agent injection, History, parallel function calls and a
    refused Settings, against one daemon and one simulator."""

    def test_update_prompt_appends(self) -> None:
        addition = "Always mention the weather."
        with self.conversation() as agent:
            self.configure(agent)
            agent.socket.send_update_prompt(AgentV1UpdatePrompt(prompt=addition))
            agent.expect("PromptUpdated")
            self.goes_on(agent)
        self.assertEqual(problems_of(agent.frames), [])
        updates = session_updates(self.upstream_events())
        self.assertEqual(updates[0]["instructions"], PROMPT)
        # Deepgram's UpdatePrompt appends; only the instructions change.
        self.assertEqual(updates[1:], [{"type": "realtime", "instructions": PROMPT + "\n" + addition}])

    def test_update_think_replaces_prompt_and_functions(self) -> None:
        new_prompt = "You tell people the time."
        with self.conversation() as agent:
            self.configure(agent, agent_settings(model=MODEL, functions=[GET_WEATHER]))
            agent.socket.send_update_think(AgentV1UpdateThink.model_validate({
                "type": "UpdateThink",
                "think": {"provider": {"type": "open_ai", "model": MODEL}, "prompt": new_prompt,
                          "functions": [GET_TIME]},
            }))
            agent.expect("ThinkUpdated")
            # Both functions are named: only the one the update declared may be called.
            agent.inject("What is the weather and the time in Paris?")
            request = agent.expect("FunctionCallRequest")
            [call] = request["functions"]
            self.assertEqual(call["name"], "get_time")
            self.assertTrue(call["client_side"])
            self.assertEqual(json.loads(call["arguments"]), {"city": "Paris"})
            agent.function_response(call["id"], call["name"], "It is 14:05")
            answer = agent.turn()
            self.assertEqual(texts(answer, "assistant"), ["Here is what I found: It is 14:05"])
        self.assertEqual(len(messages_of(agent.frames, "FunctionCallRequest")), 1)
        self.assertEqual(problems_of(agent.frames), [])
        updates = session_updates(self.upstream_events())
        self.assertEqual([t["name"] for t in updates[0]["tools"]], ["get_weather"])
        self.assertEqual(updates[1:], [{
            "type": "realtime",
            "instructions": new_prompt,
            "tools": [{"type": "function", **GET_TIME}],
        }])

    def test_update_think_repeating_the_settings_provider(self) -> None:
        # The SDK's UpdateThink requires think.provider; an application sends the one its Settings
        # had. The daemon replaced that model at Settings time (one MODEL_REPLACED); repeating it is
        # not a model change, as it is not for a second Settings.
        settings = agent_settings()  # think.provider.model gpt-4o-mini, not a realtime model
        with self.conversation() as agent:
            agent.send_settings(settings)
            agent.expect("SettingsApplied")
            agent.socket.send_update_think(AgentV1UpdateThink.model_validate({
                "type": "UpdateThink",
                "think": {"provider": settings["agent"]["think"]["provider"],
                          "prompt": "You are a terse assistant."},
            }))
            agent.expect("ThinkUpdated")
            self.goes_on(agent)
        self.assertEqual([(p["type"], p["code"]) for p in problems_of(agent.frames)],
                         [("Warning", "MODEL_REPLACED")])
        updates = session_updates(self.upstream_events())
        self.assertEqual(updates[1:], [{"type": "realtime", "instructions": "You are a terse assistant."}])

    def test_update_speak_before_agent_audio(self) -> None:
        with self.conversation() as agent:
            self.configure(agent)
            agent.socket.send_update_speak(_update_speak("ash", 1.2))
            agent.expect("SpeakUpdated")
            self.goes_on(agent)
        self.assertEqual(problems_of(agent.frames), [])
        updates = session_updates(self.upstream_events())
        # Before any agent audio the voice may change, in the same event as the speed.
        self.assertEqual(updates[1:], [
            {"type": "realtime", "audio": {"output": {"voice": "ash", "speed": 1.2}}},
        ])

    def test_update_speak_after_agent_audio(self) -> None:
        greeting = "Hello, this is the voice you will hear."
        with self.conversation() as agent:
            self.configure(agent, agent_settings(model=MODEL, greeting=greeting))
            self.assertEqual(texts(agent.turn(), "assistant"), [greeting])
            agent.socket.send_update_speak(_update_speak("ash", 1.2))
            frames = agent.read_until(
                lambda got: ("SpeakUpdated" in types_of(got) and "Warning" in types_of(got)),
                what="SpeakUpdated and a Warning")
            [warning] = messages_of(frames, "Warning")
            self.assertEqual(warning["code"], "VOICE_LOCKED")
            self.goes_on(agent)
        self.assertEqual(messages_of(agent.frames, "Error"), [])
        self.assertEqual(len(messages_of(agent.frames, "SpeakUpdated")), 1)
        events = self.upstream_events()
        # The voice went alone (the simulator refused it, as the API does after audio); the speed
        # went in its own event and was applied.
        self.assertEqual(session_updates(events)[1:], [
            {"type": "realtime", "audio": {"output": {"speed": 1.2}}},
            {"type": "realtime", "audio": {"output": {"voice": "ash"}}},
        ])

    def test_update_listen(self) -> None:
        with self.conversation() as agent:
            self.configure(agent)
            # The SDK's typed sender; a provider with "language" is the v1 listen provider.
            agent.socket.send_update_listen(AgentV1UpdateListen.model_validate({
                "type": "UpdateListen",
                "listen": {"provider": {"type": "deepgram", "model": "nova-3", "language": "de"}},
            }))
            agent.expect("ListenUpdated")
            self.assertEqual(problems_of(agent.frames), [])
            # A v2 (Flux) provider with Deepgram-only end-of-turn tuning.
            agent.socket.send_update_listen(AgentV1UpdateListen.model_validate({
                "type": "UpdateListen",
                "listen": {"provider": {"version": "v2", "type": "deepgram", "model": "flux-general-en",
                                        "language_hints": ["fr"], "eot_threshold": 0.8}},
            }))
            frames = agent.read_until(
                lambda got: "ListenUpdated" in types_of(got) and "Warning" in types_of(got),
                what="ListenUpdated and a Warning")
            [warning] = messages_of(frames, "Warning")
            self.assertEqual(warning["code"], "UNSUPPORTED_SETTING")
            self.assertIn("eot_threshold", warning["description"])
            self.assertNotIn("language_hints", warning["description"])
            self.goes_on(agent)
        self.assertEqual(messages_of(agent.frames, "Error"), [])
        updates = session_updates(self.upstream_events())
        model = updates[0]["audio"]["input"]["transcription"]["model"]
        self.assertEqual(updates[1:], [
            {"type": "realtime", "audio": {"input": {"transcription": {"model": model, "language": "de"}}}},
            {"type": "realtime", "audio": {"input": {"transcription": {"model": model, "language": "fr"}}}},
        ])

    def test_second_settings_sends_only_changes(self) -> None:
        first = agent_settings(model=MODEL)
        second = copy.deepcopy(first)
        second["agent"]["think"]["prompt"] = "You are a terse assistant."
        with self.conversation() as agent:
            self.configure(agent, first)
            self.configure(agent, second)
            self.goes_on(agent)
        self.assertEqual(len(messages_of(agent.frames, "SettingsApplied")), 2)
        self.assertEqual(problems_of(agent.frames), [])
        updates = session_updates(self.upstream_events())
        self.assertEqual(updates[1:], [{"type": "realtime", "instructions": "You are a terse assistant."}])

    def test_updates_wait_for_the_reply_to_end(self) -> None:
        with self.conversation() as agent:
            self.configure(agent)
            agent.inject(LONG_MESSAGE)
            agent.expect("AgentStartedSpeaking")
            agent.socket.send_update_prompt(AgentV1UpdatePrompt(prompt="Speak slowly."))
            agent.socket.send_update_speak(_update_speak("marin", 1.1))
            frames = agent.read_until(
                counts(("PromptUpdated", 1), ("SpeakUpdated", 1), ("AgentAudioDone", 1)),
                what="the end of the reply and both acknowledgements")
            self.assertEqual(texts(frames, "assistant"), [f"You said: {LONG_MESSAGE}"])
            done = index_of(frames, "AgentAudioDone")
            said = index_of(frames, "ConversationText", role="assistant")
            for ack in ("PromptUpdated", "SpeakUpdated"):
                self.assertGreater(index_of(frames, ack), max(done, said))
            self.goes_on(agent)
        self.assertEqual(problems_of(agent.frames), [])
        events = self.upstream_events()
        self.assertEqual(session_updates(events)[1:], [
            {"type": "realtime", "instructions": PROMPT + "\nSpeak slowly."},
            {"type": "realtime", "audio": {"output": {"speed": 1.1}}},
        ])

        # The daemon's own order of what it sent and received: no session.update while a response
        # was requested or active, and the updates did arrive during the reply (so they waited).
        requested = active = 0
        arrived_during_reply = []
        sent_updates = 0
        for direction, kind in self.daemon_trace():
            if (direction, kind) == ("daemon->upstream", "response.create"):
                requested += 1
            elif (direction, kind) == ("upstream->daemon", "response.created"):
                requested, active = max(0, requested - 1), active + 1
            elif (direction, kind) == ("upstream->daemon", "response.done"):
                active -= 1
            elif (direction, kind) == ("daemon->upstream", "session.update"):
                sent_updates += 1
                self.assertEqual((requested, active), (0, 0),
                                 f"session.update {sent_updates} sent during a response")
            elif direction == "client->daemon" and kind in ("UpdatePrompt", "UpdateSpeak"):
                arrived_during_reply.append(active > 0)
            elif (direction, kind) == ("upstream->daemon", "error"):
                self.fail("the upstream answered an event with an error")
        self.assertEqual(sent_updates, 3)
        self.assertEqual(arrived_during_reply, [True, True])

    def test_inject_agent_message_when_idle(self) -> None:
        message = "Our office opens at nine tomorrow morning."
        with self.conversation() as agent:
            self.configure(agent)
            agent.socket.send_inject_agent_message(AgentV1InjectAgentMessage(message=message))
            turn = agent.turn()
            self.assertEqual(texts(turn, "assistant"), [message])
            self.assertEqual(texts(turn, "user"), [])
            spoken_turn_ok(self, turn)
            self.goes_on(agent)
        self.assertEqual(problems_of(agent.frames), [])
        self.assertEqual(messages_of(agent.frames, "InjectionRefused"), [])
        creates = [e for e in self.upstream_events() if e["type"] == "response.create"]
        # The message was asked for word for word, in the conversation (not out of band).
        self.assertIn(f'"{message}"', creates[0]["response"]["instructions"])
        self.assertNotIn("conversation", creates[0]["response"])

    def test_inject_agent_message_refused_during_reply(self) -> None:
        message = "Excuse me for interrupting."
        with self.conversation() as agent:
            self.configure(agent)
            agent.inject(LONG_MESSAGE)
            agent.expect("AgentStartedSpeaking")
            agent.socket.send_inject_agent_message(AgentV1InjectAgentMessage(message=message))
            refused_and_done = counts(("InjectionRefused", 1), ("AgentAudioDone", 1))
            frames = agent.read_until(lambda got: refused_and_done(got) and bool(texts(got, "assistant")),
                                      what="InjectionRefused and the end of the reply")
            self.assertLess(index_of(frames, "InjectionRefused"), index_of(frames, "AgentAudioDone"))
            self.assertEqual(texts(frames, "assistant"), [f"You said: {LONG_MESSAGE}"])
            self.goes_on(agent)
        self.assertEqual(problems_of(agent.frames), [])
        self.assertNotIn(message, texts(agent.frames, "assistant"))
        for event in self.upstream_events():
            self.assertNotIn(message, json.dumps(event))

    def _weather_conversation(self, agent: Agent, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings, "Hello", then a weather question answered by the client; the call."""
        self.configure(agent, settings)
        self.goes_on(agent)
        agent.inject("What is the weather in Paris?")
        [call] = agent.expect("FunctionCallRequest")["functions"]
        agent.function_response(call["id"], call["name"], "Sunny and 21 degrees")
        self.assertEqual(texts(agent.turn(), "assistant"), ["Here is what I found: Sunny and 21 degrees"])
        # A round trip that ends after anything the daemon sent for the turn.
        agent.socket.send_update_prompt(AgentV1UpdatePrompt(prompt="Be brief."))
        agent.expect("PromptUpdated")
        return call

    def test_history_messages(self) -> None:
        with self.conversation() as agent:
            call = self._weather_conversation(agent, agent_settings(model=MODEL, functions=[GET_WEATHER]))
        self.assertEqual(problems_of(agent.frames), [])
        frames = agent.frames
        # Each ConversationText is followed by its History.
        said = [i for i, f in enumerate(frames) if isinstance(f, dict) and f["type"] == "ConversationText"]
        self.assertEqual(len(said), 4)  # two user turns, two assistant turns
        for i in said:
            text = frames[i]
            assert isinstance(text, dict)
            self.assertEqual(frames[i + 1], {"type": "History", "role": text["role"],
                                             "content": text["content"]})
        rounds = [h for h in messages_of(frames, "History") if "function_calls" in h]
        self.assertEqual(rounds, [{"type": "History", "function_calls": [{
            "id": call["id"], "name": "get_weather", "client_side": True,
            "arguments": call["arguments"], "response": "Sunny and 21 degrees"}]}])
        # The round's History comes after the request and before the follow-up reply.
        self.assertLess(index_of(frames, "FunctionCallRequest"), frames.index(rounds[0]))
        self.assertLess(frames.index(rounds[0]),
                        index_of(frames, "ConversationText", role="assistant",
                                 content="Here is what I found: Sunny and 21 degrees"))
        self.assertEqual(len(messages_of(frames, "History")), 5)
        self.upstream_events()

    def test_no_history_when_disabled(self) -> None:
        settings = agent_settings(model=MODEL, functions=[GET_WEATHER])
        settings["flags"] = {"history": False}
        with self.conversation() as agent:
            self._weather_conversation(agent, settings)
        self.assertEqual(problems_of(agent.frames), [])
        self.assertEqual(len(texts(agent.frames, "assistant")), 2)
        self.assertEqual(messages_of(agent.frames, "History"), [])
        self.upstream_events()

    def test_several_function_calls_in_one_response(self) -> None:
        with self.conversation() as agent:
            self.configure(agent, agent_settings(model=MODEL, functions=[GET_WEATHER, GET_TIME]))
            agent.inject("What is the weather and the time in Paris?")
            frames = agent.read_until(counts(("FunctionCallRequest", 2)), what="two FunctionCallRequests")
            requests = messages_of(frames, "FunctionCallRequest")
            calls = [c for r in requests for c in r["functions"]]
            self.assertEqual([len(r["functions"]) for r in requests], [1, 1])
            self.assertEqual([c["name"] for c in calls], ["get_weather", "get_time"])
            for c in calls:
                self.assertTrue(c["client_side"])
                self.assertEqual(json.loads(c["arguments"]), {"city": "Paris"})
            weather, clock = calls

            agent.function_response(weather["id"], weather["name"], "Sunny and 21 degrees")
            # Let the upstream confirm the first output (the moment a daemon that did not wait for
            # every output would ask for the follow-up) before the second output is sent.
            confirmed = self._wait_for_confirmed_output(1)
            self.assertNotIn(("daemon->upstream", "response.create"), confirmed)
            agent.function_response(clock["id"], clock["name"], "It is 14:05")
            answer = agent.turn()
            self.assertEqual(texts(answer, "assistant"), ["Here is what I found: It is 14:05"])
            spoken_turn_ok(self, answer)
        frames = agent.frames
        self.assertEqual(problems_of(frames), [])
        self.assertEqual(len(messages_of(frames, "FunctionCallRequest")), 2)
        self.assertEqual(len(texts(frames, "assistant")), 1)
        [history] = [h for h in messages_of(frames, "History") if "function_calls" in h]
        self.assertEqual([(c["id"], c["response"]) for c in history["function_calls"]],
                         [(weather["id"], "Sunny and 21 degrees"), (clock["id"], "It is 14:05")])

        events = self.upstream_events()
        kinds = [e["type"] for e in events]
        outputs = [i for i, e in enumerate(events) if e["type"] == "conversation.item.create"
                   and e["item"]["type"] == "function_call_output"]
        self.assertEqual([events[i]["item"]["call_id"] for i in outputs], [weather["id"], clock["id"]])
        follow_ups = [i for i, kind in enumerate(kinds) if kind == "response.create" and i > outputs[0]]
        # Exactly one follow-up, and only once both outputs were sent.
        self.assertEqual(len(follow_ups), 1)
        self.assertGreater(follow_ups[0], outputs[1])

    def _wait_for_confirmed_output(self, number: int) -> list[tuple[str, str]]:
        """Wait until the daemon has sent its ``number``-th function output upstream and received the
        upstream's confirmation of that item; the daemon's trace from that output on."""

        def after_output() -> list[tuple[str, str]] | None:
            outputs = [i for i, (_, e) in enumerate(self._recorded_since_mark())
                       if e["type"] == "conversation.item.create"
                       and e["item"].get("type") == "function_call_output"]
            if len(outputs) < number:
                return None
            # The k-th item create the simulator received is the daemon's k-th item create.
            creates = sum(1 for _, e in self._recorded_since_mark()[:outputs[number - 1] + 1]
                          if e["type"] == "conversation.item.create")
            trace = self.daemon_trace(closed=False)
            sent = [i for i, step in enumerate(trace)
                    if step == ("daemon->upstream", "conversation.item.create")]
            if len(sent) < creates:
                return None
            rest = trace[sent[creates - 1]:]
            return rest if ("upstream->daemon", "conversation.item.done") in rest else None

        result: list[tuple[str, str]] = wait_for(after_output, f"function output {number} confirmed")
        return result

    def test_agent_id_string_refused_then_corrected(self) -> None:
        with self.conversation() as agent:
            refused = agent_settings(model=MODEL)
            refused["agent"] = "d290f1ee-6c54-4b01-90e6-d701748f0851"
            agent.send_settings(refused)
            error = agent.expect("Error")
            self.assertEqual(error["code"], "INVALID_SETTINGS")
            self.assertTrue(error["description"].startswith("agent:"), error)
            self.configure(agent)
            self.goes_on(agent)
        self.assertEqual(len(messages_of(agent.frames, "Error")), 1)
        self.assertEqual(messages_of(agent.frames, "Warning"), [])
        # The refused Settings never reached the upstream: one full session.update, from the second.
        updates = session_updates(self.upstream_events())
        self.assertEqual(len(updates), 1)
        self.assertEqual(updates[0]["instructions"], PROMPT)


# --------------------------------------------------------------------------- server-side functions


class ToolServer:
    """A small HTTP server in a thread standing for a function endpoint; it records every request.

    ``/tools/weather`` answers 200, ``/tools/broken`` 500, ``/tools/slow`` only once ``release`` is set.
    """

    WEATHER = "Sunny and 21 degrees in Paris"

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        tool_server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                tool_server.requests.append({
                    "method": self.command, "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                if self.path.startswith("/tools/weather"):
                    status, reply = 200, tool_server.WEATHER
                elif self.path.startswith("/tools/broken"):
                    status, reply = 500, "database down"
                elif self.path.startswith("/tools/slow"):
                    tool_server.release.wait(START_TIMEOUT)
                    status, reply = 200, "too late"
                else:
                    status, reply = 404, "no such tool"
                data = reply.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the daemon gave up on a slow answer

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


_TOOL_SERVERS: dict[type, ToolServer] = {}


class ServerSideFunctionTests(SharedDaemonTestCase):
    """Functions with an ``endpoint``, run by the daemon itself against a local HTTP server
    (``--function-url-prefixes http://127.0.0.1:PORT/tools``, ``--function-timeout 1``)."""

    def extra_daemon_options(self, closers: list[Callable[[], Any]]) -> list[str]:
        tools = ToolServer()
        tools.start()
        closers.append(tools.stop)
        _TOOL_SERVERS[type(self)] = tools
        return ["--function-url-prefixes", tools.url("/tools"), "--function-timeout", "1"]

    @property
    def tools(self) -> ToolServer:
        return _TOOL_SERVERS[type(self)]

    def settings_with_endpoint(self, url: str) -> dict[str, Any]:
        function = dict(GET_WEATHER, endpoint={
            "url": url, "method": "POST", "headers": {"x-tool-key": "tool-key-7d1c"}})
        return agent_settings(model=MODEL, functions=[function])

    def server_side_round(self, path: str) -> tuple[dict[str, Any], dict[str, Any], list[Frame]]:
        """Settings with an endpoint at ``path``, a weather question; the FunctionCallRequest's call,
        the daemon's FunctionCallResponse and the follow-up turn."""
        with self.conversation() as agent:
            self.configure(agent, self.settings_with_endpoint(self.tools.url(path)))
            agent.inject("What is the weather in Paris?")
            frames = agent.read_until(counts(("FunctionCallRequest", 1), ("FunctionCallResponse", 1)),
                                      timeout=TIMEOUT, what="the request and the daemon's response")
            [call] = messages_of(frames, "FunctionCallRequest")[0]["functions"]
            response = messages_of(frames, "FunctionCallResponse")[0]
            self.assertLess(index_of(frames, "FunctionCallRequest"), index_of(frames, "FunctionCallResponse"))
            turn = agent.turn()
            spoken_turn_ok(self, turn)
        self.assertEqual(problems_of(agent.frames), [])
        self.assertEqual(call["name"], "get_weather")
        self.assertFalse(call["client_side"])
        self.assertEqual(json.loads(call["arguments"]), {"city": "Paris"})
        self.assertEqual((response["id"], response["name"]), (call["id"], call["name"]))
        self.assertEqual(texts(turn, "assistant"), [f"Here is what I found: {response['content']}"])
        [history] = [h for h in messages_of(agent.frames, "History") if "function_calls" in h]
        self.assertEqual(history["function_calls"], [{
            "id": call["id"], "name": "get_weather", "client_side": False,
            "arguments": call["arguments"], "response": response["content"]}])
        # The endpoint's headers are the client's secret: never shown back.
        for frame in agent.frames:
            if isinstance(frame, dict):
                self.assertNotIn("tool-key-7d1c", json.dumps(frame))
        # The model read exactly what the client was shown.
        [output] = function_outputs(self.upstream_events())
        self.assertEqual((output["call_id"], output["output"]), (call["id"], response["content"]))
        return call, response, turn

    def test_server_side_function(self) -> None:
        seen = len(self.tools.requests)
        call, response, _ = self.server_side_round("/tools/weather")
        self.assertEqual(response["content"], ToolServer.WEATHER)
        [request] = self.tools.requests[seen:]
        self.assertEqual((request["method"], request["path"]), ("POST", "/tools/weather"))
        self.assertEqual(request["headers"].get("x-tool-key"), "tool-key-7d1c")
        self.assertEqual(request["headers"].get("content-type"), "application/json")
        self.assertEqual(json.loads(request["body"]), json.loads(call["arguments"]))

    def test_server_side_function_error_status(self) -> None:
        _, response, _ = self.server_side_round("/tools/broken")
        result = json.loads(response["content"])
        self.assertEqual((result["error"], result["status"]), ("http_status", 500))
        self.assertIn("database down", result["body"])

    def test_server_side_function_timeout(self) -> None:
        self.tools.release.clear()
        self.addCleanup(self.tools.release.set)
        _, response, _ = self.server_side_round("/tools/slow")
        self.assertEqual(json.loads(response["content"])["error"], "timeout")

    def test_endpoint_outside_allow_list_refused(self) -> None:
        seen = len(self.tools.requests)
        with self.conversation() as agent:
            for url in (self.tools.url("/admin/weather"), self.tools.url("/toolsx/weather"),
                        "http://tools.example.com/tools/weather"):
                agent.send_settings(self.settings_with_endpoint(url))
                error = agent.expect("Error")
                self.assertEqual(error["code"], "INVALID_SETTINGS")
                self.assertTrue(error["description"].startswith("agent.think.functions[0].endpoint.url"),
                                error)
            self.configure(agent, self.settings_with_endpoint(self.tools.url("/tools/weather")))
            self.goes_on(agent)
        self.assertEqual(len(messages_of(agent.frames, "Error")), 3)
        self.assertEqual(self.tools.requests[seen:], [])
        self.assertEqual(len(session_updates(self.upstream_events())), 1)
