"""
Server-side functions: the daemon calls a think function's HTTP ``endpoint`` itself, as Deepgram does.

A Deepgram v1 think function may carry ``endpoint {url, method, headers}``. The daemon then performs the
HTTP call when the model asks for the function and hands the answer back to the model, and the client
only watches (``FunctionCallRequest`` with ``client_side: false``, then the ``FunctionCallResponse`` the
daemon produced). Because the URL comes from the client, the daemon only ever calls URLs inside a
prefix the operator allowed, and it checks the very URL it sends:

- :func:`parse_endpoint` validates the client's ``endpoint`` object and builds an :class:`Endpoint`;
- :func:`url_allowed` decides whether a URL lies inside one of the operator's prefixes;
- :class:`FunctionCaller` performs the call with ``treq`` and turns every outcome into a string the
  model can read. It never follows redirects, never stores cookies, never reads more than
  ``max_response_bytes`` of a body, and never writes request headers (they may hold secrets) to a
  result or a log line.

URL rules (both for the endpoint and for the prefixes): ``http`` or ``https`` with a host name or an IP
address, an optional port, no user information, no fragment, no backslashes, whitespace or control
characters, no ``.``/``..`` path segments (also percent-encoded, or with ``;`` parameters), no
percent-encoded ``/`` or ``\\`` and no doubly-encoded dots or slashes. Host names are lowercased and
IDNA-encoded (UTS #46, as the HTTP client does); IP addresses are compared in their canonical form.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode, urlsplit

import idna
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from openai_proxy import __version__
from openai_proxy.jsonshape import type_name

#: Methods a server-side function may use.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
#: Methods whose arguments travel as a JSON body; the others put them in the query string.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

#: Headers the daemon (or the HTTP client) owns: letting a client set them would let it pick another
#: virtual host behind an allowed address (Host) or desynchronise message framing.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "expect",
    }
)

_MAX_URL_LENGTH = 4096
_MAX_HEADERS = 64
_MAX_HEADER_NAME = 256
_MAX_HEADER_VALUE = 8192
#: A non-2xx body is only quoted (its first characters), so little of it is read.
_ERROR_BODY_CHARS = 500
_ERROR_BODY_BYTES = 4 * _ERROR_BODY_CHARS

#: RFC 9110 token characters (header field names).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOST_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: After one round of decoding, an encoded dot, slash or backslash means double encoding.
_DOUBLE_ENCODED = re.compile(rb"%(?:2e|2f|5c)", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}

# -- endpoint --------------------------------------------------------------------------------------


class EndpointError(ValueError):
    """A function ``endpoint`` the daemon cannot accept.

    ``field`` is relative to the endpoint object (``url``, ``method`` or ``headers``); ``description``
    says what is wrong without repeating header values or the URL (either may hold secrets).
    """

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class _FrozenHeaders(Mapping[str, str]):
    """Immutable, hashable header mapping whose repr hides the values."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = tuple(items.items())

    def __getitem__(self, key: str) -> str:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        # Header values are often credentials: a repr can end up in a log line.
        return "{" + ", ".join(f"{name!r}: '<redacted>'" for name, _ in self._items) + "}"


@dataclass(frozen=True)
class Endpoint:
    """A validated function endpoint. Constructing one validates it (raises :class:`EndpointError`)."""

    url: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise EndpointError("url", "must be a string")
        problem = _url_problem(self.url)
        if problem is not None:
            raise EndpointError("url", problem)
        if not isinstance(self.method, str) or self.method.upper() not in METHODS:
            raise EndpointError("method", f"must be one of {', '.join(sorted(METHODS))}")
        object.__setattr__(self, "method", self.method.upper())
        object.__setattr__(self, "headers", _FrozenHeaders(_checked_headers(self.headers)))


