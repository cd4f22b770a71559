"""
The daemon's metrics: OpenTelemetry instruments, exported by the standard ``OTEL_*`` settings and served
as Prometheus text on ``/metrics`` from the same instruments.

Instruments (OpenTelemetry name → Prometheus name; attributes):

- ``openai_proxy.sessions.active`` → ``openai_proxy_sessions_active`` (gauge): open client sessions.
- ``openai_proxy.sessions`` → ``openai_proxy_sessions_total``: sessions opened since the start.
- ``openai_proxy.draining`` → ``openai_proxy_draining`` (gauge): 1 while the daemon drains.
- ``openai_proxy.handshakes`` → ``openai_proxy_handshakes_total`` {outcome}: WebSocket opening handshakes;
  outcome ``accepted``, ``unauthorized`` (401), ``forbidden`` (403, origin), ``unavailable`` (503:
  draining or full), ``error`` (500) or ``refused`` (another status).
- ``openai_proxy.client.errors`` → ``openai_proxy_client_errors_total`` {type, code}: ``Error`` and
  ``Warning`` messages sent to clients.
- ``openai_proxy.upstream.errors`` → ``openai_proxy_upstream_errors_total`` {code}: upstream ``error``
  events and upstream connection failures.
- ``openai_proxy.messages`` → ``openai_proxy_messages_total`` {direction, type}: JSON messages;
  direction ``client_in`` (client → daemon), ``client_out``, ``upstream_in`` (upstream → daemon),
  ``upstream_out``.
- ``openai_proxy.audio`` (s) → ``openai_proxy_audio_seconds_total`` {direction}: audio, ``in`` (from
  clients) and ``out`` (to clients), in seconds of the client's format.
- ``openai_proxy.turn.latency`` (s) → ``openai_proxy_turn_latency_seconds`` (histogram): from the end of
  the user's speech (the upstream's ``input_audio_buffer.speech_stopped``) to the first agent audio sent
  to the client.
- ``openai_proxy.relay.latency`` (s) → ``openai_proxy_relay_latency_seconds`` (histogram) {direction}:
  the daemon's own time handling one message, ``client_to_upstream`` and ``upstream_to_client``; one
  message in :data:`SAMPLE_EVERY` per session and direction is timed.
- ``openai_proxy.upstream.rollovers``, ``openai_proxy.upstream.reconnects`` → ``…_total``: planned
  upstream session switches and reconnections after a drop.
- ``openai_proxy.reloads`` → ``openai_proxy_reloads_total`` {outcome}: SIGHUP reloads, ``applied`` or
  ``failed``.

Every attribute takes its values from a fixed set (anything else counts as ``other``), so no client or
upstream can grow the number of series.  Per-frame work is a couple of integer additions on plain Python
objects; the instruments read those sums when a reader collects.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from time import perf_counter
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from openai_proxy import __version__, errors

__all__ = ["Metrics", "SessionMeter", "render_prometheus", "SAMPLE_EVERY"]

#: One message in this many (per session and direction) has its handling time recorded.
SAMPLE_EVERY = 64
OTHER = "other"

#: Deepgram Voice Agent v1 client messages (reference/deepgram-voice-agent-v1.md).
CLIENT_MESSAGE_TYPES = frozenset({
    "Settings", "UpdatePrompt", "UpdateSpeak", "UpdateThink", "UpdateListen", "InjectAgentMessage",
    "InjectUserMessage", "FunctionCallResponse", "KeepAlive", "AgentKeepAlive",
})
#: Deepgram Voice Agent v1 server messages (and the daemon's compatibility extras).
SERVER_MESSAGE_TYPES = frozenset({
    "Welcome", "SettingsApplied", "ConversationText", "UserStartedSpeaking", "AgentThinking",
    "FunctionCallRequest", "AgentStartedSpeaking", "AgentAudioDone", "Error", "Warning",
    "PromptUpdated", "SpeakUpdated", "ThinkUpdated", "ListenUpdated", "InjectionRefused", "History",
    "UtteranceEnd",
})
#: OpenAI Realtime (GA) server events (reference/openai-realtime-ga.md).
UPSTREAM_EVENT_TYPES = frozenset({
    "error", "session.created", "session.updated", "conversation.item.added", "conversation.item.done",
    "conversation.item.created", "conversation.item.retrieved", "conversation.item.deleted",
    "conversation.item.truncated", "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.delta", "conversation.item.input_audio_transcription.failed",
    "conversation.item.input_audio_transcription.segment", "input_audio_buffer.committed",
    "input_audio_buffer.cleared", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
    "input_audio_buffer.timeout_triggered", "output_audio_buffer.started", "output_audio_buffer.stopped",
    "output_audio_buffer.cleared", "response.created", "response.done", "response.output_item.added",
    "response.output_item.done", "response.content_part.added", "response.content_part.done",
    "response.output_text.delta", "response.output_text.done", "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done", "response.output_audio.delta", "response.output_audio.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done", "rate_limits.updated",
})
#: OpenAI Realtime (GA) client events.
UPSTREAM_CLIENT_EVENT_TYPES = frozenset({
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "output_audio_buffer.clear", "conversation.item.create", "conversation.item.retrieve",
    "conversation.item.truncate", "conversation.item.delete", "response.create", "response.cancel",
})
#: The daemon's own codes (docs/errors.md).
DAEMON_CODES = frozenset(v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str))
#: OpenAI error codes seen from the Realtime API.
UPSTREAM_CODES = frozenset({
    "invalid_request_error", "invalid_value", "invalid_type", "missing_required_parameter",
    "unknown_parameter", "decimal_below_min_value", "decimal_above_max_value", "integer_below_min_value",
    "integer_above_max_value", "string_above_max_length", "session_expired", "rate_limit_exceeded",
    "insufficient_quota", "server_error", "invalid_api_key", "model_not_found",
    "conversation_already_has_active_response", "response_cancel_not_active",
    "input_audio_buffer_commit_empty", "item_truncate_invalid_item_id", "item_not_found",
    "invalid_event", "unknown_event",
}) | errors.BENIGN_UPSTREAM_CODES
KNOWN_CODES = DAEMON_CODES | UPSTREAM_CODES

_HANDSHAKE_OUTCOMES = {401: "unauthorized", 403: "forbidden", 503: "unavailable", 500: "error"}
_TURN_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_RELAY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


def bounded(value: Any, known: frozenset[str]) -> str:
    """``value`` when it is one of ``known``, else ``"other"``."""
    return value if isinstance(value, str) and value in known else OTHER


def _bytes_per_second(fmt: Any) -> float:
    """Bytes per second of a client audio format (``encoding``, ``sample_rate``); linear16 is 2 bytes."""
    try:
        width = 2 if fmt.encoding == "linear16" else 1
        return float(fmt.sample_rate) * width
    except (AttributeError, TypeError, ValueError):
        return 48000.0  # linear16 at 24 kHz, the default


class SessionMeter:
    """
    One session's counts, kept on plain attributes (the relay adds to them per frame) and read by the
    instruments when a reader collects.
    """

    __slots__ = ("_metrics", "audio_in_bytes", "audio_out_bytes", "frames_in", "events_in",
                 "_speech_stopped", "session")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.audio_in_bytes = 0
        self.audio_out_bytes = 0
        self.frames_in = 0
        self.events_in = 0
        self._speech_stopped: float | None = None
        #: The session (its ``plan`` gives the client's audio formats).
        self.session: Any = None

    # -- per message (JSON only; audio frames only add bytes) -----------------------------------------

    def client_message(self, message_type: Any) -> None:
        self._metrics.client_in[bounded(message_type, CLIENT_MESSAGE_TYPES)] += 1

    def upstream_event(self, event: dict[str, Any], now: Callable[[], float]) -> None:
        """Count one upstream event; measure the turn latency; count ``error`` events by code."""
        kind = event.get("type")
        if kind not in UPSTREAM_EVENT_TYPES:
            kind = OTHER
        metrics = self._metrics
        metrics.upstream_in[kind] += 1
        if kind == "response.output_audio.delta":
            if self._speech_stopped is not None:
                metrics.turn_latency.record(max(0.0, now() - self._speech_stopped))
                self._speech_stopped = None
        elif kind == "input_audio_buffer.speech_stopped":
            self._speech_stopped = now()
        elif kind == "error":
            error = event.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            metrics.upstream_error(code)

    def time(self, direction: str, handle: Callable[..., None], *args: Any) -> None:
        """Run ``handle(*args)`` and record how long it took (sampled by the caller)."""
        started = perf_counter()
        try:
            handle(*args)
        finally:
            self._metrics.relay_latency.record(perf_counter() - started, {"direction": direction})

    # -- audio seconds -------------------------------------------------------------------------------

    def audio_seconds(self) -> tuple[float, float]:
        """Seconds of audio (in, out) so far, in the session's client formats."""
        plan = getattr(self.session, "plan", None)
        rate_in = _bytes_per_second(getattr(plan, "input_format", None))
        rate_out = _bytes_per_second(getattr(plan, "output_format", None))
        return self.audio_in_bytes / rate_in, self.audio_out_bytes / rate_out

    def finish(self) -> None:
        """The session ended: fold its audio into the process totals."""
        self._metrics.session_finished(self)


