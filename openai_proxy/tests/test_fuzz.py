"""
A fuzz target for the whole daemon, in memory: hypothesis drives client frames (well-formed, malformed
and random), upstream events (the GA event types with fields of every type, and frames that are not
events), and the passing of time into one session, while a second session holds a conversation.

After each run: no failure was logged and no ``INTERNAL_ERROR`` was sent, every frame a client received
is strict JSON (no ``NaN``/``Infinity``) and a Deepgram message with a string ``type``, the other session
still converses, and what the daemon holds for the fuzzed session stays under fixed bounds.

The suite runs a short campaign; ``fuzz/fuzz_daemon.py`` runs a long one (``OPENAI_PROXY_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.tests.helpers import default_settings
from openai_proxy.tests.test_memory import MemoryClient, MemoryDaemon, _pair

#: Examples per run: a short campaign in the suite, more from ``fuzz/fuzz_daemon.py``.
EXAMPLES = int(os.environ.get("OPENAI_PROXY_FUZZ_EXAMPLES", "30"))

# -- values -------------------------------------------------------------------------------------------

# Numbers of every kind a peer can write: NaN and ±Infinity (json.dumps writes them as bare words, which
# strict JSON refuses), doubles up to 1e308, and integers of hundreds of digits.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.text(max_size=40),
)
#: JSON nested deeper than a recursive decoder goes (``RecursionError``), inside a message or alone.
_deep = st.integers(min_value=900, max_value=5000).map(lambda n: "[" * n + "]" * n)
_json = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

_CLIENT_TYPES = ["Settings", "UpdatePrompt", "UpdateSpeak", "UpdateThink", "UpdateListen",
                 "InjectUserMessage", "InjectAgentMessage", "FunctionCallResponse", "KeepAlive",
                 "Teleport", ""]
_CLIENT_FIELDS = ["prompt", "speak", "think", "listen", "content", "message", "behavior", "id", "name",
                  "audio", "agent", "tags", "experimental", "mip_opt_out", "flags"]


@st.composite
def _client_message(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["valid", "shaped", "json", "text", "deep"]))
    if kind == "valid":
        message = draw(st.sampled_from([
            default_settings(),
            default_settings(greeting="Hello!"),
            {"type": "InjectUserMessage", "content": "What is the weather in Paris?"},
            {"type": "InjectUserMessage", "content": "x" * 2000},
            {"type": "InjectAgentMessage", "message": "One moment."},
            {"type": "InjectAgentMessage", "message": "Now.", "behavior": "interrupt"},
            {"type": "UpdatePrompt", "prompt": "Be brief."},
            {"type": "UpdateSpeak", "speak": {"provider": {"type": "open_ai", "voice": "ash"}}},
            {"type": "KeepAlive"},
            {"type": "FunctionCallResponse", "id": "call_1", "name": "get_weather", "content": "{}"},
        ]))
        return json.dumps(message)
    if kind == "shaped":
        message = {"type": draw(st.sampled_from(_CLIENT_TYPES))}
        for name in draw(st.lists(st.sampled_from(_CLIENT_FIELDS), max_size=4, unique=True)):
            message[name] = draw(_json)
        return json.dumps(message)
    if kind == "json":
        return json.dumps(draw(_json))
    if kind == "deep":
        return '{"type": "Settings", "agent": ' + draw(_deep) + "}"
    return draw(st.text(max_size=60))


_UPSTREAM_TYPES = [
    "session.created", "session.updated", "error", "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
    "conversation.item.done", "conversation.item.input_audio_transcription.completed",
    "response.created", "response.done", "response.output_item.added", "response.output_item.done",
    "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done", "response.output_text.delta", "response.output_text.done",
    "response.function_call_arguments.done", "rate_limits.updated", "brand.new.event",
]
_IDS = st.sampled_from(["resp_1", "resp_2", "item_1", "item_2", "call_1", "evt_1"]) | st.text(max_size=8)


@st.composite
def _upstream_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["event", "event", "event", "json", "text", "deep"]))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "deep":
        return ('{"type": "response.done", "response": ' + draw(_deep) + "}").encode()
    if kind == "text":
        return draw(st.text(max_size=40)).encode()
    event: dict[str, Any] = {"type": draw(st.sampled_from(_UPSTREAM_TYPES)), "event_id": draw(_IDS)}
    fields = {
        "response": st.fixed_dictionaries({"id": _IDS, "status": st.sampled_from(
            ["completed", "cancelled", "failed", "in_progress"]) | _json}, optional={"output": _json})
        | _json,
        "item": st.fixed_dictionaries({"id": _IDS}, optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output"]) | _json,
            "role": st.sampled_from(["user", "assistant"]) | _json,
            "content": _json, "call_id": _IDS, "name": st.text(max_size=10), "arguments": _json,
        }) | _json,
        "item_id": _IDS | _json,
        "response_id": _IDS | _json,
        "call_id": _IDS | _json,
        "name": st.sampled_from(["get_weather", "unknown"]) | _json,
        "arguments": st.sampled_from(['{"city": "Paris"}', "{", "[]"]) | _json,
        "delta": st.binary(max_size=480).map(lambda b: base64.b64encode(b).decode()) | _json,
        "transcript": st.text(max_size=30) | _json,
        "text": st.text(max_size=30) | _json,
        "audio_start_ms": st.integers(min_value=-1000, max_value=10**6) | _json,
        "audio_end_ms": st.integers(min_value=-1000, max_value=10**6) | _json,
        "error": st.fixed_dictionaries({}, optional={
            "type": st.text(max_size=20), "code": st.text(max_size=20), "message": st.text(max_size=40),
            "event_id": _IDS,
        }) | _json,
        "session": _json,
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        event[name] = draw(fields[name])
    return json.dumps(event).encode()


_actions = st.lists(
    st.one_of(
        st.tuples(st.just("client"), _client_message()),
        st.tuples(st.just("audio"), st.binary(max_size=4800)),
        st.tuples(st.just("upstream"), _upstream_frame()),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=3)),
    ),
    min_size=8,
    max_size=40,
)


# -- the target ---------------------------------------------------------------------------------------


class _StrictClient(MemoryClient):
    """Checks every frame the daemon sends before anything else reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_frames: list[str] = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            try:
                message = json.loads(payload, parse_constant=_refuse_constant)
            except ValueError as e:
                self.bad_frames.append(f"{e}: {payload[:200]!r}")
                return
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                self.bad_frames.append(f"not a message: {payload[:200]!r}")
                return
        super().onMessage(payload, isBinary)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Codes of the simulator's refusals of malformed events (not of events the conversation's state refuses).