def parse_endpoint(obj: object) -> Endpoint:
    """Validate a Deepgram function ``endpoint`` object and return it as an :class:`Endpoint`.

    ``url`` is required (an http/https URL with a host and no user information); ``method`` is one of
    GET, POST, PUT, PATCH, DELETE in any case (default POST); ``headers`` maps strings to strings, with
    token names, no control characters (CR, LF…) in values and none of :data:`FORBIDDEN_HEADERS`.
    Whether the URL is allowed is a separate question: :func:`url_allowed`.
    """
    if not isinstance(obj, Mapping):
        raise EndpointError("url", "the endpoint must be an object with a url")
    url = obj.get("url")
    if url is None:
        raise EndpointError("url", "is required")
    if not isinstance(url, str):
        raise EndpointError("url", f"must be a string, got {type_name(url)}")
    method = obj.get("method")
    if method is None:
        method = "POST"
    elif not isinstance(method, str):
        raise EndpointError("method", f"must be a string, got {type_name(method)}")
    headers = obj.get("headers")
    if headers is None:
        headers = {}
    elif not isinstance(headers, Mapping):
        raise EndpointError("headers", f"must be an object, got {type_name(headers)}")
    return Endpoint(url=url, method=method, headers=headers)


def _checked_headers(headers: object) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        raise EndpointError("headers", f"must be an object, got {type_name(headers)}")
    if len(headers) > _MAX_HEADERS:
        raise EndpointError("headers", f"at most {_MAX_HEADERS} headers are allowed")
    checked: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.match(name) or len(name) > _MAX_HEADER_NAME:
            raise EndpointError("headers", f"{_quoted_name(name)} is not a valid header name")
        if not isinstance(value, str):
            raise EndpointError("headers", f"the value of {name!r} must be a string, got {type_name(value)}")
        if any(_is_control(ch) and ch != "\t" for ch in value):
            raise EndpointError("headers", f"the value of {name!r} contains a control character (CR, LF, …)")
        if len(value) > _MAX_HEADER_VALUE:
            raise EndpointError("headers", f"the value of {name!r} is longer than {_MAX_HEADER_VALUE}")
        lowered = name.lower()
        if lowered in FORBIDDEN_HEADERS:
            raise EndpointError("headers", f"{name!r} is set by the daemon and cannot be given")
        if lowered in seen:
            raise EndpointError("headers", f"{name!r} is given twice")
        seen.add(lowered)
        checked[name] = value
    return checked


def _quoted_name(name: object) -> str:
    if isinstance(name, str) and len(name) <= _MAX_HEADER_NAME:
        return repr(name)
    return "a header name"


# -- URLs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A URL taken apart and put back together in the one form the daemon checks and sends."""

    scheme: str
    #: Lowercased IDNA host name, or a canonical IP address (IPv6 without brackets).
    host: str
    port: int
    #: Percent-decoded path segments (bytes, so distinct invalid UTF-8 escapes stay distinct).
    segments: tuple[bytes, ...]
    #: Path and query, ASCII, as sent.
    path_and_query: str

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path_and_query}"


class _BadURL(ValueError):
    pass


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")


def _parse_url(url: str, *, prefix: bool = False) -> _Target:
    """Take ``url`` apart strictly; raise :class:`_BadURL` saying why it is refused."""
    if len(url) > _MAX_URL_LENGTH:
        raise _BadURL(f"is longer than {_MAX_URL_LENGTH} characters")
    for ch in url:
        if ch.isspace() or _is_control(ch):
            raise _BadURL("contains whitespace or a control character")
        if ch == "\\":
            raise _BadURL("contains a backslash")
    if "#" in url:
        raise _BadURL("must not have a fragment (#)")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _BadURL("is not a valid URL") from exc
    scheme = parts.scheme
    if scheme not in _DEFAULT_PORTS or not url[: len(scheme) + 3].lower() == f"{scheme}://":
        raise _BadURL("must be an http:// or https:// URL")
    netloc = parts.netloc
    if "@" in netloc:
        raise _BadURL("must not contain user information (user@host)")
    host, port = _split_netloc(netloc, _DEFAULT_PORTS[scheme])
    path = parts.path or "/"
    segments = _path_segments(path)
    query = parts.query
    if prefix and query:
        raise _BadURL("must not have a query string")
    # Non-ASCII and characters that are never valid in a URI are percent-encoded; existing escapes
    # and reserved characters stay as they are, so the decoded segments do not change.
    path_and_query = quote(path, safe="/%:@!$&'()*+,;=-._~")
    if query:
        path_and_query += "?" + quote(query, safe="/?%:@!$&'()*+,;=-._~")
    return _Target(scheme, host, port, segments, path_and_query)


