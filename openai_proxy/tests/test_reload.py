"""SIGHUP reloads applied to a running factory: what changes, what stays, what a bad reload leaves."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy import session as s
from openai_proxy.config import Config, ConfigError
from openai_proxy.functions import FunctionCaller
from openai_proxy.metrics import Metrics
from openai_proxy.reload import Reloader
from openai_proxy.tests.test_metrics import points, value


class _Factory:
    def __init__(self, config: Config, caller: FunctionCaller | None = None) -> None:
        self.config = config
        self.function_caller = caller
        self.session_options = s.SessionOptions(
            default_model=config.model, model_allowed=config.model_allowed, default_voice=config.voice,
            transcription_model=config.transcription_model,
            function_url_prefixes=config.function_url_prefixes)


class _Reactor:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, args))


class ReloaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.base = Config(api_key="sk-old", simulator=True, client_tokens=frozenset({"a"}))
        self.factory = _Factory(self.base)
        self.next: Config | Exception = self.base
        self.made: list[FunctionCaller] = []
        self.reader = InMemoryMetricReader()
        self.metrics = Metrics(readers=[self.reader], environ={})
        self.addCleanup(self.metrics.shutdown)
        self.reloader = Reloader(_Reactor(), self.factory, self.load, self.make_caller, self.metrics)

    def load(self) -> Config:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next

    def make_caller(self, config: Config) -> FunctionCaller:
        caller = FunctionCaller(Clock(), prefixes=config.function_url_prefixes)
        self.made.append(caller)
        return caller

    def test_applies_the_reloadable_settings_only(self) -> None:
        self.next = dataclasses.replace(
            self.base, client_tokens=frozenset({"b", "c"}), allowed_origins=("https://a.example",),
            function_url_prefixes=("https://tools.example/",), model="gpt-realtime-mini", api_key="sk-new")
        self.assertTrue(self.reloader.reload())
        config = self.factory.config
        self.assertEqual(config.client_tokens, frozenset({"b", "c"}))
        self.assertEqual(config.allowed_origins, ("https://a.example",))
        self.assertEqual(config.function_url_prefixes, ("https://tools.example/",))
        # Not reloadable: kept, and named as needing a restart (the key by name only).
        self.assertEqual(config.model, "gpt-realtime")
        self.assertEqual(config.api_key, "sk-old")
        [warning] = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(warning["settings"], "api_key, model")
        self.assertNotIn("sk-new", repr(self.events))
        # Functions were off: a caller now exists, with the new prefixes; sessions see them too.
        [caller] = self.made
        self.assertIs(self.factory.function_caller, caller)
        self.assertEqual(caller._prefixes, ("https://tools.example/",))
        self.assertEqual(self.factory.session_options.function_url_prefixes, ("https://tools.example/",))
        # Turning them off again keeps the caller but allows nothing.
        self.next = self.base
        self.assertTrue(self.reloader.reload())
        self.assertEqual(caller._prefixes, ())
        self.assertEqual(self.factory.session_options.function_url_prefixes, ())
        self.assertEqual(len(self.made), 1)
        self.assertEqual(value(points(self.reader), "openai_proxy.reloads", outcome="applied"), 2)

    def test_bad_reload_keeps_everything(self) -> None:
        before = self.factory.config
        options = self.factory.session_options
        for problem in (ConfigError("--client-tokens-file: t holds no token"), RuntimeError("boom")):
            self.next = problem
            self.assertFalse(self.reloader.reload())
            self.assertIs(self.factory.config, before)
            self.assertIs(self.factory.session_options, options)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        errors = [e for e in self.events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(len(errors), 2)
        self.assertIn("holds no token", errors[0]["problem"])
        self.assertEqual(value(points(self.reader), "openai_proxy.reloads", outcome="failed"), 2)

    def test_reload_never_turns_authentication_off(self) -> None:
        self.next = dataclasses.replace(self.base, client_tokens=frozenset())
        self.assertFalse(self.reloader.reload())
        self.assertEqual(self.factory.config.client_tokens, frozenset({"a"}))
        [error] = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertIn("cannot be removed by a reload", error["log_format"])
        # Turning it on is fine.
        self.factory.config = dataclasses.replace(self.base, client_tokens=frozenset())
        self.next = self.base
        self.assertTrue(self.reloader.reload())
        self.assertEqual(self.factory.config.client_tokens, frozenset({"a"}))

    def test_signal_handler_defers_to_the_reactor(self) -> None:
        previous = signal.getsignal(signal.SIGHUP)
        self.reloader.install()
        self.addCleanup(self.reloader.uninstall)
        handler = signal.getsignal(signal.SIGHUP)
        self.assertTrue(callable(handler))
        assert callable(handler)
        handler(signal.SIGHUP, None)
        reactor = self.reloader._reactor
        self.assertEqual(reactor.calls, [(self.reloader.reload, ())])
        self.reloader.uninstall()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)
