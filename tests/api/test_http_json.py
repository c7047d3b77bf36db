"""gRPC-JSON routes: POST /openemploi.v1.<Service>/<Method> calls the servicer gRPC calls, with its checks."""

from __future__ import annotations

import grpc
import httpx
import pytest
from harness import ServerThread, make_config

from openemploi.config import SecurityConfig
from openemploi.security import append_token
from openemploi.v1 import match_pb2 as mpb
from openemploi.v1 import match_pb2_grpc as mpb_grpc


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    return path, {scope: append_token(path, f"svc-{scope}", [scope]) for scope in ("search", "ingest", "admin")}


@pytest.fixture(scope="module")
def server(default_version, tokens, catalogue_copy):
    config = make_config(
        collections_dir=catalogue_copy(),
        rome_collection=True,
        skills_collection=False,
        security=SecurityConfig(tokens_file=tokens[0]),
    )
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def post(server, tokens):
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.running.http_port}", timeout=120)

    def post(path: str, body: dict, scope: str = "search") -> httpx.Response:
        return client.post(path, json=body, headers={"Authorization": f"Bearer {tokens[1][scope]}"})

    yield post
    client.close()


def test_match_occupation_answers_as_grpc_does(server, tokens, post):
    text = "je fais le pain et les croissants la nuit"
    reply = post("/openemploi.v1.MatchService/MatchOccupation", {"text": text, "k": 5})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"]
    matches = reply.json()["matches"]
    assert "D1102" in [m["code"] for m in matches]
    with grpc.insecure_channel(server.address) as channel:
        expected = mpb_grpc.MatchServiceStub(channel).MatchOccupation(
            mpb.MatchOccupationRequest(text=text, k=5), metadata=(("authorization", f"Bearer {tokens[1]['search']}"),), timeout=60
        )
    assert [m["code"] for m in matches] == [m.code for m in expected.matches]
    assert set(matches[0]) >= {"code", "label", "score", "dense_score", "matched_terms", "matched_entry"}


def test_a_bad_k_is_a_400_naming_the_field(post):
    reply = post("/openemploi.v1.MatchService/MatchOccupation", {"text": "boulanger", "k": 500})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "k" and "k must be between 1 and" in error["message"]


def test_a_collection_is_created_filled_and_searched_over_json(post):
    created = post("/openemploi.v1.IndexService/CreateCollection", {"name": "offres", "index": {"kind": "FLAT"}}, "admin")
    assert created.status_code == 200, created.text
    documents = [
        {"id": "o1", "text": "Boulanger de nuit, fournil artisanal", "metadata": {"ville": "Lyon"}},
        {"id": "o2", "text": "Infirmier de bloc opératoire", "metadata": {"ville": "Paris"}},
    ]
    upserted = post("/openemploi.v1.IndexService/Upsert", {"collection": "offres", "documents": documents}, "ingest")
    assert upserted.status_code == 200 and upserted.json()["upserted"] == "2"  # uint64: a string in proto3 JSON
    found = post("/openemploi.v1.IndexService/Search", {"collection": "offres", "text": "pain et viennoiseries", "k": 1})
    assert found.status_code == 200, found.text
    assert [hit["id"] for hit in found.json()["hits"]] == ["o1"]
    camel = post("/openemploi.v1.IndexService/Get", {"collection": "offres", "ids": ["o2"], "includeVectors": True})
    assert camel.status_code == 200 and len(camel.json()["documents"][0]["vector"]) == 384


def test_the_managed_catalogue_is_read_only_to_non_admin_tokens(post):
    reply = post("/openemploi.v1.IndexService/Upsert", {"collection": "rome", "documents": [{"id": "x", "text": "y"}]}, "ingest")
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "managed_collection"


def test_a_body_that_is_not_the_request_message_is_a_400(post):
    reply = post("/openemploi.v1.MatchService/MatchOccupation", {"texte": "boulanger"})
    assert reply.status_code == 400 and "texte" in reply.json()["error"]["message"]


def test_an_unknown_method_is_a_404_and_a_streaming_one_a_400(post):
    assert post("/openemploi.v1.MatchService/Guess", {}).status_code == 404
    assert post("/openemploi.v1.EmbeddingService/EmbedStream", {}).json()["error"]["code"] == "streaming_method"