def _split_netloc(netloc: str, default_port: int) -> tuple[str, int]:
    if not netloc:
        raise _BadURL("has no host")
    if "%" in netloc:
        raise _BadURL("must not have a percent-encoded or scoped host")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _BadURL("has an unterminated IPv6 address")
        raw_host, rest = netloc[1:end], netloc[end + 1 :]
        try:
            host = ipaddress.IPv6Address(raw_host).compressed
        except ValueError as exc:
            raise _BadURL("has an invalid IPv6 address") from exc
    else:
        raw_host, colon, port_text = netloc.partition(":")
        rest = colon + port_text
        host = _normalise_host(raw_host)
    if not rest:
        return host, default_port
    if not rest.startswith(":") or not _PORT.match(rest[1:]):
        raise _BadURL("has an invalid port")
    port = int(rest[1:])
    if not 0 < port < 65536:
        raise _BadURL("has an invalid port")
    return host, port


def _normalise_host(raw_host: str) -> str:
    if not raw_host:
        raise _BadURL("has no host")
    try:
        return str(ipaddress.IPv4Address(raw_host))
    except ValueError:
        pass
    try:
        # UTS #46 as hyperlink (inside treq) applies it, so the checked host is the one connected to.
        host = idna.encode(raw_host, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as exc:
        raise _BadURL("has an invalid host name") from exc
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise _BadURL("has an invalid host name")
    if labels[-1].isdigit():
        # Resolvers read "127.1" or "2130706433" as IPv4 addresses: only dotted quads are accepted.
        raise _BadURL("has an invalid IPv4 address")
    return host


def _path_segments(path: str) -> tuple[bytes, ...]:
    if not path.startswith("/"):
        raise _BadURL("has an invalid path")
    if _PERCENT.search(path):
        raise _BadURL("has an invalid percent escape")
    segments = []
    for raw in path.split("/")[1:]:
        decoded = unquote_to_bytes(raw)
        if b"/" in decoded or b"\\" in decoded:
            raise _BadURL("must not contain a percent-encoded / or \\ in its path")
        if _DOUBLE_ENCODED.search(decoded):
            raise _BadURL("must not contain doubly percent-encoded characters in its path")
        if any(byte < 0x20 or byte == 0x7F for byte in decoded):
            raise _BadURL("must not contain encoded control characters in its path")
        # Some servers read "..;x" as ".." (path parameters), so those count as dot segments too.
        if decoded.split(b";", 1)[0] in (b".", b".."):
            raise _BadURL("must not contain . or .. path segments")
        segments.append(decoded)
    return tuple(segments)


def _as_sent(target: _Target) -> None:
    """Check that treq and Twisted will send exactly ``target`` (no parser differential).

    Raises :class:`_BadURL` when hyperlink (inside treq) cannot represent the URL (it refuses IPv6
    literals, for one) or when the request it would build names another host, port or path.
    """
    try:
        sent = EncodedURL.from_text(target.url).to_uri().to_text()
        uri = URI.fromBytes(sent.encode("ascii"))
    except Exception as exc:  # hyperlink and idna raise a variety of errors
        raise _BadURL("cannot be sent by the HTTP client (use a host name or IPv4 address)") from exc
    if (
        sent != target.url
        or uri.host != target.host.encode("ascii")
        or uri.port != target.port
        or uri.originForm != target.path_and_query.encode("ascii")
    ):
        raise _BadURL("cannot be sent by the HTTP client unchanged")


def _url_problem(url: str) -> str | None:
    try:
        _as_sent(_parse_url(url))
    except _BadURL as exc:
        return str(exc)
    return None


def check_prefix(prefix: str) -> str:
    """Validate one operator URL prefix; return it in canonical form or raise ``ValueError``.

    For configuration parsing: a prefix that this returns for is one :func:`url_allowed` can match.
    """
    try:
        target = _parse_url(prefix, prefix=True)
    except _BadURL as exc:
        raise ValueError(f"URL prefix {prefix!r} {exc}") from exc
    return target.url


def _inside(target: _Target, prefix: str) -> bool:
    try:
        allowed = _parse_url(prefix, prefix=True)
    except _BadURL:
        return False
    if (target.scheme, target.host, target.port) != (allowed.scheme, allowed.host, allowed.port):
        return False
    wanted = list(allowed.segments)
    # "https://h/tools/" and "https://h/tools" both mean everything under /tools.
    while wanted and wanted[-1] == b"":
        wanted.pop()
    return list(target.segments[: len(wanted)]) == wanted


def url_allowed(url: str, prefixes: Sequence[str]) -> bool:
    """True only when ``url`` lies inside one of ``prefixes``.

    Inside means the same scheme, the same host (case-insensitive, IDNA-normalised; IP addresses in
    canonical form), the same effective port (80/443 when absent) and a path that starts with the
    prefix's path at a segment boundary (``/tools`` allows ``/tools`` and ``/tools/x``, not
    ``/toolsX``). URLs the module refuses (see the module docstring: user information, dot segments,
    encoded slashes, backslashes, control characters, other schemes…) are never allowed, nor are any
    URLs when ``prefixes`` is empty.
    """
    if not isinstance(url, str) or not prefixes:
        return False
    try:
        target = _parse_url(url)
    except _BadURL:
        return False
    return any(isinstance(prefix, str) and _inside(target, prefix) for prefix in prefixes)


# -- calling ---------------------------------------------------------------------------------------


class _NoCookies(IndexableCookieJar):
    """A cookie jar that never stores anything: calls of different sessions must not share cookies."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass

    def set_cookie(self, cookie: Any) -> None:
        pass


@implementer(IAgent)
class _IdentityAgent:
    """Asks for uncompressed bodies, so ``max_response_bytes`` bounds what is held in memory.

    treq always adds ``Accept-Encoding: gzip``; a small compressed body can inflate a thousandfold.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = headers.copy() if headers is not None else Headers()
        headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer)


