"""
``twistd openai-proxy``: the command-line options and the service tree.

``makeService`` builds a :class:`DaemonService` (a ``MultiService``) holding the session registry, one
listening service per ``--listen`` endpoint and, with ``--simulator``, the built-in simulated upstream.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, endpoints
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from openai_proxy import __version__
from openai_proxy.config import Config, ConfigError, build_config
from openai_proxy.functions import FunctionCaller
from openai_proxy.metrics import Metrics
from openai_proxy.relay import ClientFactory, SessionRegistry, UpstreamConnector
from openai_proxy.reload import Reloader
from openai_proxy.web import make_metrics_site, make_site

_log = Logger(namespace="openai_proxy")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve Deepgram's Voice Agent API v1 (the official Deepgram SDKs, browsers, telephony bridges) "
        "on top of OpenAI's Realtime API. Settings come from options, then the environment, then a "
        ".env file; see docs/configuration.md."
    )
    optFlags = [
        ["simulator", None, "Serve with the built-in simulated upstream: no key, no network."],
        ["no-query-token", None, "Refuse client tokens in the URL (?token=) [OPENAI_PROXY_QUERY_TOKEN=off]."],
        ["demo", None, "Serve the browser demo page at /demo [OPENAI_PROXY_DEMO; on with --simulator]."],
        ["no-demo", None, "Do not serve /demo, even with --simulator."],
    ]
    optParameters = [
        ["env-file", None, None, "The .env file to read (default: ./.env when present)."],
        ["api-key-file", None, None, "File holding the OpenAI key (else OPENAI_API_KEY)."],
        ["upstream-url", None, None, "Upstream base URL [OPENAI_REALTIME_URL; "
                                     "default wss://api.openai.com/v1/realtime]."],
        ["model", None, None, "Default realtime model [OPENAI_REALTIME_MODEL; gpt-realtime]."],
        ["allowed-models", None, None, "Comma-separated models (globs) a client's Settings may "
                                       "choose [OPENAI_PROXY_ALLOWED_MODELS; gpt-realtime*]."],
        ["voice", None, None, "Default voice [OPENAI_REALTIME_VOICE; marin]."],
        ["transcription-model", None, None, "Model transcribing user speech "
                                            "[OPENAI_PROXY_TRANSCRIPTION_MODEL; gpt-4o-mini-transcribe]."],
        ["client-tokens-file", None, None, "File with one client token per line; clients must "
                                           "present one [OPENAI_PROXY_CLIENT_TOKENS]."],
        ["log-level", None, None, "debug, info, warn, error or critical [LOG_LEVEL; info; "
                                  "OPENAI_PROXY_DEBUG=1 means debug]."],
        ["upstream-ca", None, None, "PEM file of the CA that signs the upstream's certificate "
                                    "(default: the system's trust store)."],
        ["max-message-bytes", None, None, "Largest client message in bytes [1048576]."],
        ["max-sessions", None, None, "Concurrent sessions [200]."],
        ["handshake-timeout", None, None, "Seconds for WebSocket opening handshakes [10]."],
        ["audio-buffer-seconds", None, None, "Client audio held before the session is ready [5]."],
        ["function-call-timeout", None, None, "Seconds to wait for a response that asked for "
                                              "functions to end [10]."],
        ["shutdown-grace", None, None, "Seconds sessions get to finish after SIGTERM [30]."],
        ["ping-interval", None, None, "Seconds between pings to clients; 0 disables [20]."],
        ["upstream-ping-interval", None, None, "Seconds between pings to the upstream; 0 disables [15]."],
        ["rollover-after", None, None, "Seconds after which an upstream session is rolled over at "
                                       "the next quiet moment [OPENAI_PROXY_ROLLOVER_AFTER; 3300, "
                                       "scaled to a shorter announced expiry]."],
        ["function-url-prefixes", None, None, "Comma-separated URL prefixes server-side functions "
                                              "may call [OPENAI_PROXY_FUNCTION_URL_PREFIXES; none: off]."],
        ["function-timeout", None, None, "Seconds a server-side function has to answer [10]."],
        ["function-max-response-bytes", None, None, "Largest server-side function answer [65536]."],
        ["client-stall-timeout", None, None, "Seconds a client may leave the daemon's output unread "
                                             "before it is dropped [30]."],
        ["max-pending-connections", None, None, "Concurrent connections not yet upgraded to "
                                                "WebSocket sessions [128]."],
        ["upstream-kind", None, None, "openai or azure [OPENAI_PROXY_UPSTREAM_KIND; azure when the "
                                      "upstream URL is an Azure OpenAI host, else openai]."],
        ["azure-ad-token-file", None, None, "Azure: file holding a Microsoft Entra token, re-read for "
                                            "every session [AZURE_OPENAI_AD_TOKEN_FILE]."],
        ["allowed-origins", None, None, "Comma-separated browser origins (scheme://host[:port], * globs, "
                                        "null) allowed to connect [OPENAI_PROXY_ALLOWED_ORIGINS; any]."],
        ["simulator-expire-after", None, None, "With --simulator: simulated sessions expire "
                                               "(session_expired) after this many seconds [3600]."],
    ]
    optFlags += [
        ["metrics-require-token", None, "/metrics answers 401 without a client token "
                                        "[OPENAI_PROXY_METRICS_REQUIRE_TOKEN]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics-listen"] = []
        self["simulator-drop"] = []
        self.config: Config | None = None

    def opt_metrics_listen(self, description: str) -> None:
        """Endpoint serving /metrics (then not served on --listen), repeatable [OPENAI_PROXY_METRICS_LISTEN]."""
        self["metrics-listen"].append(description)

    def parseOptions(self, options: Any = None) -> None:
        """Parse; a usage error (unknown option, missing value) is one line on stderr and exit 78."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            problem = " ".join(str(e).split())
            sys.stderr.write(
                f"openai-proxy: configuration error: {problem} (twistd openai-proxy --help lists the options)\n"
            )
            raise SystemExit(78) from None  # EX_CONFIG

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, repeatable (e.g. tcp:8080:interface=127.0.0.1) [OPENAI_PROXY_PORT; tcp:8080]."""
        self["listen"].append(description)

    def opt_simulator_drop(self, rule: str) -> None:
        """With --simulator: drop simulated upstream connections, repeatable (e.g.
        event=response.output_audio.delta,nth=3,close=1011; see docs/reliability.md)."""
        self["simulator-drop"].append(rule)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"openai-proxy {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(self)
            _check_endpoints(self.config.listen)
            _check_endpoints(self.config.metrics_listen, "--metrics-listen")
        except ConfigError as e:
            # One clear line and a non-zero exit: the usage text would bury it.
            sys.stderr.write(f"openai-proxy: configuration error: {e}\n")
            raise SystemExit(78) from None  # EX_CONFIG


def _check_endpoints(descriptions: tuple[str, ...], setting: str = "--listen") -> None:
    from twisted.internet import reactor

    for description in descriptions:
        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            # Endpoint parsers raise whatever their arguments provoke (ValueError, OSError for a missing
            # key file, IndexError for a systemd socket that was not passed …).
            raise ConfigError(f"{setting}: bad endpoint {description!r}: {e!r}") from None


#: Descriptors kept for what the limits do not count: listening sockets, the log, function calls.
DESCRIPTOR_MARGIN = 64


def descriptors_needed(config: Config) -> int:
    """Open files the limits may need at once: two per session (client, upstream), one per pending
    connection, and a margin."""
    limits = config.limits
    return 2 * limits.max_sessions + limits.max_pending_connections + DESCRIPTOR_MARGIN


def ensure_descriptors(config: Config, rlimit: Any = None) -> None:
    """
    Raise the soft open-files limit (``RLIMIT_NOFILE``) towards the hard one when the limits may need
    more descriptors; when even the hard limit is too low, log a ``warn`` record saying what to change.
    ``rlimit`` is the ``resource`` module (tests pass a stand-in).
    """
    if rlimit is None:
        import resource as rlimit
    needed = descriptors_needed(config)
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    if soft == rlimit.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == rlimit.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        try:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        _log.warn(
            "the open-files limit ({limit}) is below the {needed} descriptors --max-sessions and "
            "--max-pending-connections may need; raise LimitNOFILE or lower those limits",
            limit=soft,
            needed=needed,
        )


def _sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, when it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("ascii"))
    except OSError as e:
        _log.warn("could not notify systemd: {problem}", problem=str(e))


class DaemonService(MultiService):
    """
    The daemon's root service.  Registering it with an application also installs the daemon's log
    observer there (``twistd`` picks an application's ``ILogObserver`` component).
    """

    def __init__(
        self, config: Config, registry: SessionRegistry, log_observer: Any = None
    ) -> None:
        super().__init__()
        self.config = config
        self.registry = registry
        self._log_observer = log_observer
        #: Applies SIGHUP reloads (set by :func:`build_service` when it can reload).
        self.reloader: Reloader | None = None

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._log_observer)

    def startService(self) -> None:
        ensure_descriptors(self.config)
        self.registry.startService()
        super().startService()
        _log.info(
            "openai-proxy {version} listening on {endpoints}; upstream {upstream}",
            version=__version__,
            endpoints=", ".join(self.config.listen),
            upstream="built-in simulator" if self.config.simulator else self.config.upstream_url,
        )
        if self.reloader is not None:
            self.reloader.install()
        _sd_notify("READY=1")

    def stopService(self) -> Any:
        """
        Drain first, then stop listening: while sessions finish, ``/readyz`` still answers (503) and new
        WebSocket upgrades are refused with 503.
        """
        _sd_notify("STOPPING=1")
        if self.reloader is not None:
            self.reloader.uninstall()
        d = defer.maybeDeferred(self.registry.stopService)
        d.addBoth(lambda _: MultiService.stopService(self))
        return d


class _SimulatorService(Service):
    """Runs the built-in simulated upstream on a loopback port for ``--simulator``."""

    def __init__(self, reactor: Any, config: Config) -> None:
        self._reactor = reactor
        self._config = config
        self._port: Any = None

    def startService(self) -> None:
        from openai_proxy.simulator import SimulatorFactory

        super().startService()
        # The daemon's simulator keeps no transcript of what it received (tests use their own).
        factory = SimulatorFactory(
            self._reactor,
            record_received=False,
            max_session_seconds=self._config.simulator_expire_after,
            drops=self._config.simulator_drops,
        )
        self._port = self._reactor.listenTCP(0, factory, interface="127.0.0.1")

    def url_for(self, model: str) -> str:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        port = self._port.getHost().port
        return f"ws://127.0.0.1:{port}/v1/realtime?model={model}"

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()
        return None


class _Closer(Service):
    """Runs ``close`` when the daemon stops (e.g. to release a connection pool)."""

    def __init__(self, close: Any) -> None:
        self._close = close

    def stopService(self) -> Any:
        super().stopService()
        return self._close()


def build_service(
    config: Config,
    reactor: Any,
    log_observer: Any = None,
    reload: Callable[[], Config] | None = None,
    metrics: Metrics | None = None,
) -> DaemonService:
    """
    The daemon's service tree for ``config`` (used by :func:`makeService` and by tests).

    ``reload``: builds the configuration again for SIGHUP (no SIGHUP handling without it).
    ``metrics``: the instruments (default: exporters chosen by the ``OTEL_*`` environment variables).
    """
    if metrics is None:
        metrics = Metrics()
    for problem in metrics.problems:
        _log.warn("{problem}", problem=problem)
    registry = SessionRegistry(reactor, config.limits.shutdown_grace, metrics)
    root = DaemonService(config, registry, log_observer)
    url_for = None
    if config.simulator:
        try:
            import openai_proxy.simulator  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                f"--simulator: the simulator needs the 'simulator' extra "
                f"(pip install 'openai-proxy[simulator]'): {e}"
            ) from None
        simulator = _SimulatorService(reactor, config)
        simulator.setServiceParent(root)
        url_for = simulator.url_for
    connector = UpstreamConnector(reactor, config, url_for=url_for)
    caller = None
    if config.function_url_prefixes:
        caller = FunctionCaller(
            reactor,
            timeout=config.limits.function_timeout,
            max_response_bytes=config.limits.function_max_response_bytes,
            prefixes=config.function_url_prefixes,
        )
        _Closer(caller.close).setServiceParent(root)
    factory = ClientFactory(reactor, config, registry, connector, caller)
    site = make_site(factory, registry, timeout=config.limits.handshake_timeout, demo=config.demo)
    for description in config.listen:
        strports.service(description, site, reactor=reactor).setServiceParent(root)
    if config.metrics_listen:
        metrics_site = make_metrics_site(factory, registry, timeout=config.limits.handshake_timeout)
        for description in config.metrics_listen:
            strports.service(description, metrics_site, reactor=reactor).setServiceParent(root)
    if caller is None:
        # A reload may turn server-side functions on; close that caller on the way out.
        _Closer(lambda: factory.function_caller.close() if factory.function_caller else None).setServiceParent(root)
    _Closer(metrics.shutdown).setServiceParent(root)
    if reload is not None:

        def make_caller(new: Config) -> FunctionCaller:
            return FunctionCaller(
                reactor,
                timeout=config.limits.function_timeout,
                max_response_bytes=config.limits.function_max_response_bytes,
                prefixes=new.function_url_prefixes,
            )

        root.reloader = Reloader(reactor, factory, reload, make_caller, metrics)
    return root


def _log_stream(options: Options) -> Any:
    """
    Where the console log goes: standard output in the foreground (``twistd -n``, systemd, journald);
    when ``twistd`` daemonizes, its ``--logfile`` (default ``twistd.log``), since standard output is then
    /dev/null.
    """
    parent = getattr(options, "parent", None)
    if parent is None or parent.get("nodaemon") or parent.get("logfile") == "-":
        return None
    return open(parent.get("logfile") or "twistd.log", "a", buffering=1, encoding="utf-8")


def makeService(options: Options) -> IService:
    """The twistd plugin's entry point."""
    from twisted.internet import reactor

    from openai_proxy.telemetry import make_log_observer

    config = options.config or build_config(options)
    observer = make_log_observer(config.log_level, stream=_log_stream(options))
    # Flush the exporters on the way out (the SDK's atexit hook is only a fallback).
    reactor.addSystemEventTrigger("after", "shutdown", observer.shutdown)
    try:
        return build_service(config, reactor, observer, reload=lambda: build_config(options))
    except ConfigError as e:
        sys.stderr.write(f"openai-proxy: configuration error: {e}\n")
        raise SystemExit(78) from None
