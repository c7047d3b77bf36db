"""TLS, bearer tokens and deadlines as a caller sets them up, against a live secured server."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from openemploi.client import Client, PermissionDenied, RetryPolicy, TlsConfig, Unauthenticated, Unavailable
from openemploi.client.connection import Deadline
from openemploi.security import append_token
from openemploi.testing.launcher import ServerProcess

NO_RETRY = RetryPolicy(max_attempts=1)


def test_a_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="go together"):
        TlsConfig(client_cert=b"pem")


def test_a_deadline_counts_down_on_its_clock_and_never_below_zero():
    now = [100.0]
    deadline = Deadline(5.0, clock=lambda: now[0])
    now[0] = 103.0
    assert deadline.remaining() == 2.0
    now[0] = 109.0
    assert deadline.remaining() == 0.0
    assert Deadline(None).remaining() is None


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        Client("127.0.0.1:1", chunk_size=0)


def _certificate(common_name: str, key, issuer_name, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and a server certificate it signed, for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("client-pki")
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openemploi client test CA")])
    ca = _certificate("openemploi client test CA", ca_key, ca_name, ca_key, ca=True)
    server = _certificate("localhost", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(server.public_bytes(pem))
    files["key"].write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def secured(default_version, tmp_path_factory, pki):
    tokens_file = tmp_path_factory.mktemp("client-tokens") / "tokens.toml"
    tokens = {name: append_token(tokens_file, name, [scope]) for name, scope in (("reader", "search"), ("embedder", "embed"))}
    server = ServerProcess(
        tmp_path_factory.mktemp("client-secured-collections"),
        env={
            "OPENEMPLOI_SECURITY_TLS_CERT": str(pki["cert"]),
            "OPENEMPLOI_SECURITY_TLS_KEY": str(pki["key"]),
            "OPENEMPLOI_SECURITY_TOKENS_FILE": str(tokens_file),
        },
        tls_ca=pki["ca"].read_bytes(),
    )
    server.start()
    yield server, tokens
    server.stop()


def test_tls_with_a_token_embeds(secured, pki):
    server, tokens = secured
    with Client(server.address, token=tokens["embedder"], tls=TlsConfig.from_files(pki["ca"])) as client:
        assert client.embed("Boulanger").shape == (1, 384)


def test_tls_without_a_token_is_unauthenticated(secured, pki):
    server, _ = secured
    with Client(server.address, tls=TlsConfig.from_files(pki["ca"]), retry=NO_RETRY) as client, pytest.raises(Unauthenticated):
        client.embed("Boulanger")


def test_a_token_without_the_scope_is_permission_denied(secured, pki):
    server, tokens = secured
    with Client(server.address, token=tokens["reader"], tls=TlsConfig.from_files(pki["ca"])) as client:
        assert client.list_models()  # `search` covers ListModels
        with pytest.raises(PermissionDenied, match="embed"):
            client.embed("Boulanger")


def test_a_plaintext_client_cannot_reach_a_tls_server(secured):
    server, tokens = secured
    with Client(server.address, token=tokens["embedder"], retry=NO_RETRY, timeout=10) as client, pytest.raises(Unavailable):
        client.embed("Boulanger")