_BODY_DONE = Failure(ResponseDone())


class _CappedBody(Protocol):
    """Collects a response body up to ``limit`` bytes; beyond that it drops the connection.

    ``finished`` fires with ``(body, truncated)`` once the body is over, by its end or by the
    dropped connection.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._truncated = False
        self.finished: Deferred[tuple[bytes, bool]] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[tuple[bytes, bool]]) -> None:
        self._stop()

    def _stop(self) -> None:
        # Response.deliverBody hands the protocol a producer-transport; stopping it drops the connection.
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._truncated:
            return
        room = self._limit - self._size
        if len(data) > room:
            self._chunks.append(data[:room])
            self._truncated = True
            # Nothing more is read: the connection goes, rather than back to the pool.
            self._stop()
            return
        self._chunks.append(data)
        self._size += len(data)

    def connectionLost(self, reason: Failure = _BODY_DONE) -> None:
        if self.finished.called:
            return
        if self._truncated or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback((b"".join(self._chunks), self._truncated))
        else:
            self.finished.errback(reason)


class _ArgumentsError(ValueError):
    pass


def _result(error: str, message: str, **extra: Any) -> str:
    return json.dumps({"error": error, "message": message, **extra})


def _query_from(arguments: str) -> str:
    """GET/DELETE: a JSON object of scalars becomes query parameters (``null`` values are left out)."""
    value = _arguments_value(arguments)
    if not isinstance(value, dict):
        raise _ArgumentsError("the arguments of a GET or DELETE function must be a JSON object")
    pairs = []
    for key, item in value.items():
        if item is None:
            continue
        if isinstance(item, (dict, list)):
            raise _ArgumentsError(
                f"the argument {key!r} is not a string, number or boolean, "
                "which a GET or DELETE function needs (they travel as query parameters)"
            )
        pairs.append((key, item if isinstance(item, str) else json.dumps(item)))
    return urlencode(pairs, quote_via=quote)


def _arguments_value(arguments: str) -> Any:
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except ValueError as exc:
        raise _ArgumentsError("the arguments are not valid JSON") from exc


class FunctionCaller:
    """Performs server-side function calls over HTTP, only to URLs inside the operator's prefixes.

    ``call`` always succeeds with a string for the model: the endpoint's body on a 2xx answer, or a
    small JSON object ``{"error": kind, "message": …}`` otherwise. Error kinds: ``url_not_allowed``,
    ``invalid_arguments``, ``timeout``, ``connection_failed``, ``http_status`` (with ``status`` and the
    first 500 characters of ``body``; redirects land here too, as they are never followed),
    ``response_too_large`` (a 2xx body above ``max_response_bytes``: it is refused whole rather than
    cut, so the model never reads half a JSON document), ``cancelled`` and ``internal_error``.

    Bodies are decoded as UTF-8 (invalid bytes replaced). GET/DELETE arguments must be a JSON object
    whose values are strings, numbers, booleans or null: strings go as they are, numbers and booleans
    in their JSON spelling (``true``), null values are left out; anything else is ``invalid_arguments``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = 65536,
        prefixes: Sequence[str] = (),
        http_client: HTTPClient | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        self._prefixes = tuple(prefixes)
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)
            http_client = HTTPClient(_IdentityAgent(agent), cookiejar=_NoCookies())
        self._client = http_client
        self._in_flight: set[Deferred[str]] = set()

    def set_prefixes(self, prefixes: Sequence[str]) -> None:
        """Replace the URL prefixes calls may go to (a configuration reload); calls in flight go on."""
        self._prefixes = tuple(prefixes)

    def call(self, endpoint: Endpoint, name: str, arguments: str) -> Deferred[str]:
        """Call ``endpoint`` for the function ``name`` with the model's ``arguments`` (a JSON string).

        POST/PUT/PATCH send the arguments as the JSON body; GET/DELETE send a JSON object of scalars as
        query parameters. The returned Deferred never fails; see the class docstring for the results.
        """
        started = self._reactor.seconds()
        method = endpoint.method
        try:
            target = _parse_url(endpoint.url)
            _as_sent(target)
        except _BadURL:
            return succeed(self._refuse(name, method, "-", started))
        if method not in METHODS or not any(_inside(target, p) for p in self._prefixes):
            return succeed(self._refuse(name, method, target.host, started))

        headers = Headers()
        headers.addRawHeader(b"User-Agent", f"openai-proxy/{__version__}".encode("ascii"))
        url = target.url
        body: bytes | None = None
        try:
            if method in _BODY_METHODS:
                _arguments_value(arguments)
                body = (arguments if arguments.strip() else "{}").encode("utf-8")
                headers.setRawHeaders(b"Content-Type", [b"application/json"])
            else:
                query = _query_from(arguments)
                if query:
                    url += ("&" if "?" in url else "?") + query
        except _ArgumentsError as exc:
            self._log_call(name, method, target.host, "invalid_arguments", started)
            return succeed(_result("invalid_arguments", str(exc)))
        for header_name, value in endpoint.headers.items():
            # The endpoint's own headers win over the defaults (User-Agent, Content-Type).
            headers.setRawHeaders(header_name.encode("ascii"), [value.encode("utf-8")])

        outcome: dict[str, Any] = {"status": "connection_failed"}
        try:
            d: Deferred[Any] = self._client.request(
                method, url, headers=headers, data=body, allow_redirects=False, unbuffered=True
            )
        except Exception as exc:
            # The exception's type only: its text could quote the URL or a header.
            self._log.warn(
                "function {name}: the HTTP client refused the request ({kind})",
                name=name,
                kind=type(exc).__name__,
            )
            self._log_call(name, method, target.host, "connection_failed", started)
            return succeed(_result("connection_failed", "the function endpoint could not be called"))
        d.addCallback(self._read_body, outcome)
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        # Answer on a later reactor turn: by then the HTTP client has finished with the connection
        # (back in the pool, or closed), so a caller that closes the pool at once leaves nothing behind.
        d.addBoth(lambda outcome_: deferLater(self._reactor, 0, lambda: outcome_))
        d.addCallbacks(self._answer, self._failed, callbackArgs=(outcome,), errbackArgs=(outcome,))
        d.addErrback(self._unexpected, outcome)

        def done(result: str) -> str:
            self._in_flight.discard(d)
            self._log_call(name, method, target.host, outcome["status"], started)
            return result

        d.addCallback(done)
        if not d.called:
            self._in_flight.add(d)
        return d

    def close(self) -> Deferred[None]:
        """Cancel calls in progress (they answer ``cancelled``) and close the connection pool.

        An ``http_client`` given to the constructor is left to its owner.
        """
        for d in list(self._in_flight):
            d.cancel()
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    # -- steps of a call ---------------------------------------------------------------------------

    def _read_body(self, response: IResponse, outcome: dict[str, Any]) -> Deferred[tuple[bytes, bool]]:
        status = response.code
        outcome["status"] = status
        outcome["code"] = status
        limit = self._max_response_bytes if 200 <= status < 300 else _ERROR_BODY_BYTES
        reader = _CappedBody(limit)
        response.deliverBody(reader)
        return reader.finished

    def _timed_out(self, result: object, timeout: float) -> None:
        raise _Timeout()

    def _answer(self, read: tuple[bytes, bool], outcome: dict[str, Any]) -> str:
        data, truncated = read
        status = outcome["code"]
        text = data.decode("utf-8", errors="replace")
        if not 200 <= status < 300:
            message = f"the function endpoint answered HTTP {status}"
            if 300 <= status < 400:
                message += " (redirects are not followed)"
            return _result("http_status", message, status=status, body=text[:_ERROR_BODY_CHARS])
        if truncated:
            outcome["status"] = "response_too_large"
            return _result(
                "response_too_large",
                f"the function endpoint answered with more than {self._max_response_bytes} bytes",
                limit=self._max_response_bytes,
            )
        return text

    def _failed(self, failure: Failure, outcome: dict[str, Any]) -> str:
        if failure.check(_Timeout):
            outcome["status"] = "timeout"
            return _result("timeout", f"the function endpoint did not answer within {self._timeout:g} s")
        if isinstance(_root_cause(failure), CancelledError):
            outcome["status"] = "cancelled"
            return _result("cancelled", "the function call was cancelled")
        outcome["status"] = "connection_failed"
        # The failure's type only: its text could quote the request.
        self._log.debug("function call failed: {kind}", kind=_failure_kind(failure))
        return _result(
            "connection_failed",
            f"the function endpoint could not be reached ({_failure_kind(failure)})",
        )

    def _unexpected(self, failure: Failure, outcome: dict[str, Any]) -> str:
        # A bug here must still leave the model with an answer (and the Deferred must not fail).
        outcome["status"] = "internal_error"
        self._log.error("function call: unexpected {kind}", kind=type(failure.value).__name__)
        return _result("internal_error", "the daemon could not complete the function call")

    def _refuse(self, name: str, method: str, host: str, started: float) -> str:
        self._log_call(name, method, host, "url_not_allowed", started)
        return _result("url_not_allowed", "the daemon is not allowed to call this function's URL")

    def _log_call(self, name: str, method: str, host: str, status: object, started: float) -> None:
        self._log.info(
            "function {name}: {method} {host} -> {status} in {elapsed} s",
            name=name,
            method=method,
            host=host,
            status=status,
            elapsed=round(self._reactor.seconds() - started, 3),
        )


class _Timeout(Exception):
    pass


def _root_cause(failure: Failure) -> BaseException:
    """The exception behind a request failure (ResponseNeverReceived / ResponseFailed wrap them)."""
    error: Any = failure.value
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    return error


def _failure_kind(failure: Failure) -> str:
    """A short, header-free name for why a request failed."""
    return type(_root_cause(failure)).__name__
