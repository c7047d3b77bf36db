"""Bearer tokens, scopes, TLS, mTLS and request limits through real gRPC channels and the real model.

Two servers for the whole module: one with TLS + tokens + small limits, one with mTLS.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import DEFAULT_MODEL, ServerThread, expect, make_config

from openemploi.cli import main
from openemploi.config import SecurityConfig
from openemploi.logs import JsonFormatter
from openemploi.security import MISSING_TOKEN, append_token
from openemploi.v1 import embedding_pb2 as pb
from openemploi.v1 import embedding_pb2_grpc as pb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc
from openemploi.v1 import match_pb2 as mpb
from openemploi.v1 import match_pb2_grpc as mpb_grpc
from openemploi.v1 import models_pb2 as mopb
from openemploi.v1 import models_pb2_grpc as mopb_grpc

SECRET_TEXT = "Texte confidentiel de Mme Dupont : licenciée pour inaptitude le 3 mars"
LIMITS = dict(max_k=50, max_stream_requests=3, max_upsert_documents=2)


# --------------------------------------------------------------------------- certificates


@dataclasses.dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes
    _cert_obj: x509.Certificate
    _key_obj: ec.EllipticCurvePrivateKey


def issue(common_name: str, issuer: Pem | None = None, *, ca: bool = False, client: bool = False) -> Pem:
    """A P-256 certificate: self-signed when `issuer` is None; SAN localhost + 127.0.0.1 for servers."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer._cert_obj.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if not client:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
    cert = builder.sign(issuer._key_obj if issuer else key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    server_ca = issue("openemploi test CA", ca=True)
    server_cert = issue("localhost", server_ca)
    client_ca = issue("openemploi clients CA", ca=True)
    client_cert = issue("svc-batch", client_ca, client=True)
    stranger = issue("stranger", issue("another CA", ca=True), client=True)
    files = {
        "server_ca": write(folder, "server-ca.pem", server_ca.cert),
        "server_cert": write(folder, "server.pem", server_cert.cert),
        "server_key": write(folder, "server.key", server_cert.key),
        "client_ca": write(folder, "client-ca.pem", client_ca.cert),
        "client_cert": write(folder, "client.pem", client_cert.cert),
        "client_key": write(folder, "client.key", client_cert.key),
    }
    return {"files": files, "server_ca": server_ca, "client": client_cert, "stranger": stranger}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    made = {
        name: append_token(path, name, scopes)
        for name, scopes in {
            "svc-embed": ["embed"],
            "svc-search": ["search"],
            "svc-ingest": ["ingest"],
            "ops": ["admin"],
        }.items()
    }
    return path, made


@pytest.fixture(scope="module")
def server(default_version, tmp_path_factory, pki, tokens):
    base = make_config(collections_dir=tmp_path_factory.mktemp("security-collections"))
    files = pki["files"]
    config = dataclasses.replace(
        base,
        limits=dataclasses.replace(base.limits, **LIMITS),
        security=SecurityConfig(tokens_file=tokens[0], tls_cert=files["server_cert"], tls_key=files["server_key"]),
    )
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server, pki):
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(pki["server_ca"].cert)) as ch:
        yield ch


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def as_(tokens):
    """as_("ops") -> call metadata for that token."""
    return lambda name: auth(tokens[1][name])


@pytest.fixture(scope="module")
def stubs(channel):
    return dataclasses.make_dataclass("Stubs", ["embed", "index", "match", "models"])(
        pb_grpc.EmbeddingServiceStub(channel),
        ipb_grpc.IndexServiceStub(channel),
        mpb_grpc.MatchServiceStub(channel),
        mopb_grpc.ModelServiceStub(channel),
    )


@pytest.fixture(scope="module")
def offers(stubs, as_):
    """A small collection made and filled by the admin token."""
    stubs.index.CreateCollection(ipb.CreateCollectionRequest(name="offres"), timeout=30, metadata=as_("ops"))
    documents = [
        ipb.Document(id="o1", text="Boulangère en CDI, pain et viennoiseries", skills=["panification"]),
        ipb.Document(id="o2", text="Cariste CACES R489 en entrepôt", skills=["CACES R489"]),
    ]
    stubs.index.Upsert(ipb.UpsertRequest(collection="offres", documents=documents), timeout=60, metadata=as_("ops"))
    return "offres"


def requests_total(server, rpc: str, code: str) -> float:
    value = server.running.metrics.registry.get_sample_value("openemploi_requests_total", {"rpc": rpc, "code": code})
    return value or 0.0


def counted(server, rpc: str, code: str, expected: float) -> bool:
    """context.abort sends the status before the metrics interceptor's `finally` runs: wait for the count."""
    for _ in range(100):
        if requests_total(server, rpc, code) == expected:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- tokens and scopes


