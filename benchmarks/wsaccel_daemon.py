"""The installed daemon with wsaccel's C masking in its frame path: a measurement for ``bench_load.py``.

The daemon's fast frame path (``openai_proxy.relay._FastFrames``) unmasks every client frame and
masks every upstream event in Python.  This starts the same ``twistd openai-proxy`` with that one
function replaced by ``wsaccel``'s C masker, and Autobahn's own masker and UTF-8 validator (used for
the frames outside the fast path) replaced by wsaccel's, so that the load benchmark shows what C
masking is worth::

    python benchmarks/bench_load.py --proxy-cmd \\
        'wsaccel={python} {here}/wsaccel_daemon.py -n --pidfile= openai-proxy --listen tcp:{port} ...'

(the arguments are ``twistd``'s) from an interpreter that has ``pip install wsaccel`` beside the
daemon.  ``wsaccel.patch_autobahn()`` itself no longer reaches Autobahn 24 and later, which import
these classes into ``autobahn.websocket.protocol``; they are replaced there.
"""

from __future__ import annotations

import sys

import autobahn.websocket.protocol as autobahn_protocol
from twisted.scripts.twistd import run
from wsaccel.utf8validator import Utf8Validator
from wsaccel.xormask import XorMaskerNull, XorMaskerSimple

from openai_proxy import relay


def _xor_mask(payload: bytes, key: bytes) -> bytes:
    return XorMaskerSimple(key).process(payload) if payload else payload


def main() -> None:
    relay._xor_mask = _xor_mask  # type: ignore[attr-defined]
    autobahn_protocol.Utf8Validator = Utf8Validator  # type: ignore[attr-defined,misc]
    autobahn_protocol.XorMaskerNull = XorMaskerNull  # type: ignore[attr-defined,misc]
    autobahn_protocol.create_xor_masker = lambda mask, length=None: XorMaskerSimple(mask)  # type: ignore[attr-defined]
    sys.argv[0] = "twistd"
    run()


if __name__ == "__main__":
    main()
