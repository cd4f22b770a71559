"""
Server-side functions: endpoint validation, the URL allow-list, and HTTP calls against a loopback server.
"""

from __future__ import annotations

import json
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from openai_proxy.functions import (
    Endpoint,
    EndpointError,
    FunctionCaller,
    check_prefix,
    parse_endpoint,
    url_allowed,
)

reactor: Any = _reactor
SECRET = "Bearer s3cret-t0ken-value"


# -- url_allowed -----------------------------------------------------------------------------------


class URLAllowedTests(SynchronousTestCase):
    TOOLS = "https://api.example.com/tools"

    def assertAllowed(self, url: str, prefix: str) -> None:
        self.assertTrue(url_allowed(url, [prefix]), f"{url!r} should be inside {prefix!r}")

    def assertRefused(self, url: str, prefix: str) -> None:
        self.assertFalse(url_allowed(url, [prefix]), f"{url!r} must not be inside {prefix!r}")

    def test_path_prefix_at_segment_boundary(self) -> None:
        for url in (
            "https://api.example.com/tools",
            "https://api.example.com/tools/",
            "https://api.example.com/tools/x",
            "https://api.example.com/tools/x/y?q=1&r=2",
            "https://api.example.com/tools?x=1",
            "https://api.example.com/t%6Fols/x",  # an escaped unreserved character is the same path
        ):
            self.assertAllowed(url, self.TOOLS)
        for url in (
            "https://api.example.com/toolsX",
            "https://api.example.com/tool",
            "https://api.example.com/",
            "https://api.example.com",
            "https://api.example.com/admin",
            "https://api.example.com/x/tools",
            "https://api.example.com/Tools",  # paths are case-sensitive
            "https://api.example.com/tools;x",
        ):
            self.assertRefused(url, self.TOOLS)

    def test_trailing_slash_in_prefix(self) -> None:
        self.assertAllowed("https://api.example.com/tools/x", self.TOOLS + "/")
        self.assertAllowed("https://api.example.com/tools", self.TOOLS + "/")
        self.assertRefused("https://api.example.com/toolsX", self.TOOLS + "/")

    def test_host_only_prefix_allows_every_path(self) -> None:
        for prefix in ("https://api.example.com", "https://api.example.com/"):
            self.assertAllowed("https://api.example.com/", prefix)
            self.assertAllowed("https://api.example.com/anything/at/all", prefix)
            self.assertRefused("https://api.example.com.evil.net/x", prefix)
            self.assertRefused("https://evilapi.example.com/x", prefix)

    def test_dot_segments_are_refused(self) -> None:
        for url in (
            "https://api.example.com/tools/../admin",
            "https://api.example.com/tools/./x",
            "https://api.example.com/tools/..",
            "https://api.example.com/tools/%2e%2e/admin",
            "https://api.example.com/tools/%2E%2E/admin",
            "https://api.example.com/tools/.%2e/admin",
            "https://api.example.com/tools/%2e/x",
            "https://api.example.com/tools/..;/admin",
            "https://api.example.com/tools/..;x=1/admin",
            "https://api.example.com/tools/%252e%252e/admin",
        ):
            self.assertRefused(url, self.TOOLS)
            self.assertRefused(url, "https://api.example.com/")

    def test_encoded_slashes_and_backslashes_are_refused(self) -> None:
        for url in (
            "https://api.example.com/tools%2F..%2Fadmin",
            "https://api.example.com/tools/a%2fb",
            "https://api.example.com/tools/a%5cb",
            "https://api.example.com/tools/%252f",
            "https://api.example.com/tools\\..\\admin",
            "https://api.example.com\\@evil.net/tools",
            "https://api.example.com/tools/%00",
            "https://api.example.com/tools/%zz",
        ):
            self.assertRefused(url, self.TOOLS)

    def test_userinfo_is_refused(self) -> None:
        for url in (
            "https://api.example.com@evil.net/tools",
            "https://user:pass@api.example.com/tools",
            "https://api.example.com:443@evil.net/tools",
            "https://@api.example.com/tools",
        ):
            self.assertRefused(url, self.TOOLS)

    def test_whitespace_and_control_characters_are_refused(self) -> None:
        for url in (
            " https://api.example.com/tools",
            "https://api.example.com/tools ",
            "https://api.example.com/tools/x y",
            "https://api.example.com/tools/\tx",
            "https://api.example.com/tools/\nx",
            "https://api.example.com/tools\r\nHost: evil",
            "https://api.exam\u200bple.com/tools",
            "https://api.example.com/tools/\u2028",
            "https://api.example.com/tools/\x00",
        ):
            self.assertRefused(url, self.TOOLS)

    def test_fragments_are_refused(self) -> None:
        self.assertRefused("https://api.example.com/tools#x", self.TOOLS)
        self.assertRefused("https://evil.net#@api.example.com/tools", self.TOOLS)

    def test_schemes(self) -> None:
        self.assertRefused("http://api.example.com/tools", self.TOOLS)
        self.assertRefused("https://api.example.com/tools", "http://api.example.com/tools")
        for url in (
            "ftp://api.example.com/tools",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "//api.example.com/tools",
            "https:/api.example.com/tools",
            "https:api.example.com/tools",
            "/tools",
            "",
        ):
            self.assertRefused(url, self.TOOLS)
        self.assertAllowed("HTTPS://api.example.com/tools/x", self.TOOLS)
        self.assertRefused("ftp://api.example.com/tools", "ftp://api.example.com/tools")

    def test_host_case_and_idna(self) -> None:
        self.assertAllowed("https://API.Example.COM/tools/x", self.TOOLS)
        self.assertAllowed("https://api.example.com/tools/x", "https://API.EXAMPLE.com/tools")
        self.assertAllowed("https://xn--bcher-kva.example/tools/x", "https://bücher.example/tools")
        self.assertAllowed("https://BÜCHER.example/tools/x", "https://xn--bcher-kva.example/tools")
        self.assertAllowed("https://ＡＰＩ.example.com/tools", self.TOOLS)  # full-width letters
        self.assertRefused("https://bucher.example/tools", "https://bücher.example/tools")
        self.assertRefused("https://api.example.com./tools", self.TOOLS)
        self.assertRefused("https://api..example.com/tools", self.TOOLS)
        self.assertRefused("https://api%2eexample.com/tools", self.TOOLS)
        self.assertRefused("https://api_x.example.com/tools", "https://api_x.example.com/tools")

    def test_ports(self) -> None:
        self.assertAllowed("https://h.example/x", "https://h.example:443")
        self.assertAllowed("https://h.example:443/x", "https://h.example")
        self.assertAllowed("http://h.example:80/x", "http://h.example/")
        self.assertAllowed("http://h.example:8080/x", "http://h.example:8080")
        self.assertRefused("http://h.example:8080/x", "http://h.example")
        self.assertRefused("http://h.example/x", "http://h.example:8080")
        self.assertRefused("https://h.example:80/x", "https://h.example")
        self.assertRefused("http://h.example:8081/x", "http://h.example:8080")
        for url in (
            "http://h.example:/x",
            "http://h.example:0/x",
            "http://h.example:65536/x",
            "http://h.example:+80/x",
            "http://h.example:8080:80/x",
            "http://h.example:٨٠/x",  # non-ASCII digits
        ):
            self.assertRefused(url, "http://h.example")
            self.assertRefused(url, "http://h.example:8080")

    def test_ip_addresses(self) -> None:
        self.assertAllowed("http://127.0.0.1:9000/tools/x", "http://127.0.0.1:9000/tools")
        for url in (
            "http://127.1:9000/tools",
            "http://2130706433:9000/tools",
            "http://0x7f.0.0.1:9000/tools",
            "http://127.0.0.01:9000/tools",
        ):
            self.assertRefused(url, "http://127.0.0.1:9000/tools")

    def test_ipv6_hosts(self) -> None:
        prefix = "http://[::1]:8080/tools"
        self.assertAllowed("http://[::1]:8080/tools/x", prefix)
        self.assertAllowed("http://[0:0:0:0:0:0:0:1]:8080/tools", prefix)
        self.assertAllowed("http://[2001:DB8::1]/tools", "http://[2001:db8:0::1]/tools")
        self.assertRefused("http://[::1]/tools", prefix)
        self.assertRefused("http://[::2]:8080/tools", prefix)
        self.assertRefused("http://[::1]:8080/toolsX", prefix)
        self.assertRefused("http://[::1:8080/tools", prefix)
        self.assertRefused("http://::1:8080/tools", prefix)
        self.assertRefused("http://[fe80::1%25eth0]:8080/tools", "http://[fe80::1%25eth0]:8080/tools")
        self.assertRefused("http://[::ffff:127.0.0.1]:8080/tools", "http://127.0.0.1:8080/tools")
        self.assertRefused("http://[evil.net]:8080/tools", prefix)

    def test_no_prefixes_and_bad_prefixes(self) -> None:
        self.assertFalse(url_allowed("https://api.example.com/tools", []))
        self.assertFalse(url_allowed("https://api.example.com/tools", ()))
        for prefix in (
            "",
            "api.example.com/tools",
            "https://api.example.com/tools?x=1",
            "https://user@api.example.com/tools",
            "https://api.example.com/tools/../",
        ):
            self.assertRefused("https://api.example.com/tools", prefix)

    def test_any_of_several_prefixes(self) -> None:
        prefixes = ["https://a.example/one", "http://b.example:8080/two"]
        self.assertTrue(url_allowed("https://a.example/one/x", prefixes))
        self.assertTrue(url_allowed("http://b.example:8080/two", prefixes))
        self.assertFalse(url_allowed("https://a.example/two", prefixes))
        self.assertFalse(url_allowed("http://b.example/two", prefixes))

    def test_check_prefix(self) -> None:
        self.assertEqual(check_prefix("HTTPS://API.example.com:443/tools"), "https://api.example.com/tools")
        for prefix in (
            "ftp://x.example/",
            "https://u@x.example/",
            "https://x.example/a?b",
            "x.example",
            "http://127.1/",  # resolvers would read it as 127.0.0.1
            "http://x.example:99999/",
        ):
            with self.assertRaises(ValueError):
                check_prefix(prefix)


