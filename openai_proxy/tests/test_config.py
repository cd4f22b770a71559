"""Configuration: precedence, seed-compatible names, .env files and one-line errors."""

from __future__ import annotations

import io
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.config import ConfigError, build_config


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_key_required_unless_simulator(self) -> None:
        with self.assertRaises(ConfigError) as e:
            build_config({}, {}, cwd=self.dir)
        self.assertIn("OPENAI_API_KEY", str(e.exception))
        self.assertNotIn("\n", str(e.exception))
        config = build_config({"simulator": True}, {}, cwd=self.dir)
        self.assertIsNone(config.api_key)

    def test_defaults(self) -> None:
        config = build_config({}, {"OPENAI_API_KEY": "sk-test"}, cwd=self.dir)
        self.assertEqual(config.listen, ("tcp:8080",))
        self.assertEqual(config.upstream_url, "wss://api.openai.com/v1/realtime")
        self.assertEqual(config.model, "gpt-realtime")
        self.assertEqual(config.voice, "marin")
        self.assertEqual(config.log_level, "info")
        self.assertTrue(config.model_allowed("gpt-realtime-mini"))
        self.assertFalse(config.model_allowed("gpt-4o-mini"))
        self.assertEqual(config.client_tokens, frozenset())

    def test_precedence_option_env_dotenv(self) -> None:
        self.write(".env", "OPENAI_API_KEY=sk-file\nOPENAI_REALTIME_MODEL=gpt-realtime-mini\n"
                           "OPENAI_REALTIME_VOICE=cedar\nOPENAI_PROXY_PORT=9000\n")
        config = build_config({}, {}, cwd=self.dir)
        self.assertEqual((config.api_key, config.model, config.voice, config.listen),
                         ("sk-file", "gpt-realtime-mini", "cedar", ("tcp:9000",)))
        config = build_config({}, {"OPENAI_REALTIME_MODEL": "gpt-realtime-2"}, cwd=self.dir)
        self.assertEqual(config.model, "gpt-realtime-2")
        config = build_config({"model": "gpt-realtime-1.5", "listen": ["tcp:1:interface=::1"]},
                              {"OPENAI_REALTIME_MODEL": "gpt-realtime-2"}, cwd=self.dir)
        self.assertEqual(config.model, "gpt-realtime-1.5")
        self.assertEqual(config.listen, ("tcp:1:interface=::1",))

    def test_env_file_option(self) -> None:
        path = self.write("other.env", "OPENAI_API_KEY=sk-other\n")
        config = build_config({"env-file": path}, {}, cwd=self.dir)
        self.assertEqual(config.api_key, "sk-other")
        with self.assertRaises(ConfigError) as e:
            build_config({"env-file": path + ".missing"}, {}, cwd=self.dir)
        self.assertIn("--env-file", str(e.exception))

    def test_key_file_and_tokens_file(self) -> None:
        key = self.write("key", "sk-from-file\n")
        tokens = self.write("tokens", "# clients\nalpha\n\nbeta\n")
        config = build_config({"api-key-file": key, "client-tokens-file": tokens}, {}, cwd=self.dir)
        self.assertEqual(config.api_key, "sk-from-file")
        self.assertEqual(config.client_tokens, frozenset({"alpha", "beta"}))
        with self.assertRaises(ConfigError) as e:
            build_config({"api-key-file": key + "x"}, {}, cwd=self.dir)
        self.assertIn("--api-key-file", str(e.exception))

    def test_debug_and_log_level(self) -> None:
        env = {"OPENAI_API_KEY": "k", "OPENAI_PROXY_DEBUG": "1"}
        self.assertEqual(build_config({}, env, cwd=self.dir).log_level, "debug")
        env = {"OPENAI_API_KEY": "k", "LOG_LEVEL": "WARNING"}
        self.assertEqual(build_config({}, env, cwd=self.dir).log_level, "warn")
        with self.assertRaises(ConfigError) as e:
            build_config({"log-level": "loud"}, {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertIn("--log-level", str(e.exception))

    def test_bad_values_name_the_setting(self) -> None:
        env = {"OPENAI_API_KEY": "k"}
        cases = [
            ({"upstream-url": "http://x"}, "--upstream-url"),
            ({"voice": "nova"}, "--voice"),
            ({"max-sessions": "many"}, "--max-sessions"),
            ({"handshake-timeout": "-1"}, "--handshake-timeout"),
        ]
        for options, name in cases:
            with self.assertRaises(ConfigError) as e:
                build_config(options, env, cwd=self.dir)
            self.assertIn(name, str(e.exception))

    def test_upstream_url_gets_model(self) -> None:
        config = build_config({}, {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertEqual(config.upstream_url_for("gpt-realtime-mini"),
                         "wss://api.openai.com/v1/realtime?model=gpt-realtime-mini")
        config = build_config({"upstream-url": "wss://h/v1/realtime?model=fixed"},
                              {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertEqual(config.upstream_url_for("other"), "wss://h/v1/realtime?model=fixed")

    def test_repr_hides_secrets(self) -> None:
        tokens = self.write("tokens", "supersecrettoken\n")
        config = build_config({"client-tokens-file": tokens}, {"OPENAI_API_KEY": "sk-secret"},
                              cwd=self.dir)
        self.assertNotIn("sk-secret", repr(config))
        self.assertNotIn("supersecrettoken", repr(config))

    def test_client_tokens_from_environment(self) -> None:
        config = build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": "a, b"},
                              cwd=self.dir)
        self.assertEqual(config.client_tokens, frozenset({"a", "b"}))
        path = self.write("tokens", "c\n")
        config = build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": path},
                              cwd=self.dir)
        self.assertEqual(config.client_tokens, frozenset({"c"}))

    def test_client_tokens_setting_with_no_token_is_refused(self) -> None:
        # Only separators or blanks must never mean "client auth off".
        for value in (",", " , ", ",,,", "   ", " ,\t, "):
            with self.assertRaises(ConfigError) as e:
                build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": value},
                             cwd=self.dir)
            self.assertTrue(str(e.exception).startswith("OPENAI_PROXY_CLIENT_TOKENS: "), value)
            self.assertNotIn("\n", str(e.exception))
        # The same value from a .env file.
        self.write(".env", "OPENAI_PROXY_CLIENT_TOKENS=' , '\n")
        with self.assertRaises(ConfigError):
            build_config({}, {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        # A tokens file holding only comments and blanks is refused as well.
        path = self.write("tokens", "# nobody\n\n   \n")
        with self.assertRaises(ConfigError):
            build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": path}, cwd=self.dir)
        # Unset or empty still means no client authentication.
        os.remove(os.path.join(self.dir, ".env"))
        config = build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": ""}, cwd=self.dir)
        self.assertEqual(config.client_tokens, frozenset())

    def test_twistd_options_exit_78_with_one_line_naming_the_setting(self) -> None:
        from openai_proxy.tap import Options

        self.patch(os, "environ", {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": " , "})
        self.patch(os, "getcwd", lambda: self.dir)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as e:
            Options().parseOptions([])
        self.assertEqual(e.exception.code, 78)
        [line] = stderr.getvalue().splitlines()
        self.assertTrue(line.startswith("openai-proxy: configuration error: OPENAI_PROXY_CLIENT_TOKENS:"))

    def test_upstream_ca_must_be_a_pem_certificate(self) -> None:
        path = self.write("ca.pem", "not a certificate")
        with self.assertRaises(ConfigError) as e:
            build_config({"upstream-ca": path}, {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertIn("--upstream-ca", str(e.exception))

    def test_function_url_prefixes(self) -> None:
        config = build_config({"function-url-prefixes": "https://tools.example.com/api"},
                              {"OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertEqual(config.function_url_prefixes, ("https://tools.example.com/api",))
        with self.assertRaises(ConfigError) as e:
            build_config({"function-url-prefixes": "ftp://x/y"}, {"OPENAI_API_KEY": "k"},
                         cwd=self.dir)
        self.assertIn("--function-url-prefixes", str(e.exception))

    def test_client_tokens_path_that_does_not_exist(self) -> None:
        with self.assertRaises(ConfigError) as e:
            build_config({}, {"OPENAI_API_KEY": "k", "OPENAI_PROXY_CLIENT_TOKENS": "/etc/nope/tokens"},
                         cwd=self.dir)
        self.assertIn("OPENAI_PROXY_CLIENT_TOKENS", str(e.exception))

    def test_query_token_switch(self) -> None:
        env = {"OPENAI_API_KEY": "sk-test"}
        self.assertTrue(build_config({}, env, cwd=self.dir).query_token)
        self.assertFalse(build_config({"no-query-token": 1}, env, cwd=self.dir).query_token)
        for value, expected in [("off", False), ("0", False), ("No", False), ("on", True), ("1", True)]:
            config = build_config({}, {**env, "OPENAI_PROXY_QUERY_TOKEN": value}, cwd=self.dir)
            self.assertEqual(config.query_token, expected, value)
        with self.assertRaises(ConfigError) as e:
            build_config({}, {**env, "OPENAI_PROXY_QUERY_TOKEN": "sometimes"}, cwd=self.dir)
        self.assertIn("OPENAI_PROXY_QUERY_TOKEN", str(e.exception))

    def test_demo_switch(self) -> None:
        env = {"OPENAI_API_KEY": "sk-test"}
        self.assertFalse(build_config({}, env, cwd=self.dir).demo)
        self.assertTrue(build_config({"simulator": 1}, {}, cwd=self.dir).demo)
        self.assertFalse(build_config({"simulator": 1, "no-demo": 1}, {}, cwd=self.dir).demo)
        self.assertTrue(build_config({"demo": 1}, env, cwd=self.dir).demo)
        self.assertTrue(build_config({}, {**env, "OPENAI_PROXY_DEMO": "on"}, cwd=self.dir).demo)
        self.assertFalse(build_config({"simulator": 1}, {"OPENAI_PROXY_DEMO": "off"}, cwd=self.dir).demo)
        with self.assertRaises(ConfigError):
            build_config({}, {**env, "OPENAI_PROXY_DEMO": "maybe"}, cwd=self.dir)

    def test_azure_upstream(self) -> None:
        url = "wss://contoso-voice.openai.azure.com/openai/v1/realtime"
        # The host selects Azure; the key goes in an api-key header; the deployment is the model.
        config = build_config({"upstream-url": url, "model": "gpt-realtime-prod"},
                              {"AZURE_OPENAI_API_KEY": "azure-key-1"}, cwd=self.dir)
        self.assertEqual(config.upstream_kind, "azure")
        self.assertEqual(config.upstream_headers(), {"api-key": "azure-key-1"})
        self.assertEqual(config.upstream_url_for("gpt-realtime-prod"), url + "?model=gpt-realtime-prod")
        # Without --allowed-models, a client's model choice never picks another deployment.
        self.assertEqual(config.allowed_models, ("gpt-realtime-prod",))
        self.assertFalse(config.model_allowed("gpt-realtime"))
        # OPENAI_API_KEY is the fallback; AZURE_OPENAI_API_KEY wins.
        config = build_config({"upstream-url": url}, {"OPENAI_API_KEY": "k2"}, cwd=self.dir)
        self.assertEqual(config.upstream_headers(), {"api-key": "k2"})
        for host in ("x.cognitiveservices.azure.com", "x.services.ai.azure.com"):
            config = build_config({"upstream-url": f"wss://{host}/openai/v1/realtime"},
                                  {"OPENAI_API_KEY": "k"}, cwd=self.dir)
            self.assertEqual(config.upstream_kind, "azure", host)
        # An explicit kind wins over the host (a private gateway in front of Azure).
        config = build_config({"upstream-url": "ws://127.0.0.1:9/openai/v1/realtime",
                               "upstream-kind": "Azure"}, {"AZURE_OPENAI_API_KEY": "k"}, cwd=self.dir)
        self.assertEqual(config.upstream_kind, "azure")
        config = build_config({"upstream-url": url}, {"OPENAI_PROXY_UPSTREAM_KIND": "openai",
                                                      "OPENAI_API_KEY": "sk-x"}, cwd=self.dir)
        self.assertEqual(config.upstream_headers(), {"Authorization": "Bearer sk-x"})

    def test_azure_entra_token_file(self) -> None:
        url = "wss://contoso-voice.openai.azure.com/openai/v1/realtime"
        token = self.write("entra", "eyJ0eXAi.first\n")
        config = build_config({"upstream-url": url, "azure-ad-token-file": token}, {}, cwd=self.dir)
        self.assertEqual(config.upstream_headers(), {"Authorization": "Bearer eyJ0eXAi.first"})
        # Re-read for every connection, so a refreshed token is used without a restart.
        self.write("entra", "eyJ0eXAi.second")
        self.assertEqual(config.upstream_headers(), {"Authorization": "Bearer eyJ0eXAi.second"})
        os.remove(token)
        self.assertEqual(config.upstream_headers(), {})
        self.assertNotIn("eyJ0eXAi", repr(config))

    def test_azure_bad_settings_name_the_setting(self) -> None:
        url = "wss://contoso-voice.openai.azure.com/openai/v1/realtime"
        cases = [
            ({"upstream-url": url}, {}, "AZURE_OPENAI_API_KEY"),
            ({"upstream-kind": "azure"}, {"AZURE_OPENAI_API_KEY": "k"}, "--upstream-url"),
            ({"upstream-kind": "bedrock"}, {"OPENAI_API_KEY": "k"}, "--upstream-kind"),
            ({"azure-ad-token-file": self.write("t", "x")}, {"OPENAI_API_KEY": "k"},
             "--azure-ad-token-file"),
            ({"upstream-url": url, "azure-ad-token-file": os.path.join(self.dir, "missing")}, {},
             "--azure-ad-token-file"),
            ({"upstream-url": url, "azure-ad-token-file": self.write("empty", " \n")}, {},
             "--azure-ad-token-file"),
        ]
        for options, env, setting in cases:
            with self.assertRaises(ConfigError) as e:
                build_config(options, env, cwd=self.dir)
            self.assertTrue(str(e.exception).startswith(setting), (options, str(e.exception)))