def test_health_is_open_without_a_token(channel):
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_missing_token_is_unauthenticated_and_counted_by_metrics(server, stubs):
    before = requests_total(server, "Embed", "UNAUTHENTICATED")
    details = expect(lambda: stubs.embed.Embed(pb.EmbedRequest(texts=["Boulanger"]), timeout=10), grpc.StatusCode.UNAUTHENTICATED)
    assert details == MISSING_TOKEN
    assert counted(server, "Embed", "UNAUTHENTICATED", before + 1)


def test_wrong_or_malformed_token_is_unauthenticated(stubs, tokens):
    request = pb.EmbedRequest(texts=["Boulanger"])
    assert "unknown bearer token" in expect(
        lambda: stubs.embed.Embed(request, timeout=10, metadata=auth("not-a-token")), grpc.StatusCode.UNAUTHENTICATED
    )
    real = tokens[1]["ops"]
    assert "unknown bearer token" in expect(
        lambda: stubs.embed.Embed(request, timeout=10, metadata=auth(real[:-1])), grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        expect(
            lambda: stubs.embed.Embed(request, timeout=10, metadata=(("authorization", real),)), grpc.StatusCode.UNAUTHENTICATED
        )
        == MISSING_TOKEN
    )


def test_denied_calls_return_the_request_id(stubs):
    call = stubs.embed.Embed.with_call
    with pytest.raises(grpc.RpcError) as info:
        call(pb.EmbedRequest(texts=["a"]), timeout=10, metadata=(("x-request-id", "req-42"),))
    assert ("x-request-id", "req-42") in tuple(info.value.trailing_metadata())


