"""
``reuseport:PORT[:interface=ADDR][:backlog=N]``: a TCP server endpoint whose listening socket has
``SO_REUSEPORT`` set, so that several daemon processes can listen on the same address and port and
the kernel spreads new connections over them (Linux 3.9+, the BSDs).

The endpoint string parser is registered as a Twisted plugin (``twisted/plugins/openai_proxy_reuseport.py``),
so ``--listen reuseport:8080:interface=127.0.0.1`` works wherever Twisted endpoint strings do.  The
socket is created and bound here and handed to the reactor with ``IReactorSocket.adoptStreamPort``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IReactorSocket,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

#: The listen queue length when none is given (Twisted's TCP default).
DEFAULT_BACKLOG = 50


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    Listens on ``interface:port`` (``interface`` an IPv4 or IPv6 address; default all IPv4 addresses)
    with ``SO_REUSEADDR`` and ``SO_REUSEPORT`` set.

    ``listen`` fails with ``CannotListenError`` (like ``tcp:``; e.g. ``EADDRINUSE``) when another socket
    without ``SO_REUSEPORT``, or one owned by another user, holds the port.
    """

    def __init__(self, reactor: IReactorSocket, port: int, interface: str = "", backlog: int = DEFAULT_BACKLOG):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: Any) -> Any:
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        interface = self._interface or "0.0.0.0"
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((interface, self._port))
                sock.listen(self._backlog)
            except OSError as e:
                raise CannotListenError(interface, self._port, e) from None
            sock.setblocking(False)
            # The reactor duplicates the descriptor; this one is closed below either way.
            return self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """Parses ``reuseport:PORT[:interface=ADDR][:backlog=N]`` (IPv6 colons escaped as ``\\:``)."""

    prefix = "reuseport"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> IStreamServerEndpoint:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("reuseport: this system has no SO_REUSEPORT")
        if len(args) != 1:
            raise ValueError("reuseport: expected reuseport:PORT[:interface=ADDR][:backlog=N]")
        unknown = set(kwargs) - {"interface", "backlog"}
        if unknown:
            raise ValueError(f"reuseport: unknown argument {sorted(unknown)[0]!r}")
        port = int(str(args[0]))
        if not 0 <= port <= 65535:
            raise ValueError(f"reuseport: port {port} is out of range")
        backlog = int(str(kwargs.get("backlog", DEFAULT_BACKLOG)))
        if backlog <= 0:
            raise ValueError(f"reuseport: backlog must be > 0, got {backlog}")
        interface = str(kwargs.get("interface", ""))
        if interface:
            try:
                ipaddress.ip_address(interface)
            except ValueError:
                raise ValueError(f"reuseport: interface {interface!r} is not an IP address") from None
        return ReusePortEndpoint(reactor, port, interface, backlog)
