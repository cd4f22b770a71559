"""
The browser demo page (``GET /demo``, see docs/simulator.md): static files shipped as package data and
served from memory with fixed content types.

- ``/demo`` and ``/demo/`` — the page (``index.html``);
- ``/demo/demo.js``, ``/demo/mic-worklet.js``, ``/demo/demo.css`` — its script, microphone worklet and
  style;
- anything else under ``/demo/`` — 404.
"""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request

#: File name → content type.  Nothing else in the package is served.
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "demo.js": b"text/javascript; charset=utf-8",
    "mic-worklet.js": b"text/javascript; charset=utf-8",
    "demo.css": b"text/css; charset=utf-8",
}

# The page talks to this host only: its WebSocket, its own script and worklet.
_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
    b"media-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _File(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self._body = body
        self._content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self._body

    def render_HEAD(self, request: Request) -> bytes:
        self.render_GET(request)
        return b""


class DemoResource(Resource):
    """``/demo``: the page at the resource itself, its assets as children.

    @raise FileNotFoundError: the package was installed without its data files.
    """

    def __init__(self) -> None:
        super().__init__()
        package = resources.files(__name__)
        self._files = {
            name: _File(package.joinpath(name).read_bytes(), content_type)
            for name, content_type in FILES.items()
        }

    def getChild(self, path: bytes, request: Request) -> Resource:
        name = path.decode("utf-8", "replace")
        if name == "":
            return self._files["index.html"]
        if name in self._files and not request.postpath:
            return self._files[name]
        return NoResource()

    def render_GET(self, request: Request) -> bytes:
        return self._files["index.html"].render_GET(request)

    def render_HEAD(self, request: Request) -> bytes:
        return self._files["index.html"].render_HEAD(request)
