"""
Releasing Autobahn's closing-handshake timer when a connection is lost.

Autobahn arms ``closeHandshakeTimeoutCall`` (on the factory's txaio batched timer, a reactor
``DelayedCall`` shared by every connection of that factory) when a side sends a close frame, and cancels
it only when the peer's close frame arrives.  A connection lost before that (an aborted peer, a dropped
TCP connection) leaves the timer pending for up to ``closeHandshakeTimeout`` seconds after the
protocol is gone, holding the protocol alive and leaving a live reactor call behind.
"""

from __future__ import annotations

from typing import Any


def cancel_close_handshake_timer(protocol: Any) -> None:
    """Cancel ``protocol``'s pending closing-handshake timer, if any (idempotent)."""
    call = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if call is not None:
        call.cancel()
        protocol.closeHandshakeTimeoutCall = None
