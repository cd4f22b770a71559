"""
The session core is sans-IO: it imports with Twisted and Autobahn unimportable, and every upstream
failure is an input whose mapping to a client Error is decided (and tested) here, in memory.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import errors
from openai_proxy import session as s
from openai_proxy.tests.test_session import Harness
from openai_proxy.tests.test_session import settings as _settings

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("twisted", "autobahn", "txaio", "treq"):
                raise ImportError(f"{name} is blocked: the session core must not import it")
            return None

    sys.meta_path.insert(0, Blocker())
    import openai_proxy.session, openai_proxy.scheduling, openai_proxy.replies
    import openai_proxy.function_calls, openai_proxy.outputs, openai_proxy.endpoint
    import openai_proxy.translate.client, openai_proxy.translate.upstream
    import openai_proxy.translate.settings
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("twisted", "autobahn", "txaio"))
    assert not loaded, loaded
    session = openai_proxy.session.Session(openai_proxy.session.SessionOptions(
        default_model="gpt-realtime", model_allowed=lambda m: True, default_voice="marin",
        transcription_model="gpt-4o-mini-transcribe"), now=lambda: 0.0)
    print(session.start()[0].message["type"])
    """
)


class SansIOTests(SynchronousTestCase):
    def run_blocked(self, code: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=60, check=False)

    def test_session_core_imports_without_twisted(self) -> None:
        result = self.run_blocked(_BLOCKER)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "Welcome")

    def test_the_blocker_blocks(self) -> None:
        # The same check fails for a module that does import Twisted.
        code = _BLOCKER.replace("import openai_proxy.session,", "import openai_proxy.relay,")
        result = self.run_blocked(code)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("blocked", result.stderr)


class UpstreamClosureTests(SynchronousTestCase):
    """SPEC §7: what the client is told when the upstream goes away, decided by the session."""

    CASES = [
        (s.UpstreamClosure(was_open=True, close_code=1011), errors.UPSTREAM_CLOSED, "1011"),
        (s.UpstreamClosure(was_open=True), errors.UPSTREAM_CLOSED, "closed the session"),
        (s.UpstreamClosure(was_open=False, tls_failed=True), errors.UPSTREAM_TLS_FAILED, "TLS"),
        (s.UpstreamClosure(was_open=False, http_status=401), errors.UPSTREAM_AUTH_FAILED, "401"),
        (s.UpstreamClosure(was_open=False, http_status=403), errors.UPSTREAM_AUTH_FAILED, "403"),
        (s.UpstreamClosure(was_open=False, http_status=429), errors.UPSTREAM_RATE_LIMITED, "429"),
        (s.UpstreamClosure(was_open=False, http_status=503), errors.UPSTREAM_UNAVAILABLE, "503"),
        (s.UpstreamClosure(was_open=False), errors.UPSTREAM_UNAVAILABLE, "before"),
        # TLS failure wins over whatever status the aborted handshake left behind.
        (s.UpstreamClosure(was_open=False, http_status=401, tls_failed=True),
         errors.UPSTREAM_TLS_FAILED, "TLS"),
    ]

    def test_each_closure(self) -> None:
        # Before the upstream ever opened nothing is reconnected (SPEC §7); for an upstream that was
        # open, a close that is not worth a reconnection (SPEC §8) is told the same way.
        cases = [(c, code, words) for c, code, words in self.CASES if not c.was_open] + [
            (s.UpstreamClosure(was_open=True, close_code=1008), errors.UPSTREAM_CLOSED, "1008"),
            (s.UpstreamClosure(was_open=True, close_code=4000), errors.UPSTREAM_CLOSED, "4000"),
        ]
        for closure, code, words in cases:
            h = Harness()
            h.configure()
            if closure.was_open:
                h.feed(h.session.upstream_opened())
            out = h.feed(h.session.upstream_closed(closure))
            [error] = h.client(out)
            self.assertEqual(error["code"], code, closure)
            self.assertIn(words, error["description"])
            [close] = [o for o in out if isinstance(o, s.CloseClient)]
            self.assertEqual(close.code, 1011)
            # Nothing more happens once the session is closed.
            self.assertEqual(h.feed(h.session.upstream_closed(closure)), [])

    def test_unreachable_and_timed_out(self) -> None:
        for report, code in [(s.Session.upstream_unreachable, errors.UPSTREAM_UNAVAILABLE),
                             (s.Session.upstream_timed_out, errors.UPSTREAM_TIMEOUT)]:
            h = Harness()
            h.text({"type": "KeepAlive"})
            out = h.feed(report(h.session))
            self.assertEqual(h.client(out)[0]["code"], code)

    def test_closure_releases_timers(self) -> None:
        h = Harness()
        h.text({"type": "Settings", **{k: v for k, v in _settings().items() if k != "type"}})
        out = h.feed(h.session.upstream_closed(s.UpstreamClosure(was_open=False, http_status=500)))
        self.assertIn(s.CancelTimer(s.TimerKey(s.TimerKind.UPDATE_WATCHDOG)), out)
        self.assertTrue(all(not isinstance(o, s.StartTimer) for o in out))

    def test_draining(self) -> None:
        h = Harness()
        h.configure()
        out = h.feed(h.session.draining())
        self.assertEqual(h.client(out)[0]["code"], errors.SHUTTING_DOWN)
        self.assertIn(s.CloseClient(1001, "server shutting down"), out)


