"""Tests for openai_proxy.telemetry: twisted.logger events as OpenTelemetry log records."""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Sequence
from typing import Any, ClassVar

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from twisted.logger import ILogObserver, Logger, LoggingFile, LogLevel, LogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from openai_proxy.telemetry import (
    OpenTelemetryLogObserver,
    make_log_observer,
    parse_log_level,
    parse_trace_id,
    redact,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http._log_exporter"


class _Harness:
    """An observer writing to a string buffer, plus an in-memory exporter on the same provider."""

    def __init__(self, case: unittest.TestCase, level: str = "debug", **kwargs: Any) -> None:
        self.stream = io.StringIO()
        self.observer = make_log_observer(level, stream=self.stream, environ=kwargs.pop("environ", {}), **kwargs)
        case.addCleanup(self.observer.shutdown)
        self.memory = InMemoryLogRecordExporter()
        self.observer.provider.add_log_record_processor(SimpleLogRecordProcessor(self.memory))
        self.log = Logger(namespace="openai_proxy.test", observer=self.observer)

    def records(self) -> list[Any]:
        return [r.log_record for r in self.memory.get_finished_logs()]

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


class ObserverInterfaceTests(unittest.TestCase):
    def test_provides_ilogobserver_and_shutdown(self) -> None:
        harness = _Harness(self)
        self.assertTrue(verifyObject(ILogObserver, harness.observer))
        self.assertIsInstance(harness.observer, OpenTelemetryLogObserver)
        self.assertTrue(callable(harness.observer.shutdown))

    def test_unknown_level_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            make_log_observer("loud", stream=io.StringIO(), environ={})
        self.assertIn("loud", str(caught.exception))


class SeverityTests(unittest.TestCase):
    def test_twisted_levels_map_to_otel_severities(self) -> None:
        harness = _Harness(self, "debug")
        harness.log.debug("d")
        harness.log.info("i")
        harness.log.emit(LogLevel.warn, "w")
        harness.log.error("e")
        harness.log.critical("c")
        self.assertEqual(
            [(r.severity_number, r.severity_text, r.body) for r in harness.records()],
            [
                (SeverityNumber.DEBUG, "DEBUG", "d"),
                (SeverityNumber.INFO, "INFO", "i"),
                (SeverityNumber.WARN, "WARN", "w"),
                (SeverityNumber.ERROR, "ERROR", "e"),
                (SeverityNumber.FATAL, "CRITICAL", "c"),
            ],
        )

    def test_timestamp_is_the_event_time(self) -> None:
        harness = _Harness(self)
        harness.observer({"log_level": LogLevel.info, "log_format": "x", "log_time": 1700000000.5})
        self.assertEqual(harness.records()[0].timestamp, 1700000000500000000)
        self.assertEqual(harness.lines()[0]["timestamp"], "2023-11-14T22:13:20.500000Z")


class LevelThresholdTests(unittest.TestCase):
    def _bodies(self, level: str) -> list[str]:
        harness = _Harness(self, level)
        for method in ("debug", "info", "warn", "error", "critical"):
            getattr(harness.log, method)(method)
        return [r.body for r in harness.records()]

    def test_warn_drops_info_and_debug(self) -> None:
        self.assertEqual(self._bodies("warn"), ["warn", "error", "critical"])

    def test_warning_is_an_alias(self) -> None:
        self.assertEqual(self._bodies("WARNING"), ["warn", "error", "critical"])

    def test_info_is_default_threshold(self) -> None:
        self.assertEqual(self._bodies("info"), ["info", "warn", "error", "critical"])

    def test_debug_passes_everything(self) -> None:
        self.assertEqual(self._bodies("debug"), ["debug", "info", "warn", "error", "critical"])

    def test_critical_only(self) -> None:
        self.assertEqual(self._bodies("critical"), ["critical"])

    def test_parse_log_level(self) -> None:
        self.assertIs(parse_log_level(" Error "), LogLevel.error)
        self.assertRaises(ValueError, parse_log_level, "verbose")


class AttributeTests(unittest.TestCase):
    def test_named_fields_and_scalars_become_attributes(self) -> None:
        harness = _Harness(self)
        harness.log.info(
            "closed {close_code}",
            connection_id="c-1",
            direction="upstream",
            message_type="session.update",
            error_code="UPSTREAM_CLOSED",
            close_code=1006,
            latency=0.25,
            retried=False,
            request_id="0f5b",
        )
        record = harness.records()[0]
        self.assertEqual(record.body, "closed 1006")
        self.assertEqual(
            dict(record.attributes),
            {
                "connection_id": "c-1",
                "direction": "upstream",
                "message_type": "session.update",
                "error.code": "UPSTREAM_CLOSED",
                "close_code": 1006,
                "latency": 0.25,
                "retried": False,
                "request_id": "0f5b",
            },
        )

    def test_non_scalars_and_bookkeeping_are_not_attributes(self) -> None:
        harness = _Harness(self)
        harness.log.info(
            "x",
            frames=[1, 2],
            settings={"a": 1},
            audio=b"\x01\x02",
            nothing=None,
            count=3,
        )
        self.assertEqual(dict(harness.records()[0].attributes), {"count": 3})

    def test_scope_is_the_log_namespace(self) -> None:
        harness = _Harness(self)
        harness.log.info("x")
        scope = harness.memory.get_finished_logs()[0].instrumentation_scope
        self.assertEqual(scope.name if scope else None, "openai_proxy.test")

    def test_failure_becomes_exception_attributes(self) -> None:
        harness = _Harness(self)
        try:
            raise RuntimeError("upstream refused key sk-abcdefghijklmnop")
        except RuntimeError:
            harness.log.failure("relay failed")
        record = harness.records()[0]
        self.assertEqual(record.severity_number, SeverityNumber.FATAL)
        self.assertEqual(record.attributes["exception.type"], "RuntimeError")
        self.assertIn("RuntimeError", record.attributes["exception.stacktrace"])
        self.assertNotIn("abcdefghijklmnop", record.attributes["exception.message"])
        self.assertNotIn("abcdefghijklmnop", record.attributes["exception.stacktrace"])


class TraceContextTests(unittest.TestCase):
    def test_event_trace_id_is_the_record_trace_context(self) -> None:
        harness = _Harness(self)
        harness.log.info("x", trace_id=TRACE_ID)
        record = harness.records()[0]
        self.assertEqual(record.trace_id, int(TRACE_ID, 16))
        self.assertNotIn("trace_id", record.attributes)
        self.assertEqual(harness.lines()[0]["trace_id"], TRACE_ID)

    def test_invalid_trace_id_is_ignored(self) -> None:
        harness = _Harness(self)
        harness.log.info("x", trace_id="not-a-trace-id")
        harness.log.info("y", trace_id="0" * 32)
        for record in harness.records():
            self.assertEqual(record.trace_id, 0)
            self.assertNotIn("trace_id", record.attributes)
        self.assertNotIn("trace_id", harness.lines()[0])

    def test_query_parameter(self) -> None:
        self.assertEqual(parse_trace_id(TRACE_ID.upper(), None), TRACE_ID)
        self.assertIsNone(parse_trace_id("0" * 32, None))
        self.assertIsNone(parse_trace_id(TRACE_ID[:-1], None))
        self.assertIsNone(parse_trace_id(TRACE_ID + "0", None))
        self.assertIsNone(parse_trace_id("g" * 32, None))

    def test_query_parameter_uuid(self) -> None:
        """A UUID with dashes (what the React component's test app sends) is the same 128-bit id."""
        dashed = f"{TRACE_ID[:8]}-{TRACE_ID[8:12]}-{TRACE_ID[12:16]}-{TRACE_ID[16:20]}-{TRACE_ID[20:]}"
        self.assertEqual(parse_trace_id(dashed, None), TRACE_ID)
        self.assertEqual(parse_trace_id(dashed.upper(), None), TRACE_ID)
        self.assertEqual(parse_trace_id(f" {dashed} ", None), TRACE_ID)
        for bad in [
            "00000000-0000-0000-0000-000000000000",  # the nil UUID: an all-zero trace id
            dashed[:-1],  # short last group
            dashed.replace("-", "", 1),  # a dash missing
            f"{{{dashed}}}",  # braces
            f"urn:uuid:{dashed}",
            dashed.replace("-", "_"),
            TRACE_ID[:9] + "-" + TRACE_ID[9:],  # a dash in the wrong place
        ]:
            self.assertIsNone(parse_trace_id(bad, None), bad)
        # An invalid query id falls back to traceparent.
        header = f"00-{'b' * 32}-00f067aa0ba902b7-01"
        self.assertEqual(parse_trace_id(dashed[:-1], header), "b" * 32)

    def test_traceparent(self) -> None:
        header = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        self.assertEqual(parse_trace_id(None, header), TRACE_ID)
        self.assertEqual(parse_trace_id(None, f"  {header} "), TRACE_ID)
        # A future version may carry more fields.
        self.assertEqual(parse_trace_id(None, f"01-{TRACE_ID}-00f067aa0ba902b7-01-extra"), TRACE_ID)

    def test_invalid_traceparent(self) -> None:
        span = "00f067aa0ba902b7"
        for header in [
            f"00-{'0' * 32}-{span}-01",  # all-zero trace id
            f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
            f"ff-{TRACE_ID}-{span}-01",  # forbidden version
            f"00-{TRACE_ID}-{span}-01-extra",  # version 00 has exactly four fields
            f"00-{TRACE_ID.upper()}-{span}-01",  # uppercase hex
            f"00-{TRACE_ID[:-2]}-{span}-01",  # short trace id
            f"00-{TRACE_ID}-{span}",  # no flags
            "garbage",
            "",
        ]:
            self.assertIsNone(parse_trace_id(None, header), header)

    def test_query_parameter_wins_then_falls_back(self) -> None:
        other = "a" * 32
        header = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        self.assertEqual(parse_trace_id(other, header), other)
        self.assertEqual(parse_trace_id("bad", header), TRACE_ID)
        self.assertIsNone(parse_trace_id(None, None))


class RedactionTests(unittest.TestCase):
    def test_redact_openai_keys(self) -> None:
        text = redact("key sk-proj-AbC_123-xyzxyz and ek_68af2d0f1e2c8190abc end")
        self.assertNotIn("AbC_123", text)
        self.assertNotIn("68af2d0f", text)
        self.assertTrue(text.startswith("key sk-"))
        self.assertTrue(text.endswith(" end"))

    def test_redact_authorization_credentials(self) -> None:
        for text, secret in [
            ("Authorization: Bearer abc.def-123456", "abc.def-123456"),
            ("authorization=Basic dXNlcjpwYXNz; next", "dXNlcjpwYXNz"),
            ("{'authorization': 'Token 0123456789abcdef'}", "0123456789abcdef"),
            ("sent Token 0123456789abcdef", "0123456789abcdef"),
            ("bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2ln", "eyJzdWIiOiIxMjM0In0"),
            ("Sec-WebSocket-Protocol: token, 0123456789abcdef", "0123456789abcdef"),
            ("/v1/agent/converse?api_key=hunter22&x=1", "hunter22"),
            ('{"password": "correct horse"}', "correct"),
        ]:
            self.assertNotIn(secret, redact(text), text)

    def test_redact_keeps_ordinary_text(self) -> None:
        for text in [
            "Authorization header missing",
            "client sent Settings with 3 functions",
            "max_tokens=200",
            "task-force ready",
        ]:
            self.assertEqual(redact(text), text)

    def test_secret_fields_are_dropped_and_masked_in_body(self) -> None:
        harness = _Harness(self)
        harness.log.info(
            "auth {authorization} key {api_key} tok {client_token}",
            authorization="Token s3cr3t-token-value",
            api_key="plainsecretvalue",
            client_token="tok-987654321",
            Password="pw-123456789",
            upstream_secret="zzzsecretzzz",
            connection_id="c-9",
        )
        record = harness.records()[0]
        self.assertEqual(dict(record.attributes), {"connection_id": "c-9"})
        for secret in ("s3cr3t", "plainsecretvalue", "987654321", "pw-123", "zzzsecretzzz"):
            self.assertNotIn(secret, harness.stream.getvalue())
        self.assertEqual(record.body, "auth [REDACTED] key [REDACTED] tok [REDACTED]")

    def test_secret_in_ordinary_field_is_redacted(self) -> None:
        harness = _Harness(self)
        harness.log.emit(LogLevel.warn, "upstream said {reason}", reason="Incorrect API key provided: sk-abcdefghijklmnopqrstu")
        output = harness.stream.getvalue()
        self.assertNotIn("abcdefghijklmnopqrstu", output)
        record = harness.records()[0]
        self.assertIn("sk-[REDACTED]", record.body)
        self.assertIn("sk-[REDACTED]", record.attributes["reason"])

    def test_unformattable_event_leaks_no_secret(self) -> None:
        harness = _Harness(self)
        # A bad format string makes twisted describe the whole event instead.
        harness.log.info("{missing.attr}", token="tok-0123456789", password="pw-0123456789")
        output = harness.stream.getvalue()
        self.assertTrue(output)
        self.assertNotIn("0123456789", output)

    def test_audio_payloads_are_elided(self) -> None:
        harness = _Harness(self)
        delta = "QUJD" * 400  # 1600 base64 characters
        harness.log.debug("upstream event {event}", event=f'{{"type":"response.output_audio.delta","delta":"{delta}"}}')
        harness.log.debug("frame {frame}", frame=b"\x00\x01" * 2000)
        output = harness.stream.getvalue()
        self.assertNotIn(delta[:300], output)
        self.assertIn("base64 chars elided", output)
        self.assertIn("<4000 bytes>", output)
        self.assertNotIn("\\u0000", output)


class ConsoleTests(unittest.TestCase):
    def test_one_json_line_per_record(self) -> None:
        harness = _Harness(self)
        harness.log.info("first line\nsecond line {n}", n=1)
        harness.log.error("another")
        lines = harness.stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["body"], "first line\nsecond line 1")
        self.assertEqual(first["severity_text"], "INFO")
        self.assertEqual(first["severity_number"], 9)
        self.assertEqual(first["scope"], "openai_proxy.test")
        self.assertEqual(first["attributes"], {"n": 1})
        self.assertEqual(json.loads(lines[1])["severity_text"], "ERROR")

    def test_written_immediately(self) -> None:
        harness = _Harness(self)
        harness.log.info("now")
        # No flush or shutdown in between: the line is already there.
        self.assertEqual(len(harness.stream.getvalue().splitlines()), 1)

    def test_redirected_stdout_is_bypassed(self) -> None:
        # Under twistd, sys.stdout may itself feed the log; the console must use the real stdout.
        real = io.StringIO()
        self.patch(sys, "__stdout__", real)
        self.patch(sys, "stdout", LoggingFile(Logger(namespace="stdout", observer=LogPublisher())))
        observer = make_log_observer("info", environ={})
        self.addCleanup(observer.shutdown)
        Logger(namespace="t", observer=observer).info("to the terminal")
        self.assertEqual(json.loads(real.getvalue())["body"], "to the terminal")

    def test_event_logged_while_exporting_is_dropped(self) -> None:
        observer = make_log_observer("debug", stream=io.StringIO(), environ={})
        self.addCleanup(observer.shutdown)
        log = Logger(namespace="loop", observer=observer)

        class Chatty(LogRecordExporter):
            calls = 0

            def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
                Chatty.calls += 1
                log.info("exporting")  # would loop back into the observer
                return LogRecordExportResult.SUCCESS

            def shutdown(self) -> None:
                pass

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        observer.provider.add_log_record_processor(SimpleLogRecordProcessor(Chatty()))
        log.info("once")
        self.assertEqual(Chatty.calls, 1)


