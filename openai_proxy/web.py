"""
The HTTP side: one ``twisted.web`` site serving the WebSocket routes and the health endpoints.

- ``/v1/agent/converse`` — the path the official Deepgram SDKs use;
- ``/openai`` — the older path of the daemon this replaces;
- ``/healthz`` — 200 while the process runs; ``/readyz`` — 200 when sessions are accepted, 503 while draining;
- ``/metrics`` — session and error counters in Prometheus' text format;
- ``/demo`` — the browser demo page, when enabled (``--demo``, on by default with ``--simulator``);
- anything else — 404.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from openai_proxy.relay import ClientFactory, SessionRegistry


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


class _Ready(Resource):
    isLeaf = True

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
    """Prometheus text exposition of the daemon's counters."""

    isLeaf = True

    def __init__(self, registry: SessionRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        registry = self._registry
        lines = [
            "# HELP openai_proxy_sessions Open client sessions.",
            "# TYPE openai_proxy_sessions gauge",
            f"openai_proxy_sessions {len(registry)}",
            "# HELP openai_proxy_sessions_total Client sessions opened since the start.",
            "# TYPE openai_proxy_sessions_total counter",
            f"openai_proxy_sessions_total {registry.sessions_total}",
            "# HELP openai_proxy_draining 1 while the daemon drains for a shutdown.",
            "# TYPE openai_proxy_draining gauge",
            f"openai_proxy_draining {int(registry.draining)}",
            "# HELP openai_proxy_client_errors_total Error and Warning messages sent to clients.",
            "# TYPE openai_proxy_client_errors_total counter",
        ]
        for (kind, code), count in sorted(registry.client_errors.items()):
            # Codes are UPPER_SNAKE or upstream snake_case: nothing to escape beyond quotes.
            code = code.replace("\\", "").replace('"', "")
            lines.append(f'openai_proxy_client_errors_total{{type="{kind}",code="{code}"}} {count}')
        return ("\n".join(lines) + "\n").encode("utf-8")


class _QuietSite(Site):
    """A site that does not write an access-log line per request (health checks would flood the log)."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def make_site(
    factory: ClientFactory, registry: SessionRegistry, timeout: float = 60.0, demo: bool = False
) -> Site:
    """The daemon's site: WebSocket routes, health endpoints, the demo page when ``demo``, 404 elsewhere."""
    root = Resource()
    websocket = WebSocketResource(factory)
    root.putChild(b"openai", websocket)
    v1 = Resource()
    agent = Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"agent", agent)
    agent.putChild(b"converse", websocket)
    root.putChild(b"healthz", _Health())
    root.putChild(b"readyz", _Ready(registry))
    root.putChild(b"metrics", _Metrics(registry))
    if demo:
        from openai_proxy.demo import DemoResource

        root.putChild(b"demo", DemoResource())
    # An HTTP connection idle for ``timeout`` before its upgrade is dropped (WebSocket sessions are not
    # affected once they are open).
    site = _QuietSite(root, timeout=timeout)
    site.displayTracebacks = False
    return site