class SwitchTests(SynchronousTestCase):
    """SPEC §8 in memory: the session's side of a reconnection, input by input."""

    def lost(self) -> tuple[Harness, list[s.Output]]:
        h = Harness(random=lambda: 0.5)
        h.configure()
        h.feed(h.session.upstream_opened())
        h.text({"type": "InjectUserMessage", "content": "Tell me about the sea"})
        [create] = [o.event for o in h.outputs if isinstance(o, s.SendUpstream)
                    and o.event["type"] == "conversation.item.create"]
        h.up("conversation.item.done", item=create["item"])
        out = h.feed(h.session.upstream_closed(s.UpstreamClosure(was_open=True, close_code=1006)))
        return h, out

    def test_a_drop_starts_a_reconnection_after_the_backoff(self) -> None:
        h, out = self.lost()
        [warning] = h.client(out)
        self.assertEqual(warning["code"], errors.UPSTREAM_RECONNECTING)
        [start] = [o for o in out if isinstance(o, s.StartTimer)
                   and o.name == s.TimerKey(s.TimerKind.RECONNECT)]
        self.assertEqual(start.seconds, 0.125)  # half of the first ceiling, 0.25 s
        self.assertNotIn(s.CloseClient, [type(o) for o in out])
        out = h.timer(start.name)
        self.assertIn(s.ConnectUpstream("gpt-realtime", 1), out)

    def test_the_new_session_gets_the_configuration_then_the_replay_then_the_swap(self) -> None:
        h, _ = self.lost()
        h.timer(s.TimerKey(s.TimerKind.RECONNECT))
        # Events from the lost connection (generation 0) change nothing any more.
        self.assertEqual(h.feed(h.session.upstream_event(
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0})), [])
        out = h.feed(h.session.upstream_opened(1))
        [update] = [o for o in out if isinstance(o, s.SendUpstream)]
        self.assertEqual((update.generation, update.event["type"]), (1, "session.update"))
        self.assertEqual(update.event["session"]["instructions"], "You are helpful.")
        out = h.feed(h.session.upstream_event({"type": "session.updated", "session": {}}, 1))
        [replayed] = [o for o in out if isinstance(o, s.SendUpstream)]
        self.assertEqual(replayed.generation, 1)
        self.assertEqual(replayed.event["item"]["content"][0]["text"], "Tell me about the sea")
        out = h.feed(h.session.upstream_event(
            {"type": "conversation.item.done", "item": replayed.event["item"]}, 1))
        self.assertIn(s.SwapUpstream(1), out)
        self.assertEqual([m["code"] for m in h.client(out)], [errors.UPSTREAM_RECONNECTED])
        self.assertEqual(h.session.stats["reconnects"], 1)

    def test_client_leaving_during_a_reconnection_cancels_every_timer(self) -> None:
        h, _ = self.lost()
        h.timer(s.TimerKey(s.TimerKind.RECONNECT))
        out = h.feed(h.session.client_closed())
        self.assertIn(s.CloseUpstream(), out)
        self.assertEqual(h.session._emit.timers, set())

    def swap(self, h: Harness) -> list[s.Output]:
        """Take the reconnection through to its swap; the outputs of the last step."""
        h.timer(s.TimerKey(s.TimerKind.RECONNECT))
        h.feed(h.session.upstream_opened(1))
        out = h.feed(h.session.upstream_event({"type": "session.updated", "session": {}}, 1))
        for output in [o for o in out if isinstance(o, s.SendUpstream)]:
            out = h.feed(h.session.upstream_event(
                {"type": "conversation.item.done", "item": output.event["item"]}, 1))
        return out

    def test_audio_during_a_reconnection_is_held_bounded_and_delivered_in_order(self) -> None:
        h, _ = self.lost()
        second = 24000 * 2  # one second of linear16 at 24 kHz; the harness holds one second
        chunks = [bytes([n]) * (second // 2) for n in (1, 2, 3)]
        for chunk in chunks:
            self.assertEqual([o for o in h.binary(chunk) if isinstance(o, s.SendUpstream)], [])
        out = self.swap(h)
        self.assertIn(s.SwapUpstream(1), out)
        codes = [m["code"] for m in h.client(out)]
        self.assertEqual(codes, [errors.UPSTREAM_RECONNECTED, errors.AUDIO_BUFFER_OVERFLOW])
        sent = b"".join(
            base64.b64decode(o.event["audio"]) for o in out
            if isinstance(o, s.SendUpstream) and o.event["type"] == "input_audio_buffer.append")
        # The newest second, oldest chunk dropped whole, the rest in order (a last partial batch
        # may still wait for its flush timer).
        self.assertTrue((chunks[1] + chunks[2]).startswith(sent), len(sent))
        self.assertGreater(len(sent), second * 0.9)
