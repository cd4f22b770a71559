"""
The WebSocket routes' exact paths (SPEC §2), the Origin allow-list (SPEC §7) and their settings, over a
loopback socket to the daemon's site.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.config import ConfigError, build_config
from openai_proxy.tests.helpers import DaemonTestCase
from openai_proxy.web import origin_allowed


class _StatusLine(Protocol):
    """Sends one raw HTTP request and fires ``status`` with the status code of the answer."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buffer = b""
        self.status: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n" in self._buffer and not self.status.called:
            line = self._buffer.split(b"\r\n", 1)[0]
            self.status.callback(int(line.split()[1]))
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.status.called:
            self.status.errback(ConnectionError(f"closed without an answer: {self._buffer!r}"))


@defer.inlineCallbacks
def upgrade_status(port: int, target: str, headers: dict[str, str] | None = None) -> Any:
    """The HTTP status the daemon answers a WebSocket upgrade of ``target`` with (101 when accepted)."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ] + [f"{name}: {value}" for name, value in (headers or {}).items()]
    protocol = _StatusLine(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    status = yield protocol.status.addTimeout(5, reactor)
    return status


class _SiteTestCase(DaemonTestCase):
    timeout = 20

    @defer.inlineCallbacks
    def start(self, **config: Any) -> Any:
        yield super().start(**config)
        assert self.daemon.port is not None
        self.port = self.daemon.port.getHost().port

    def status(self, target: str, headers: dict[str, str] | None = None) -> Any:
        return upgrade_status(self.port, target, headers)


class RouteTests(_SiteTestCase):
    @defer.inlineCallbacks
    def test_exact_paths_with_or_without_query(self) -> None:
        yield self.start()
        for target in ("/v1/agent/converse", "/v1/agent/converse?traceId=" + "ab" * 16, "/openai",
                       "/openai?x=1&y=2", "/openai?"):
            status = yield self.status(target)
            self.assertEqual(status, 101, target)

    @defer.inlineCallbacks
    def test_sub_paths_are_404(self) -> None:
        yield self.start()
        for target in ("/v1/agent/converse/x", "/v1/agent/converse/", "/v1/agent/converse/x?y=1",
                       "/v1/agent/converse/x/y", "/openai/x", "/openai/", "/openai/x?token=t",
                       "/openai//", "/v1/agent", "/v1", "/v1/agent/conversex", "/openaix",
                       "//openai", "/", "/healthz/x", "/readyz/", "/metrics/x"):
            status = yield self.status(target)
            self.assertEqual(status, 404, target)
        # Nothing was opened.
        assert self.daemon.registry is not None
        self.assertEqual(self.daemon.registry.sessions_total, 0)


class OriginTests(_SiteTestCase):
    ALLOWED = ("https://app.example.com", "https://*.example.org", "http://localhost:3000")

    @defer.inlineCallbacks
    def test_allowed_refused_and_absent(self) -> None:
        yield self.start(allowed_origins=self.ALLOWED)
        cases = {
            "https://app.example.com": 101,
            "HTTPS://APP.EXAMPLE.COM": 101,
            "https://voice.example.org": 101,
            "http://localhost:3000": 101,
            "https://evil.example.com": 403,
            "http://app.example.com": 403,
            "https://app.example.com:8443": 403,
            "https://app.example.com.evil.net": 403,
            "http://localhost:3001": 403,
            "null": 403,
            "": 403,
        }
        for origin, expected in cases.items():
            status = yield self.status("/v1/agent/converse", {"Origin": origin})
            self.assertEqual(status, expected, origin)
        # Non-browser clients send no Origin: never refused by the allow-list.
        status = yield self.status("/v1/agent/converse")
        self.assertEqual(status, 101)
        status = yield self.status("/openai", {"Origin": "https://evil.example.com"})
        self.assertEqual(status, 403)

    @defer.inlineCallbacks
    def test_no_list_allows_every_origin(self) -> None:
        yield self.start()
        for origin in ("https://anything.example", "null"):
            status = yield self.status("/v1/agent/converse", {"Origin": origin})
            self.assertEqual(status, 101, origin)

    @defer.inlineCallbacks
    def test_origin_checked_before_the_token(self) -> None:
        yield self.start(allowed_origins=self.ALLOWED, client_tokens=frozenset({"good-token"}))
        status = yield self.status("/v1/agent/converse", {"Origin": "https://evil.example.com",
                                                          "Authorization": "Token good-token"})
        self.assertEqual(status, 403)
        status = yield self.status("/v1/agent/converse", {"Origin": "https://app.example.com"})
        self.assertEqual(status, 401)
        status = yield self.status("/v1/agent/converse", {"Origin": "https://app.example.com",
                                                          "Authorization": "Token good-token"})
        self.assertEqual(status, 101)


class OriginSettingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def config(self, options: dict[str, Any], env: dict[str, str] | None = None) -> Any:
        return build_config({"simulator": True, **options}, env or {}, cwd=self.dir)

    def test_option_and_environment(self) -> None:
        self.assertEqual(self.config({}).allowed_origins, ())
        config = self.config({"allowed-origins": "https://a.example, null , http://b.example:8080"})
        self.assertEqual(config.allowed_origins, ("https://a.example", "null", "http://b.example:8080"))
        config = self.config({}, {"OPENAI_PROXY_ALLOWED_ORIGINS": "https://*.example.com"})
        self.assertEqual(config.allowed_origins, ("https://*.example.com",))
        config = self.config({"allowed-origins": "https://opt.example"},
                             {"OPENAI_PROXY_ALLOWED_ORIGINS": "https://env.example"})
        self.assertEqual(config.allowed_origins, ("https://opt.example",))

    def test_bad_values(self) -> None:
        for value in (",", " , ", "app.example.com", "https://app.example.com/path", "https://",
                      "https://a.example?x", "*"):
            with self.assertRaises(ConfigError) as e:
                self.config({"allowed-origins": value})
            self.assertTrue(str(e.exception).startswith("--allowed-origins:"), str(e.exception))
            self.assertNotIn("\n", str(e.exception))

    def test_matching(self) -> None:
        self.assertTrue(origin_allowed("https://x.example", ()))
        self.assertTrue(origin_allowed(" https://A.Example ", ("https://a.example",)))
        self.assertFalse(origin_allowed("https://a.example", ("https://b.example",)))
        self.assertTrue(origin_allowed("null", ("null",)))
        self.assertFalse(origin_allowed("https://a.example.evil", ("https://a.example",)))
