"""
The network side: Autobahn protocols that turn WebSocket callbacks into :class:`~openai_proxy.session.Session`
inputs and carry out the session's outputs.

- :class:`ClientProtocol` serves one Deepgram v1 client.
- :class:`UpstreamLink` owns the OpenAI leg of that client: a Deferred gate holds events until the upstream
  socket is open, then they flow in order.  :class:`UpstreamProtocol` is its Autobahn client protocol.
- Backpressure: each leg's transport is registered as a push producer on the other (through
  :class:`_PauseRelay`), so a slow reader on one side stops reading on the other instead of queueing.
- Continuity (SPEC §8): a client has a current link and, while the session moves the conversation to a
  new upstream session, a candidate link; links are numbered (``generation``) and what a link that is
  neither reports is dropped. ``SwapUpstream`` makes the candidate current in one reactor turn: the
  backpressure registration moves to it and the old link is closed.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Any, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.config import Config
from openai_proxy.functions import FunctionCaller
from openai_proxy.telemetry import parse_trace_id
from openai_proxy.translate import messages as m
from openai_proxy.wsclose import cancel_close_handshake_timer

_log = Logger(namespace="openai_proxy")

#: Events queued for an upstream that is not open yet.  Only control events wait there (audio is held,
#: bounded, by the session until the upstream confirmed the configuration), so this is generous.
MAX_GATED_EVENTS = 512


def _level(name: str) -> Callable[..., None]:
    return {
        "debug": _log.debug,
        "info": _log.info,
        "warn": _log.warn,
        "error": _log.error,
    }.get(name, _log.info)


def _safe_type(message: Any) -> str | None:
    if isinstance(message, dict) and isinstance(message.get("type"), str):
        return str(message["type"])[:64]
    return None


@implementer(IPushProducer)
class _PauseRelay:
    """
    Pauses reading on one transport while the other cannot keep up with writing.

    ``stopProducing`` does nothing: closes are the relay's business, so that the client still gets its
    ``Error`` when the upstream leaves.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def _no_delay(transport: Any) -> None:
    # Autobahn's tcpNoDelay option never reaches the socket (it is applied before the option is
    # copied onto the protocol); small frames must not wait for Nagle's algorithm.
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, NotImplementedError):
        pass


def _glue(consumer_transport: Any, producer_transport: Any) -> None:
    # Under twisted.web the taken-over transport still has the HTTPChannel registered as its producer.
    if getattr(consumer_transport, "producer", None) is not None:
        consumer_transport.unregisterProducer()
    consumer_transport.registerProducer(_PauseRelay(producer_transport), True)


# -- upstream ---------------------------------------------------------------------------------------


class UpstreamProtocol(WebSocketClientProtocol):
    """The OpenAI Realtime leg of one session."""

    link: UpstreamLink

    def connectionMade(self) -> None:
        super().connectionMade()
        _no_delay(self.transport)
        self._lost_reason: Failure | None = None

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost_reason = reason
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)

    def onOpen(self) -> None:
        try:
            self.link.opened(self)
        except Exception:
            _log.failure("upstream onOpen failed")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.link.protocol_problem("the upstream sent a binary frame")
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            self.link.protocol_problem("the upstream sent a frame that is not JSON")
            return
        if not isinstance(event, dict):
            self.link.protocol_problem("the upstream sent JSON that is not an object")
            return
        self.link.event(event)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        status = None
        status_line = getattr(self, "http_status_line", None)
        if isinstance(status_line, str):
            parts = status_line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
        self.link.closed(code, reason, status, getattr(self, "_lost_reason", None))


