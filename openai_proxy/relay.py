"""
The network side: Autobahn protocols that turn WebSocket callbacks into :class:`~openai_proxy.session.Session`
inputs and carry out the session's outputs.

- :class:`ClientProtocol` serves one Deepgram v1 client.
- :class:`UpstreamLink` owns the OpenAI leg of that client: a Deferred gate holds events until the upstream
  socket is open, then they flow in order.  :class:`UpstreamProtocol` is its Autobahn client protocol.
- Backpressure (:class:`_Flow`): each leg's transport says when its write buffer backs up; a client that
  does not read pauses reading on both legs and is dropped after ``client_stall_timeout`` (close 1008
  ``CLIENT_NOT_READING``), an upstream that does not read pauses reading from the client and ends the
  session after as long (``UPSTREAM_TIMEOUT``).
- Every ``Error`` / ``Warning`` text and close reason leaving for a client is scrubbed of secrets, and the
  log records a client can cause at will are rate-limited per session.
- Continuity (SPEC §8): a client has a current link and, while the session moves the conversation to a
  new upstream session, a candidate link; links are numbered (``generation``) and what a link that is
  neither reports is dropped. ``SwapUpstream`` makes the candidate current in one reactor turn: the
  backpressure watch moves to it and the old link is closed.
"""

from __future__ import annotations

import hmac
import json
import random
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Any, cast
from urllib.parse import urlsplit

import numpy as np
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
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
from openai_proxy.metrics import KNOWN_CODES, SAMPLE_EVERY, Metrics, SessionMeter, bounded
from openai_proxy.telemetry import REDACTED, parse_trace_id, redact
from openai_proxy.translate import messages as m
from openai_proxy.writeturn import WriteTurn, sends_directly, write_turn
from openai_proxy.wsclose import cancel_close_handshake_timer

_log = Logger(namespace="openai_proxy")

#: The close reason (with code 1008) of a client dropped for leaving the daemon's output unread.
CLIENT_NOT_READING = "CLIENT_NOT_READING"

#: Seconds a closing client has to finish the closing handshake before its connection is dropped.
CLOSE_TIMEOUT = 2.0

#: Client-bound messages whose text may quote what a peer said (an upstream error message): their
#: strings are scrubbed of secrets on the way out.
_SCRUBBED_TYPES = frozenset({"Error", "Warning"})

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
class _WriteWatch:
    """
    Registered as the push producer of one leg's transport, so that the transport says when its write
    buffer backs up (``pauseProducing``: above Twisted's high-water mark, 64 KiB) and when it has drained
    (``resumeProducing``).  ``stopProducing`` does nothing: closes are the relay's business, so that the
    client still gets its ``Error`` when the upstream leaves.
    """

    def __init__(self, flow: _Flow, leg: str) -> None:
        self._flow = flow
        self._leg = leg

    def pauseProducing(self) -> None:
        self._flow.backed_up(self._leg, True)

    def resumeProducing(self) -> None:
        self._flow.backed_up(self._leg, False)

    def stopProducing(self) -> None:
        pass


