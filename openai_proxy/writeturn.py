"""
WebSocket frames written during one reactor turn leave together at the start of the next.

Twisted's ``transport.write`` buffers the data and registers the socket for writability
(``epoll_ctl``); the next poll reports it writable, ``doWrite`` sends, and the socket is unregistered
again (``epoll_ctl``).  For a relay that writes one small frame per message on sockets that are
almost always writable, that is two system calls and a reactor dispatch per message.

:class:`WriteTurn` keeps the frames each connection is given during a turn and sends them with one
``send()`` per connection from a ``callLater(0)``, which the reactor runs before it polls again: the
same turn boundary as Twisted's own write path, so no frame waits longer than it did, and frames for one
connection still leave in one burst.  A transport that already has data buffered, is closing, is not
plain TCP, or whose socket does not take everything, gets the (rest of the) data through
``transport.write``, in order, so Twisted's buffering and producer (backpressure) rules apply unchanged
from there on.

Performance figures: ``docs/performance.md``.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime

#: Transports whose socket the turn may write to directly: Twisted's plain TCP connections (what
#: ``tcp:``, ``reuseport:``, systemd's sockets and ``HostnameEndpoint`` give).  TLS connections keep
#: their own write path.
_DIRECT = (tcp.Server, tcp.Client)


def sends_directly(transport: Any) -> bool:
    """Whether frames for ``transport`` go through a :class:`WriteTurn` (plain TCP, no TLS)."""
    return type(transport) in _DIRECT and not transport.TLS


def _send(transport: Any, chunks: list[bytes]) -> None:
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if (
        transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and not transport.dataBuffer
    ):
        # Nothing queued in Twisted's buffer, so nothing can be overtaken.  ``writeSomeData`` returns
        # the bytes the socket took (0 on EWOULDBLOCK) or an exception when the connection is gone.
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
    # The rest, or all of it, goes the usual way; a dead connection is found there and closed.
    transport.write(data)


class WriteTurn:
    """
    The frames written to plain TCP transports during the current reactor turn.

    :meth:`write` never sends at once; :meth:`flush_transport` must be called before anything else is
    written to the same transport (a close frame, a ping) or it is closed, so that nothing overtakes
    the frames queued here.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: dict[Any, list[bytes]] = {}
        self._call: Any = None

    def write(self, transport: Any, data: bytes) -> None:
        """Queue ``data`` (bytes) for ``transport``; it leaves at the start of the next reactor turn."""
        chunks = self._pending.get(transport)
        if chunks is None:
            self._pending[transport] = [data]
            if self._call is None:
                self._call = self._clock.callLater(0, self.flush)
        else:
            chunks.append(data)

    def flush_transport(self, transport: Any) -> None:
        """Send what is queued for ``transport`` now, before something else is written to it."""
        chunks = self._pending.pop(transport, None)
        if chunks:
            _send(transport, chunks)

    def discard(self, transport: Any) -> None:
        """Forget what is queued for ``transport`` (its connection is lost or aborted)."""
        self._pending.pop(transport, None)

    def pending(self, transport: Any) -> int:
        """Bytes queued for ``transport``."""
        return sum(len(chunk) for chunk in self._pending.get(transport, ()))

    def flush(self) -> None:
        """Send everything queued (run from the reactor at the start of a turn)."""
        self._call = None
        pending = self._pending
        self._pending = {}
        for transport, chunks in pending.items():
            _send(transport, chunks)


_turns: WeakKeyDictionary[Any, WriteTurn] = WeakKeyDictionary()


def write_turn(reactor: IReactorTime) -> WriteTurn:
    """The :class:`WriteTurn` of ``reactor`` (one per reactor)."""
    turn = _turns.get(reactor)
    if turn is None:
        turn = _turns[reactor] = WriteTurn(reactor)
    return turn
