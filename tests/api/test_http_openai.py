"""The OpenAI-compatible routes with the official `openai` client, against a live server's HTTP port."""

from __future__ import annotations

import base64
import dataclasses

import grpc
import httpx
import numpy as np
import openai
import pytest
from harness import DEFAULT_MODEL, ServerThread, make_config
from openai import OpenAI
from test_errors_details import fill_index_pool

from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc

TEXTS = ["Boulanger / Boulangère", "je fais le pain et les croissants la nuit", "Infirmier de bloc opératoire (IBODE)"]


@pytest.fixture(scope="module")
def server(default_version):
    config = make_config()
    running = ServerThread(
        dataclasses.replace(config, limits=dataclasses.replace(config.limits, index_workers=1, max_index_queue=1))
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{server.running.http_port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.running.http_port}", timeout=60) as http:
        yield http


def grpc_vectors(server: ServerThread, texts: list[str], kind: int) -> np.ndarray:
    with grpc.insecure_channel(server.address) as channel:
        response = epb_grpc.EmbeddingServiceStub(channel).Embed(
            epb.EmbedRequest(texts=texts, kind=kind, encoding=epb.RAW_FLOAT32), timeout=60
        )
    return np.frombuffer(response.raw_float32, dtype="<f4").reshape(len(texts), response.dim)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_vectors_equal_grpc_embed_as_passages_by_default(server, client, encoding):
    result = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format=encoding)
    if encoding == "base64":  # asked for explicitly, the SDK hands the string over as is
        vectors = np.array([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in result.data])
    else:
        vectors = np.array([item.embedding for item in result.data], dtype=np.float32)
    assert [item.index for item in result.data] == [0, 1, 2]
    np.testing.assert_array_equal(vectors, grpc_vectors(server, TEXTS, epb.PASSAGE))
    assert result.model == DEFAULT_MODEL
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(TEXTS)


def test_input_type_query_selects_the_query_prefix(server, client):
    result = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[1], extra_body={"input_type": "query"})
    query = np.array(result.data[0].embedding, dtype=np.float32)
    np.testing.assert_array_equal(query, grpc_vectors(server, [TEXTS[1]], epb.QUERY)[0])
    assert not np.array_equal(query, grpc_vectors(server, [TEXTS[1]], epb.PASSAGE)[0])


def test_the_sdk_default_encoding_decodes_to_the_same_vectors(server, client):
    result = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[:1])  # the SDK asks for base64 and decodes it
    np.testing.assert_array_equal(
        np.array(result.data[0].embedding, dtype=np.float32), grpc_vectors(server, TEXTS[:1], epb.PASSAGE)[0]
    )


def test_an_unknown_model_is_a_404_in_openais_error_shape(client, http):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="camembert", input="x")
    assert info.value.status_code == 404
    reply = http.post("/v1/embeddings", json={"model": "camembert", "input": "x"}).json()["error"]
    assert set(reply) >= {"message", "type", "param", "code"}
    assert reply["code"] == "model_not_found" and "camembert" in reply["message"]
    resource = next(d for d in reply["details"] if d["@type"].endswith("ResourceInfo"))
    assert (resource["resourceType"], resource["resourceName"]) == ("model", "camembert")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "x", "dimensions": 128}, "dimensions", "dimensions is not supported"),
        ({"input": [[101, 2023]]}, "input", "token ids"),
        ({"input": [17, 42]}, "input", "token ids"),
        ({"input": []}, "input", "texts is empty"),
        ({"input": ["ok", 3]}, "input", "a string or a list of strings"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "x", "input_type": "document"}, "input_type", "'query' or 'passage'"),
        ({"input": ["court", "x" * 20_001]}, "input[1]", "texts[1] has 20001 characters"),
    ],
)
def test_bad_requests_are_400_naming_the_parameter(http, body, param, words):
    reply = http.post("/v1/embeddings", json={"model": DEFAULT_MODEL, **body})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_dimensions_is_refused_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError, match="dimensions is not supported"):
        client.embeddings.create(model=DEFAULT_MODEL, input="x", dimensions=128)


def test_models_lists_the_loaded_models(client):
    assert [model.id for model in client.models.list()] == [DEFAULT_MODEL]


def test_health_and_liveness(http):
    assert http.get("/health").json() == {"status": "SERVING"}
    assert http.get("/livez").status_code == 200


def test_a_body_over_the_message_limit_is_413(server, http):
    limit = server.running.config.limits.max_message_bytes
    reply = http.post("/v1/embeddings", content=b'{"input": "' + b"x" * limit + b'"}')
    assert reply.status_code == 413 and "limits.max_message_bytes" in reply.json()["error"]["message"]


def test_an_overloaded_index_pool_is_429_with_retry_after(server, http):
    release, futures = fill_index_pool(server)
    try:
        reply = http.post("/openemploi.v1.IndexService/ListCollections", json={})
    finally:
        release.set()
        for future in futures:
            future.result(30)
    assert reply.status_code == 429
    assert int(reply.headers["retry-after"]) >= 1
    assert reply.json()["error"]["code"] == "index_pool_full" and reply.json()["error"]["type"] == "rate_limit_error"


def test_requests_are_counted_by_route_and_status(server, http):
    http.get("/livez")
    http.get("/no/such/route/here")
    samples = {
        (s.labels["route"], s.labels["status"]): s.value
        for metric in server.running.metrics.registry.collect()
        if metric.name == "openemploi_http_requests"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert samples[("/livez", "200")] >= 1 and samples[("other", "404")] >= 1


def test_health_is_503_once_shutdown_starts(default_version):
    draining = ServerThread(make_config())
    try:
        url = f"http://127.0.0.1:{draining.running.http_port}"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        draining.call(draining.running.health.enter_graceful_shutdown())
        reply = httpx.get(f"{url}/health", timeout=30)
        assert reply.status_code == 503 and reply.json() == {"status": "NOT_SERVING"}
        assert httpx.get(f"{url}/livez", timeout=30).status_code == 200
    finally:
        draining.stop()
