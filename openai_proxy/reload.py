"""
SIGHUP: read the configuration again and apply the settings that can change while sessions run.

Reloaded: the client tokens (``--client-tokens-file`` or ``OPENAI_PROXY_CLIENT_TOKENS``, a file or the
tokens themselves, from the environment or the ``.env`` file), the server-side function URL prefixes
(``--function-url-prefixes``) and the browser origin allow-list (``--allowed-origins``).  They apply to
the next WebSocket upgrade and the next server-side function call; open sessions carry on.

Anything else that changed is reported as needing a restart.  A configuration that does not build
(an unreadable or empty tokens file, a bad prefix …), or one that would turn client authentication off,
is logged and the running settings stay as they were.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from openai_proxy.config import Config, ConfigError
from openai_proxy.functions import FunctionCaller

_log = Logger(namespace="openai_proxy")

#: The settings a reload applies.
RELOADABLE = ("client_tokens", "function_url_prefixes", "allowed_origins")
#: Settings never compared (secrets are not named in the log; the key needs a restart like the rest).
_SECRET = ("api_key",)


class Reloader:
    """
    Applies a reloaded :class:`Config` to a running ``ClientFactory``.

    ``load()`` builds the configuration again (raising :class:`ConfigError`); ``make_caller(config)``
    builds a :class:`FunctionCaller` when a reload turns server-side functions on.
    """

    def __init__(
        self,
        reactor: Any,
        factory: Any,
        load: Callable[[], Config],
        make_caller: Callable[[Config], FunctionCaller],
        metrics: Any = None,
    ) -> None:
        self._reactor = reactor
        self._factory = factory
        self._load = load
        self._make_caller = make_caller
        self._metrics = metrics
        self._previous_handler: Any = None
        self._installed = False

    # -- the signal ---------------------------------------------------------------------------------

    def install(self) -> None:
        """Handle SIGHUP from now on (the reload itself runs in the reactor thread)."""
        if self._installed:
            return
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_signal)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    # -- the reload ---------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the configuration again and apply it; False (and the old settings kept) when it fails."""
        try:
            new = self._load()
        except ConfigError as e:
            _log.error("reload failed; the running settings stay: {problem}", problem=str(e))
            self._count("failed")
            return False
        except Exception:
            _log.failure("reload failed; the running settings stay")
            self._count("failed")
            return False
        old: Config = self._factory.config
        if old.client_tokens and not new.client_tokens:
            # A truncated .env file must not open the daemon to everyone.
            _log.error(
                "reload failed; the running settings stay: client tokens cannot be removed by a reload "
                "(restart to turn client authentication off)"
            )
            self._count("failed")
            return False
        factory = self._factory
        if new.function_url_prefixes and factory.function_caller is None:
            factory.function_caller = self._make_caller(new)
        caller = factory.function_caller
        if caller is not None:
            caller.set_prefixes(new.function_url_prefixes)
        factory.session_options = dataclasses.replace(
            factory.session_options, function_url_prefixes=new.function_url_prefixes
        )
        factory.config = dataclasses.replace(old, **{name: getattr(new, name) for name in RELOADABLE})
        pending = [
            f.name for f in dataclasses.fields(Config)
            if f.name not in RELOADABLE and f.name not in _SECRET and getattr(old, f.name) != getattr(new, f.name)
        ]
        if old.api_key != new.api_key:
            pending.append("api_key")
        if pending:
            _log.warn(
                "reload: {settings} changed; a restart applies that",
                settings=", ".join(sorted(pending)),
            )
        _log.info(
            "settings reloaded: {client_auth_entries} client tokens, {prefixes} function URL prefixes, "
            "{origins} allowed origins",
            # (A field named like "token" would be masked in the log.)
            client_auth_entries=len(new.client_tokens),
            prefixes=len(new.function_url_prefixes),
            origins=len(new.allowed_origins),
        )
        self._count("applied")
        return True

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.reloads.add(1, {"outcome": outcome})