class Metrics:
    """
    The process's instruments on one ``MeterProvider``.

    ``readers``: extra metric readers (tests pass an ``InMemoryMetricReader``).  ``environ`` (default
    ``os.environ``) chooses exporters: ``OTEL_METRICS_EXPORTER`` (``otlp``, ``none``, ``prometheus``,
    comma-separated; unset means ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` is set) and the exporter's own ``OTEL_EXPORTER_OTLP_*`` and
    ``OTEL_METRIC_EXPORT_INTERVAL`` settings.  ``/metrics`` is always served from its own in-process
    reader.  ``problems`` lists what could not be set up (e.g. the ``otlp`` extra is missing).
    """

    def __init__(
        self,
        readers: Iterable[MetricReader] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.problems: list[str] = []
        self.prometheus_reader = InMemoryMetricReader()
        all_readers: list[MetricReader] = [self.prometheus_reader, *readers, *self._exporters(env)]
        #: Every reader: the one behind ``/metrics``, the given ones, the exporters'.
        self.readers = tuple(all_readers)
        resource = Resource.create(
            {"service.name": env.get("OTEL_SERVICE_NAME", "openai-proxy"), "service.version": __version__}
        )
        self.provider = MeterProvider(metric_readers=all_readers, resource=resource)
        meter = self.provider.get_meter("openai_proxy", __version__)
        self._lock = threading.Lock()
        # Plain counters the hot path adds to; read by observable instruments.
        self.client_in: Counter[str] = Counter()
        self.client_out: Counter[str] = Counter()
        self.upstream_in: Counter[str] = Counter()
        self.upstream_out: Counter[str] = Counter()
        self._finished_audio = [0.0, 0.0]
        self._reported_audio = [0.0, 0.0]
        self._live: set[SessionMeter] = set()
        self._sessions_active: Callable[[], int] = lambda: 0
        self._draining: Callable[[], bool] = lambda: False

        self.sessions = meter.create_counter(
            "openai_proxy.sessions", unit="{session}", description="Client sessions opened since the start.")
        self.handshakes = meter.create_counter(
            "openai_proxy.handshakes", unit="{handshake}", description="WebSocket opening handshakes by outcome.")
        self.client_errors = meter.create_counter(
            "openai_proxy.client.errors", unit="{message}",
            description="Error and Warning messages sent to clients, by type and code.")
        self.upstream_errors = meter.create_counter(
            "openai_proxy.upstream.errors", unit="{error}",
            description="Upstream error events and connection failures, by code.")
        self.turn_latency = meter.create_histogram(
            "openai_proxy.turn.latency", unit="s",
            description="End of the user's speech to the first agent audio sent to the client.",
            explicit_bucket_boundaries_advisory=_TURN_BUCKETS)
        self.relay_latency = meter.create_histogram(
            "openai_proxy.relay.latency", unit="s",
            description="The daemon's own time handling one message, by direction (sampled).",
            explicit_bucket_boundaries_advisory=_RELAY_BUCKETS)
        self.rollovers = meter.create_counter(
            "openai_proxy.upstream.rollovers", unit="{rollover}",
            description="Planned switches to a new upstream session.")
        self.reconnects = meter.create_counter(
            "openai_proxy.upstream.reconnects", unit="{reconnect}",
            description="Upstream reconnections after a drop.")
        self.replayed_items = meter.create_counter(
            "openai_proxy.upstream.replayed_items", unit="{item}",
            description="Conversation items replayed into new upstream sessions (SPEC §8).")
        self.switch_duration = meter.create_histogram(
            "openai_proxy.upstream.switch.duration", unit="s",
            description="Time from opening a new upstream session to switching over to it.",
            explicit_bucket_boundaries_advisory=_TURN_BUCKETS)
        self.reloads = meter.create_counter(
            "openai_proxy.reloads", unit="{reload}", description="Configuration reloads (SIGHUP) by outcome.")
        # Present (at 0) from the start, so that dashboards and alerts see them before the first event.
        for counter in (self.sessions, self.rollovers, self.reconnects):
            counter.add(0)
        meter.create_observable_up_down_counter(
            "openai_proxy.sessions.active", callbacks=[self._observe_active], unit="{session}",
            description="Open client sessions.")
        meter.create_observable_gauge(
            "openai_proxy.draining", callbacks=[self._observe_draining],
            description="1 while the daemon drains for a shutdown.")
        meter.create_observable_counter(
            "openai_proxy.messages", callbacks=[self._observe_messages], unit="{message}",
            description="JSON messages by direction and type.")
        meter.create_observable_counter(
            "openai_proxy.audio", callbacks=[self._observe_audio], unit="s",
            description="Seconds of audio from clients (in) and to clients (out).")

    def _exporters(self, env: Mapping[str, str]) -> list[MetricReader]:
        choice = env.get("OTEL_METRICS_EXPORTER", "").strip().lower()
        if choice:
            names = {name.strip() for name in choice.split(",") if name.strip()}
        elif env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            names = {"otlp"}
        else:
            names = set()
        for unknown in sorted(names - {"otlp", "none", "prometheus"}):
            self.problems.append(f"OTEL_METRICS_EXPORTER: {unknown!r} is not supported (otlp, prometheus, none)")
        if "otlp" not in names or "none" in names:
            return []
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError as e:
            self.problems.append(
                f"OTLP metric export is off: it needs the 'otlp' extra (pip install 'openai-proxy[otlp]') ({e})"
            )
            return []
        endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        if not endpoint and env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/metrics"
        # Other OTEL_EXPORTER_OTLP_* settings (headers, timeout, compression) the exporter reads itself.
        return [PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint or None))]

    # -- sources the registry provides ----------------------------------------------------------------

    def observe_registry(self, active: Callable[[], int], draining: Callable[[], bool]) -> None:
        self._sessions_active = active
        self._draining = draining

    # -- recording -----------------------------------------------------------------------------------

    def handshake(self, status: int | None) -> None:
        """One opening handshake: ``None`` when accepted, else the HTTP status it was refused with."""
        outcome = "accepted" if status is None else _HANDSHAKE_OUTCOMES.get(status, "refused")
        self.handshakes.add(1, {"outcome": outcome})

    def client_message(self, message: dict[str, Any]) -> None:
        """A JSON message on its way to a client (counted by type; errors by code)."""
        kind = message.get("type")
        self.client_out[bounded(kind, SERVER_MESSAGE_TYPES)] += 1
        if kind in ("Error", "Warning"):
            self.client_errors.add(1, {"type": kind, "code": bounded(message.get("code"), KNOWN_CODES)})

    def upstream_message(self, event: dict[str, Any]) -> None:
        self.upstream_out[bounded(event.get("type"), UPSTREAM_CLIENT_EVENT_TYPES)] += 1

    #: Session continuity counts (``Session.stats`` names) → (instrument, its ``outcome``).
    _CONTINUITY = {
        "rollovers": ("rollovers", "completed"),
        "rollovers_forced": ("rollovers", "forced"),
        "rollovers_failed": ("rollovers", "failed"),
        "reconnects": ("reconnects", "reconnected"),
        "reconnects_failed": ("reconnects", "gave_up"),
    }

    def continuity(self, name: str, amount: int = 1) -> None:
        """
        One of a session's continuity counts (SPEC §8): rollovers and reconnects by ``outcome``
        (``forced`` counts rollovers forced at the hard deadline, which also count as ``completed``
        once they complete), replayed items, and ``switch_ms`` (a switch's duration, in ms).
        """
        if name == "replayed_items":
            self.replayed_items.add(amount)
        elif name == "switch_ms":
            self.switch_duration.record(amount / 1000.0)
        elif name in self._CONTINUITY:
            instrument, outcome = self._CONTINUITY[name]
            getattr(self, instrument).add(amount, {"outcome": outcome})

    def upstream_error(self, code: Any) -> None:
        self.upstream_errors.add(1, {"code": bounded(code, KNOWN_CODES)})

    def session_meter(self) -> SessionMeter:
        """A new session's meter; counted as opened and as live."""
        meter = SessionMeter(self)
        with self._lock:
            self._live.add(meter)
        self.sessions.add(1)
        return meter

    def session_finished(self, meter: SessionMeter) -> None:
        seconds_in, seconds_out = meter.audio_seconds()
        with self._lock:
            if meter in self._live:
                self._live.discard(meter)
                self._finished_audio[0] += seconds_in
                self._finished_audio[1] += seconds_out

    # -- observable callbacks (run in the collecting thread) -----------------------------------------

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self._sessions_active())

    def _observe_draining(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(int(bool(self._draining())))

    def _observe_messages(self, options: CallbackOptions) -> Iterable[Observation]:
        for direction, counts in (("client_in", self.client_in), ("client_out", self.client_out),
                                  ("upstream_in", self.upstream_in), ("upstream_out", self.upstream_out)):
            for kind, count in dict(counts).items():
                yield Observation(count, {"direction": direction, "type": kind})

    def _observe_audio(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._finished_audio)
            for meter in self._live:
                seconds_in, seconds_out = meter.audio_seconds()
                totals[0] += seconds_in
                totals[1] += seconds_out
            # A counter never goes down, even if a format changed mid-session.
            for index in (0, 1):
                self._reported_audio[index] = max(self._reported_audio[index], totals[index])
            reported = list(self._reported_audio)
        yield Observation(reported[0], {"direction": "in"})
        yield Observation(reported[1], {"direction": "out"})

    # -- output --------------------------------------------------------------------------------------

    def prometheus_text(self) -> str:
        """Every instrument in Prometheus' text exposition format (version 0.0.4)."""
        return render_prometheus(self.prometheus_reader.get_metrics_data())

    def shutdown(self) -> None:
        """Flush and stop the exporters (once, when the process stops)."""
        self.provider.shutdown()


# -- Prometheus text --------------------------------------------------------------------------------

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_UNIT_SUFFIX = {"s": "seconds", "By": "bytes"}


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(attributes: Mapping[str, Any] | None, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = [(_NAME_BAD.sub("_", str(k)), _escape_label(v)) for k, v in (attributes or {}).items()]
    pairs += list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render_prometheus(data: Any) -> str:
    """``MetricsData`` (cumulative) as Prometheus text: dots become underscores, a unit of ``s`` adds
    ``_seconds``, monotonic sums end in ``_total``, histograms give ``_bucket``/``_sum``/``_count``."""
    lines: list[str] = []
    if data is None:
        return ""
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                name = _NAME_BAD.sub("_", metric.name)
                suffix = _UNIT_SUFFIX.get(metric.unit or "")
                if suffix and not name.endswith("_" + suffix):
                    name += "_" + suffix
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    kind, sample = "counter", name + "_total"
                elif isinstance(points, (Sum, Gauge)):
                    kind, sample = "gauge", name
                elif isinstance(points, Histogram):
                    kind, sample = "histogram", name
                else:
                    continue
                lines.append(f"# HELP {sample if kind == 'counter' else name} {_escape_help(metric.description or '')}")
                lines.append(f"# TYPE {sample if kind == 'counter' else name} {kind}")
                for point in points.data_points:
                    if kind == "histogram":
                        cumulative = 0
                        bounds = list(point.explicit_bounds) + [float("inf")]
                        for bound, count in zip(bounds, point.bucket_counts, strict=False):
                            cumulative += count
                            le = (("le", _number(bound)),)
                            lines.append(f"{name}_bucket{_labels(point.attributes, le)} {cumulative}")
                        lines.append(f"{name}_sum{_labels(point.attributes)} {_number(point.sum)}")
                        lines.append(f"{name}_count{_labels(point.attributes)} {point.count}")
                    else:
                        lines.append(f"{sample}{_labels(point.attributes)} {_number(point.value)}")
    return "\n".join(lines) + "\n"