class _Flow:
    """
    Backpressure of one session, both ways (SPEC §7: memory per session stays bounded whatever a peer does).

    - The client's output backs up (it does not read): reading pauses on **both** legs, the client's
      (nothing it sends can add work) and the upstream's (nothing more to forward).
    - The upstream's output backs up: reading from the client pauses.

    Reading resumes as soon as no backed-up output asks for the pause any more.  A leg whose output has
    stayed backed up for ``stall_timeout`` seconds is reported to ``on_stall(leg)``, once per backup.
    """

    def __init__(
        self, clock: IReactorTime, stall_timeout: float, on_stall: Callable[[str], None]
    ) -> None:
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._on_stall: Callable[[str], None] | None = on_stall
        self._transports: dict[str, Any] = {}
        self._backed_up = {"client": False, "upstream": False}
        self._paused = {"client": False, "upstream": False}
        self._stalls: dict[str, Any] = {}

    def attach(self, leg: str, transport: Any) -> None:
        """Watch ``transport``'s write buffer and let the flow pause its reading."""
        # Under twisted.web the taken-over transport still has the HTTP channel registered as its producer.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        previous = self._transports.get(leg)
        if previous is not None and previous is not transport:
            # A new connection takes the leg over (an upstream switch): it starts neither paused nor
            # backed up, and the previous one's stall timer goes.
            self._paused[leg] = False
            if self._backed_up[leg]:
                self._backed_up[leg] = False
                self._cancel_stall(leg)
        self._transports[leg] = transport
        transport.registerProducer(_WriteWatch(self, leg), True)
        self._apply()

    def detach(self) -> None:
        """The session is over: forget the transports and stop the stall timers (breaks the cycles)."""
        for leg in list(self._stalls):
            self._cancel_stall(leg)
        self._transports.clear()
        self._on_stall = None

    def is_paused(self, leg: str) -> bool:
        return self._paused[leg]

    def backed_up(self, leg: str, value: bool) -> None:
        if self._backed_up[leg] == value:
            return
        self._backed_up[leg] = value
        if value:
            self._stalls[leg] = self._clock.callLater(self._stall_timeout, self._stalled, leg)
        else:
            self._cancel_stall(leg)
        self._apply()

    def _apply(self) -> None:
        want = {
            "client": self._backed_up["client"] or self._backed_up["upstream"],
            "upstream": self._backed_up["client"],
        }
        for leg, transport in self._transports.items():
            if want[leg] == self._paused[leg]:
                continue
            self._paused[leg] = want[leg]
            if getattr(transport, "disconnected", False):
                continue
            if want[leg]:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def _cancel_stall(self, leg: str) -> None:
        call = self._stalls.pop(leg, None)
        if call is not None and call.active():
            call.cancel()

    def _stalled(self, leg: str) -> None:
        self._stalls.pop(leg, None)
        if self._on_stall is not None:
            self._on_stall(leg)


class _FaultLog:
    """
    Per-session rate limit on log records a peer can cause at will (its bad messages, the errors they
    earn): the first ``burst`` records of each ``interval`` seconds are written, the rest only counted,
    and the count is written as one summary record when the next interval begins (or the session ends).
    """

    def __init__(self, clock: IReactorTime, burst: int = 10, interval: float = 60.0) -> None:
        self._clock = clock
        self._burst = burst
        self._interval = interval
        self._window_start = -interval
        self._written = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """Whether the next record may be written; may write the summary of the previous interval."""
        now = self._clock.seconds()
        if now - self._window_start >= self._interval:
            self._window_start = now
            self._written = 0
        if self._written < self._burst:
            self._written += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """How many records were suppressed since the last call."""
        count, self.suppressed = self.suppressed, 0
        return count


def _release_autobahn(protocol: Any) -> None:
    """
    After ``connectionLost``: Autobahn resolves ``is_closed`` with the protocol itself (a reference
    cycle) and leaves its close handshake timer running after the connection is gone.
    """
    protocol.is_closed = defer.succeed(None)
    # Whatever was half received goes now, whoever still refers to the protocol.
    protocol.data = b""
    protocol.message_data = []
    cancel_close_handshake_timer(protocol)


def _no_delay(transport: Any) -> None:
    # Autobahn's tcpNoDelay option never reaches the socket (it is applied before the option is
    # copied onto the protocol); small frames must not wait for Nagle's algorithm.
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, NotImplementedError):
        pass


# -- the per-message fast path ----------------------------------------------------------------------

_STATE_OPEN = WebSocketProtocol.STATE_OPEN


#: From this many bytes on (an append of 20 ms of audio is about 1.4 KB) masking runs in numpy,
#: about twice as fast there as the integer XOR below; under it numpy's per-call cost eats the gain.
_NUMPY_MASK_BYTES = 1024