def test_streaming_rpc_is_denied_without_a_token(server, stubs, as_):
    requests = [pb.EmbedRequest(texts=["Boulanger"])] * 2
    before = requests_total(server, "EmbedStream", "UNAUTHENTICATED")
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.embed.EmbedStream(iter(requests), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert counted(server, "EmbedStream", "UNAUTHENTICATED", before + 1)
    with pytest.raises(grpc.RpcError) as info:
        list(stubs.embed.EmbedStream(iter(requests), timeout=10, metadata=as_("svc-search")))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ok = list(stubs.embed.EmbedStream(iter(requests), timeout=60, metadata=as_("svc-embed")))
    assert [r.sequence for r in ok] == [0, 1] and all(r.code == 0 for r in ok)


def test_under_scoped_tokens_are_denied_naming_the_scope(server, stubs, as_, offers):
    assert len(stubs.embed.Embed(pb.EmbedRequest(texts=["Boulanger"]), timeout=30, metadata=as_("svc-embed")).embeddings) == 1
    before = requests_total(server, "Search", "PERMISSION_DENIED")
    details = expect(
        lambda: stubs.index.Search(ipb.SearchRequest(collection=offers, text="pain", k=1), timeout=10, metadata=as_("svc-embed")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "scope 'search'" in details and "svc-embed" in details
    assert counted(server, "Search", "PERMISSION_DENIED", before + 1)
    details = expect(
        lambda: stubs.index.CreateCollection(ipb.CreateCollectionRequest(name="x"), timeout=10, metadata=as_("svc-embed")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "scope 'admin'" in details
    details = expect(
        lambda: stubs.models.LoadModel(mopb.LoadModelRequest(name=DEFAULT_MODEL), timeout=10, metadata=as_("svc-search")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "scope 'admin'" in details
    assert "scope 'ingest'" in expect(
        lambda: stubs.index.Upsert(
            ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="z", text="x")]),
            timeout=10,
            metadata=as_("svc-search"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # the search token does search, the ingest token does ingest
    hits = stubs.index.Search(ipb.SearchRequest(collection=offers, text="pain", k=1), timeout=30, metadata=as_("svc-search")).hits
    assert hits[0].id == "o1"
    deleted = stubs.index.Delete(ipb.DeleteRequest(collection=offers, ids=["nope"]), timeout=30, metadata=as_("svc-ingest"))
    assert deleted.deleted == 0


def test_admin_can_call_every_scope(stubs, as_, offers):
    ops = as_("ops")
    assert stubs.embed.Embed(pb.EmbedRequest(texts=["Cariste"]), timeout=30, metadata=ops).dim == 384
    assert next(iter(stubs.embed.EmbedStream(iter([pb.EmbedRequest(texts=["Cariste"])]), timeout=30, metadata=ops))).code == 0
    assert (
        stubs.index.Search(ipb.SearchRequest(collection=offers, text="entrepôt", k=1), timeout=30, metadata=ops).hits[0].id
        == "o2"
    )
    assert {c.name for c in stubs.index.ListCollections(ipb.ListCollectionsRequest(), timeout=30, metadata=ops).collections} >= {
        offers
    }
    assert len(stubs.index.Get(ipb.GetRequest(collection=offers, ids=["o1"]), timeout=30, metadata=ops).documents) == 1
    profile = mpb.MatchProfileRequest(collection=offers, text="je conduis des chariots", skills=["CACES R489"], k=1)
    assert stubs.match.MatchProfile(profile, timeout=30, metadata=ops).matches[0].id == "o2"
    assert stubs.models.ListModels(mopb.ListModelsRequest(), timeout=30, metadata=ops).default_model == DEFAULT_MODEL
    stubs.index.CreateCollection(ipb.CreateCollectionRequest(name="jetable"), timeout=30, metadata=ops)
    stubs.index.Upsert(
        ipb.UpsertRequest(collection="jetable", documents=[ipb.Document(id="a", text="Maçon")]), timeout=30, metadata=ops
    )
    assert stubs.index.Delete(ipb.DeleteRequest(collection="jetable", ids=["a"]), timeout=30, metadata=ops).deleted == 1
    assert stubs.index.DropCollection(ipb.DropCollectionRequest(name="jetable"), timeout=30, metadata=ops).dropped
    stubs.models.SetDefault(mopb.SetDefaultRequest(name=DEFAULT_MODEL), timeout=30, metadata=ops)
    # past the interceptor: the servicer's own answer, not PERMISSION_DENIED
    expect(
        lambda: stubs.models.LoadModel(mopb.LoadModelRequest(name="no-such-model"), timeout=30, metadata=ops),
        grpc.StatusCode.NOT_FOUND,
    )


# --------------------------------------------------------------------------- TLS and the CLI


def test_a_plaintext_client_cannot_talk_to_a_tls_server(server):
    with grpc.insecure_channel(server.address) as plain:
        expect(
            lambda: health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5),
            grpc.StatusCode.UNAVAILABLE,
        )


def test_cli_health_and_embed_work_against_the_secured_server(server, pki, tokens, capsys, monkeypatch):
    ca = str(pki["files"]["server_ca"])
    assert main(["health", "--address", server.address, "--tls-ca", ca]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--address", server.address]) == 1  # plaintext against TLS
    assert main(["embed", "Boulanger", "--address", server.address, "--tls-ca", ca]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("OPENEMPLOI_TOKEN", tokens[1]["svc-embed"])
    assert main(["embed", "Boulanger", "--address", server.address, "--tls-ca", ca]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == 384
    monkeypatch.delenv("OPENEMPLOI_TOKEN")
    assert main(["embed", "Boulanger", "--address", server.address, "--tls-ca", ca, "--token", tokens[1]["ops"]]) == 0


@pytest.fixture(scope="module")
def mtls_server(default_version, tmp_path_factory, pki):
    files = pki["files"]
    config = make_config(
        collections_dir=tmp_path_factory.mktemp("mtls-collections"),
        security=SecurityConfig(tls_cert=files["server_cert"], tls_key=files["server_key"], tls_client_ca=files["client_ca"]),
    )
    running = ServerThread(config)
    yield running
    running.stop()


def test_mtls_refuses_clients_without_a_certificate_from_the_client_ca(mtls_server, pki):
    ca = pki["server_ca"].cert
    request = pb.EmbedRequest(texts=["Boulanger"])
    for credentials in (
        grpc.ssl_channel_credentials(ca),
        grpc.ssl_channel_credentials(ca, pki["stranger"].key, pki["stranger"].cert),
    ):
        with grpc.secure_channel(mtls_server.address, credentials) as ch:
            expect(lambda: pb_grpc.EmbeddingServiceStub(ch).Embed(request, timeout=5), grpc.StatusCode.UNAVAILABLE)
    with grpc.secure_channel(mtls_server.address, grpc.ssl_channel_credentials(ca, pki["client"].key, pki["client"].cert)) as ch:
        assert pb_grpc.EmbeddingServiceStub(ch).Embed(request, timeout=30).dim == 384  # no tokens file: mTLS alone


def test_cli_health_with_a_client_certificate(mtls_server, pki, capsys):
    files = {k: str(v) for k, v in pki["files"].items()}
    base = ["health", "--address", mtls_server.address, "--tls-ca", files["server_ca"]]
    assert main(base) == 1
    assert main([*base, "--tls-cert", files["client_cert"], "--tls-key", files["client_key"]]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


# --------------------------------------------------------------------------- limits


def test_k_over_limits_max_k_is_invalid_argument(stubs, as_, offers):
    for call in (
        lambda: stubs.index.Search(ipb.SearchRequest(collection=offers, text="pain", k=51), timeout=10, metadata=as_("ops")),
        lambda: stubs.match.MatchProfile(
            mpb.MatchProfileRequest(collection=offers, text="pain", k=51), timeout=10, metadata=as_("ops")
        ),
    ):
        details = expect(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert "between 1 and 50" in details and "limits.max_k" in details
    assert (
        len(stubs.index.Search(ipb.SearchRequest(collection=offers, text="pain", k=50), timeout=30, metadata=as_("ops")).hits)
        == 2
    )


def test_a_stream_over_limits_max_stream_requests_answers_then_ends(stubs, as_):
    requests = [pb.EmbedRequest(texts=[f"métier {i}"]) for i in range(5)]
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for item in stubs.embed.EmbedStream(iter(requests), timeout=60, metadata=as_("svc-embed")):
            received.append(item)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 3 requests" in info.value.details() and "limits.max_stream_requests" in info.value.details()
    assert [r.sequence for r in received] == [0, 1, 2] and all(r.code == 0 for r in received)


def test_upsert_over_limits_max_upsert_documents_is_invalid_argument(stubs, as_, offers):
    documents = [ipb.Document(id=f"d{i}", text="Maçon") for i in range(3)]
    details = expect(
        lambda: stubs.index.Upsert(ipb.UpsertRequest(collection=offers, documents=documents), timeout=10, metadata=as_("ops")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "3 documents" in details and "limits.max_upsert_documents" in details


def test_texts_chars_and_message_size_limits_name_their_key(server, stubs, as_, offers):
    limits = server.running.config.limits
    ops = as_("ops")
    details = expect(
        lambda: stubs.embed.Embed(pb.EmbedRequest(texts=["a"] * (limits.max_texts_per_request + 1)), timeout=10, metadata=ops),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "limits.max_texts_per_request" in details
    long_text = "é" * (limits.max_text_chars + 1)
    for call in (
        lambda: stubs.embed.Embed(pb.EmbedRequest(texts=["ok", long_text]), timeout=10, metadata=ops),
        lambda: stubs.index.Search(ipb.SearchRequest(collection=offers, text=long_text, k=1), timeout=10, metadata=ops),
        lambda: stubs.index.Upsert(
            ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="l", text=long_text)]), timeout=10, metadata=ops
        ),
    ):
        assert "limits.max_text_chars" in expect(call, grpc.StatusCode.INVALID_ARGUMENT)
    chunk = "x" * 4000
    too_big = pb.EmbedRequest(texts=[chunk] * (limits.max_message_bytes // len(chunk) + 1))
    expect(lambda: stubs.embed.Embed(too_big, timeout=10, metadata=ops), grpc.StatusCode.RESOURCE_EXHAUSTED)


# --------------------------------------------------------------------------- logs


def test_info_logs_never_hold_a_token_or_a_request_text(server, stubs, tokens, as_, offers, caplog):
    formatter = JsonFormatter()
    with caplog.at_level(logging.DEBUG):
        stubs.embed.Embed(pb.EmbedRequest(texts=[SECRET_TEXT]), timeout=30, metadata=as_("svc-embed"))
        list(stubs.embed.EmbedStream(iter([pb.EmbedRequest(texts=[SECRET_TEXT])]), timeout=30, metadata=as_("svc-embed")))
        stubs.index.Search(ipb.SearchRequest(collection=offers, text=SECRET_TEXT, k=1), timeout=30, metadata=as_("svc-search"))
        stubs.index.Upsert(
            ipb.UpsertRequest(collection=offers, documents=[ipb.Document(id="s", text=SECRET_TEXT)]),
            timeout=30,
            metadata=as_("ops"),
        )
        for call in (
            lambda: stubs.index.Search(
                ipb.SearchRequest(collection=offers, text=SECRET_TEXT, k=1), timeout=10, metadata=as_("svc-embed")
            ),
            lambda: stubs.embed.Embed(
                pb.EmbedRequest(texts=[SECRET_TEXT]), timeout=10, metadata=auth("guessed-" + tokens[1]["ops"])
            ),
            lambda: stubs.embed.Embed(pb.EmbedRequest(texts=[SECRET_TEXT], model="nope"), timeout=10, metadata=as_("ops")),
        ):
            with pytest.raises(grpc.RpcError):
                call()
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    lines = [formatter.format(r) for r in info]
    refusals = [json.loads(line) for line in lines if "refused" in line]
    assert any(r.get("caller") == "svc-embed" and r["level"] == "warning" for r in refusals), lines
    text = "\n".join(lines)
    for secret in [*list(tokens[1].values()), SECRET_TEXT, SECRET_TEXT[:20]]:
        assert secret not in text
    debug = "\n".join(formatter.format(r) for r in caplog.records)
    assert all(token not in debug for token in tokens[1].values())
