"""
Test fixtures: the daemon's site on a loopback port in front of the simulator, and a small Deepgram v1
test client built on Autobahn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from openai_proxy.config import Config, Limits
from openai_proxy.functions import FunctionCaller
from openai_proxy.relay import ClientFactory, SessionRegistry, UpstreamConnector
from openai_proxy.simulator import SimulatorFactory, listen_simulator
from openai_proxy.simulator.validation import validate_client_event
from openai_proxy.web import make_site
from openai_proxy.wsclose import cancel_close_handshake_timer


def wait(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class Daemon:
    """The daemon's site on 127.0.0.1 with the simulator as its upstream."""

    def __init__(self) -> None:
        self.port: IListeningPort | None = None
        self.simulator_port: IListeningPort | None = None
        self.simulator: SimulatorFactory | None = None
        self.registry: SessionRegistry | None = None
        self.factory: ClientFactory | None = None
        self.caller: FunctionCaller | None = None

    @defer.inlineCallbacks
    def start(self, *, url_for: Callable[[str], str] | None = None,
              **config: Any) -> Any:
        limits = config.pop("limits", Limits(handshake_timeout=5.0, ping_interval=0))
        simulator_options = config.pop("simulator_options", {})
        metrics = config.pop("metrics", None)
        self.config = Config(**{"api_key": "sk-test-key", "simulator": True, "limits": limits, **config})
        if url_for is None:
            self.simulator_port, self.simulator = yield listen_simulator(
                reactor, api_key="sk-test-key", **simulator_options
            )
            sim_port = self.simulator_port.getHost().port

            def url_for(model: str) -> str:
                return f"ws://127.0.0.1:{sim_port}/v1/realtime?model={model}"

        self.registry = SessionRegistry(reactor, self.config.limits.shutdown_grace, metrics)
        connector = UpstreamConnector(reactor, self.config, url_for=url_for)
        self.caller = None
        if self.config.function_url_prefixes:
            self.caller = FunctionCaller(
                reactor,
                timeout=self.config.limits.function_timeout,
                prefixes=self.config.function_url_prefixes,
            )
        self.factory = ClientFactory(reactor, self.config, self.registry, connector, self.caller)
        site = make_site(self.factory, self.registry, demo=self.config.demo)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return self

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"ws://127.0.0.1:{self.port.getHost().port}/v1/agent/converse"

    def upstream_events(self) -> list[dict[str, Any]]:
        """Every event the simulator received, each validated strictly with the openai types."""
        assert self.simulator is not None
        events = [event for _, event in self.simulator.received]
        for event in events:
            validate_client_event(event)
        return events

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if self.port is not None:
            yield self.port.stopListening()
        if self.registry is not None:
            for protocol in list(self.registry._sessions):
                protocol.dropConnection(abort=True)
        if self.simulator is not None:
            for protocol in list(self.simulator.sessions):
                protocol.dropConnection(abort=True)
        if self.simulator_port is not None:
            yield self.simulator_port.stopListening()
        if self.caller is not None:
            yield self.caller.close()
        # Let aborted connections finish closing, and the timers Autobahn batches into buckets of
        # whole seconds (txaio's call_later: handshake and close timeouts of those connections) run
        # out, so that trial sees a clean reactor. Bounded: a bucket is at most a few seconds away.
        yield wait(0.05)
        deadline = reactor.seconds() + 5.0
        while reactor.seconds() < deadline and any(
            getattr(call.func, "__name__", "") == "_notify_bucket" for call in reactor.getDelayedCalls()
        ):
            yield wait(0.05)


class DaemonTestCase(TestCase):
    """A test case with an in-process daemon on loopback (:class:`Daemon`), stopped after the test."""

    @defer.inlineCallbacks
    def start(self, **config: Any) -> Any:
        self.daemon = Daemon()
        yield self.daemon.start(**config)
        self.addCleanup(self.daemon.stop)
        return self.daemon


class TestClient(WebSocketClientProtocol):
    """Collects what the daemon sends; ``expect`` waits for the next message of a type."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.frames: list[Any] = []  # dicts and bytes, in arrival order
        self.audio = bytearray()
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[Any]]] = []
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[tuple[bool, int | None, str | None]] = defer.Deferred()
        self._seen = 0

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.audio += payload
            self.frames.append(bytes(payload))
            return
        message = json.loads(payload)
        self.messages.append(message)
        self.frames.append(message)
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        self.closed.callback((wasClean, code, reason))
        for _, d in self._waiters:
            if not d.called:
                d.errback(ConnectionError(f"closed: {code} {reason}"))
        self._waiters = []

    def _check(self) -> None:
        for predicate, d in list(self._waiters):
            for message in self.messages[self._seen_for(d):]:
                if predicate(message):
                    self._waiters.remove((predicate, d))
                    d.callback(message)
                    break

    def _seen_for(self, d: defer.Deferred[Any]) -> int:
        return getattr(d, "_from", 0)

    def expect(self, message_type: str, timeout: float = 5.0, **fields: Any) -> defer.Deferred[Any]:
        """The first message of ``message_type`` (with ``fields``) after the previous ``expect``."""

        def predicate(message: dict[str, Any]) -> bool:
            return message.get("type") == message_type and all(
                message.get(k) == v for k, v in fields.items()
            )

        d: defer.Deferred[Any] = defer.Deferred()
        d._from = self._seen  # type: ignore[attr-defined]
        for index, message in enumerate(self.messages[self._seen:], start=self._seen):
            if predicate(message):
                self._seen = index + 1
                d.callback(message)
                return d

        def advance(message: dict[str, Any]) -> dict[str, Any]:
            self._seen = self.messages.index(message, self._seen) + 1
            return message

        self._waiters.append((predicate, d))
        d.addCallback(advance)
        d.addTimeout(timeout, reactor)
        return d

    def wait_for(self, message_type: str, timeout: float = 5.0, **fields: Any) -> defer.Deferred[Any]:
        """The first message of ``message_type`` (with ``fields``) ever received, or the next one."""
        saved, self._seen = self._seen, 0
        try:
            d = self.expect(message_type, timeout, **fields)
        finally:
            if d.called:
                self._seen = saved
        return d

    def send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)


@defer.inlineCallbacks
def connect_client(url: str, headers: dict[str, str] | None = None,
                   protocols: list[str] | None = None) -> Any:
    """Open a :class:`TestClient` to ``url`` and wait for the WebSocket to open."""
    factory = WebSocketClientFactory(url, headers=headers or {}, protocols=protocols)
    factory.protocol = TestClient
    port = int(url.split(":")[2].split("/")[0])
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = yield endpoint.connect(factory)
    yield client.opened
    return client


def default_settings(**agent: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": 24000},
            "output": {"encoding": "linear16", "sample_rate": 24000, "container": "none"},
        },
        "agent": {
            "think": {
                "provider": {"type": "open_ai", "model": "gpt-realtime"},
                "prompt": "You are a helpful test agent.",
                "functions": [{
                    "name": "get_weather",
                    "description": "Get the weather for a city",
                    "parameters": {"type": "object",
                                   "properties": {"city": {"type": "string"}},
                                   "required": ["city"]},
                }],
            },
            "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}},
        },
    }
    message["agent"].update(agent)
    return message


__all__ = ["Daemon", "TestClient", "connect_client", "default_settings", "wait"]