_MALFORMED_CODES = frozenset({
    "invalid_json", "unknown_parameter", "invalid_type", "missing_required_parameter",
    "object_above_max_properties", "string_above_max_length", "session_not_configured",
})


def _footprint(session: s.Session) -> dict[str, int]:
    """What the daemon holds for a session that a peer could make grow."""
    return {
        "held audio bytes": len(session._held_audio),
        "held injections": len(session._held_injections),
        "unconfirmed injections": len(session._user_echo),
        "waiting replies": len(session._scheduler.waiting),
        "queued updates": len(session._queued_updates),
    }


class _Checks(SynchronousTestCase):
    """The assertion methods, for the module-level target."""

    def runTest(self) -> None:
        pass


_check = _Checks()


def run_daemon(actions: list[tuple[str, Any]], configured: bool = False) -> None:
    """
    The fuzz target: drive ``actions`` into a fresh in-memory daemon and check what it did.  With
    ``configured`` the fuzzed client's session is configured first (so upstream events reach a session
    that has an upstream), else the actions start from the Welcome.
    """
    failures: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(repr(event.get("log_failure") or event.get("log_format")))

    daemon = MemoryDaemon()
    loop = replace_loop(daemon.reactor)
    loop.__enter__()
    globalLogPublisher.addObserver(observe)
    try:
        _drive(daemon, actions, configured)
    finally:
        globalLogPublisher.removeObserver(observe)
        loop.__exit__(None, None, None)
    _check.assertEqual(failures, [])