class _FakeOTLPLogExporter(InMemoryLogRecordExporter):
    instances: ClassVar[list[_FakeOTLPLogExporter]] = []

    def __init__(self, endpoint: str | None = None) -> None:
        super().__init__()
        self.endpoint = endpoint
        _FakeOTLPLogExporter.instances.append(self)


class OTLPTests(unittest.TestCase):
    def _install_module(self, module: types.ModuleType | None) -> None:
        saved = sys.modules.get(OTLP_MODULE, ...)
        sys.modules[OTLP_MODULE] = module  # type: ignore[assignment]

        def restore() -> None:
            if saved is ...:
                sys.modules.pop(OTLP_MODULE, None)
            else:
                sys.modules[OTLP_MODULE] = saved  # type: ignore[assignment]

        self.addCleanup(restore)

    def _install_fake(self) -> None:
        module = types.ModuleType(OTLP_MODULE)
        module.OTLPLogExporter = _FakeOTLPLogExporter  # type: ignore[attr-defined]
        self._install_module(module)
        _FakeOTLPLogExporter.instances = []

    def test_missing_extra_warns_once_and_keeps_logging(self) -> None:
        self._install_module(None)  # makes the import fail
        stream = io.StringIO()
        observer = make_log_observer("info", stream=stream, otlp_endpoint="http://127.0.0.1:4318", environ={})
        self.addCleanup(observer.shutdown)
        Logger(namespace="t", observer=observer).info("still here")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0]["severity_text"], "WARN")
        self.assertIn("otlp", lines[0]["body"])
        self.assertIn("http://127.0.0.1:4318/v1/logs", lines[0]["body"])
        self.assertEqual(lines[1]["body"], "still here")

    def test_missing_extra_from_environment(self) -> None:
        self._install_module(None)
        stream = io.StringIO()
        observer = make_log_observer(
            "error", stream=stream, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
        )
        self.addCleanup(observer.shutdown)
        self.assertIn("http://collector:4318/v1/logs", stream.getvalue())

    def test_no_endpoint_no_warning(self) -> None:
        self._install_module(None)
        stream = io.StringIO()
        observer = make_log_observer("debug", stream=stream, environ={})
        self.addCleanup(observer.shutdown)
        self.assertEqual(stream.getvalue(), "")

    def test_exports_to_collector_when_extra_present(self) -> None:
        self._install_fake()
        stream = io.StringIO()
        observer = make_log_observer("info", stream=stream, otlp_endpoint="http://127.0.0.1:4318", environ={})
        self.addCleanup(observer.shutdown)
        Logger(namespace="t", observer=observer).info("to both {connection_id}", connection_id="c-1", trace_id=TRACE_ID)
        self.assertTrue(observer.force_flush())
        [exporter] = _FakeOTLPLogExporter.instances
        self.assertEqual(exporter.endpoint, "http://127.0.0.1:4318/v1/logs")
        [exported] = exporter.get_finished_logs()
        self.assertEqual(exported.log_record.body, "to both c-1")
        self.assertEqual(exported.log_record.trace_id, int(TRACE_ID, 16))
        self.assertEqual(exported.resource.attributes["service.name"], "openai-proxy")
        self.assertEqual(len(stream.getvalue().splitlines()), 1)

    def test_signal_specific_endpoint_used_as_is(self) -> None:
        self._install_fake()
        observer = make_log_observer(
            "info",
            stream=io.StringIO(),
            environ={
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://collector:4318/custom/logs",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318",
            },
        )
        self.addCleanup(observer.shutdown)
        self.assertEqual([e.endpoint for e in _FakeOTLPLogExporter.instances], ["http://collector:4318/custom/logs"])

    def test_shutdown_flushes_collector_batch(self) -> None:
        self._install_fake()
        observer = make_log_observer("info", stream=io.StringIO(), otlp_endpoint="http://c:4318/v1/logs", environ={})
        Logger(namespace="t", observer=observer).info("last words")
        observer.shutdown()
        [exporter] = _FakeOTLPLogExporter.instances
        self.assertEqual(exporter.endpoint, "http://c:4318/v1/logs")
        self.assertEqual([r.log_record.body for r in exporter.get_finished_logs()], ["last words"])
