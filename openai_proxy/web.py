"""
The HTTP side: one ``twisted.web`` site serving the WebSocket routes and the health endpoints.

- ``/v1/agent/converse`` — the path the official Deepgram SDKs use;
- ``/openai`` — the older path of the daemon this replaces;
- ``/healthz`` — 200 while the process runs; ``/readyz`` — 200 when sessions are accepted, 503 while draining;
- ``/metrics`` — session and error counters in Prometheus' text format;
- ``/demo`` — the browser demo page, when enabled (``--demo``, on by default with ``--simulator``);
- anything else — 404, sub-paths of the WebSocket routes included (SPEC §2).

A browser's upgrade (one with an ``Origin`` header) is refused with 403 unless its origin is in
``--allowed-origins`` (when that list is set; SPEC §7).

Every connection starts as a *pending* connection (plain HTTP, or a request still arriving) and stops
being one when it becomes a WebSocket session.  Pending connections are bounded both in number
(``max_pending_connections``: at the limit the oldest is dropped to make room) and in time: a request
must be complete within ``request_timeout`` seconds of the connection opening, or of the daemon's
previous answer on it (a total deadline, which bytes trickling in do not extend); otherwise the daemon
answers 408 and closes.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Request, Site

from openai_proxy.relay import ClientFactory, SessionRegistry, token_matches

_log = Logger(namespace="openai_proxy")


class _Health(Resource):
    # Not a leaf: a sub-path falls through to Resource.getChild, a 404.
    isLeaf = False

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


class _Ready(Resource):
    # Not a leaf: a sub-path falls through to Resource.getChild, a 404.
    isLeaf = False

    def __init__(self, registry: SessionRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._registry.draining:
            request.setResponseCode(503)
            return b"draining\n"
        return b"ready\n"

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


class _Metrics(Resource):
    """
    Prometheus text exposition of the daemon's instruments (``openai_proxy.metrics``).  With
    ``metrics_require_token`` in the configuration, a request without a valid client token
    (``Authorization: Token <t>`` or ``Bearer <t>``) gets 401.
    """

    isLeaf = False

    def __init__(self, registry: SessionRegistry, factory: ClientFactory | None = None) -> None:
        super().__init__()
        self._registry = registry
        self._factory = factory

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        config = getattr(self._factory, "config", None)
        if config is not None and getattr(config, "metrics_require_token", False):
            scheme, _, presented = (request.getHeader(b"authorization") or b"").decode("latin-1").strip().partition(" ")
            if scheme.lower() not in ("token", "bearer") or not token_matches(presented.strip(), config.client_tokens):
                request.setResponseCode(401)
                request.setHeader(b"www-authenticate", b'Bearer realm="openai-proxy metrics"')
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"a valid token is required\n"
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._registry.metrics.prometheus_text().encode("utf-8")


def make_metrics_site(factory: ClientFactory, registry: SessionRegistry, timeout: float = 60.0) -> Site:
    """The ``--metrics-listen`` site: ``/metrics``, ``/healthz`` and ``/readyz``; 404 elsewhere."""
    root = _Directory()
    root.putChild(b"metrics", _Metrics(registry, factory))
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(registry))
    site = _DaemonSite(root, timeout=timeout, request_timeout=timeout,
                       max_pending=factory.config.limits.max_pending_connections)
    site.displayTracebacks = False
    return site


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """
    Whether a browser's ``Origin`` (``scheme://host[:port]``, or ``null``) is in ``allowed``.

    Entries are origins, compared case-insensitively; ``*`` in an entry matches any run of characters
    (``https://*.example.com``).  An empty ``allowed`` allows every origin.
    """
    if not allowed:
        return True
    candidate = origin.strip().lower()
    return any(fnmatch.fnmatchcase(candidate, entry.lower()) for entry in allowed)


class _WebSocketRoute(Resource):
    """
    One WebSocket route: only its exact path (a query string is fine) reaches the WebSocket resource;
    sub-paths are 404 (SPEC §2).  A request with an ``Origin`` outside the allow-list is 403 before the
    upgrade (SPEC §7).  The allow-list is read from ``factory.config`` on every request, so a reloaded
    configuration applies to the next upgrade.
    """

    isLeaf = True

    def __init__(self, factory: ClientFactory, websocket: IResource) -> None:
        super().__init__()
        self._factory = factory
        self._websocket = websocket

    def render(self, request: Request) -> Any:
        if request.postpath:
            # "/openai/x" and "/openai/" (postpath [b""]) are other paths.
            return NoResource().render(request)
        raw_origin = request.getHeader(b"origin")
        origin = raw_origin.decode("latin-1") if raw_origin is not None else None
        allowed: tuple[str, ...] = getattr(self._factory.config, "allowed_origins", ())
        if origin is not None and not origin_allowed(origin, allowed):
            _log.info("client refused: origin {origin!r} is not allowed", origin=origin[:200])
            record = getattr(self._factory.registry, "record_handshake", None)
            if record is not None:
                record(403)
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"origin not allowed\n"
        connection = request.channel.transport
        if isinstance(connection, _PendingConnection):
            # The session talks to the connection beneath the wrapper (the TCP or TLS transport).
            request.channel.transport = connection.take_over()
        return self._websocket.render(request)


class _Directory(Resource):
    """A path that only holds children (``/``, ``/v1``, ``/v1/agent``): 404 itself, like any other path."""

    def render(self, request: Request) -> bytes:
        return NoResource().render(request)



#: What a connection whose request did not arrive in time is told before it is closed.
_REQUEST_TIMEOUT_BODY = b"the request did not arrive in time\n"
_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REQUEST_TIMEOUT_BODY), _REQUEST_TIMEOUT_BODY)
)
#: Seconds a connection told 408 has to go away before it is aborted.
_ABORT_AFTER = 2.0


class _PendingConnection(ProtocolWrapper):
    """
    Wraps each connection of the site while it is pending (not a WebSocket session yet): counts it and
    runs its request deadline.  When the request is a WebSocket upgrade, :meth:`take_over` ends that
    and takes this wrapper out of the chain: the session talks to the transport beneath it.
    """

    factory: _DaemonSite  # type: ignore[assignment]

    def __init__(self, factory: _DaemonSite, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self.pending = True
        #: Bytes received while pending.
        self.received = 0
        self._deadline: Any = None
        self._abort: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.factory.pending_opened(self)
        self._restart_deadline()
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.pending:
            self.received += len(data)
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.pending:
            # An answer went out: the next request on this connection gets a deadline of its own.
            self._restart_deadline()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_pending()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)

    def drop(self) -> None:
        """Make room for a newer connection: the oldest pending one goes at once."""
        self._stop_pending()
        transport: Any = self.transport
        transport.abortConnection()

    def take_over(self) -> Any:
        """
        The connection is becoming a WebSocket session: it stops being pending and this wrapper leaves
        the chain, so that the session's reads and writes do not pass through it (one call less per
        message, and the session sees the TCP transport itself).  Returns the transport beneath (TCP,
        or TLS over TCP), now delivering to the HTTP channel until ``WebSocketResource`` hands it on.
        """
        self._stop_pending()
        transport: Any = self.transport
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = self.wrappedProtocol
        else:
            transport.protocol = self.wrappedProtocol
        return transport

    def _stop_pending(self) -> None:
        if self.pending:
            self.pending = False
            self.factory.pending_closed(self)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _restart_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.factory.request_timeout)
        else:
            self._deadline = self.factory.reactor.callLater(self.factory.request_timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        self.factory.request_timeouts += 1
        self._stop_pending()
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.write(_REQUEST_TIMEOUT_RESPONSE)
        transport.loseConnection()
        self._abort = self.factory.reactor.callLater(_ABORT_AFTER, transport.abortConnection)


class _DaemonSite(Site):
    """
    The daemon's ``twisted.web`` site: no access-log line per request (health checks would flood the
    log), and pending connections bounded in number and time (see the module docstring).
    """

    def __init__(self, resource: Resource, *, request_timeout: float, max_pending: int,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        self._pending: OrderedDict[_PendingConnection, None] = OrderedDict()
        #: Connections dropped to make room, and connections told 408, since the start.
        self.pending_dropped = 0
        self.request_timeouts = 0

    @property
    def pending(self) -> int:
        """Connections open now that are not WebSocket sessions."""
        return len(self._pending)

    def pending_received(self) -> int:
        """Bytes received so far by the pending connections (what their requests have grown to)."""
        return sum(connection.received for connection in self._pending)

    noisy = False

    def log(self, request: Any) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        return _PendingConnection(self, channel)

    def pending_opened(self, connection: _PendingConnection) -> None:
        while len(self._pending) >= self.max_pending:
            oldest, _ = self._pending.popitem(last=False)
            self.pending_dropped += 1
            if self.pending_dropped == 1 or self.pending_dropped % 100 == 0:
                _log.warn(
                    "{limit} connections are waiting to become sessions; dropping the oldest "
                    "({count} dropped since the start)",
                    limit=self.max_pending,
                    count=self.pending_dropped,
                )
            oldest.pending = False
            oldest.drop()
        self._pending[connection] = None

    def pending_closed(self, connection: _PendingConnection) -> None:
        self._pending.pop(connection, None)

    # ProtocolWrapper registers itself with its factory.
    def registerProtocol(self, protocol: Any) -> None:
        pass

    def unregisterProtocol(self, protocol: Any) -> None:
        pass


def make_site(
    factory: ClientFactory,
    registry: SessionRegistry,
    timeout: float = 60.0,
    *,
    request_timeout: float | None = None,
    max_pending: int | None = None,
    demo: bool = False,
) -> Site:
    """
    The daemon's site: WebSocket routes, health endpoints, the demo page when ``demo``, 404 elsewhere.
    ``request_timeout`` (default ``timeout``) is the total deadline of each HTTP request,
    ``max_pending`` (default the factory's ``max_pending_connections``) the limit on connections that
    are not sessions.
    """
    root = _Directory()
    websocket = _WebSocketRoute(factory, WebSocketResource(factory))
    root.putChild(b"openai", websocket)
    v1 = _Directory()
    agent = _Directory()
    root.putChild(b"v1", v1)
    v1.putChild(b"agent", agent)
    agent.putChild(b"converse", websocket)
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(registry))
    if not getattr(factory.config, "metrics_listen", ()):
        root.putChild(b"metrics", _Metrics(registry, factory))
    if demo:
        from openai_proxy.demo import DemoResource

        root.putChild(b"demo", DemoResource())
    # An HTTP connection idle for ``timeout`` before its upgrade is dropped (WebSocket sessions are not
    # affected once they are open); a request must also be complete within ``request_timeout``.
    limits = factory.config.limits
    site = _DaemonSite(
        root,
        timeout=timeout,
        request_timeout=timeout if request_timeout is None else request_timeout,
        max_pending=limits.max_pending_connections if max_pending is None else max_pending,
    )
    site.displayTracebacks = False
    return site
