"""
Real browsers against the installed daemon on its simulator: headless Chromium (Debian's ``chromium``,
driven by Playwright for Python through ``executable_path``, no browser download), its fake microphone
fed a WAV file of speech the simulator understands.

- the official ``@deepgram/sdk`` browser agent client (bundled here from the npm registry with esbuild,
  into a cache directory outside the repository): a text turn and a spoken turn, authenticated through
  the subprotocol, the agent's audio really played (a Web Audio analyser hears it);
- the wire behaviour of the ``deepgram-voice-interaction-react`` component in proxy mode: path
  ``/openai``, ``?service=agent&token=…``, the test app's ``?traceId=<uuid>``;
- the daemon's own demo page at ``/demo``: press Talk, the fake microphone speaks, the transcript shows
  both sides and the agent is heard.

Without Chromium, npm or Playwright the tests are skipped with the reason, except under CI (``CI`` set),
where ``.ci/run`` installs them and their absence is a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any

from twisted.trial.unittest import FailTest, SkipTest

from openai_proxy.simulator.speak import speech_wav

from .support import SystemTestCase

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "browser")
CHROMIUM = os.environ.get("OPENAI_PROXY_CHROMIUM", "/usr/bin/chromium")
#: Where the npm packages are installed (outside the repository).
NPM_CACHE = os.environ.get(
    "OPENAI_PROXY_NPM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "openai-proxy-browser-test"))
NPM_PACKAGES = {"@deepgram/sdk": "5.13.0", "esbuild": "0.28.2"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]
TOKEN = "browser-token-3f9c2a7e51"
TRACE_UUID = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
#: RMS (full scale 1.0) above which the analyser is hearing the agent, not silence.
AUDIBLE = 0.01
QUESTION = "what is the weather in paris"


def _missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install npm)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Playwright for Python (pip install playwright)"
    return None


def _require() -> None:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CI"):
            raise FailTest(f"CI must run the browser tests: {reason}")
        raise SkipTest(reason)


@functools.lru_cache(maxsize=1)
def _esbuild() -> str:
    """The pinned npm packages in :data:`NPM_CACHE` (installed once, under a lock); esbuild's path."""
    os.makedirs(NPM_CACHE, exist_ok=True)
    with open(os.path.join(NPM_CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = os.path.join(NPM_CACHE, "package.json")
        wanted = {"private": True, "dependencies": NPM_PACKAGES}
        installed = {}
        for name in NPM_PACKAGES:
            try:
                with open(os.path.join(NPM_CACHE, "node_modules", name, "package.json")) as f:
                    installed[name] = json.load(f)["version"]
            except (OSError, ValueError, KeyError):
                pass
        if installed != NPM_PACKAGES:
            with open(manifest, "w") as f:
                json.dump(wanted, f)
            done = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--no-package-lock"],
                cwd=NPM_CACHE, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise FailTest(f"npm install failed:\n{done.stdout}\n{done.stderr}")
    return os.path.join(NPM_CACHE, "node_modules", ".bin", "esbuild")


def _bundle(entry: str, output: str) -> None:
    """Bundle ``entry`` (resolving its imports from :data:`NPM_CACHE`) into one browser script."""
    esbuild = _esbuild()
    with tempfile.NamedTemporaryFile("w", suffix=".mjs", dir=NPM_CACHE, delete=False) as copy:
        with open(entry) as source:
            copy.write(source.read())
    try:
        done = subprocess.run(
            [esbuild, copy.name, "--bundle", "--format=iife", "--platform=browser", "--target=chrome110",
             f"--outfile={output}", "--log-level=warning"],
            capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(copy.name)
    if done.returncode != 0:
        raise FailTest(f"esbuild failed:\n{done.stdout}\n{done.stderr}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serve(directory: str) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a secure context, so the microphone is allowed)."""
    handler = functools.partial(_Quiet, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class BrowserTests(SystemTestCase):
    def setUp(self) -> None:
        _require()
        super().setUp()
        self.microphone = os.path.join(self.directory, "microphone.wav")
        speech_wav(QUESTION, self.microphone, rate=48000, lead=0.5, tail=2.0)

    @contextlib.contextmanager
    def browser(self) -> Iterator[Any]:
        """A fresh headless Chromium whose microphone plays :attr:`microphone`; yields a page."""
        from playwright.sync_api import sync_playwright

        profile = os.path.join(self.directory, "chromium-profile")
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={self.microphone}"],
                permissions=["microphone"])
            try:
                page = context.new_page()
                self.console: list[str] = []
                page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
                page.on("pageerror", lambda error: self.console.append(f"page error: {error}"))
                yield page
            finally:
                context.close()

    def evaluate(self, page: Any, script: str, argument: Any = None) -> Any:
        try:
            return page.evaluate(script, argument)
        except Exception as e:
            raise FailTest(f"{e}\nbrowser console:\n" + "\n".join(self.console)) from None

    def daemon_with_tokens(self) -> Any:
        return self.start_daemon("--simulator", api_key=None,
                                 env={"OPENAI_PROXY_CLIENT_TOKENS": TOKEN})

    def test_deepgram_sdk_text_and_spoken_turn(self) -> None:
        daemon = self.daemon_with_tokens()
        site = os.path.join(self.directory, "site")
        os.makedirs(site)
        _bundle(os.path.join(HERE, "sdk_agent.mjs"), os.path.join(site, "sdk_agent.js"))
        with open(os.path.join(site, "mic-worklet.js"), "wb") as f:
            f.write(resources.files("openai_proxy.demo").joinpath("mic-worklet.js").read_bytes())
        with open(os.path.join(site, "index.html"), "w") as f:
            f.write('<!doctype html><meta charset="utf-8"><script src="sdk_agent.js"></script>')
        with _serve(site) as origin, self.browser() as page:
            page.goto(f"{origin}/index.html")
            result = self.evaluate(page, "(args) => window.runSdkAgent(args)", {
                "agentUrl": daemon.base_url, "token": TOKEN, "text": "Hello there",
                "workletUrl": f"{origin}/mic-worklet.js"})
        transcript = result["transcript"]
        self.assertEqual(transcript[:2], ["user: Hello there", "assistant: You said: Hello there"])
        self.assertIn(f"user: {QUESTION}", transcript[2:])
        self.assertIn(f"assistant: You said: {QUESTION}", transcript[2:])
        self.assertGreater(result["textTurnLevel"], AUDIBLE)
        self.assertGreater(result["micChunks"], 50)  # over a second of microphone audio was streamed
        self.assertGreater(result["audioBytes"], 48000)
        log = daemon.stdout() + daemon.stderr()
        self.assertNotIn(TOKEN, log)

    def test_react_component_proxy_mode_wire(self) -> None:
        daemon = self.daemon_with_tokens()
        site = os.path.join(self.directory, "site")
        os.makedirs(site)
        shutil.copy(os.path.join(HERE, "proxy_mode.html"), site)
        with _serve(site) as origin, self.browser() as page:
            page.goto(f"{origin}/proxy_mode.html")
            result = self.evaluate(page, "(args) => window.runProxyMode(args)", {
                "baseUrl": daemon.base_url, "token": TOKEN, "traceId": TRACE_UUID, "text": "Hello there"})
            # A wrong token in the URL is refused before the upgrade.
            refused = self.evaluate(page, """(url) => new Promise((resolve) => {
                const ws = new WebSocket(url);
                ws.onopen = () => resolve("open");
                ws.onclose = (event) => resolve(`closed ${event.code}`);
            })""", f"{daemon.base_url}/openai?service=agent&token=not-{TOKEN}")
        self.assertEqual(refused, "closed 1006")
        self.assertEqual(result["transcript"], [
            "assistant: Hi there!", "user: Hello there", "assistant: You said: Hello there"])
        self.assertIn("Warning", result["messages"])  # MODEL_REPLACED for gpt-4o-mini
        self.assertGreater(result["maxOutputLevel"], AUDIBLE)
        records = daemon.log_records()
        session = [r for r in records if r.get("attributes", {}).get("connection_id")]
        self.assertTrue(session)
        self.assertEqual({r.get("trace_id") for r in session}, {TRACE_UUID.replace("-", "")},
                         json.dumps(session[:3]))
        log = daemon.stdout() + daemon.stderr()
        self.assertNotIn(TOKEN, log)
        self.assertEqual(len([r for r in records if "client refused" in r.get("body", "")]), 1)

    def test_demo_page_talk(self) -> None:
        daemon = self.start_daemon("--simulator", api_key=None)
        with self.browser() as page:
            response = page.goto(f"http://127.0.0.1:{daemon.port}/demo")
            self.assertEqual(response.headers["content-type"], "text/html; charset=utf-8")
            page.click("#talk")
            try:
                page.wait_for_function(
                    """(question) => window.demo.transcript.some((t) => t.role === "assistant"
                         && t.content === `You said: ${question}`)""", arg=QUESTION, timeout=30000)
            except Exception as e:
                state = self.evaluate(page, "() => JSON.stringify(window.demo)")
                raise FailTest(f"{e}\n{state}\n" + "\n".join(self.console)) from None
            demo = self.evaluate(page, "() => window.demo")
            shown = page.inner_text("#transcript")
            events = page.inner_text("#events")
        # The microphone usually interrupts the greeting (barge-in), which then has no text; if the
        # greeting finished first, its text comes before the user's.
        transcript = demo["transcript"]
        question = transcript.index({"role": "user", "content": QUESTION})
        self.assertIn(transcript[:question], (
            [], [{"role": "assistant", "content": "Hello! Press Talk and speak, or type a message."}]))
        self.assertEqual(transcript[question + 1], {"role": "assistant", "content": f"You said: {QUESTION}"})
        self.assertIn(f"You said: {QUESTION}", shown)
        self.assertGreater(demo["maxOutputLevel"], AUDIBLE)
        self.assertGreater(demo["micChunks"], 50)
        for kind in ("< Welcome", "> Settings", "< SettingsApplied", "< UserStartedSpeaking",
                     "< AgentStartedSpeaking", "< AgentAudioDone"):
            self.assertIn(kind, events)
