"""``python -m openai_proxy.simulator``: the simulated OpenAI Realtime API as its own process.

Point the daemon at it with ``--upstream-url ws://127.0.0.1:PORT/v1/realtime``::

    python -m openai_proxy.simulator --listen tcp:8765:interface=127.0.0.1 --api-key sk-test \\
        --record received.jsonl

It prints ``listening on ws://HOST:PORT/v1/realtime`` once ready (and writes the port number to
``--port-file``, which appears complete, never half-written). ``--record`` appends every client event
it receives as one JSON line ``{"session": ID, "event": {...}}``, flushed per line, so another process
can check what reached the upstream. ``--tls-key`` and ``--tls-cert`` serve ``wss://`` instead.
SIGTERM or Ctrl-C stops it.

Faults, to test what a client does when the upstream goes away (see docs/reliability.md)::

    python -m openai_proxy.simulator --expire-after 20 --drop-after 7 \
        --drop event=response.output_audio.delta,nth=3,close=1011,session=2

``--expire-after SECONDS`` ends every session like the real API does at 60 minutes (``error``
``session_expired``, then close 1001). ``--drop RULE`` (repeatable) drops connections at a chosen
point (:mod:`openai_proxy.simulator.faults` has the syntax); ``--drop-after SECONDS`` is short for
``--drop after=SECONDS`` (a TCP abort that many seconds into every session).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.tls import TLSMemoryBIOFactory

from .faults import DropRule, FaultSpecError, parse_drop_rule
from .server import SimulatorFactory


class _RecordingList(list[tuple[str, dict[str, Any]]]):
    """The factory's ``received`` list that also appends each event to a JSON-lines file."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def append(self, entry: tuple[str, dict[str, Any]]) -> None:
        session_id, event = entry
        self._stream.write(json.dumps({"session": session_id, "event": event}) + "\n")
        self._stream.flush()
        # Only the file is the record: a long run must not grow in memory.


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m openai_proxy.simulator",
        description="Serve the strict simulated OpenAI Realtime (GA) API.",
    )
    parser.add_argument("--listen", default="tcp:0:interface=127.0.0.1",
                        help="Twisted server endpoint (default: a free loopback port)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: any)")
    parser.add_argument("--record", metavar="FILE", help="append every received event to FILE (JSON lines)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for wss://")
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate (chain) for wss://")
    parser.add_argument("--port-file", metavar="FILE", help="write the bound port number to FILE")
    parser.add_argument("--quiet", action="store_true", help="do not log to stderr")
    parser.add_argument("--azure", action="store_true",
                        help="speak Azure OpenAI's shape: /openai/v1/realtime?model=DEPLOYMENT, "
                             "'api-key: KEY' header (or --entra-token)")
    parser.add_argument("--entra-token", help="with --azure: accept 'Authorization: Bearer TOKEN'")
    parser.add_argument("--expire-after", metavar="SECONDS", type=float, default=3600.0,
                        help="end every session with session_expired after SECONDS (default 3600)")
    parser.add_argument("--drop", metavar="RULE", action="append", default=[],
                        help="drop connections: after=S | event=TYPE[,nth=K] "
                             "[,close=abort|hang|CODE][,session=N|,every=N] (repeatable)")
    parser.add_argument("--drop-after", metavar="SECONDS", action="append", default=[],
                        help="short for --drop after=SECONDS (repeatable)")
    options = parser.parse_args(argv)
    if bool(options.tls_key) != bool(options.tls_cert):
        parser.error("--tls-key and --tls-cert go together")
    if not (options.expire_after > 0 and options.expire_after < float("inf")):
        parser.error(f"--expire-after: must be a number of seconds > 0, got {options.expire_after}")
    drops: list[DropRule] = []
    for option, specs in (("--drop", options.drop),
                          ("--drop-after", [f"after={s}" for s in options.drop_after])):
        for spec in specs:
            try:
                drops.append(parse_drop_rule(spec))
            except FaultSpecError as e:
                parser.error(f"{option}: {e}")
    options.drops = tuple(drops)
    return options


def _write_port_file(path: str, port: int) -> None:
    # Written aside and renamed, so that a reader polling for the file never sees it half-written.
    partial = f"{path}.partial"
    with open(partial, "w", encoding="ascii") as f:
        f.write(f"{port}\n")
    os.replace(partial, path)


async def _serve(reactor: Any, options: argparse.Namespace) -> None:
    if not options.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    factory = SimulatorFactory(reactor, api_key=options.api_key,
                               record_received=options.record is not None,
                               azure=options.azure, entra_token=options.entra_token,
                               max_session_seconds=options.expire_after, drops=options.drops)
    if options.record:
        factory.received = _RecordingList(open(options.record, "a", encoding="utf-8"))
    served: Any = factory
    scheme = "ws"
    if options.tls_cert:
        with open(options.tls_key, encoding="ascii") as k, open(options.tls_cert, encoding="ascii") as c:
            certificate = PrivateCertificate.loadPEM(k.read() + c.read())
        served = TLSMemoryBIOFactory(certificate.options(), False, factory)
        scheme = "wss"
    port = await serverFromString(reactor, options.listen).listen(served)
    address = port.getHost()
    host = getattr(address, "host", "127.0.0.1")
    number = getattr(address, "port", 0)
    path = "/openai/v1/realtime" if options.azure else "/v1/realtime"
    print(f"listening on {scheme}://{host}:{number}{path}", flush=True)
    if options.port_file:
        _write_port_file(options.port_file, number)
    await Deferred()  # until the reactor stops (SIGTERM, Ctrl-C)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the simulator until it is stopped."""
    from twisted.internet import task

    options = _parse(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: _serve(reactor, options))


if __name__ == "__main__":
    main()
