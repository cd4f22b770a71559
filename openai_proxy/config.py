"""
One validated configuration, built from command-line options, the environment and a ``.env`` file.

Precedence, highest first: command-line option, process environment, ``.env`` file (python-dotenv; the
working directory's ``.env`` unless ``--env-file`` names another).  Every problem is reported as a
:class:`ConfigError` whose message is one line naming the setting, so ``twistd`` can stop with it.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from dotenv import dotenv_values

if TYPE_CHECKING:
    from openai_proxy.simulator.faults import DropRule

DEFAULT_LISTEN = "tcp:8080"
DEFAULT_UPSTREAM_URL = "wss://api.openai.com/v1/realtime"
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_ALLOWED_MODELS = ("gpt-realtime*",)
DEFAULT_VOICE = "marin"
DEFAULT_TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"

#: Voices the OpenAI Realtime API knows (GA ``audio.output.voice``).
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


#: Limits that 0 turns off rather than makes impossible.
_ZERO_ALLOWED_LIMITS = frozenset({"shutdown_grace", "ping_interval", "upstream_ping_interval"})


class ConfigError(Exception):
    """A setting is missing or invalid; ``str(error)`` is one line naming it."""


@dataclass(frozen=True)
class Limits:
    """Resource limits, each one a setting (see docs/configuration.md)."""

    #: Largest WebSocket message (and frame) a client may send, in bytes; above it the client gets 1009.
    max_message_bytes: int = 1024 * 1024
    #: Concurrent client sessions; one more is refused with HTTP 503 before the upgrade.
    max_sessions: int = 200
    #: Seconds a client has to finish the WebSocket opening handshake, and the upstream to answer ours.
    handshake_timeout: float = 10.0
    #: Seconds of client audio held while the session is not configured yet.
    audio_buffer_seconds: float = 5.0
    #: Seconds to wait for a response that asked for functions to end before following up anyway.
    function_call_timeout: float = 10.0
    #: Seconds given to open sessions to finish after SIGTERM before they are closed with 1001.
    shutdown_grace: float = 30.0
    #: Seconds between WebSocket pings to the client (0 disables).
    ping_interval: float = 20.0
    #: Seconds between WebSocket pings to the upstream (0 disables); one unanswered for twice this
    #: long drops the connection, which is then reconnected (SPEC §8).
    upstream_ping_interval: float = 15.0
    #: Seconds a server-side function endpoint has to answer.
    function_timeout: float = 10.0
    #: Largest server-side function response body, in bytes.
    function_max_response_bytes: int = 64 * 1024
    #: Seconds a client may leave the daemon's output to it unread (its transport's write buffer above
    #: the high-water mark) before it is dropped (close 1008 ``CLIENT_NOT_READING``).
    client_stall_timeout: float = 30.0
    #: Concurrent connections that have not (yet) become WebSocket sessions: plain HTTP and requests
    #: still arriving.  At the limit the oldest of them is dropped to make room for a new one.
    max_pending_connections: int = 128


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to run, already validated."""

    api_key: str | None
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    upstream_url: str = DEFAULT_UPSTREAM_URL
    model: str = DEFAULT_MODEL
    allowed_models: tuple[str, ...] = DEFAULT_ALLOWED_MODELS
    voice: str = DEFAULT_VOICE
    transcription_model: str = DEFAULT_TRANSCRIPTION_MODEL
    client_tokens: frozenset[str] = frozenset()
    log_level: str = "info"
    simulator: bool = False
    upstream_ca: str | None = None
    #: URL prefixes server-side functions may call; empty means the feature is off.
    function_url_prefixes: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: Whether a client may present its token as a ``token`` query parameter (SPEC §7).
    query_token: bool = True
    #: Whether ``GET /demo`` serves the browser demo page.
    demo: bool = False
    #: ``openai`` or ``azure``: the upstream's URL and authentication shape (docs/azure.md).
    upstream_kind: str = "openai"
    #: Azure only: a file holding a Microsoft Entra access token, read again for every upstream connection.
    azure_ad_token_file: str | None = None
    #: Browser origins (``scheme://host[:port]``, ``*`` globs, or ``null``) allowed to open sessions;
    #: empty: any.  Requests without an ``Origin`` header (non-browser clients) are never refused by it.
    allowed_origins: tuple[str, ...] = ()
    #: Endpoints serving only ``/metrics`` (and the health checks); when set, ``--listen`` endpoints do
    #: not serve ``/metrics``.
    metrics_listen: tuple[str, ...] = ()
    #: ``/metrics`` answers 401 without a client token (needs client tokens to be configured).
    metrics_require_token: bool = False
    #: With ``simulator``: seconds after which simulated sessions expire (``session_expired``).
    simulator_expire_after: float = 3600.0
    #: With ``simulator``: connection drops the simulated upstream injects (docs/reliability.md).
    simulator_drops: tuple[DropRule, ...] = ()
    #: Seconds after an upstream session's start from which it is rolled over at the next quiet
    #: moment (SPEC §8); ``None``: 55 minutes, scaled to a session announced shorter than 60 minutes.
    rollover_after: float | None = None

    def upstream_headers(self) -> dict[str, str]:
        """
        The upstream WebSocket upgrade's authentication header: ``Authorization: Bearer <key>`` for OpenAI;
        for Azure OpenAI, ``api-key: <key>`` or, with an Entra token file, ``Authorization: Bearer <token>``.
        An unreadable or empty token file gives no header (the upstream then refuses: UPSTREAM_AUTH_FAILED).
        """
        return upstream_auth_headers(self)

    def model_allowed(self, name: str) -> bool:
        """Whether a client's Settings may choose the realtime model ``name``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allowed_models)

    def upstream_url_for(self, model: str) -> str:
        """The upstream WebSocket URL for ``model``: ``?model=`` is added unless the URL has one."""
        parts = urlsplit(self.upstream_url)
        query = parse_qs(parts.query, keep_blank_values=True)
        if "model" in query:
            return self.upstream_url
        pairs = [(k, v) for k, values in query.items() for v in values] + [("model", model)]
        return urlunsplit(parts._replace(query=urlencode(pairs)))

    def __repr__(self) -> str:
        # The key and the client tokens must never reach a log line, even through a repr.
        return (
            f"Config(listen={self.listen!r}, upstream_url={self.upstream_url!r}, "
            f"model={self.model!r}, simulator={self.simulator!r}, "
            f"client_tokens={len(self.client_tokens)} configured)"
        )


UPSTREAM_KINDS = ("openai", "azure")
#: Host name endings of Azure OpenAI / Azure AI Foundry endpoints (an ``--upstream-url`` there selects Azure).
AZURE_HOST_SUFFIXES = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")


def upstream_auth_headers(config: Config) -> dict[str, str]:
    """See :meth:`Config.upstream_headers`."""
    if config.upstream_kind == "azure":
        if config.azure_ad_token_file:
            try:
                with open(config.azure_ad_token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError:
                token = ""
            return {"Authorization": f"Bearer {token}"} if token else {}
        return {"api-key": config.api_key} if config.api_key else {}
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _switch(value: Any, setting: str) -> bool:
    """An on/off setting: ``1/true/yes/on`` or ``0/false/no/off`` (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{setting}: expected on or off, got {value!r}")


def _read_secret_file(path: str, setting: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
    if not value:
        raise ConfigError(f"{setting}: {path} is empty")
    return value


def _read_tokens(path: str, setting: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror}") from None
    tokens = frozenset(
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    )
    if not tokens:
        raise ConfigError(f"{setting}: {path} holds no token")
    return tokens


def _check_pem_certificate(path: str) -> None:
    from OpenSSL import crypto

    try:
        with open(path, "rb") as f:
            crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    except OSError as e:
        raise ConfigError(f"--upstream-ca: cannot read {path}: {e.strerror}") from None
    except crypto.Error:
        raise ConfigError(f"--upstream-ca: {path} is not a PEM certificate") from None


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _positive_number(value: Any, setting: str, *, integer: bool = False, allow_zero: bool = False) -> Any:
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{setting}: expected a number, got {value!r}") from None
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{setting}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s?#]+", re.IGNORECASE)


def _check_origins(value: str) -> tuple[str, ...]:
    origins = _split_list(value)
    if not origins:
        raise ConfigError("--allowed-origins: the list is empty")
    for origin in origins:
        if origin.lower() != "null" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"--allowed-origins: {origin!r} is not an origin (scheme://host[:port], or null)"
            )
    return origins


def _flag(value: Any, setting: str) -> bool:
    if isinstance(value, bool) or isinstance(value, int):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{setting}: expected 1/0, true/false, yes/no or on/off, got {value!r}")


def _listen_from_env(value: str) -> tuple[str, ...]:
    # The seed's OPENAI_PROXY_PORT holds a port number; an endpoint string is accepted too.
    value = value.strip()
    if value.isdigit():
        return (f"tcp:{value}",)
    return _split_list(value)


def build_config(
    options: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    *,
    cwd: str | None = None,
) -> Config:
    """
    Build the :class:`Config` from parsed command-line ``options`` (``None`` or empty for "not given"),
    the process ``environ`` and the ``.env`` file.

    @raise ConfigError: one line naming the bad setting.
    """
    process_env = dict(os.environ if environ is None else environ)
    env_file = options.get("env-file")
    if env_file:
        if not os.path.isfile(env_file):
            raise ConfigError(f"--env-file: {env_file} does not exist")
        dotenv_path = env_file
    else:
        dotenv_path = os.path.join(cwd or os.getcwd(), ".env")
    file_env: dict[str, str] = {}
    if os.path.isfile(dotenv_path):
        try:
            file_env = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--env-file: cannot read {dotenv_path}: {e}") from None
    env: dict[str, str] = {**file_env, **process_env}

    def pick(option: str, name: str | None) -> Any:
        value = options.get(option)
        if value not in (None, "", [], ()):
            return value
        if name is not None and env.get(name, "") != "":
            return env[name]
        return None

    simulator = bool(options.get("simulator"))
    upstream_kind, azure_ad_token_file = _upstream_kind(options, env, pick)

    api_key: str | None
    if options.get("api-key-file"):
        api_key = _read_secret_file(options["api-key-file"], "--api-key-file")
    elif upstream_kind == "azure":
        api_key = env.get("AZURE_OPENAI_API_KEY") or env.get("OPENAI_API_KEY") or None
    else:
        api_key = env.get("OPENAI_API_KEY") or None
    if upstream_kind == "azure" and api_key is None and azure_ad_token_file is None and not simulator:
        raise ConfigError(
            "AZURE_OPENAI_API_KEY: no Azure OpenAI credential configured (set AZURE_OPENAI_API_KEY, "
            "use --api-key-file, or --azure-ad-token-file for a Microsoft Entra token)"
        )
    if api_key is None and upstream_kind == "openai" and not simulator:
        raise ConfigError(
            "OPENAI_API_KEY: no OpenAI key configured (set OPENAI_API_KEY, use --api-key-file, "
            "or run with --simulator)"
        )

    listen_opt = options.get("listen")
    if listen_opt:
        listen = tuple(listen_opt)
    elif env.get("OPENAI_PROXY_PORT"):
        listen = _listen_from_env(env["OPENAI_PROXY_PORT"])
    else:
        listen = (DEFAULT_LISTEN,)
    if not listen:
        raise ConfigError("--listen: no endpoint given")

    upstream_url = pick("upstream-url", "OPENAI_REALTIME_URL") or DEFAULT_UPSTREAM_URL
    parts = urlsplit(upstream_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"--upstream-url: expected a ws:// or wss:// URL, got {upstream_url!r}")

    model = pick("model", "OPENAI_REALTIME_MODEL") or DEFAULT_MODEL
    allowed_raw = pick("allowed-models", "OPENAI_PROXY_ALLOWED_MODELS")
    allowed = _split_list(allowed_raw) if allowed_raw else DEFAULT_ALLOWED_MODELS
    if upstream_kind == "azure" and not allowed_raw:
        # Azure models are deployments named by the operator: clients get the configured one.
        allowed = (model,)
    if not allowed:
        raise ConfigError("--allowed-models: the list is empty")

    voice = pick("voice", "OPENAI_REALTIME_VOICE") or DEFAULT_VOICE
    if voice not in OPENAI_VOICES:
        raise ConfigError(
            f"--voice: {voice!r} is not an OpenAI voice (one of {', '.join(sorted(OPENAI_VOICES))})"
        )

    transcription_model = (
        pick("transcription-model", "OPENAI_PROXY_TRANSCRIPTION_MODEL") or DEFAULT_TRANSCRIPTION_MODEL
    )

    client_tokens: frozenset[str] = frozenset()
    if options.get("client-tokens-file"):
        client_tokens = _read_tokens(options["client-tokens-file"], "--client-tokens-file")
    elif env.get("OPENAI_PROXY_CLIENT_TOKENS", "") != "":
        # The environment holds either a file of tokens or the tokens themselves, comma-separated.
        value = env["OPENAI_PROXY_CLIENT_TOKENS"].strip()
        if value.startswith(("/", "./", "../", "~")) and not os.path.isfile(value):
            # A mistyped path must not silently become a token.
            raise ConfigError("OPENAI_PROXY_CLIENT_TOKENS: names a file that does not exist")
        if os.path.isfile(value):
            client_tokens = _read_tokens(value, "OPENAI_PROXY_CLIENT_TOKENS")
        else:
            client_tokens = frozenset(_split_list(value))
            if not client_tokens:
                # Only separators: refusing is safer than silently turning client auth off.
                raise ConfigError("OPENAI_PROXY_CLIENT_TOKENS: holds no token (only separators)")

    log_level = options.get("log-level")
    if not log_level:
        if env.get("OPENAI_PROXY_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            log_level = "debug"
        else:
            log_level = env.get("LOG_LEVEL") or "info"
    log_level = log_level.strip().lower()
    if log_level == "warning":
        log_level = "warn"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")

    upstream_ca = pick("upstream-ca", "OPENAI_PROXY_UPSTREAM_CA")
    if upstream_ca:
        _check_pem_certificate(upstream_ca)

    prefixes_raw = pick("function-url-prefixes", "OPENAI_PROXY_FUNCTION_URL_PREFIXES")
    function_url_prefixes: tuple[str, ...] = ()
    if prefixes_raw:
        from openai_proxy.endpoint import check_prefix

        checked = []
        for prefix in _split_list(prefixes_raw):
            try:
                checked.append(check_prefix(prefix))
            except ValueError as e:
                raise ConfigError(f"--function-url-prefixes: {prefix!r}: {e}") from None
        function_url_prefixes = tuple(checked)

    limits_values: dict[str, Any] = {}
    for limit in fields(Limits):
        option = limit.name.replace("_", "-")
        raw = pick(option, "OPENAI_PROXY_" + limit.name.upper())
        if raw is not None:
            limits_values[limit.name] = _positive_number(
                raw,
                f"--{option}",
                integer=limit.type in (int, "int"),
                allow_zero=limit.name in _ZERO_ALLOWED_LIMITS,
            )
    limits = Limits(**limits_values)

    origins_raw = pick("allowed-origins", "OPENAI_PROXY_ALLOWED_ORIGINS")
    allowed_origins = _check_origins(origins_raw) if origins_raw else ()

    metrics_raw = options.get("metrics-listen") or env.get("OPENAI_PROXY_METRICS_LISTEN", "")
    metrics_listen = tuple(metrics_raw) if isinstance(metrics_raw, (list, tuple)) else _split_list(metrics_raw)
    require_raw = options.get("metrics-require-token") or env.get("OPENAI_PROXY_METRICS_REQUIRE_TOKEN", "")
    metrics_require_token = _flag(require_raw, "--metrics-require-token")
    if metrics_require_token and not client_tokens:
        raise ConfigError(
            "--metrics-require-token: no client tokens are configured (--client-tokens-file or "
            "OPENAI_PROXY_CLIENT_TOKENS)"
        )

    simulator_expire_after, simulator_drops = _simulator_faults(options, simulator)

    rollover_raw = pick("rollover-after", "OPENAI_PROXY_ROLLOVER_AFTER")
    rollover_after: float | None = None
    if rollover_raw is not None:
        rollover_after = _positive_number(rollover_raw, "--rollover-after")
        if not math.isfinite(rollover_after):
            raise ConfigError(f"--rollover-after: must be finite, got {rollover_raw!r}")

    return Config(
        api_key=api_key,
        listen=listen,
        upstream_url=upstream_url,
        model=model,
        allowed_models=allowed,
        voice=voice,
        transcription_model=transcription_model,
        client_tokens=client_tokens,
        log_level=log_level,
        simulator=simulator,
        upstream_ca=upstream_ca,
        function_url_prefixes=function_url_prefixes,
        limits=limits,
        **_client_facing(options, env, simulator),
        upstream_kind=upstream_kind,
        azure_ad_token_file=azure_ad_token_file,
        allowed_origins=allowed_origins,
        metrics_listen=metrics_listen,
        metrics_require_token=metrics_require_token,
        simulator_expire_after=simulator_expire_after,
        simulator_drops=simulator_drops,
        rollover_after=rollover_after,
    )


def _client_facing(options: Mapping[str, Any], env: Mapping[str, str], simulator: bool) -> dict[str, bool]:
    """``query_token`` (``--no-query-token``, ``OPENAI_PROXY_QUERY_TOKEN``) and ``demo`` (``--demo``,
    ``--no-demo``, ``OPENAI_PROXY_DEMO``; on by default with ``--simulator``)."""
    query_token = True
    if options.get("no-query-token"):
        query_token = False
    elif env.get("OPENAI_PROXY_QUERY_TOKEN", "").strip():
        query_token = _switch(env["OPENAI_PROXY_QUERY_TOKEN"], "OPENAI_PROXY_QUERY_TOKEN")
    demo = simulator
    if options.get("no-demo"):
        demo = False
    elif options.get("demo"):
        demo = True
    elif env.get("OPENAI_PROXY_DEMO", "").strip():
        demo = _switch(env["OPENAI_PROXY_DEMO"], "OPENAI_PROXY_DEMO")
    return {"query_token": query_token, "demo": demo}


def _upstream_kind(
    options: Mapping[str, Any], env: Mapping[str, str], pick: Any
) -> tuple[str, str | None]:
    """The upstream kind (``--upstream-kind``, ``OPENAI_PROXY_UPSTREAM_KIND``; by default ``azure`` when
    the upstream URL's host is an Azure OpenAI endpoint) and the Entra token file (Azure only)."""
    kind = pick("upstream-kind", "OPENAI_PROXY_UPSTREAM_KIND")
    if kind:
        kind = str(kind).strip().lower()
        if kind not in UPSTREAM_KINDS:
            raise ConfigError(f"--upstream-kind: {kind!r} is not one of {', '.join(UPSTREAM_KINDS)}")
    else:
        url = pick("upstream-url", "OPENAI_REALTIME_URL") or DEFAULT_UPSTREAM_URL
        host = (urlsplit(url).hostname or "").lower()
        kind = "azure" if host.endswith(AZURE_HOST_SUFFIXES) else "openai"
    if kind == "azure" and not pick("upstream-url", "OPENAI_REALTIME_URL"):
        raise ConfigError(
            "--upstream-url: Azure OpenAI needs the resource's URL, "
            "e.g. wss://RESOURCE.openai.azure.com/openai/v1/realtime"
        )
    token_file = pick("azure-ad-token-file", "AZURE_OPENAI_AD_TOKEN_FILE")
    if token_file:
        if kind != "azure":
            raise ConfigError("--azure-ad-token-file: only used with --upstream-kind azure")
        _read_secret_file(token_file, "--azure-ad-token-file")
    return kind, token_file or None


def _simulator_faults(options: Mapping[str, Any], simulator: bool) -> tuple[float, tuple[DropRule, ...]]:
    """``--simulator-expire-after`` and ``--simulator-drop``: only meaningful with ``--simulator``."""
    expire_raw = options.get("simulator-expire-after")
    drop_specs = list(options.get("simulator-drop") or ())
    if expire_raw in (None, "") and not drop_specs:
        return 3600.0, ()
    if not simulator:
        name = "--simulator-drop" if drop_specs else "--simulator-expire-after"
        raise ConfigError(f"{name}: only with --simulator")
    expire_after = 3600.0
    if expire_raw not in (None, ""):
        expire_after = _positive_number(expire_raw, "--simulator-expire-after")
        if not math.isfinite(expire_after):
            raise ConfigError(f"--simulator-expire-after: must be finite, got {expire_raw!r}")
    try:
        from openai_proxy.simulator.faults import FaultSpecError, parse_drop_rule
    except ImportError as e:
        raise ConfigError(f"--simulator-drop: the simulator is not installed: {e}") from None
    drops = []
    for spec in drop_specs:
        try:
            drops.append(parse_drop_rule(spec))
        except FaultSpecError as e:
            raise ConfigError(f"--simulator-drop: {spec!r}: {e}") from None
    return expire_after, tuple(drops)

