"""
Beyond one process: the shipped HAProxy configuration in front of two installed daemons (sessions spread,
a SIGTERM drains one daemon without cutting its sessions), and the Kubernetes examples checked against
the Kubernetes schemas.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from .support import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    TIMEOUT,
    Process,
    SystemTestCase,
    agent_settings,
    clean_environment,
    connect_agent,
    free_port,
    texts,
)
from .test_scaling import MAX_ATTEMPTS, connected_ids, welcome_id

MISC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "misc")
HAPROXY_CONFIG = os.path.join(MISC, "haproxy.cfg")
KUBERNETES = os.path.join(MISC, "kubernetes", "openai-proxy.yaml")
#: The oldest Kubernetes version the examples are written for (the preStop sleep action).
KUBERNETES_VERSION = "1.30.0"


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class HAProxyTests(SystemTestCase):
    def start_haproxy(self, front: int, backends: list[int]) -> Process:
        binary = shutil.which("haproxy") or next(
            (p for p in ("/usr/sbin/haproxy", "/sbin/haproxy") if os.path.exists(p)), None)
        if binary is None:
            raise SkipTest("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
        with open(HAPROXY_CONFIG, encoding="utf-8") as f:
            config = f.read()
        # The shipped file, with this test's ports.
        for shipped, port in (("bind 127.0.0.1:8080", front), ("proxy1 127.0.0.1:8081", backends[0]),
                              ("proxy2 127.0.0.1:8082", backends[1])):
            self.assertEqual(config.count(shipped), 1, shipped)
            config = config.replace(shipped, f"{shipped.rsplit(':', 1)[0]}:{port}")
        path = os.path.join(self.directory, "haproxy.cfg")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config)
        haproxy = Process("haproxy", [binary, "-db", "-f", path], self.directory, clean_environment())
        self._track(haproxy)
        haproxy.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(front):
            if haproxy.exited() is not None or time.monotonic() > deadline:
                raise FailTest(f"haproxy did not listen\n{haproxy.describe()}")
            time.sleep(0.05)
        return haproxy

    def test_balance_and_drain(self) -> None:
        simulator = self.start_simulator()
        daemons = [self.start_daemon(upstream=simulator, name=f"daemon{i}", grace=30.0) for i in (1, 2)]
        front = free_port()
        self.start_haproxy(front, [d.port for d in daemons])

        # Sessions spread over both daemons.
        opened: list[str] = []
        for _ in range(MAX_ATTEMPTS):
            opened.append(welcome_id(front))
            if all(connected_ids(d) & set(opened) for d in daemons):
                break
        else:
            raise FailTest("sessions through haproxy all went to one daemon")

        with connect_agent(f"ws://127.0.0.1:{front}") as agent:
            welcome = agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            [draining] = [d for d in daemons if welcome["request_id"] in connected_ids(d)]
            [other] = [d for d in daemons if d is not draining]

            draining.signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT
            while draining.http_status("/readyz") == 200:
                if time.monotonic() > deadline:
                    raise FailTest("the daemon did not start draining")
                time.sleep(0.05)
            # New sessions all land on the other daemon, none is refused, from the first moment on.
            for _ in range(8):
                request_id = welcome_id(front)
                self.assertIn(request_id, connected_ids(other))
                self.assertNotIn(request_id, connected_ids(draining))
            # The session on the draining daemon is not cut: it goes on and finishes normally.
            agent.inject("Are you still there?")
            self.assertTrue(texts(agent.turn(), "assistant"))
            self.assertIsNone(draining.exited())
        # Its last session over, the drained daemon exits at once (well before its 30 s grace).
        self.assertEqual(draining.wait(STOP_TIMEOUT), -signal.SIGTERM)
        for _ in range(3):
            self.assertIn(welcome_id(front), connected_ids(other))


class KubernetesExampleTests(SynchronousTestCase):
    """The examples validate against the Kubernetes schemas (``kubernetes-validate`` ships them)."""

    def documents(self) -> list[dict]:
        import yaml

        with open(KUBERNETES, encoding="utf-8") as f:
            return [doc for doc in yaml.safe_load_all(f) if doc]

    def test_schema_valid(self) -> None:
        import kubernetes_validate

        kinds = []
        for document in self.documents():
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            kinds.append(document["kind"])
        self.assertEqual(sorted(kinds), ["Deployment", "PodDisruptionBudget", "Service"])

    def test_validator_refuses_mistakes(self) -> None:
        import kubernetes_validate

        [deployment] = [d for d in self.documents() if d["kind"] == "Deployment"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["readinessProbe"]["httpGet"]["path"] = 17
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
        container["readinessProbe"]["httpGet"]["path"] = "/readyz"
        container["lifecycle"]["preStop"]["sleeep"] = {"seconds": 5}
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    def test_settings_agree(self) -> None:
        [deployment] = [d for d in self.documents() if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        args = container["args"]
        grace = float(args[args.index("--shutdown-grace") + 1])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # The pod gets the whole drain: preStop pause, grace, 2 s of closing.
        self.assertGreaterEqual(pod["terminationGracePeriodSeconds"], pre_stop + grace + 2)
        self.assertEqual(container["readinessProbe"]["httpGet"]["path"], "/readyz")
        self.assertEqual(container["livenessProbe"]["httpGet"]["path"], "/healthz")
        [budget] = [d for d in self.documents() if d["kind"] == "PodDisruptionBudget"]
        self.assertEqual(budget["spec"]["selector"], deployment["spec"]["selector"])
        [service] = [d for d in self.documents() if d["kind"] == "Service"]
        self.assertEqual(service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"])