def _xor_mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3 masking (its own inverse): ``payload`` XOR ``key`` repeated."""
    n = len(payload)
    if not n:
        return payload
    if n >= _NUMPY_MASK_BYTES:
        # Whole 4-byte words, each XORed with the key read the same way (byte order cancels out).
        padded = payload + bytes(-n % 4)
        words = np.frombuffer(padded, dtype=np.uint32) ^ np.frombuffer(key, dtype=np.uint32)[0]
        return words.tobytes()[:n]
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def _frame_header(opcode_byte: int, length: int, mask_bit: int) -> bytes:
    if length < 126:
        return bytes((opcode_byte, mask_bit | length))
    if length < 65536:
        return bytes((opcode_byte, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((opcode_byte, mask_bit | 127)) + length.to_bytes(8, "big")


class _FastFrames:
    """
    A shorter per-message path through Autobahn for the frames a relay sees all the time.

    Autobahn parses each frame through a chain of callbacks, fires a ``message`` observer event (a
    Deferred per message) and formats debug log arguments for every read and write even when debug
    logging is off.  For a complete, unfragmented, uncompressed text or binary frame that is
    already in the buffer (the usual audio frame and JSON event), :meth:`processData` reads it in one
    step and hands it to ``onMessage``; :meth:`sendMessage` writes one final frame directly.  Anything
    else (control frames, fragments, frames split across reads, oversized or malformed frames, a
    closing connection) goes through Autobahn's own code, which applies every RFC 6455 check and
    fails the connection as it always does.  The fast path keeps the checks that matter to it: the
    masking direction, minimal length encoding, the size limits, and UTF-8 validity of text frames
    where ``utf8validateIncoming`` is on.  Autobahn's ``trafficStats`` are not updated for these
    frames (nothing in the daemon reads them).

    On a plain TCP transport the frames :meth:`sendMessage` writes wait for the end of the reactor
    turn (:mod:`openai_proxy.writeturn`); Autobahn's own writes and a graceful close send them first,
    an abort drops them.
    """

    # Attributes the mixin reads from Autobahn's protocol classes.
    data: bytes
    state: int
    current_frame: Any
    inside_message: bool
    maxFramePayloadSize: int
    maxMessagePayloadSize: int
    utf8validateIncoming: bool
    send_queue: Any
    autoFragmentSize: int
    _perMessageCompress: Any
    transport: Any
    message_data: Any
    autoPingTimeoutCall: Any
    autoPingRestartOnAnyTraffic: bool
    closeHandshakeTimeoutCall: Any
    #: The mask bit incoming frames must carry: 0x80 from clients, 0 from servers.
    _incoming_mask_bit = 0
    #: Whether frames this side sends are masked (a client's must be).
    _masks_outgoing = False

    #: Where fast-path frames wait for the end of the reactor turn (plain TCP transports only).
    _turn: WriteTurn | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[misc]
        # No Nagle delay, and frames through the reactor's write turn where the transport is plain TCP.
        _no_delay(self.transport)
        if sends_directly(self.transport):
            self._turn = write_turn(self.factory.reactor)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own writes (handshake, close, ping, pong, fragments) must not overtake the frames
        # queued in this turn.
        if self._turn is not None:
            self._turn.flush_transport(self.transport)
        super().sendData(data, sync, chopsize)  # type: ignore[misc]

    def _closeConnection(self, abort: bool = False) -> None:
        if self._turn is not None:
            if abort:
                self._turn.discard(self.transport)
            else:
                self._turn.flush_transport(self.transport)
        super()._closeConnection(abort)  # type: ignore[misc]

    def _connectionLost(self, reason: Any) -> None:
        if self._turn is not None:
            self._turn.discard(self.transport)
        # Autobahn leaves the closing-handshake timer running when the connection is lost before
        # the peer answered the close; it would keep the protocol alive until it fires.
        cancel_close_handshake_timer(self)
        super()._connectionLost(reason)  # type: ignore[misc]

    def _message_size_allowed(self, length: int) -> bool:
        if self.maxFramePayloadSize and length > self.maxFramePayloadSize:
            return False
        return not (self.maxMessagePayloadSize and length > self.maxMessagePayloadSize)

    def processData(self) -> bool:
        data = self.data
        n = len(data)
        if n < 2 or self.current_frame is not None or self.inside_message or self.state != _STATE_OPEN:
            return super().processData()  # type: ignore[misc,no-any-return]
        b0 = data[0]
        b1 = data[1]
        # FIN set, no RSV bits, text or binary opcode, masked as this direction requires.
        if b0 not in (0x81, 0x82) or b1 & 0x80 != self._incoming_mask_bit:
            return super().processData()  # type: ignore[misc,no-any-return]
        length = b1 & 0x7F
        start = 2
        if length == 126:
            if n < 4:
                return False
            length = (data[2] << 8) | data[3]
            if length < 126:
                return super().processData()  # type: ignore[misc,no-any-return]
            start = 4
        elif length == 127:
            return super().processData()  # type: ignore[misc,no-any-return]
        key = b""
        if b1 & 0x80:
            key = data[start : start + 4]
            start += 4
        end = start + length
        if n < end or not self._message_size_allowed(length):
            return super().processData()  # type: ignore[misc,no-any-return]
        payload = data[start:end]
        if key:
            payload = _xor_mask(payload, key)
        if b0 == 0x81 and self.utf8validateIncoming:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                # Autobahn's own path fails the connection with 1007.
                return super().processData()  # type: ignore[misc,no-any-return]
        self.data = data[end:]
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            # As Autobahn does at the end of a data frame: traffic is as good as a pong.
            self._cancelAutoPingTimeoutCall()  # type: ignore[attr-defined]
        self._onMessage(payload, b0 == 0x82)  # type: ignore[attr-defined]
        return len(self.data) > 0

    def onMessageEnd(self) -> None:
        # Autobahn's version also fires a "message" observer event (a Deferred per message); the
        # daemon has no observers.
        if not self.failedByMe:  # type: ignore[attr-defined]
            payload = b"".join(self.message_data)
            self._onMessage(payload, self.message_is_binary)  # type: ignore[attr-defined]
        self.message_data = None

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        if (
            fragmentSize is None
            and not sync
            and self.state == _STATE_OPEN
            and self._perMessageCompress is None
            and not self.autoFragmentSize
            and not self.send_queue
        ):
            opcode = 0x82 if isBinary else 0x81
            if self._masks_outgoing:
                key = random.getrandbits(32).to_bytes(4, "little")
                frame = _frame_header(opcode, len(payload), 0x80) + key + _xor_mask(payload, key)
            else:
                frame = _frame_header(opcode, len(payload), 0) + payload
            if self._turn is not None:
                self._turn.write(self.transport, frame)
            else:
                self.transport.write(frame)
            return
        super().sendMessage(  # type: ignore[misc]
            payload, isBinary, fragmentSize=fragmentSize, sync=sync, doNotCompress=doNotCompress
        )


# -- upstream ---------------------------------------------------------------------------------------


class UpstreamProtocol(_FastFrames, WebSocketClientProtocol):  # type: ignore[misc]
    """The OpenAI Realtime leg of one session."""

    link: UpstreamLink
    _masks_outgoing = True

    def connectionMade(self) -> None:
        super().connectionMade()
        self._lost_reason: Failure | None = None

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost_reason = reason
        try:
            super().connectionLost(reason)
        finally:
            _release_autobahn(self)

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
        #: The client's protocol, until the link is closed (then nothing here holds the session).
        self._owner: ClientProtocol | None = owner
        self._log_fields = owner.log_fields
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
            self._report(lambda session: session.upstream_timed_out(self.generation))
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
            **self._log_fields,
        )
        if not self._closed:
            self._closed = True
            self._report(lambda session: session.upstream_unreachable(self.generation))

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
        owner = self._owner
        if owner is not None:
            owner.factory.registry.metrics.upstream_message(event)
            if owner.factory.debug:
                owner.log_message("daemon->upstream", event)
        self._protocol.sendMessage(m.encode_event(event))

    def _flush_gate(self, protocol: UpstreamProtocol) -> None:
        while self._queue and not self._closed:
            self._write(self._queue.popleft())

    def opened(self, protocol: UpstreamProtocol) -> None:
        self._cancel_timeout()
        owner = self._owner
        if self._closed or owner is None:
            protocol.dropConnection(abort=True)
            return
        self._protocol = protocol
        if owner.is_current(self):
            self.glue()
        owner.upstream_opened(self)
        self.gate.callback(protocol)

    def glue(self) -> None:
        """Make this link's socket the session's upstream leg for backpressure (:class:`_Flow`)."""
        owner = self._owner
        if (owner is not None and owner.flow is not None and self._protocol is not None
                and self._protocol.transport is not None):
            owner.flow.attach("upstream", self._protocol.transport)

    def unglue(self) -> None:
        """This link's socket stops taking part in backpressure (the next link's takes over)."""
        transport: Any = self._protocol.transport if self._protocol is not None else None
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    def event(self, event: dict[str, Any]) -> None:
        if not self._closed and self._owner is not None:
            self._owner.upstream_event(self, event)

    def protocol_problem(self, description: str) -> None:
        _log.warn(
            "upstream protocol problem: {problem}",
            problem=description,
            **self._log_fields,
        )

    def closed(
        self, code: int | None, reason: str | None, status: int | None, lost: Failure | None
    ) -> None:
        self._cancel_timeout()
        self._connector = None  # its result is the protocol, which holds this link
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        was_open = self._protocol is not None
        self._protocol = None
        if not self.gate.called:
            self.gate.errback(Failure(internet_error.ConnectionClosed()))
        # When the daemon closed it (the client left), the client's close line already tells the story.
        (_log.debug if self._closed else _log.info)(
            "upstream closed {close_code} {close_reason} (http status {http_status})",
            close_code=code,
            close_reason=reason or "",
            http_status=status,
            direction="upstream",
            **self._log_fields,
        )
        if self._closed:
            return
        self._closed = True
        if self._owner is not None:
            self._owner.upstream_closed(self, s.UpstreamClosure(
                was_open=was_open,
                close_code=code,
                http_status=status,
                tls_failed=lost is not None and lost.check(SSL.Error) is not None,
            ))

    def _notify_failed(self, code: str, description: str) -> None:
        if self._owner is not None:
            self._owner.upstream_failed(self, code, description)

    def _report(self, report: Callable[[s.Session], list[s.Output]]) -> None:
        if self._owner is not None:
            self._owner.upstream_report(self, report)

    def _fail(self, code: str, description: str) -> None:
        if not self._closed:
            self._closed = True
            self._notify_failed(code, description)

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
        if not self.gate.called:
            # Its callbacks hold the link: fire it so that nothing keeps the two alive.
            self.gate.errback(Failure(internet_error.ConnectionClosed()))
        # The upstream's connection objects may outlive the session until a collection (Twisted's
        # connector and transport refer to each other): they must not keep the session alive.
        self._owner = None


def _abort(protocol: UpstreamProtocol) -> None:
    transport: Any = protocol.transport
    if transport is not None and getattr(transport, "connected", False):
        if protocol._turn is not None:
            protocol._turn.discard(transport)
        transport.abortConnection()


class _UpstreamFactory(WebSocketClientFactory):
    """The factory of one upstream connection: its protocol belongs to ``link``."""

    protocol = UpstreamProtocol

    def __init__(self, link: UpstreamLink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link = link

    def buildProtocol(self, addr: Any) -> UpstreamProtocol:
        protocol = cast(UpstreamProtocol, super().buildProtocol(addr))
        protocol.link = self.link
        return protocol


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
        headers = self.config.upstream_headers()
        factory = _UpstreamFactory(link, url, headers=headers, reactor=self.reactor)
        # One factory per session: its "Starting factory" / "Stopping factory" lines are noise.
        factory.noisy = False
        ping = self.config.limits.upstream_ping_interval
        factory.setProtocolOptions(
            # The link's own timer (same limit, started earlier) reports UPSTREAM_TIMEOUT first.
            openHandshakeTimeout=self.config.limits.handshake_timeout * 2,
            # An upstream that stops answering pings (a dead path) is dropped, then reconnected.
            autoPingInterval=ping or 0,
            autoPingTimeout=ping * 2 if ping else 0,
            # No Autobahn close-handshake timer: UpstreamLink.close aborts a slow upstream itself after 1 s,
            # with a timer it cancels when the socket closes (Autobahn's batched timers outlive a cancel).
            closeHandshakeTimeout=0,
            # Upstream events (session.updated with long instructions, audio deltas) can be large.
            maxMessagePayloadSize=16 * 1024 * 1024,
            maxFramePayloadSize=16 * 1024 * 1024,
            # The upstream is trusted and its events go through json.loads, which refuses bad
            # UTF-8 anyway (UPSTREAM protocol problem); no second pass over every delta.
            utf8validateIncoming=False,
        )

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


def _credential(request: ConnectionRequest, query_token: bool = True) -> tuple[str | None, str | None]:
    """
    The client's token and the subprotocol to answer with, first found of: ``Authorization: Token|Bearer
    <t>``, ``Sec-WebSocket-Protocol: token|bearer, <t>`` (browsers), the ``token`` query parameter (the
    React component's proxy mode; only when ``query_token``).  SPEC §7.
    """
    header = request.headers.get("authorization")
    if isinstance(header, str):
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip(), None
    protocols = [p.strip() for p in (request.protocols or [])]
    if len(protocols) >= 2 and protocols[0].lower() in ("token", "bearer"):
        return protocols[1], protocols[0]
    if query_token:
        return _query_token(request), None
    return None, None


def _query_token(request: ConnectionRequest) -> str | None:
    """The ``token`` query parameter (its first non-empty value), or None."""
    values = (request.params or {}).get("token") or []
    return next((v.strip() for v in values if isinstance(v, str) and v.strip()), None)


def _refusal_reason(request: ConnectionRequest, query_token: bool) -> str:
    if not query_token and _query_token(request) is not None:
        return "tokens in the URL are not accepted here; use the Authorization header or the subprotocol"
    return "a valid token is required"


def token_matches(presented: str | None, tokens: frozenset[str]) -> bool:
    """Constant-time comparison against every configured token."""
    if presented is None:
        return False
    candidate = presented.encode("utf-8")
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token.encode("utf-8"))
    return matched


class ClientProtocol(_FastFrames, WebSocketServerProtocol):  # type: ignore[misc]
    """One Deepgram v1 client."""

    _incoming_mask_bit = 0x80

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
        self.flow: _Flow | None = None
        self._faults: _FaultLog | None = None
        self._stall_abort: Any = None
        self._meter: SessionMeter  # set with the session, in onOpen

    def connectionMade(self) -> None:
        super().connectionMade()
        clock = self.factory.clock
        self._faults = _FaultLog(clock)
        self.flow = _Flow(clock, self.factory.config.limits.client_stall_timeout, self._stalled)
        self.flow.attach("client", self.transport)

    def connectionLost(self, reason: Failure = internet_error.ConnectionDone) -> None:  # type: ignore[assignment]
        try:
            super().connectionLost(reason)
        finally:
            self._release()

    def _release(self) -> None:
        """
        Break the references between this protocol, its flow, its link and its timers, so that the
        session's memory goes with the reference counts, without waiting for a full collection.
        """
        if self.flow is not None:
            self.flow.detach()
        _release_autobahn(self)
        if self._stall_abort is not None and self._stall_abort.active():
            self._stall_abort.cancel()
        self._stall_abort = None
        self._close_links()
        self._upstream = None
        self._candidate = None

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
            subprotocol = self._accept(request)
        except ConnectionDeny as e:
            self.factory.registry.record_handshake(e.code)
            raise
        except Exception:
            # Autobahn would turn this into a bare HTTP 500 and the reason would vanish.
            _log.failure("accepting a client failed")
            self.factory.registry.record_handshake(500)
            raise ConnectionDeny(500, "internal error") from None
        self.factory.registry.record_handshake(None)
        return subprotocol

    def _accept(self, request: ConnectionRequest) -> str | None:
        registry = self.factory.registry
        if registry.draining:
            raise ConnectionDeny(503, "the server is shutting down")
        if len(registry) >= self.factory.config.limits.max_sessions:
            raise ConnectionDeny(503, "too many sessions")
        token, subprotocol = _credential(request, self.factory.config.query_token)
        tokens = self.factory.config.client_tokens
        if tokens and not token_matches(token, tokens):
            raise ConnectionDeny(401, _refusal_reason(request, self.factory.config.query_token))
        query_trace = request.params.get("traceId", [None])[0] if request.params else None
        self.trace_id = parse_trace_id(query_trace, request.headers.get("traceparent"))
        if subprotocol is None:
            offered = [p.strip() for p in (request.protocols or [])]
            subprotocol = next((p for p in offered if p.lower() in ("token", "bearer")), None)
        return subprotocol

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """
        Refuse the upgrade with an HTTP error, logged as one line: ``client refused (HTTP <code>):
        <reason>`` (Autobahn's own two lines per refusal are left out).
        """
        level = _log.warn if code == 503 and not self.factory.registry.draining else _log.info
        level("client refused (HTTP {http_status}): {reason}", http_status=code, reason=reason,
              peer=self.peer)
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        # A refusal is a complete HTTP exchange, not an unclean WebSocket close.
        self.wasClean = True
        self.dropConnection(abort=False)

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
        self._meter = self.factory.registry.metrics.session_meter()
        self._meter.session = self.session
        self.factory.registry.add(self)
        _log.info("client connected from {peer}", peer=self.peer, **self.log_fields)
        self._carry_out(self.session.start())

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is None or self._gone:
            return
        meter = self._meter
        if isBinary:
            meter.audio_in_bytes += len(payload)
        meter.frames_in += 1
        try:
            if meter.frames_in % SAMPLE_EVERY:
                self._handle_client_message(payload, isBinary)
            else:
                meter.time("client_to_upstream", self._handle_client_message, payload, isBinary)
        except Exception:
            self._internal_error()

    def _handle_client_message(self, payload: bytes, isBinary: bool) -> None:
        assert self.session is not None
        if isBinary:
            outputs = self.session.client_binary(payload)
        else:
            # Autobahn has already validated the UTF-8 of text frames (1007 otherwise).
            text = payload.decode("utf-8", "replace")
            # Client text messages are few (audio is binary): peeking at the type is cheap enough.
            message_type = _peek_type(text)
            self._meter.client_message(message_type)
            if self.factory.debug:
                self.log_message("client->daemon", message_type)
            outputs = self.session.client_text(text)
        self._carry_out(outputs)

    def _internal_error(self) -> None:
        """A bug met one input: log it, tell the client, and keep the session (and the process) going."""
        if self._faults is None or self._faults.allow():
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
        self._meter.finish()
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        for call in list(self._function_calls):
            call.cancel()
        self._close_links()
        self._summarise_faults()
        self.factory.registry.remove(self)

    def _summarise_faults(self) -> None:
        if self._faults is not None:
            count = self._faults.take_suppressed()
            if count:
                _log.info(
                    "{count} more client fault records of this session were not written",
                    count=count,
                    **self.log_fields,
                )

    def _stalled(self, leg: str) -> None:
        if leg == "client":
            self._not_reading()
        elif not self._gone:
            # The upstream has left the daemon's output unread as long: the session cannot go on.
            _log.warn(
                "upstream not reading for {seconds} s; ending the session",
                seconds=self.factory.config.limits.client_stall_timeout,
                **self.log_fields,
            )
            if self._upstream is not None:
                self.upstream_failed(self._upstream, errors.UPSTREAM_TIMEOUT, "the upstream stopped reading")

    def _not_reading(self) -> None:
        """The client left the daemon's output unread for ``client_stall_timeout``: drop it."""
        if self._gone or self.transport is None:
            return
        limits = self.factory.config.limits
        _log.warn(
            "client not reading for {seconds} s; dropping it",
            seconds=limits.client_stall_timeout,
            error_code=CLIENT_NOT_READING,
            **self.log_fields,
        )
        # The close frame waits behind the unread output: a client that reads again within the close
        # timeout sees it, any other is cut off.
        self.close_with(1008, CLIENT_NOT_READING)
        self._stall_abort = self.factory.clock.callLater(CLOSE_TIMEOUT, self._abort_stalled)

    def _abort_stalled(self) -> None:
        self._stall_abort = None
        if self.transport is not None:
            self.dropConnection(abort=True)

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
        if self.factory.debug:
            self.log_message("upstream->daemon", event)
        meter = self._meter
        meter.upstream_event(event, self.factory.reactor.seconds)
        meter.events_in += 1
        # (The session logs upstream error events at the default level.)
        generation = link.generation
        try:
            if meter.events_in % SAMPLE_EVERY:
                self._carry_out(self.session.upstream_event(event, generation))
            else:
                meter.time("upstream_to_client", self._upstream_event, event, generation)
        except Exception:
            self._internal_error()

    def _upstream_event(self, event: dict[str, Any], generation: int) -> None:
        assert self.session is not None
        self._carry_out(self.session.upstream_event(event, generation))

    def upstream_failed(self, link: UpstreamLink, code: str, description: str) -> None:
        if self._live(link):
            assert self.session is not None
            self.factory.registry.metrics.upstream_error(code)
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
        # The flow forgets the old socket's backed-up output and decides again whether the client's
        # reading stays paused.
        new.glue()

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
                message = output.message
                if message.get("type") in _SCRUBBED_TYPES:
                    message = self.factory.scrub_message(message)
                self.factory.registry.count_client_message(message)
                if self.state == self.STATE_OPEN:
                    self.log_message("daemon->client", message)
                    self.sendMessage(json.dumps(message, allow_nan=False).encode("utf-8"),
                                     isBinary=False)
            elif isinstance(output, s.SendClientAudio):
                self._meter.audio_out_bytes += len(output.data)
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
                if "error_code" in output.fields and self._faults is not None:
                    # Records a peer can cause at will (its errors) are rate-limited per session.
                    if not self._faults.allow():
                        continue
                    self._summarise_faults()
                _level(output.level)(output.format, **self.log_fields, **output.fields)

    def _call_function(self, call: s.CallFunction) -> None:
        caller = self.factory.function_caller
        if caller is None:
            # Settings refuse endpoints when no prefix is configured; this guards the contract.
            result: defer.Deferred[str] = defer.succeed(FUNCTIONS_DISABLED_RESULT)
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
            reason = self.factory.scrub(reason)
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

    def __init__(self, clock: IReactorTime, grace: float, metrics: Metrics | None = None) -> None:
        self._clock = clock
        self._grace = grace
        self._sessions: set[ClientProtocol] = set()
        self.draining = False
        #: The process's instruments (``/metrics``, OTLP); a private set when none is given.
        self.metrics = metrics if metrics is not None else Metrics(environ={})
        self.metrics.observe_registry(lambda: len(self._sessions), lambda: self.draining)
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
        self.metrics.client_message(message)
        if message.get("type") in ("Error", "Warning"):
            code = bounded(message.get("code"), KNOWN_CODES)
            self.client_errors[(message["type"], code)] += 1

    def record_handshake(self, status: int | None) -> None:
        """Count an opening handshake: ``None`` when accepted, else the HTTP status it was refused with."""
        self.metrics.handshake(status)

    def count_continuity(self, name: str, amount: int = 1) -> None:
        """Add to one of :attr:`continuity`'s counters, and to the metrics."""
        self.continuity[name] += amount
        self.metrics.continuity(name, amount)

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


#: The result a server-side function call gets when no ``--function-url-prefix`` is configured.
FUNCTIONS_DISABLED_RESULT = '{"error": "disabled", "message": "server-side functions are not enabled"}'


def session_options(config: Config) -> s.SessionOptions:
    """What every session of a daemon configured by ``config`` needs from it."""
    return s.SessionOptions(
        default_model=config.model,
        model_allowed=config.model_allowed,
        default_voice=config.voice,
        transcription_model=config.transcription_model,
        audio_buffer_seconds=config.limits.audio_buffer_seconds,
        function_call_timeout=config.limits.function_call_timeout,
        function_url_prefixes=config.function_url_prefixes,
        rollover_after=config.rollover_after,
    )


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
        #: The clock of the per-connection deadlines (the stall timer); tests replace it.
        self.clock: IReactorTime = cast(IReactorTime, reactor)
        self.debug = config.log_level == "debug"
        self._secrets = _secrets_of(config)
        self.session_options = session_options(config)
        limits = config.limits
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_bytes,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=CLOSE_TIMEOUT,
            # Refuse oversized messages with a close frame (1009) rather than a bare TCP drop.
            failByDrop=False,
            autoPingInterval=limits.ping_interval or 0,
            autoPingTimeout=limits.ping_interval * 2 if limits.ping_interval else 0,
            # Browsers on file:// send Origin: null; this call resets the flag, so set it here.
            allowNullOrigin=True,
        )

    def scrub(self, text: str) -> str:
        """``text`` with every credential masked: the configured key and client tokens, and anything the
        log's masking recognises (OpenAI keys, ``Authorization`` values, bearer tokens, JWTs)."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return redact(text)

    def scrub_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """A copy of a client-bound message with its top-level strings scrubbed (see :meth:`scrub`)."""
        return {
            key: self.scrub(value) if isinstance(value, str) else value for key, value in message.items()
        }


#: Configured secrets shorter than this are not masked literally (a one-letter token would garble every
#: text); the log's pattern masking still applies.
_MIN_LITERAL_SECRET = 6


def _secrets_of(config: Config) -> tuple[str, ...]:
    secrets = [config.api_key or "", *config.client_tokens]
    # Longest first, so that a token contained in another is not masked half.
    return tuple(sorted((x for x in secrets if len(x) >= _MIN_LITERAL_SECRET), key=len, reverse=True))
