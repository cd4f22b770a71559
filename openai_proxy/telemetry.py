"""The daemon's log: ``twisted.logger`` events bridged to OpenTelemetry log records.

:func:`make_log_observer` returns a ``twisted.logger`` observer that turns each
structured event into an OpenTelemetry ``LogRecord`` and exports it:

- to the console, one compact JSON object per line (see :func:`format_console_line`
  for the keys), written synchronously so the log never lags behind the daemon;
- to an OTLP/HTTP collector as well, when an endpoint is configured and the
  ``otlp`` extra (``opentelemetry-exporter-otlp-proto-http``) is installed. That
  export runs in a batch processor's background thread with a one-second schedule,
  so a slow collector never blocks the reactor.

Secrets and audio never reach either destination: event fields whose names look
like credentials are dropped (and replaced before the message is formatted, so a
format string cannot pull them in), the formatted body and every string attribute
go through :func:`redact`, and long base64 runs (audio payloads) and raw bytes are
elided.

Call ``observer.shutdown()`` when the process stops (for example from a reactor
``("before", "shutdown")`` trigger) so the OTLP batch is flushed; an ``atexit``
hook does the same as a last resort.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import (
    LoggerProvider,
    LogRecordProcessor,
    ReadableLogRecord,
)
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    ConsoleLogRecordExporter,
    LogRecordExporter,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from twisted.logger import ILogObserver, LoggingFile, LogLevel, formatEvent
from zope.interface import implementer

from openai_proxy import __version__

__all__ = [
    "OpenTelemetryLogObserver",
    "format_console_line",
    "make_log_observer",
    "parse_log_level",
    "parse_trace_id",
    "redact",
]

SERVICE_NAME = "openai-proxy"
REDACTED = "[REDACTED]"

# twisted LogLevel -> (OTel severity number, severity text). The text keeps the
# source's own name, as the OTel data model asks.
_SEVERITY: dict[Any, tuple[SeverityNumber, str]] = {
    LogLevel.debug: (SeverityNumber.DEBUG, "DEBUG"),
    LogLevel.info: (SeverityNumber.INFO, "INFO"),
    LogLevel.warn: (SeverityNumber.WARN, "WARN"),
    LogLevel.error: (SeverityNumber.ERROR, "ERROR"),
    LogLevel.critical: (SeverityNumber.FATAL, "CRITICAL"),
}
_LEVEL_ORDER: dict[Any, int] = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_LEVEL_NAMES: dict[str, Any] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

# Event keys renamed on their way to attributes; every other simple scalar keeps its name.
_ATTRIBUTE_NAMES = {"error_code": "error.code"}
# Bookkeeping keys of twisted's legacy log system, not information about the event.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})
# Keys that carry the trace context instead of becoming attributes.
_TRACE_KEYS = frozenset({"trace_id", "span_id"})
_SECRET_FIELD = re.compile(r"authorization|api[_-]?key|apikey|token|password|passwd|secret|cookie", re.IGNORECASE)

_MAX_ATTRIBUTE_CHARS = 1024
_MAX_BODY_CHARS = 8192
_INT64 = (-(2**63), 2**63 - 1)

_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
# A UUID in its canonical 8-4-4-4-12 form (the React component's test app sends these as traceId).
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


# --- redaction -------------------------------------------------------------

_CREDENTIAL_CHARS = r"[A-Za-z0-9._~+/=\-]"
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Header values, scheme included: "Authorization: Basic abc", "'authorization': 'Token abc'".
    (
        re.compile(r"""(?i)\b((?:proxy-)?authorization)(["']?\s*[:=]\s*["']?)(?:[A-Za-z\-]+\s+)?[^"'\s,;}\]]+"""),
        r"\1\2" + REDACTED,
    ),
    # OpenAI secret keys (sk-..., sk-proj-...) and ephemeral client keys (ek_...).
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-" + REDACTED),
    (re.compile(r"\bek_[A-Za-z0-9_\-]{8,}"), "ek_" + REDACTED),
    # JSON Web Tokens (Deepgram temporary tokens are JWTs).
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"), REDACTED),
    # "Bearer <t>", "Token <t>" and the browser subprotocol form "token, <t>".
    (
        re.compile(r"(?i)\b(bearer|token)(\s*,\s*|\s+)" + _CREDENTIAL_CHARS + r"{8,}"),
        r"\1\2" + REDACTED,
    ),
    # key=value / "key": "value" pairs (query strings, JSON, reprs).
    (
        re.compile(
            r"""(?i)\b(api[_-]?key|apikey|access[_-]?token|client[_-]?secret|password|passwd|secret|token)"""
            r"""(["']?\s*[:=]\s*["']?)[^"'\s&,;}\]]+"""
        ),
        r"\1\2" + REDACTED,
    ),
)
# Base64 runs this long are audio (or another binary payload), never prose.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{256,}={0,2}")


def redact(text: str) -> str:
    """Mask credentials in ``text``.

    Masks OpenAI keys (``sk-…``, ``ek_…``), JSON Web Tokens, the value of any
    ``Authorization`` header, ``Bearer <credential>`` / ``Token <credential>`` /
    ``token, <credential>`` (credentials of eight characters or more), and the values
    of ``api_key=``, ``token:``, ``password=``, ``secret=`` style pairs. Everything
    else is left as it is.
    """
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(text: str, limit: int) -> str:
    """Redact credentials, elide audio-sized base64 runs, cap the length."""
    text = _BASE64_RUN.sub(lambda m: f"[{len(m.group(0))} base64 chars elided]", redact(text))
    if len(text) > limit:
        text = text[:limit] + f"…[{len(text) - limit} chars cut]"
    return text


def _is_secret_field(name: str) -> bool:
    return _SECRET_FIELD.search(name) is not None


# --- trace ids -------------------------------------------------------------


def _valid_hex_id(value: str) -> bool:
    return int(value, 16) != 0


def parse_trace_id(query_trace_id: str | None, traceparent: str | None) -> str | None:
    """Return the trace id a client asked its session to be logged under.

    ``query_trace_id`` is a ``traceId`` query parameter: 32 hex digits, or a UUID
    with dashes (8-4-4-4-12 hex digits, its dashes dropped), either case, not all zero. ``traceparent`` is a W3C Trace Context header
    (``version-traceid-parentid-flags``): lowercase hex, version ``ff`` refused,
    version ``00`` with exactly four fields, trace and parent ids not all zero.
    A valid query parameter wins over the header. Returns the id as 32 lowercase
    hex digits, or None when neither is present and valid.
    """
    if query_trace_id is not None:
        candidate = query_trace_id.strip()
        if _UUID.fullmatch(candidate):
            candidate = candidate.replace("-", "")
        if _HEX32.fullmatch(candidate) and _valid_hex_id(candidate):
            return candidate.lower()
    if traceparent is not None:
        match = _TRACEPARENT.fullmatch(traceparent.strip())
        if match is not None:
            version, trace_id, parent_id, _flags, rest = match.groups()
            version_ok = version != "ff" and (version != "00" or rest is None)
            if version_ok and _valid_hex_id(trace_id) and _valid_hex_id(parent_id):
                return trace_id
    return None


def _trace_context(event: Mapping[str, Any]) -> Context | None:
    """An OTel context carrying the event's ``trace_id`` (and ``span_id``), if valid."""
    trace_id = event.get("trace_id")
    if not isinstance(trace_id, str) or not _HEX32.fullmatch(trace_id) or not _valid_hex_id(trace_id):
        return None
    span_id = 0
    raw_span = event.get("span_id")
    if isinstance(raw_span, str) and re.fullmatch(r"[0-9a-fA-F]{16}", raw_span):
        span_id = int(raw_span, 16)
    span_context = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=span_id,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