# -- parse_endpoint --------------------------------------------------------------------------------


class ParseEndpointTests(SynchronousTestCase):
    def test_valid_endpoint(self) -> None:
        endpoint = parse_endpoint(
            {"url": "https://api.example.com/tools/w", "method": "get", "headers": {"Authorization": SECRET}}
        )
        self.assertEqual(endpoint.url, "https://api.example.com/tools/w")
        self.assertEqual(endpoint.method, "GET")
        self.assertEqual(dict(endpoint.headers), {"Authorization": SECRET})

    def test_defaults(self) -> None:
        endpoint = parse_endpoint({"url": "https://api.example.com/tools/w", "method": None})
        self.assertEqual(endpoint.method, "POST")
        self.assertEqual(dict(endpoint.headers), {})

    def test_endpoints_hash_and_compare(self) -> None:
        one = parse_endpoint({"url": "https://a.example/x", "headers": {"A": "1", "B": "2"}})
        two = parse_endpoint({"url": "https://a.example/x", "headers": {"B": "2", "A": "1"}})
        three = parse_endpoint({"url": "https://a.example/x", "headers": {"A": "1", "B": "3"}})
        self.assertEqual(one, two)
        self.assertEqual(hash(one), hash(two))
        self.assertNotEqual(one, three)
        self.assertEqual(len({one, two, three}), 2)

    def test_repr_hides_header_values(self) -> None:
        endpoint = parse_endpoint({"url": "https://a.example/x", "headers": {"Authorization": SECRET}})
        self.assertNotIn(SECRET, repr(endpoint))
        self.assertIn("Authorization", repr(endpoint))

    def test_errors_name_the_field(self) -> None:
        cases: list[tuple[Any, str]] = [
            ({}, "url"),
            ({"url": None}, "url"),
            ({"url": 5}, "url"),
            ({"url": "ftp://a.example/x"}, "url"),
            ({"url": "https://"}, "url"),
            ({"url": "https://user:pw@a.example/x"}, "url"),
            ({"url": "https://a.example/x/../y"}, "url"),
            ({"url": "https://a.example/x y"}, "url"),
            ({"url": "https://a.example/x#frag"}, "url"),
            ({"url": "http://[::1]:8080/x"}, "url"),  # the HTTP client cannot send IPv6 literals
            ({"url": "https://a.example/" + "x" * 5000}, "url"),
            ({"url": "https://a.example/x", "method": "TRACE"}, "method"),
            ({"url": "https://a.example/x", "method": "CONNECT"}, "method"),
            ({"url": "https://a.example/x", "method": 1}, "method"),
            ({"url": "https://a.example/x", "headers": []}, "headers"),
            ({"url": "https://a.example/x", "headers": "A: b"}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A": 1}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A": None}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A": "b\r\nX-Injected: 1"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A": "b\nc"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A": "b\x00"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A\r\nB": "c"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"A B": "c"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"": "c"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"Host": "evil.net"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"content-length": "0"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"Transfer-Encoding": "chunked"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {"X-A": "1", "x-a": "2"}}, "headers"),
            ({"url": "https://a.example/x", "headers": {f"X-{i}": "v" for i in range(100)}}, "headers"),
            ("https://a.example/x", "url"),
            (None, "url"),
        ]
        for obj, field in cases:
            with self.assertRaises(EndpointError, msg=repr(obj)[:80]) as raised:
                parse_endpoint(obj)
            self.assertEqual(raised.exception.field, field, repr(obj)[:80])
            self.assertTrue(raised.exception.description)

    def test_userinfo_is_named_in_the_description(self) -> None:
        with self.assertRaises(EndpointError) as raised:
            parse_endpoint({"url": "https://a.example@evil.example/x"})
        self.assertIn("user information", raised.exception.description)

    def test_error_descriptions_do_not_repeat_header_values(self) -> None:
        with self.assertRaises(EndpointError) as raised:
            parse_endpoint({"url": "https://a.example/x", "headers": {"Authorization": SECRET + "\n"}})
        self.assertNotIn(SECRET, str(raised.exception))
        self.assertNotIn(SECRET, raised.exception.description)
        self.assertIn("Authorization", raised.exception.description)

    def test_constructing_an_endpoint_validates_it(self) -> None:
        with self.assertRaises(EndpointError):
            Endpoint("https://a.example/x/../y")
        with self.assertRaises(EndpointError):
            Endpoint("https://a.example/x", method="HEAD")
        with self.assertRaises(EndpointError):
            Endpoint("https://a.example/x", headers={"A": "b\r\n"})


