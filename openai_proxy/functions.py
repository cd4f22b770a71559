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

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlencode

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from openai_proxy import __version__
from openai_proxy.endpoint import (  # noqa: F401  (re-exported: the policy lives in endpoint)
    _BODY_METHODS,
    _ERROR_BODY_BYTES,
    _ERROR_BODY_CHARS,
    METHODS,
    Endpoint,
    EndpointError,
    _as_sent,
    _BadURL,
    _inside,
    _parse_url,
    check_prefix,
    parse_endpoint,
    url_allowed,
)

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
