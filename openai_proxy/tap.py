"""
``twistd openai-proxy``: the command-line options and the service tree.

``makeService`` builds a :class:`DaemonService` (a ``MultiService``) holding the session registry, one
listening service per ``--listen`` endpoint and, with ``--simulator``, the built-in simulated upstream.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, endpoints
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from openai_proxy import __version__
from openai_proxy.config import Config, ConfigError, build_config
from openai_proxy.functions import FunctionCaller
from openai_proxy.relay import ClientFactory, SessionRegistry, UpstreamConnector
from openai_proxy.web import make_site

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
        ["simulator-expire-after", None, None, "With --simulator: simulated sessions expire "
                                               "(session_expired) after this many seconds [3600]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["simulator-drop"] = []
        self.config: Config | None = None

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
        except ConfigError as e:
            # One clear line and a non-zero exit: the usage text would bury it.
            sys.stderr.write(f"openai-proxy: configuration error: {e}\n")
            raise SystemExit(78) from None  # EX_CONFIG


def _check_endpoints(descriptions: tuple[str, ...]) -> None:
    from twisted.internet import reactor

    for description in descriptions:
        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            # Endpoint parsers raise whatever their arguments provoke (ValueError, OSError for a missing
            # key file, IndexError for a systemd socket that was not passed …).
            raise ConfigError(f"--listen: bad endpoint {description!r}: {e!r}") from None


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

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._log_observer)

    def startService(self) -> None:
        self.registry.startService()
        super().startService()
        _log.info(
            "openai-proxy {version} listening on {endpoints}; upstream {upstream}",
            version=__version__,
            endpoints=", ".join(self.config.listen),
            upstream="built-in simulator" if self.config.simulator else self.config.upstream_url,
        )
        _sd_notify("READY=1")

    def stopService(self) -> Any:
        """
        Drain first, then stop listening: while sessions finish, ``/readyz`` still answers (503) and new
        WebSocket upgrades are refused with 503.
        """
        _sd_notify("STOPPING=1")
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


def build_service(config: Config, reactor: Any, log_observer: Any = None) -> DaemonService:
    """The daemon's service tree for ``config`` (used by :func:`makeService` and by tests)."""
    registry = SessionRegistry(reactor, config.limits.shutdown_grace)
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
    site = make_site(factory, registry, timeout=config.limits.handshake_timeout)
    for description in config.listen:
        strports.service(description, site, reactor=reactor).setServiceParent(root)
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
        return build_service(config, reactor, observer)
    except ConfigError as e:
        sys.stderr.write(f"openai-proxy: configuration error: {e}\n")
        raise SystemExit(78) from None