# -- the loopback server ---------------------------------------------------------------------------


class _Echo(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "path": request.path.decode(),
                "query": {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()},
                "body": body.decode(),
                "content_type": _header(request, b"content-type"),
            }
        ).encode()


class _Fail(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(500)
        return b"<" + b"x" * 3000 + b">"


class _Hang(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        return NOT_DONE_YET


class _Huge(Resource):
    """A body far above the caller's limit, with a Content-Length or chunked."""

    isLeaf = True

    def __init__(self, chunked: bool) -> None:
        super().__init__()
        self.chunked = chunked

    def render(self, request: Request) -> bytes | int:
        if not self.chunked:
            return b"y" * 1_000_000
        for _ in range(64):
            request.write(b"z" * 16384)
        request.finish()
        return NOT_DONE_YET


class _Exact(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return "é".encode() * 512  # exactly 1024 bytes


class _Redirect(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.redirect(b"/tools/echo")
        return b"moved"


class _Cookie(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.addCookie(b"session", b"abc", path=b"/")
        return b"{}"


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode() if isinstance(value, bytes) else value


class _RecordingSite(Site):
    """A Site that records every request (method, uri, headers) and every connection's end."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource, timeout=None)
        self.noisy = False
        self.seen: list[tuple[str, str, dict[str, list[str]]]] = []
        self.closed: list[defer.Deferred[None]] = []

    def getResourceFor(self, request: Request) -> Any:
        headers = {
            name.decode().lower(): [v.decode() for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append((request.method.decode(), request.uri.decode(), headers))
        return super().getResourceFor(request)

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        closed: defer.Deferred[None] = defer.Deferred()
        self.closed.append(closed)
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            lost(reason)
            closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol


@implementer(ILogObserver)
class _LogCollector:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(sorted(e.items(), key=str)) for e in self.events)


class FunctionCallerTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        tools = Resource()
        tools.putChild(b"echo", _Echo())
        tools.putChild(b"fail", _Fail())
        tools.putChild(b"hang", _Hang())
        tools.putChild(b"huge", _Huge(chunked=False))
        tools.putChild(b"huge-chunked", _Huge(chunked=True))
        tools.putChild(b"exact", _Exact())
        tools.putChild(b"redirect", _Redirect())
        tools.putChild(b"cookie", _Cookie())
        root = Resource()
        root.putChild(b"tools", tools)
        root.putChild(b"admin", _Echo())
        self.site = _RecordingSite(root)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.addCleanup(self._stop_server)

    @defer.inlineCallbacks
    def _stop_server(self) -> Any:
        yield defer.gatherResults(self.site.closed)
        yield self.port.stopListening()

    def make_caller(self, **kwargs: Any) -> FunctionCaller:
        kwargs.setdefault("prefixes", [self.base + "/tools"])
        caller = FunctionCaller(reactor, **kwargs)
        self.logs = _LogCollector()
        caller._log = Logger(observer=self.logs)
        # Cleanups run last-in first-out: the pool closes before the server waits for its connections.
        self.addCleanup(caller.close)
        return caller

    def endpoint(self, path: str, method: str = "POST", **headers: str) -> Endpoint:
        return Endpoint(self.base + path, method, {"Authorization": SECRET, **headers})

    def assertNoSecret(self, result: str) -> None:
        self.assertNotIn(SECRET, result)
        self.assertNotIn("s3cret", result)
        self.assertNotIn("s3cret", self.logs.text())

    def assertError(self, result: str, error: str) -> dict[str, Any]:
        parsed = json.loads(result)
        self.assertEqual(parsed["error"], error, result)
        self.assertIsInstance(parsed["message"], str)
        self.assertNoSecret(result)
        return parsed

    @defer.inlineCallbacks
    def test_post_sends_the_arguments_as_json(self) -> Any:
        caller = self.make_caller()
        arguments = '{"city": "Paris", "days": 3}'
        result = yield caller.call(
            self.endpoint("/tools/echo", **{"X-Custom": "yes"}), "get_weather", arguments
        )
        echoed = json.loads(result)
        self.assertEqual(echoed["method"], "POST")
        self.assertEqual(echoed["path"], "/tools/echo")
        self.assertEqual(echoed["body"], arguments)
        self.assertEqual(echoed["content_type"], "application/json")
        [(method, uri, headers)] = self.site.seen
        self.assertEqual((method, uri), ("POST", "/tools/echo"))
        self.assertEqual(headers["authorization"], [SECRET])
        self.assertEqual(headers["x-custom"], ["yes"])
        self.assertEqual(headers["host"], [self.base[len("http://") :]])
        # Bodies are asked for uncompressed, so the size limit bounds memory.
        self.assertNotIn("accept-encoding", headers)
        self.assertNotIn("s3cret", self.logs.text())

    @defer.inlineCallbacks
    def test_put_and_patch_send_a_body_and_empty_arguments_become_an_object(self) -> Any:
        caller = self.make_caller()
        for method in ("PUT", "PATCH"):
            result = yield caller.call(self.endpoint("/tools/echo", method), "f", "")
            echoed = json.loads(result)
            self.assertEqual((echoed["method"], echoed["body"]), (method, "{}"))

    @defer.inlineCallbacks
    def test_get_sends_the_arguments_as_query_parameters(self) -> Any:
        caller = self.make_caller()
        arguments = json.dumps({"q": "a&b=c d+e%", "n": 3, "x": 1.5, "flag": True, "skip": None, "€": "ü"})
        result = yield caller.call(self.endpoint("/tools/echo", "GET"), "search", arguments)
        echoed = json.loads(result)
        self.assertEqual(echoed["method"], "GET")
        self.assertEqual(echoed["body"], "")
        self.assertIsNone(echoed["content_type"])
        self.assertEqual(
            echoed["query"],
            {"q": ["a&b=c d+e%"], "n": ["3"], "x": ["1.5"], "flag": ["true"], "€": ["ü"]},
        )

    @defer.inlineCallbacks
    def test_delete_keeps_the_query_of_the_url(self) -> Any:
        caller = self.make_caller()
        result = yield caller.call(self.endpoint("/tools/echo?fixed=1", "DELETE"), "f", '{"id": "7"}')
        echoed = json.loads(result)
        self.assertEqual(echoed["method"], "DELETE")
        self.assertEqual(echoed["query"], {"fixed": ["1"], "id": ["7"]})

    @defer.inlineCallbacks
    def test_arguments_the_method_cannot_carry_are_refused_without_a_request(self) -> Any:
        caller = self.make_caller()
        nested = yield caller.call(self.endpoint("/tools/echo", "GET"), "f", '{"a": {"b": 1}}')
        self.assertError(nested, "invalid_arguments")
        listed = yield caller.call(self.endpoint("/tools/echo", "GET"), "f", "[1, 2]")
        self.assertError(listed, "invalid_arguments")
        broken = yield caller.call(self.endpoint("/tools/echo", "POST"), "f", '{"a": ')
        self.assertError(broken, "invalid_arguments")
        self.assertEqual(self.site.seen, [])

    @defer.inlineCallbacks
    def test_timeout(self) -> Any:
        caller = self.make_caller(timeout=0.5)
        result = yield caller.call(self.endpoint("/tools/hang"), "slow", "{}")
        parsed = self.assertError(result, "timeout")
        self.assertIn("0.5 s", parsed["message"])
        self.assertEqual([uri for _, uri, _ in self.site.seen], ["/tools/hang"])

    @defer.inlineCallbacks
    def test_server_error_quotes_the_start_of_the_body(self) -> Any:
        caller = self.make_caller()
        result = yield caller.call(self.endpoint("/tools/fail"), "f", "{}")
        parsed = self.assertError(result, "http_status")
        self.assertEqual(parsed["status"], 500)
        self.assertEqual(parsed["body"], "<" + "x" * 499)

    @defer.inlineCallbacks
    def test_oversized_body_is_refused(self) -> Any:
        caller = self.make_caller(max_response_bytes=1024)
        for path in ("/tools/huge", "/tools/huge-chunked"):
            result = yield caller.call(self.endpoint(path), "big", "{}")
            parsed = self.assertError(result, "response_too_large")
            self.assertEqual(parsed["limit"], 1024)

    @defer.inlineCallbacks
    def test_body_at_the_limit_is_returned_whole(self) -> Any:
        caller = self.make_caller(max_response_bytes=1024)
        result = yield caller.call(self.endpoint("/tools/exact"), "f", "{}")
        self.assertEqual(result, "é" * 512)

    @defer.inlineCallbacks
    def test_invalid_utf8_is_replaced(self) -> Any:
        class _Latin1(Resource):
            isLeaf = True

            def render(self, request: Request) -> bytes:
                return "café".encode("latin-1")

        self.site.resource.children[b"tools"].putChild(b"latin1", _Latin1())
        caller = self.make_caller()
        result = yield caller.call(self.endpoint("/tools/latin1"), "f", "{}")
        self.assertEqual(result, "caf\ufffd")

    @defer.inlineCallbacks
    def test_redirects_are_not_followed(self) -> Any:
        caller = self.make_caller()
        result = yield caller.call(self.endpoint("/tools/redirect"), "f", "{}")
        parsed = self.assertError(result, "http_status")
        self.assertEqual(parsed["status"], 302)
        self.assertEqual([uri for _, uri, _ in self.site.seen], ["/tools/redirect"])

    @defer.inlineCallbacks
    def test_disallowed_url_makes_no_request(self) -> Any:
        caller = self.make_caller()
        result = yield caller.call(self.endpoint("/admin"), "f", "{}")
        self.assertError(result, "url_not_allowed")
        closed = self.make_caller(prefixes=[])
        result = yield closed.call(self.endpoint("/tools/echo"), "f", "{}")
        self.assertError(result, "url_not_allowed")
        self.assertEqual(self.site.seen, [])
        self.assertEqual(self.site.closed, [])  # not even a connection

    @defer.inlineCallbacks
    def test_call_checks_the_url_again(self) -> Any:
        caller = self.make_caller()
        endpoint = self.endpoint("/tools/echo")
        # An Endpoint cannot be built with this URL; one changed after construction is still refused.
        object.__setattr__(endpoint, "url", self.base + "/tools/../admin")
        result = yield caller.call(endpoint, "f", "{}")
        self.assertError(result, "url_not_allowed")
        object.__setattr__(endpoint, "url", self.base + "/tools/echo")
        object.__setattr__(endpoint, "method", "TRACE")
        result = yield caller.call(endpoint, "f", "{}")
        self.assertError(result, "url_not_allowed")
        self.assertEqual(self.site.seen, [])

    @defer.inlineCallbacks
    def test_connection_refused(self) -> Any:
        listening = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        dead = listening.getHost().port
        yield listening.stopListening()
        base = f"http://127.0.0.1:{dead}"
        caller = self.make_caller(prefixes=[base])
        result = yield caller.call(Endpoint(base + "/x", headers={"Authorization": SECRET}), "f", "{}")
        self.assertError(result, "connection_failed")

    @defer.inlineCallbacks
    def test_cookies_are_not_kept_between_calls(self) -> Any:
        caller = self.make_caller()
        yield caller.call(self.endpoint("/tools/cookie"), "f", "{}")
        yield caller.call(self.endpoint("/tools/echo"), "f", "{}")
        self.assertEqual(len(self.site.seen), 2)
        self.assertNotIn("cookie", self.site.seen[1][2])

    @defer.inlineCallbacks
    def test_close_cancels_calls_in_progress(self) -> Any:
        caller = self.make_caller(timeout=30)
        pending = caller.call(self.endpoint("/tools/hang"), "slow", "{}")
        while not self.site.seen:
            yield _turn()
        yield caller.close()
        result = yield pending
        self.assertError(result, "cancelled")

    @defer.inlineCallbacks
    def test_one_info_line_per_call_without_headers(self) -> Any:
        caller = self.make_caller()
        yield caller.call(self.endpoint("/tools/echo"), "get_weather", '{"city": "Paris"}')
        yield caller.call(self.endpoint("/tools/fail"), "get_weather", "{}")
        yield caller.call(self.endpoint("/admin"), "get_weather", "{}")
        infos = [e for e in self.logs.events if e["log_level"].name == "info"]
        self.assertEqual(len(infos), 3)
        self.assertEqual([e["status"] for e in infos], [200, 500, "url_not_allowed"])
        for event in infos:
            self.assertEqual(
                (event["name"], event["method"], event["host"]), ("get_weather", "POST", "127.0.0.1")
            )
            self.assertIsInstance(event["elapsed"], float)
        text = self.logs.text()
        self.assertNotIn("s3cret", text)
        self.assertNotIn("Paris", text)  # nor the arguments
        self.assertNotIn("xxxx", text)  # nor the response body


class _SilentClient:
    """An injected HTTP client whose requests never answer (until cancelled)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.cancelled = 0

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.requests.append((method, url, kwargs))

        def cancel(_: Any) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


class InjectedClientTests(SynchronousTestCase):
    def test_timeout_on_the_given_clock_cancels_the_request(self) -> None:
        clock = Clock()
        client = _SilentClient()
        caller = FunctionCaller(
            clock, timeout=3, prefixes=["https://api.example.com/tools"], http_client=cast(HTTPClient, client)
        )
        endpoint = Endpoint("https://API.example.com:443/tools/w?x=1", "GET", {"Authorization": SECRET})
        results: list[str] = []
        caller.call(endpoint, "f", '{"city": "Paris"}').addCallback(results.append)
        [(method, url, kwargs)] = client.requests
        self.assertEqual((method, url), ("GET", "https://api.example.com/tools/w?x=1&city=Paris"))
        self.assertFalse(kwargs["allow_redirects"])
        self.assertEqual(kwargs["headers"].getRawHeaders(b"authorization"), [SECRET.encode()])
        clock.advance(2.9)
        self.assertEqual((results, client.cancelled), ([], 0))
        clock.advance(0.2)
        clock.advance(0)  # the answer comes on the next turn
        self.assertEqual(client.cancelled, 1)
        [result] = results
        self.assertEqual(json.loads(result)["error"], "timeout")
        self.assertNotIn("s3cret", result)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(self.successResultOf(caller.close()))


def _turn() -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


class HttpClientViewTests(TestCase):
    """The pure endpoint policy reads a URL exactly as Twisted's HTTP client will send it."""

    def test_matches_twisted_uri(self) -> None:
        from twisted.web.client import URI

        from openai_proxy.endpoint import http_client_view

        for url in [b"http://a.example/", b"https://a.example", b"http://a.example:8080/x;p?q=1#f",
                    b"http://a.example:/x", b"http://a.example:port/x", b"http://[::1]:81/x",
                    b"  http://a.example/path?x  ", b"https://a.example:443/a/b/../c"]:
            uri = URI.fromBytes(url)
            self.assertEqual(http_client_view(url), (uri.host, uri.port, uri.originForm), url)
