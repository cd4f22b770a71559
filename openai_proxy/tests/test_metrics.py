"""
The metrics: instruments read by an in-memory reader, the Prometheus text of ``/metrics`` from the same
instruments, bounded attribute values, and the OTLP exporter against a local collector stub.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from openai_proxy import errors
from openai_proxy.metrics import OTHER, SAMPLE_EVERY, Metrics, SessionMeter
from openai_proxy.tests.helpers import Daemon, connect_client, default_settings, wait
from openai_proxy.web import make_metrics_site


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Instrument name → its data points, from one collection."""
    found: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return found
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = list(metric.data.data_points)
    return found


def value(found: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    for point in found.get(name, []):
        if dict(point.attributes or {}) == attributes:
            return point.value if hasattr(point, "value") else point
    return None


@defer.inlineCallbacks
def until(condition: Any, timeout: float = 5.0) -> Any:
    """Wait (polling the reactor, bounded) until ``condition()`` holds; fail the test otherwise."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        yield wait(0.01)


class _Plan:
    class _Format:
        def __init__(self, encoding: str, sample_rate: int) -> None:
            self.encoding = encoding
            self.sample_rate = sample_rate

    def __init__(self) -> None:
        self.input_format = self._Format("linear16", 16000)
        self.output_format = self._Format("mulaw", 8000)


class _Session:
    plan = _Plan()


class InstrumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reader = InMemoryMetricReader()
        self.metrics = Metrics(readers=[self.reader], environ={})
        self.addCleanup(self.metrics.shutdown)

    def test_instruments_exist_before_anything_happens(self) -> None:
        found = points(self.reader)
        for name in ("openai_proxy.sessions", "openai_proxy.upstream.rollovers",
                     "openai_proxy.upstream.reconnects", "openai_proxy.sessions.active",
                     "openai_proxy.draining", "openai_proxy.audio"):
            self.assertIn(name, found)
        self.assertEqual(value(found, "openai_proxy.upstream.rollovers"), 0)
        text = self.metrics.prometheus_text()
        self.assertIn("openai_proxy_upstream_reconnects_total 0\n", text)
        self.assertIn("openai_proxy_sessions_active 0\n", text)

    def test_turn_latency_and_audio_seconds(self) -> None:
        clock = Clock()
        meter = self.metrics.session_meter()
        meter.session = _Session()
        meter.upstream_event({"type": "input_audio_buffer.speech_stopped"}, clock.seconds)
        clock.advance(0.35)
        meter.upstream_event({"type": "response.created"}, clock.seconds)
        clock.advance(0.1)
        meter.upstream_event({"type": "response.output_audio.delta", "delta": ""}, clock.seconds)
        clock.advance(0.5)
        # Only the first audio of the turn counts.
        meter.upstream_event({"type": "response.output_audio.delta", "delta": ""}, clock.seconds)
        meter.audio_in_bytes += 32000 * 3          # 3 s of linear16 at 16 kHz
        meter.audio_out_bytes += 8000 * 2          # 2 s of mulaw at 8 kHz
        found = points(self.reader)
        [turn] = found["openai_proxy.turn.latency"]
        self.assertEqual(turn.count, 1)
        self.assertAlmostEqual(turn.sum, 0.45)
        # Live sessions count already.
        self.assertAlmostEqual(value(found, "openai_proxy.audio", direction="in"), 3.0)
        self.assertAlmostEqual(value(found, "openai_proxy.audio", direction="out"), 2.0)
        meter.finish()
        meter.finish()  # idempotent
        found = points(self.reader)
        self.assertAlmostEqual(value(found, "openai_proxy.audio", direction="in"), 3.0)
        self.assertEqual(value(found, "openai_proxy.messages", direction="upstream_in",
                               type="response.output_audio.delta"), 2)
        self.assertEqual(value(found, "openai_proxy.sessions"), 1)

    def test_relay_latency_is_recorded_per_direction(self) -> None:
        meter = SessionMeter(self.metrics)
        calls: list[int] = []
        meter.time("client_to_upstream", calls.append, 1)
        meter.time("upstream_to_client", calls.append, 2)
        self.assertEqual(calls, [1, 2])
        found = points(self.reader)
        directions = sorted(dict(p.attributes)["direction"] for p in found["openai_proxy.relay.latency"])
        self.assertEqual(directions, ["client_to_upstream", "upstream_to_client"])

    def test_handshake_outcomes(self) -> None:
        for status in (None, None, 401, 403, 503, 500, 418):
            self.metrics.handshake(status)
        found = points(self.reader)
        self.assertEqual(value(found, "openai_proxy.handshakes", outcome="accepted"), 2)
        for outcome in ("unauthorized", "forbidden", "unavailable", "error", "refused"):
            self.assertEqual(value(found, "openai_proxy.handshakes", outcome=outcome), 1, outcome)

    def test_codes_and_types_are_bounded(self) -> None:
        self.metrics.upstream_error("rate_limit_exceeded")
        self.metrics.upstream_error(errors.UPSTREAM_CLOSED)
        self.metrics.client_message({"type": "Error", "code": errors.INVALID_SETTINGS})
        before = self.metrics.prometheus_text()
        meter = self.metrics.session_meter()
        for index in range(20000):
            code = f"forged_{index}"
            self.metrics.upstream_error(code)
            self.metrics.client_message({"type": "Error", "code": code})
            self.metrics.client_message({"type": f"Type{index}"})
            self.metrics.upstream_message({"type": f"t{index}"})
            meter.client_message(f"Client{index}")
            meter.upstream_event({"type": "error", "error": {"code": code}}, lambda: 0.0)
            meter.upstream_event({"type": f"e{index}"}, lambda: 0.0)
        after = self.metrics.prometheus_text()
        # Every forged value landed in "other": a handful of new series, not 20,000.
        self.assertLess(len(after.splitlines()) - len(before.splitlines()), 12)
        self.assertNotIn("forged", after)
        found = points(self.reader)
        self.assertEqual(value(found, "openai_proxy.upstream.errors", code=OTHER), 40000)
        self.assertEqual(value(found, "openai_proxy.upstream.errors", code="rate_limit_exceeded"), 1)
        self.assertEqual(value(found, "openai_proxy.client.errors", type="Error", code=OTHER), 20000)
        self.assertEqual(value(found, "openai_proxy.messages", direction="client_in", type=OTHER), 20000)

    def test_newline_in_a_code_cannot_forge_a_line(self) -> None:
        forged = 'x"} 1\nopenai_proxy_forged_total 99\n#'
        self.metrics.upstream_error(forged)
        self.metrics.client_message({"type": "Warning", "code": forged})
        self.metrics.client_message({"type": forged})
        # Even an attribute that bypasses the bounds is escaped onto its own line.
        self.metrics.handshakes.add(1, {"outcome": forged})
        text = self.metrics.prometheus_text()
        self.assertNotIn("\nopenai_proxy_forged_total", text)
        for line in text.splitlines():
            self.assertTrue(line.startswith(("# HELP ", "# TYPE ", "openai_proxy_")), line)
        self.assertIn('outcome="x\\"} 1\\nopenai_proxy_forged_total 99\\n#"', text)

    def test_exporter_settings(self) -> None:
        for environ in ({}, {"OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"},
                        {"OTEL_METRICS_EXPORTER": "prometheus"}):
            metrics = Metrics(environ=environ)
            self.addCleanup(metrics.shutdown)
            self.assertEqual(metrics.problems, [])
            self.assertEqual(len(metrics.readers), 1, environ)
        collector = _Collector()
        self.addCleanup(collector.stop)
        metrics = Metrics(environ={"OTEL_METRICS_EXPORTER": "console,otlp",
                                   "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}"})
        self.addCleanup(metrics.shutdown)
        self.assertEqual(len(metrics.problems), 1)
        self.assertIn("'console'", metrics.problems[0])
        self.assertEqual(len(metrics.readers), 2)


class _Collector:
    """An OTLP/HTTP collector stub on loopback: keeps every ``POST /v1/metrics`` body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                collector.requests.append((self.path, self.headers.get("content-type", ""),
                                           self.rfile.read(length)))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class OTLPTests(SynchronousTestCase):
    def test_export_to_a_collector(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        collector = _Collector()
        self.addCleanup(collector.stop)
        metrics = Metrics(environ={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_SERVICE_NAME": "proxy-under-test",
        })
        metrics.upstream_error(errors.UPSTREAM_AUTH_FAILED)
        metrics.handshake(None)
        self.assertTrue(metrics.provider.force_flush(10_000))
        metrics.shutdown()
        self.assertTrue(collector.requests)
        path, content_type, body = collector.requests[0]
        self.assertEqual(path, "/v1/metrics")
        self.assertEqual(content_type, "application/x-protobuf")
        request = ExportMetricsServiceRequest.FromString(body)
        [resource_metrics] = request.resource_metrics
        service = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
        self.assertEqual(service["service.name"], "proxy-under-test")
        exported = {m.name: m for s in resource_metrics.scope_metrics for m in s.metrics}
        self.assertIn("openai_proxy.sessions.active", exported)
        [point] = exported["openai_proxy.upstream.errors"].sum.data_points
        self.assertEqual(point.as_int, 1)
        self.assertEqual({a.key: a.value.string_value for a in point.attributes},
                         {"code": errors.UPSTREAM_AUTH_FAILED})


class DaemonMetricsTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def get(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        from twisted.web.http_headers import Headers

        assert self.daemon.port is not None
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.daemon.port.getHost().port}{path}".encode(),
            Headers(headers or {}))
        body = yield readBody(response)
        return response.code, body.decode("utf-8")

    @defer.inlineCallbacks
    def test_session_counts_reach_the_reader_and_metrics_page(self) -> None:
        reader = InMemoryMetricReader()
        metrics = Metrics(readers=[reader], environ={})
        self.daemon = Daemon()
        yield self.daemon.start(metrics=metrics)
        self.addCleanup(self.daemon.stop)
        client = yield connect_client(self.daemon.url)
        yield client.expect("Welcome")
        client.send_json(default_settings())
        yield client.expect("SettingsApplied")
        client.sendMessage(b"\x00\x00" * 2400, isBinary=True)  # 0.1 s of linear16 at 24 kHz
        client.send_json({"type": "InjectUserMessage", "content": "Hello"})
        yield client.expect("AgentAudioDone", timeout=10)
        found = points(reader)
        self.assertEqual(value(found, "openai_proxy.sessions.active"), 1)
        self.assertEqual(value(found, "openai_proxy.handshakes", outcome="accepted"), 1)
        self.assertEqual(value(found, "openai_proxy.messages", direction="client_in", type="Settings"), 1)
        self.assertEqual(value(found, "openai_proxy.messages", direction="client_out", type="Welcome"), 1)
        self.assertEqual(value(found, "openai_proxy.messages", direction="upstream_out",
                               type="session.update"), 1)
        self.assertGreater(value(found, "openai_proxy.messages", direction="upstream_in",
                                 type="response.output_audio.delta"), 0)
        self.assertAlmostEqual(value(found, "openai_proxy.audio", direction="in"), 0.1)
        self.assertAlmostEqual(value(found, "openai_proxy.audio", direction="out"), len(client.audio) / 48000)
        # One client frame in SAMPLE_EVERY has its handling time recorded.
        for _ in range(SAMPLE_EVERY):
            client.sendMessage(b"\x00\x00" * 240, isBinary=True)
        # Frames are handled in order: once this message's Error is back, all of them were handled.
        client.send_json({"type": "Teleport"})
        yield client.expect("Error")
        [timed] = [p for p in points(reader)["openai_proxy.relay.latency"]
                   if dict(p.attributes) == {"direction": "client_to_upstream"}]
        self.assertEqual(timed.count, 1)
        code, text = yield self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIn("openai_proxy_sessions_active 1\n", text)
        self.assertIn('openai_proxy_relay_latency_seconds_count{direction="client_to_upstream"} 1\n', text)
        self.assertIn('openai_proxy_messages_total{direction="client_in",type="InjectUserMessage"} 1\n', text)
        client.dropConnection(abort=True)
        yield until(lambda: value(points(reader), "openai_proxy.sessions.active") == 0)

    @defer.inlineCallbacks
    def test_metrics_behind_the_client_tokens(self) -> None:
        self.daemon = Daemon()
        yield self.daemon.start(client_tokens=frozenset({"good-token"}), metrics_require_token=True)
        self.addCleanup(self.daemon.stop)
        code, _ = yield self.get("/metrics")
        self.assertEqual(code, 401)
        for header in (b"Token bad-token", b"Basic good-token", b"good-token", b"Token "):
            code, _ = yield self.get("/metrics", {b"authorization": [header]})
            self.assertEqual(code, 401, header)
        for header in (b"Token good-token", b"Bearer good-token", b"bearer  good-token"):
            code, text = yield self.get("/metrics", {b"authorization": [header]})
            self.assertEqual(code, 200, header)
            self.assertIn("openai_proxy_sessions_active 0\n", text)
        # The health checks stay open.
        code, _ = yield self.get("/readyz")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_metrics_listen_moves_metrics_off_the_main_listener(self) -> None:
        self.daemon = Daemon()
        yield self.daemon.start(metrics_listen=("tcp:0:interface=127.0.0.1",))
        self.addCleanup(self.daemon.stop)
        code, _ = yield self.get("/metrics")
        self.assertEqual(code, 404)
        assert self.daemon.factory is not None and self.daemon.registry is not None
        port = reactor.listenTCP(0, make_metrics_site(self.daemon.factory, self.daemon.registry),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        for path, expected in (("/metrics", 200), ("/readyz", 200), ("/healthz", 200),
                               ("/v1/agent/converse", 404), ("/openai", 404), ("/metrics/x", 404)):
            response = yield Agent(reactor).request(b"GET", (base + path).encode())
            body = yield readBody(response)
            self.assertEqual(response.code, expected, path)
            if path == "/metrics":
                self.assertIn(b"openai_proxy_sessions_active 0\n", body)


class ContinuityMetricsTests(TestCase):
    def test_session_continuity_counts_reach_the_instruments(self) -> None:
        from twisted.internet.task import Clock

        from openai_proxy.relay import SessionRegistry

        registry = SessionRegistry(Clock(), 0)
        for name, amount in (("rollovers", 1), ("rollovers_forced", 1), ("rollovers", 1),
                             ("reconnects", 1), ("reconnects_failed", 1), ("replayed_items", 7),
                             ("switch_ms", 12), ("switch_ms", 1500)):
            registry.count_continuity(name, amount)
        text = registry.metrics.prometheus_text()
        for line in ('openai_proxy_upstream_rollovers_total{outcome="completed"} 2',
                     'openai_proxy_upstream_rollovers_total{outcome="forced"} 1',
                     'openai_proxy_upstream_reconnects_total{outcome="reconnected"} 1',
                     'openai_proxy_upstream_reconnects_total{outcome="gave_up"} 1',
                     "openai_proxy_upstream_replayed_items_total 7",
                     'openai_proxy_upstream_switch_duration_seconds_bucket{le="0.1"} 1',
                     "openai_proxy_upstream_switch_duration_seconds_count 2"):
            self.assertIn(line + "\n", text)