class UpstreamLink:
    """
    One session's connection to the upstream, with the Deferred gate in front of it.

    ``send`` never blocks: before the socket is open events wait (in order, bounded) on the gate; the gate's
    Deferred fires in ``onOpen`` (Autobahn's own ``open()`` never fires when the upgrade is refused, so the
    link keeps its own) and errbacks when the socket closes without having opened.

    ``generation`` numbers the links of one client (``ConnectUpstream.generation``): the owner routes
    what a link reports by it, and ignores a link that is neither its current one nor its candidate.
    """

    def __init__(self, owner: ClientProtocol, generation: int = 0) -> None:
        self._owner = owner
        self.generation = generation
        self._queue: deque[dict[str, Any]] = deque()
        self._protocol: UpstreamProtocol | None = None
        self._connector: Any = None
        self._closed = False
        self._timeout: Any = None
        self._abort_call: Any = None
        self.gate: defer.Deferred[UpstreamProtocol] = defer.Deferred()
        self.gate.addCallbacks(self._flush_gate, lambda f: None)

    @property
    def is_open(self) -> bool:
        return self._protocol is not None and not self._closed

    def connect(self, connector: UpstreamConnector, model: str) -> None:
        self._timeout = connector.reactor.callLater(
            connector.config.limits.handshake_timeout, self._handshake_timed_out
        )
        d = connector.connect(self, model)
        d.addErrback(self._connect_failed)
        self._connector = d

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        if self._protocol is None and not self._closed:
            self._closed = True
            self._owner.upstream_report(
                self, lambda session: session.upstream_timed_out(self.generation))
            self.close()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _connect_failed(self, failure: Failure) -> None:
        if self._closed:
            return
        if failure.check(defer.CancelledError):
            return
        self._cancel_timeout()
        _log.info(
            "upstream connection failed: {problem}",
            problem=failure.getErrorMessage(),
            **self._owner.log_fields,
        )
        if not self._closed:
            self._closed = True
            self._owner.upstream_report(
                self, lambda session: session.upstream_unreachable(self.generation))

    def send(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        if self._protocol is not None:
            self._write(event)
            return
        if len(self._queue) >= MAX_GATED_EVENTS:
            self._fail(errors.UPSTREAM_UNAVAILABLE, "too many events are waiting for the upstream")
            self.close()
            return
        self._queue.append(event)

    def _write(self, event: dict[str, Any]) -> None:
        assert self._protocol is not None
        self._owner.log_message("daemon->upstream", event)
        self._protocol.sendMessage(
            json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8"))

    def _flush_gate(self, protocol: UpstreamProtocol) -> None:
        while self._queue and not self._closed:
            self._write(self._queue.popleft())

    def opened(self, protocol: UpstreamProtocol) -> None:
        self._cancel_timeout()
        if self._closed:
            protocol.dropConnection(abort=True)
            return
        self._protocol = protocol
        if self._owner.is_current(self):
            self.glue()
        self._owner.upstream_opened(self)
        self.gate.callback(protocol)

    def glue(self) -> None:
        """Register backpressure between this link's socket and the client's (both ways)."""
        if self._protocol is not None and self._protocol.transport is not None:
            _glue(self._protocol.transport, self._owner.transport)
            _glue(self._owner.transport, self._protocol.transport)

    def unglue(self) -> None:
        """Undo :meth:`glue` on this link's side (the client's side is re-registered by the next)."""
        transport: Any = self._protocol.transport if self._protocol is not None else None
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    def event(self, event: dict[str, Any]) -> None:
        if not self._closed:
            self._owner.upstream_event(self, event)

    def protocol_problem(self, description: str) -> None:
        _log.warn(
            "upstream protocol problem: {problem}",
            problem=description,
            **self._owner.log_fields,
        )

    def closed(
        self, code: int | None, reason: str | None, status: int | None, lost: Failure | None
    ) -> None:
        self._cancel_timeout()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        was_open = self._protocol is not None
        self._protocol = None
        if not self.gate.called:
            self.gate.errback(Failure(internet_error.ConnectionClosed()))
        _log.info(
            "upstream closed {close_code} {close_reason} (http status {http_status})",
            close_code=code,
            close_reason=reason or "",
            http_status=status,
            direction="upstream",
            **self._owner.log_fields,
        )
        if self._closed:
            return
        self._closed = True
        self._owner.upstream_closed(self, s.UpstreamClosure(
            was_open=was_open,
            close_code=code,
            http_status=status,
            tls_failed=lost is not None and lost.check(SSL.Error) is not None,
        ))

    def _fail(self, code: str, description: str) -> None:
        if not self._closed:
            self._closed = True
            self._owner.upstream_failed(self, code, description)

    def close(self) -> None:
        """Release the upstream socket (idempotent)."""
        self._closed = True
        self._cancel_timeout()
        self._queue.clear()
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.sendClose(1000)
            # Do not wait for a slow or hostile upstream to finish the closing handshake.
            self._abort_call = protocol.factory.reactor.callLater(1.0, _abort, protocol)
        elif self._connector is not None and not self._connector.called:
            self._connector.cancel()


def _abort(protocol: WebSocketClientProtocol) -> None:
    transport: Any = protocol.transport
    if transport is not None and getattr(transport, "connected", False):
        transport.abortConnection()


class UpstreamConnector:
    """
    Opens upstream WebSocket connections: TLS with certificate verification for ``wss://``.

    ``endpoint_factory(host, port, secure)``, when given, supplies the client endpoint instead (tests
    connect the upstream in memory through it).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        url_for: Callable[[str], str] | None = None,
        endpoint_factory: Callable[[str, int, bool], IStreamClientEndpoint] | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self._url_for = url_for or config.upstream_url_for
        self._endpoint_factory = endpoint_factory
        self._trust_root: Certificate | None = None
        if config.upstream_ca:
            with open(config.upstream_ca, "rb") as f:
                self._trust_root = Certificate.loadPEM(f.read())

    def connect(self, link: UpstreamLink, model: str) -> defer.Deferred[Any]:
        url = self._url_for(model)
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        headers = {}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        factory = WebSocketClientFactory(url, headers=headers, reactor=self.reactor)
        factory.protocol = UpstreamProtocol
        ping = self.config.limits.upstream_ping_interval
        factory.setProtocolOptions(
            # The link's own timer (same limit, started earlier) reports UPSTREAM_TIMEOUT first.
            openHandshakeTimeout=self.config.limits.handshake_timeout * 2,
            # An upstream that stops answering pings (a dead path) is dropped, then reconnected.
            autoPingInterval=ping or 0,
            autoPingTimeout=ping * 2 if ping else 0,
            closeHandshakeTimeout=1.0,
            # Upstream events (session.updated with long instructions, audio deltas) can be large.
            maxMessagePayloadSize=16 * 1024 * 1024,
            maxFramePayloadSize=16 * 1024 * 1024,
        )

        def build(addr: Any) -> UpstreamProtocol:
            protocol: Any = WebSocketClientFactory.buildProtocol(factory, addr)
            protocol.link = link
            return cast(UpstreamProtocol, protocol)

        factory.buildProtocol = build  # type: ignore[method-assign]
        if self._endpoint_factory is not None:
            return self._endpoint_factory(host, port, secure).connect(factory)
        endpoint: Any = HostnameEndpoint(
            self.reactor, host, port, timeout=self.config.limits.handshake_timeout
        )
        if secure:
            # service_identity checks the certificate against the host name.
            options = optionsForClientTLS(host, trustRoot=self._trust_root)
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint.connect(factory)


# -- client -----------------------------------------------------------------------------------------


def _credential(request: ConnectionRequest) -> tuple[str | None, str | None]:
    """The client's token and the subprotocol to answer with (browsers send ``token, <t>``)."""
    header = request.headers.get("authorization")
    if isinstance(header, str):
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip(), None
    protocols = [p.strip() for p in (request.protocols or [])]
    if len(protocols) >= 2 and protocols[0].lower() in ("token", "bearer"):
        return protocols[1], protocols[0]
    return None, None


def token_matches(presented: str | None, tokens: frozenset[str]) -> bool:
    """Constant-time comparison against every configured token."""
    if presented is None:
        return False
    candidate = presented.encode("utf-8")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode("utf-8"))
    return matched


class ClientProtocol(WebSocketServerProtocol):
    """One Deepgram v1 client."""

    factory: ClientFactory

    def __init__(self) -> None:
        super().__init__()
        self.session: s.Session | None = None
        self.request_id = ""
        self.trace_id: str | None = None
        #: The upstream link the session talks to, and the one being set up to replace it (SPEC §8).
        self._upstream: UpstreamLink | None = None
        self._candidate: UpstreamLink | None = None
        self._timers: dict[Hashable, Any] = {}
        self._function_calls: set[defer.Deferred[str]] = set()
        self._gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        _no_delay(self.transport)

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        cancel_close_handshake_timer(self)

    def onMessageFrameBegin(self, length: int) -> None:
        # The message size limit applies to what clients send; Autobahn's own option would also refuse
        # large messages the daemon sends (a long transcript), so it is enforced here instead.
        super().onMessageFrameBegin(length)
        limit = self.factory.config.limits.max_message_bytes
        if not self.failedByMe and self.message_data_total_length > limit:
            self._max_message_size_exceeded(
                self.message_data_total_length, limit, "the message exceeds the size limit"
            )

    def onConnect(self, request: ConnectionRequest) -> str | None:
        try:
            return self._accept(request)
        except ConnectionDeny:
            raise
        except Exception:
            # Autobahn would turn this into a bare HTTP 500 and the reason would vanish.
            _log.failure("accepting a client failed")
            raise ConnectionDeny(500, "internal error") from None

    def _accept(self, request: ConnectionRequest) -> str | None:
        registry = self.factory.registry
        if registry.draining:
            raise ConnectionDeny(503, "the server is shutting down")
        if len(registry) >= self.factory.config.limits.max_sessions:
            _log.warn("session limit reached; refusing a client")
            raise ConnectionDeny(503, "too many sessions")
        token, subprotocol = _credential(request)
        tokens = self.factory.config.client_tokens
        if tokens and not token_matches(token, tokens):
            _log.info("client refused: missing or wrong token")
            raise ConnectionDeny(401, "a valid token is required")
        query_trace = request.params.get("traceId", [None])[0] if request.params else None
        self.trace_id = parse_trace_id(query_trace, request.headers.get("traceparent"))
        if subprotocol is None:
            offered = [p.strip() for p in (request.protocols or [])]
            subprotocol = next((p for p in offered if p.lower() in ("token", "bearer")), None)
        return subprotocol

    def onOpen(self) -> None:
        if self._gone:
            return
        try:
            self._open()
        except Exception:
            _log.failure("client onOpen failed")
            self.dropConnection(abort=True)

    def _open(self) -> None:
        self.session = s.Session(self.factory.session_options, now=self.factory.reactor.seconds)
        self.request_id = self.session.request_id
        self.factory.registry.add(self)
        _log.info("client connected from {peer}", peer=self.peer, **self.log_fields)
        self._carry_out(self.session.start())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None or self._gone:
            return
        try:
            self._handle_client_message(payload, isBinary)
        except Exception:
            self._internal_error()

    def _handle_client_message(self, payload: bytes, isBinary: bool) -> None:
        assert self.session is not None
        if isBinary:
            outputs = self.session.client_binary(payload)
        else:
            # Autobahn has already validated the UTF-8 of text frames (1007 otherwise).
            text = payload.decode("utf-8", "replace")
            if self.factory.debug:
                self.log_message("client->daemon", _peek_type(text))
            outputs = self.session.client_text(text)
        self._carry_out(outputs)

    def _internal_error(self) -> None:
        """A bug met one input: log it, tell the client, and keep the session (and the process) going."""
        _log.failure("internal error", **self.log_fields)
        if self.state == self.STATE_OPEN:
            self.sendMessage(json.dumps(m.error(
                errors.INTERNAL_ERROR, "the daemon failed to handle a message; the session goes on"
            )).encode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        if self.session is None:
            return
        _log.info(
            "client closed {close_code} {close_reason} (daemon sent {sent_close_code})",
            close_code=code,
            close_reason=reason or "",
            sent_close_code=self.localCloseCode,
            direction="client",
            **self.log_fields,
        )
        self._carry_out(self.session.client_closed())
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        for call in list(self._function_calls):
            call.cancel()
        self._close_links()
        self.factory.registry.remove(self)

    @property
    def log_fields(self) -> dict[str, Any]:
        """The fields every log record of this session carries."""
        return {"connection_id": self.request_id, "trace_id": self.trace_id}

    # -- inputs from the upstream links ------------------------------------------------------------

    def is_current(self, link: UpstreamLink) -> bool:
        return link is self._upstream

    def _live(self, link: UpstreamLink) -> bool:
        # A link that is neither current nor candidate is stale: what it reports is dropped.
        return self.session is not None and (link is self._upstream or link is self._candidate)

    def upstream_opened(self, link: UpstreamLink) -> None:
        if self._live(link):
            assert self.session is not None
            self._carry_out(self.session.upstream_opened(link.generation))

    def upstream_event(self, link: UpstreamLink, event: dict[str, Any]) -> None:
        if not self._live(link):
            return
        assert self.session is not None
        self.log_message("upstream->daemon", event)
        # (The session logs upstream error events at the default level.)
        try:
            self._carry_out(self.session.upstream_event(event, link.generation))
        except Exception:
            self._internal_error()

    def upstream_failed(self, link: UpstreamLink, code: str, description: str) -> None:
        if self._live(link):
            assert self.session is not None
            self._carry_out(self.session.upstream_failed(code, description, link.generation))

    def upstream_closed(self, link: UpstreamLink, closure: s.UpstreamClosure) -> None:
        if self._live(link):
            assert self.session is not None
            self._carry_out(self.session.upstream_closed(closure, link.generation))

    def upstream_report(
        self, link: UpstreamLink, report: Callable[[s.Session], list[s.Output]]
    ) -> None:
        """Hand one fact about the upstream to the session (it decides what the client hears)."""
        if self._live(link):
            assert self.session is not None
            self._carry_out(report(self.session))

    def _link(self, generation: int | None) -> UpstreamLink | None:
        if generation is None:
            return self._upstream
        for link in (self._upstream, self._candidate):
            if link is not None and link.generation == generation:
                return link
        return None

    def _connect(self, model: str, generation: int) -> None:
        link = UpstreamLink(self, generation)
        if self._upstream is None:
            self._upstream = link
        else:
            if self._candidate is not None:
                self._candidate.close()
            self._candidate = link
        link.connect(self.factory.connector, model)

    def _swap(self, generation: int) -> None:
        """The candidate becomes the current link in this reactor turn: backpressure moves to it and
        the old link is closed."""
        new = self._candidate
        if new is None or new.generation != generation:
            return
        old, self._upstream, self._candidate = self._upstream, new, None
        if old is not None:
            old.unglue()
            old.close()
        new.glue()
        # The old upstream may have paused reading from the client; the new one decides now.
        transport: Any = self.transport
        if transport is not None and hasattr(transport, "resumeProducing"):
            transport.resumeProducing()

    def _close_links(self, generation: int | None = None) -> None:
        for link in (self._upstream, self._candidate):
            if link is not None and (generation is None or link.generation == generation):
                link.close()
        if generation is not None and self._candidate is not None \
                and self._candidate.generation == generation:
            self._candidate = None

    # -- outputs ----------------------------------------------------------------------------------

    def log_message(self, direction: str, message: Any) -> None:
        if self.factory.debug:
            _log.debug(
                "{direction} {message_type}",
                direction=direction,
                message_type=_safe_type(message) if isinstance(message, dict) else message,
                **self.log_fields,
            )

    def _carry_out(self, outputs: list[s.Output]) -> None:
        for output in outputs:
            if isinstance(output, s.SendClient):
                self.factory.registry.count_client_message(output.message)
                if self.state == self.STATE_OPEN:
                    self.log_message("daemon->client", output.message)
                    self.sendMessage(json.dumps(output.message, allow_nan=False).encode("utf-8"),
                                     isBinary=False)
            elif isinstance(output, s.SendClientAudio):
                if self.state == self.STATE_OPEN:
                    self.sendMessage(output.data, isBinary=True)
            elif isinstance(output, s.SendUpstream):
                link = self._link(output.generation)
                if link is not None:
                    link.send(output.event)
            elif isinstance(output, s.ConnectUpstream):
                self._connect(output.model, output.generation)
            elif isinstance(output, s.SwapUpstream):
                self._swap(output.generation)
            elif isinstance(output, s.Count):
                self.factory.registry.count_continuity(output.name, output.amount)
            elif isinstance(output, s.CallFunction):
                self._call_function(output)
            elif isinstance(output, s.StartTimer):
                self._start_timer(output.name, output.seconds)
            elif isinstance(output, s.CancelTimer):
                call = self._timers.pop(output.name, None)
                if call is not None and call.active():
                    call.cancel()
            elif isinstance(output, s.CloseClient):
                if not self._gone:
                    self.close_with(output.code, output.reason)
                self._close_links()
            elif isinstance(output, s.CloseUpstream):
                self._close_links(output.generation)
            elif isinstance(output, s.Log):
                _level(output.level)(output.format, **self.log_fields, **output.fields)

    def _call_function(self, call: s.CallFunction) -> None:
        caller = self.factory.function_caller
        if caller is None:
            # Settings refuse endpoints when no prefix is configured; this guards the contract.
            result: defer.Deferred[str] = defer.succeed(
                '{"error": "disabled", "message": "server-side functions are not enabled"}'
            )
        else:
            result = caller.call(call.endpoint, call.name, call.arguments)
        self._function_calls.add(result)

        def answered(content: str) -> None:
            self._function_calls.discard(result)
            if self.session is not None and not self._gone:
                self._carry_out(self.session.function_result(call.call_id, content))

        result.addCallback(answered)
        result.addErrback(lambda f: f.trap(defer.CancelledError))

    def _start_timer(self, name: Hashable, seconds: float) -> None:
        previous = self._timers.pop(name, None)
        if previous is not None and previous.active():
            previous.cancel()

        def fire() -> None:
            self._timers.pop(name, None)
            if self.session is not None:
                self._carry_out(self.session.timer_fired(name))

        self._timers[name] = self.factory.reactor.callLater(seconds, fire)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with ``code``.  Autobahn's ``sendClose`` only accepts 1000 and
        3000-4999, but RFC 6455's 1001 (going away) and 1011 (internal error) are the honest codes here.
        """
        if self.state == self.STATE_OPEN:
            reason_bytes = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self.sendCloseFrame(code=code, reasonUtf8=reason_bytes)

    def shut_down(self) -> None:
        """Close for a daemon shutdown: the client may reconnect elsewhere."""
        if not self._gone and self.state == self.STATE_OPEN and self.session is not None:
            self._carry_out(self.session.draining())


def _peek_type(text: str) -> str | None:
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):  # the session answers UNPARSABLE_CLIENT_MESSAGE
        return None
    return _safe_type(message)


class SessionRegistry(Service):
    """
    The open sessions.  Stopping it drains: no new sessions, open ones get ``grace`` seconds to finish and
    are then closed with 1001.
    """

    def __init__(self, clock: IReactorTime, grace: float) -> None:
        self._clock = clock
        self._grace = grace
        self._sessions: set[ClientProtocol] = set()
        self.draining = False
        self._drained: list[defer.Deferred[None]] = []
        #: Sessions opened since the start.
        self.sessions_total = 0
        #: ``Error`` / ``Warning`` messages sent to clients, by (type, code).
        self.client_errors: Counter[tuple[str, str]] = Counter()
        #: Moves of conversations to new upstream sessions (SPEC §8), summed over every session:
        #: ``rollovers``, ``rollovers_forced``, ``rollovers_failed``, ``reconnects``, ``reconnects_failed``,
        #: ``replayed_items``, ``switch_ms`` (total duration of completed switches).
        self.continuity: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, protocol: ClientProtocol) -> None:
        self._sessions.add(protocol)
        self.sessions_total += 1

    def count_client_message(self, message: dict[str, Any]) -> None:
        """Count an ``Error`` or ``Warning`` on its way to a client (for ``/metrics``)."""
        if message.get("type") in ("Error", "Warning"):
            self.client_errors[(message["type"], str(message.get("code")))] += 1

    def count_continuity(self, name: str, amount: int = 1) -> None:
        """Add to one of :attr:`continuity`'s counters."""
        self.continuity[name] += amount

    def remove(self, protocol: ClientProtocol) -> None:
        self._sessions.discard(protocol)
        if not self._sessions:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.draining = True
        if not self._sessions:
            return defer.succeed(None)
        _log.info("draining {count} sessions", count=len(self._sessions))
        done: defer.Deferred[None] = defer.Deferred()
        self._drained.append(done)

        def close_all() -> None:
            for protocol in list(self._sessions):
                protocol.shut_down()
            # A client that ignores the close is dropped shortly after.
            timers.append(self._clock.callLater(2.0, abort_all))

        def abort_all() -> None:
            for protocol in list(self._sessions):
                protocol.dropConnection(abort=True)
                self.remove(protocol)

        timers = [self._clock.callLater(self._grace, close_all)]

        def cancel_timer(result: None) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            return result

        done.addBoth(cancel_timer)
        return done


class ClientFactory(WebSocketServerFactory):
    """Builds a :class:`ClientProtocol` per client, sharing configuration, registry and connector."""

    protocol = ClientProtocol  # type: ignore[assignment]

    def __init__(
        self,
        reactor: IReactorCore,
        config: Config,
        registry: SessionRegistry,
        connector: UpstreamConnector,
        function_caller: FunctionCaller | None = None,
    ) -> None:
        super().__init__()
        self.function_caller = function_caller
        self.reactor = reactor
        self.config = config
        self.registry = registry
        self.connector = connector
        self.debug = config.log_level == "debug"
        self.session_options = s.SessionOptions(
            default_model=config.model,
            model_allowed=config.model_allowed,
            default_voice=config.voice,
            transcription_model=config.transcription_model,
            audio_buffer_seconds=config.limits.audio_buffer_seconds,
            function_call_timeout=config.limits.function_call_timeout,
            function_url_prefixes=config.function_url_prefixes,
            rollover_after=config.rollover_after,
        )
        limits = config.limits
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_bytes,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=2.0,
            # Refuse oversized messages with a close frame (1009) rather than a bare TCP drop.
            failByDrop=False,
            autoPingInterval=limits.ping_interval or 0,
            autoPingTimeout=limits.ping_interval * 2 if limits.ping_interval else 0,
            # Browsers on file:// send Origin: null; this call resets the flag, so set it here.
            allowNullOrigin=True,
        )