# --- levels ----------------------------------------------------------------


def parse_log_level(name: str) -> Any:
    """Map ``debug|info|warn|warning|error|critical`` (any case) to a ``LogLevel``.

    Raises ValueError naming the accepted values for anything else.
    """
    try:
        return _LEVEL_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {name!r}: expected one of debug, info, warn, error, critical"
        ) from None


# --- console format --------------------------------------------------------


def format_console_line(record: ReadableLogRecord) -> str:
    """One log record as one line of compact JSON, newline-terminated.

    Keys, in order, present only when they have a value: ``timestamp`` (ISO 8601,
    UTC), ``severity_text``, ``severity_number``, ``scope`` (the twisted log
    namespace), ``body``, ``trace_id`` and ``span_id`` (lowercase hex),
    ``attributes``. JSON escapes newlines, so a record never spans two lines.
    """
    log_record = record.log_record
    line: dict[str, Any] = {}
    stamp = log_record.timestamp or log_record.observed_timestamp
    if stamp:
        moment = datetime.fromtimestamp(stamp / 1e9, tz=UTC)
        line["timestamp"] = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    if log_record.severity_text:
        line["severity_text"] = log_record.severity_text
    if log_record.severity_number is not None:
        line["severity_number"] = log_record.severity_number.value
    if record.instrumentation_scope is not None and record.instrumentation_scope.name:
        line["scope"] = record.instrumentation_scope.name
    if log_record.body is not None:
        line["body"] = log_record.body
    if log_record.trace_id:
        line["trace_id"] = trace.format_trace_id(log_record.trace_id)
    if log_record.span_id:
        line["span_id"] = trace.format_span_id(log_record.span_id)
    if log_record.attributes:
        line["attributes"] = dict(log_record.attributes)
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


