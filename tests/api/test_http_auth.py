"""The HTTP API checks the same bearer tokens and scopes as gRPC, and refuses in OpenAI's error shape."""

from __future__ import annotations

import ssl

import grpc
import httpx
import openai
import pytest
from grpc_status import rpc_status
from harness import DEFAULT_MODEL, ServerThread, make_config
from openai import OpenAI
from test_errors_details import unpack

from openemploi.config import SecurityConfig
from openemploi.security import append_token
from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    return path, {scope: append_token(path, f"svc-{scope}", [scope]) for scope in ("embed", "search", "admin")}


@pytest.fixture(scope="module")
def server(default_version, tokens):
    running = ServerThread(make_config(security=SecurityConfig(tokens_file=tokens[0])))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"http://127.0.0.1:{server.running.http_port}"


def sdk(url: str, token: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)


def test_a_token_with_the_scope_embeds(url, tokens):
    for scope in ("embed", "admin"):
        result = sdk(url, tokens[1][scope]).embeddings.create(model=DEFAULT_MODEL, input="Boulanger")
        assert len(result.data[0].embedding) == 384


def test_no_token_or_an_unknown_one_is_401(url):
    reply = httpx.post(f"{url}/v1/embeddings", json={"model": DEFAULT_MODEL, "input": "x"}, timeout=30)
    assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "missing_token"
    with pytest.raises(openai.AuthenticationError, match="unknown bearer token"):
        sdk(url, "oe_not-a-token").embeddings.create(model=DEFAULT_MODEL, input="x")


def test_a_token_without_the_scope_is_403(url, tokens):
    with pytest.raises(openai.PermissionDeniedError, match="lacks scope 'embed'"):
        sdk(url, tokens[1]["search"]).embeddings.create(model=DEFAULT_MODEL, input="x")
    reply = httpx.post(
        f"{url}/openemploi.v1.IndexService/CreateCollection",
        json={"name": "offres"},
        headers={"Authorization": f"Bearer {tokens[1]['embed']}"},
        timeout=30,
    )
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "scope_missing"
    assert sdk(url, tokens[1]["search"]).models.list().data[0].id == DEFAULT_MODEL  # ListModels: scope search


def test_health_and_liveness_need_no_token(url):
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/livez", timeout=30).status_code == 200


def test_grpc_refusals_carry_their_reason_too(server, tokens):
    with grpc.insecure_channel(server.address) as channel:
        stub = epb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Embed(epb.EmbedRequest(texts=["x"]), timeout=30)
        with pytest.raises(grpc.RpcError) as scope:
            stub.Embed(epb.EmbedRequest(texts=["x"]), metadata=(("authorization", f"Bearer {tokens[1]['search']}"),), timeout=30)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unpack(missing.value)["ErrorInfo"].reason == "MISSING_TOKEN"
    assert scope.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert unpack(scope.value)["ErrorInfo"].reason == "SCOPE_MISSING"
    assert rpc_status.from_call(scope.value).message == scope.value.details()


def test_with_tls_the_http_port_serves_https_with_the_same_certificate(default_version, tokens, tmp_path):
    from test_security import issue, write

    ca = issue("openemploi test CA", ca=True)
    cert = issue("localhost", ca)
    security = SecurityConfig(
        tokens_file=tokens[0], tls_cert=write(tmp_path, "server.pem", cert.cert), tls_key=write(tmp_path, "server.key", cert.key)
    )
    running = ServerThread(make_config(security=security))
    try:
        port = running.running.http_port
        trusted = ssl.create_default_context(cadata=ca.cert.decode())
        reply = httpx.post(
            f"https://localhost:{port}/v1/embeddings",
            json={"model": DEFAULT_MODEL, "input": "Boulanger"},
            headers={"Authorization": f"Bearer {tokens[1]['embed']}"},
            verify=trusted,
            timeout=30,
        )
        assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) == 384
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://localhost:{port}/livez", timeout=10)  # no plaintext beside it
    finally:
        running.stop()
