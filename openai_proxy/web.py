"""
The HTTP side: one ``twisted.web`` site serving the WebSocket routes and the health endpoints.

- ``/v1/agent/converse`` — the path the official Deepgram SDKs use;
- ``/openai`` — the older path of the daemon this replaces;
- ``/healthz`` — 200 while the process runs; ``/readyz`` — 200 when sessions are accepted, 503 while draining;
- ``/metrics`` — session and error counters in Prometheus' text format;
- anything else — 404, sub-paths of the WebSocket routes included (SPEC §2).

A browser's upgrade (one with an ``Origin`` header) is refused with 403 unless its origin is in
``--allowed-origins`` (when that list is set; SPEC §7).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
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
    site = _QuietSite(root, timeout=timeout)
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
        return self._websocket.render(request)


class _Directory(Resource):
    """A path that only holds children (``/``, ``/v1``, ``/v1/agent``): 404 itself, like any other path."""

    def render(self, request: Request) -> bytes:
        return NoResource().render(request)


class _QuietSite(Site):
    """A site that does not write an access-log line per request (health checks would flood the log)."""

    def log(self, request: Any) -> None:
        pass


def make_site(factory: ClientFactory, registry: SessionRegistry, timeout: float = 60.0) -> Site:
    """The daemon's site: WebSocket routes, health endpoints, 404 elsewhere."""
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
    # An HTTP connection idle for ``timeout`` before its upgrade is dropped (WebSocket sessions are not
    # affected once they are open).
    site = _QuietSite(root, timeout=timeout)
    site.displayTracebacks = False
    return site