# --- the observer ----------------------------------------------------------


@implementer(ILogObserver)
class OpenTelemetryLogObserver:
    """A ``twisted.logger`` observer that emits events at or above ``level`` as OTel log records.

    ``provider`` is the ``LoggerProvider`` whose processors export the records; each
    event is emitted through the provider's logger for the event's ``log_namespace``.
    Callable from any thread; an event logged while a record is being exported (for
    example by an exporter) is dropped rather than looping back.
    """

    def __init__(self, provider: LoggerProvider, level: str = "info") -> None:
        self.provider = provider
        self._threshold = _LEVEL_ORDER[parse_log_level(level)]
        self._busy = threading.local()

    def __call__(self, event: Mapping[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if _LEVEL_ORDER.get(level, 1) < self._threshold:
            return
        if getattr(self._busy, "active", False):
            return
        self._busy.active = True
        try:
            self._emit(event, level)
        finally:
            self._busy.active = False

    def _emit(self, event: Mapping[str, Any], level: Any) -> None:
        severity_number, severity_text = _SEVERITY.get(level, _SEVERITY[LogLevel.info])
        safe_event = _formatting_copy(event)
        body = _scrub(formatEvent(safe_event), _MAX_BODY_CHARS)
        attributes = _attributes(event)
        log_time = event.get("log_time")
        timestamp = int(log_time * 1e9) if isinstance(log_time, (int, float)) else None
        namespace = event.get("log_namespace")
        logger = self.provider.get_logger(namespace if isinstance(namespace, str) else SERVICE_NAME)
        logger.emit(
            timestamp=timestamp,
            context=_trace_context(event),
            severity_number=severity_number,
            severity_text=severity_text,
            body=body,
            attributes=attributes,
        )

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Export whatever the processors still hold; True when that finished in time."""
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop every processor and exporter. Call once, when the process stops."""
        self.provider.shutdown()


def _formatting_copy(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event with secret-named fields masked and bytes summarised, for ``formatEvent``.

    Masking before formatting means a format string such as ``"{authorization}"``
    cannot put a secret in the body, and an unformattable event (whose fallback
    text lists every field) cannot either.
    """
    copy: dict[str, Any] = {}
    for key, value in event.items():
        if not key.startswith("log_") and _is_secret_field(key):
            copy[key] = REDACTED
        elif isinstance(value, (bytes, bytearray, memoryview)):
            copy[key] = f"<{len(value)} bytes>"
        else:
            copy[key] = value
    return copy


def _attributes(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event's simple scalar fields as OTel attributes, secrets dropped."""
    attributes: dict[str, Any] = {}
    for key, value in event.items():
        if (
            key.startswith("log_")
            or key in _LEGACY_KEYS
            or key in _TRACE_KEYS
            or _is_secret_field(key)
            or value is None
            or not isinstance(value, (str, int, float, bool))
        ):
            continue
        if isinstance(value, str):
            value = _scrub(value, _MAX_ATTRIBUTE_CHARS)
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            value = str(value)  # OTLP attributes are int64
        attributes[_ATTRIBUTE_NAMES.get(key, key)] = value
    failure = event.get("log_failure")
    if failure is not None:
        attributes["exception.type"] = getattr(getattr(failure, "type", None), "__name__", "Exception")
        attributes["exception.message"] = _scrub(str(getattr(failure, "value", "")), _MAX_ATTRIBUTE_CHARS)
        get_traceback = getattr(failure, "getTraceback", None)
        if callable(get_traceback):
            attributes["exception.stacktrace"] = _scrub(get_traceback(), _MAX_BODY_CHARS)
    return attributes


# --- construction ----------------------------------------------------------


def _otlp_logs_url(otlp_endpoint: str | None, environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP logs URL, following the OTEL_EXPORTER_OTLP_* conventions.

    ``otlp_endpoint`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` are base URLs (``/v1/logs``
    is appended); ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` is used as it is.
    """
    if otlp_endpoint:
        base = otlp_endpoint
    elif environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"]
    elif environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        base = environ["OTEL_EXPORTER_OTLP_ENDPOINT"]
    else:
        return None
    base = base.rstrip("/")
    return base if base.endswith("/v1/logs") else base + "/v1/logs"


def _otlp_processor(url: str, environ: Mapping[str, str]) -> LogRecordProcessor | str:
    """A batch processor exporting to ``url``, or the reason there cannot be one."""
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    except ImportError as exc:
        return f"{exc.__class__.__name__}: {exc}"
    exporter: LogRecordExporter = OTLPLogExporter(endpoint=url)
    try:
        delay = float(environ.get("OTEL_BLRP_SCHEDULE_DELAY", "1000"))
    except ValueError:
        delay = 1000.0
    # A bounded delay: the collector's view of the log must not lag minutes behind.
    return BatchLogRecordProcessor(exporter, schedule_delay_millis=max(1.0, min(delay, 5000.0)))


def make_log_observer(
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    otlp_endpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> OpenTelemetryLogObserver:
    """Build the daemon's log observer (an ``ILogObserver`` with ``shutdown()``).

    ``level``: debug, info, warn (or warning), error or critical; events below it are
    dropped. ``stream``: where console lines go (default: the process's standard
    output; twisted's stdout-to-log redirection is bypassed so the log cannot feed
    itself). ``otlp_endpoint``: an OTLP/HTTP collector base URL such as
    ``http://collector:4318``; when None, ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` from ``environ`` (default ``os.environ``) is used.
    When a collector is configured but the ``otlp`` extra is not installed, one
    warning record says so and the console log carries on.

    Raises ValueError for an unknown ``level``.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    parse_log_level(level)  # fail before building anything
    console: IO[str] = sys.stdout if stream is None else stream
    if isinstance(console, LoggingFile):
        # twistd redirected stdout into the log: write to the real one instead.
        console = sys.__stdout__
    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME", SERVICE_NAME), "service.version": __version__}
    )
    provider = LoggerProvider(resource=resource)
    # Synchronous console export: one short write per record, nothing held back.
    provider.add_log_record_processor(
        SimpleLogRecordProcessor(ConsoleLogRecordExporter(out=console, formatter=format_console_line))
    )
    observer = OpenTelemetryLogObserver(provider, level)
    url = _otlp_logs_url(otlp_endpoint, env)
    if url is not None:
        processor = _otlp_processor(url, env)
        if isinstance(processor, str):
            provider.get_logger(__name__).emit(
                severity_number=SeverityNumber.WARN,
                severity_text="WARN",
                body=(
                    f"OTLP log export to {redact(url)} is off: it needs the 'otlp' extra "
                    f"(pip install 'openai-proxy[otlp]') ({processor})"
                ),
                attributes={"otlp.endpoint": redact(url)},
            )
        else:
            provider.add_log_record_processor(processor)
    return observer
