"""
The daemon's ``wss://`` upstream leg: the simulator serves TLS with a certificate from a throwaway
CA; ``--upstream-ca`` names the CA the daemon trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .support import SystemTestCase, agent_settings, check_server_frames, connect_agent, texts


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_certificate(path: str, certificate: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))


def make_ca(directory: str, name: str) -> tuple[str, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA; the path of its certificate, its key and its certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, f"{name}.pem")
    _write_certificate(path, certificate)
    return path, key, certificate


def make_server_certificate(directory: str, ca_key: ec.EllipticCurvePrivateKey,
                            ca: x509.Certificate) -> tuple[str, str]:
    """A certificate for ``localhost`` and 127.0.0.1 signed by ``ca``; key and certificate paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = os.path.join(directory, "server-key.pem")
    cert_path = os.path.join(directory, "server-cert.pem")
    _write_key(key_path, key)
    _write_certificate(cert_path, certificate)
    return key_path, cert_path


class UpstreamTLSTests(SystemTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ca_path, ca_key, ca = make_ca(self.directory, "test-ca")
        self.other_ca_path, _, _ = make_ca(self.directory, "other-ca")
        tls = make_server_certificate(self.directory, ca_key, ca)
        self.simulator = self.start_simulator(tls=tls)
        self.upstream_url = self.simulator.upstream_url(host="localhost")

    def test_verified_certificate(self) -> None:
        daemon = self.start_daemon("--upstream-url", self.upstream_url,
                                   "--upstream-ca", self.ca_path)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            agent.expect("SettingsApplied")
            agent.inject("Hello")
            self.assertEqual(texts(agent.turn(), "assistant"), ["You said: Hello"])
        check_server_frames(agent.frames)
        self.assertTrue(self.simulator.received())

    def test_untrusted_certificate(self) -> None:
        daemon = self.start_daemon("--upstream-url", self.upstream_url,
                                   "--upstream-ca", self.other_ca_path)
        with connect_agent(daemon.base_url) as agent:
            agent.expect("Welcome")
            agent.send_settings(agent_settings())
            error = agent.expect("Error")
            self.assertEqual(error["code"], "UPSTREAM_TLS_FAILED", error)
            self.assertIsNotNone(agent.wait_closed())
        check_server_frames(agent.frames)
        self.assertEqual(self.simulator.received(), [])
        self.assertEqual(daemon.http_status("/readyz"), 200)