def _drive(daemon: MemoryDaemon, actions: list[tuple[str, Any]], configured: bool) -> None:
    bystander = _client(daemon)
    bystander.send_json(default_settings())
    daemon.run_until(bystander.has("SettingsApplied"), "SettingsApplied")
    [bystander_upstream] = daemon.simulator.sessions
    victim = _client(daemon)
    [victim_side] = [p for p in daemon.registry._sessions
                     if p.session is not None and p.session.phase is s.Phase.AWAITING_SETTINGS]
    if configured:
        victim.send_json(default_settings())
        daemon.run_until(victim.has("SettingsApplied"), "SettingsApplied")

    for action, value in actions:
        if action == "client":
            victim.sendMessage(value.encode("utf-8"), isBinary=False)
        elif action == "audio":
            victim.sendMessage(value, isBinary=True)
        elif action == "upstream":
            for upstream in daemon.simulator.sessions:
                if upstream is not bystander_upstream and upstream.state == upstream.STATE_OPEN:
                    upstream.sendMessage(value, isBinary=False)
        else:
            daemon.advance(value)
        daemon.flush()
        session = victim_side.session
        assert session is not None
        for name, size in _footprint(session).items():
            limit = 5 * 48_000 if name == "held audio bytes" else s.MAX_WAITING_REQUESTS
            _check.assertLessEqual(size, limit, name)
    daemon.advance(5.0)

    for client in (victim, bystander):
        _check.assertEqual(client.bad_frames, [])
        _check.assertEqual(client.of_type("Error", code=errors.INTERNAL_ERROR), [])
    # The other session was not disturbed: it still converses.
    bystander.send_json({"type": "InjectUserMessage", "content": "Are you still there?"})
    daemon.run_until(bystander.has("AgentAudioDone"), "the bystander's reply")
    _check.assertTrue(bystander.of_type("ConversationText", role="assistant"))
    # Every event the daemon sent upstream is valid (checked with the openai types), and the simulator
    # refused none as malformed.  It may refuse some for the conversation's state (a voice change after
    # the agent spoke, an item only the fuzzed upstream had announced), as the real API does.
    daemon.upstream_events()
    refused = [e for e in daemon.simulator_sent("error") if e["error"]["code"] in _MALFORMED_CODES]
    _check.assertEqual(refused, [])


def _client(daemon: MemoryDaemon) -> _StrictClient:
    factory = WebSocketClientFactory("ws://daemon.memory.test/v1/agent/converse", reactor=daemon.reactor)
    factory.protocol = _StrictClient
    address = IPv4Address("TCP", "127.0.0.1", 8080)
    client = factory.buildProtocol(address)
    server = daemon.site.buildProtocol(address)
    daemon.pumps.append(_pair(server, client, daemon.reactor, 8080))
    daemon.flush()
    assert isinstance(client, _StrictClient)
    return client


#: The suite's short campaign is the same every run (derandomized, no example database); a long one
#: explores at random and keeps what it finds.
_SHORT = EXAMPLES <= 30


@settings(max_examples=EXAMPLES, deadline=None, derandomize=_SHORT,
          database=None if _SHORT else settings.default.database,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(actions=_actions, configured=st.booleans())
def fuzz_daemon(actions: list[tuple[str, Any]], configured: bool) -> None:
    """The hypothesis-driven target (``fuzz_daemon.hypothesis.fuzz_one_input`` for atheris)."""
    run_daemon(actions, configured)


class DaemonFuzzTests(SynchronousTestCase):
    def test_nothing_a_peer_sends_escapes_leaks_or_grows(self) -> None:
        fuzz_daemon()
