"""`openemploi serve --ray` on a real Ray cluster (a head and two worker nodes on this host), judged
against the single-process server with the same settings and tokens file: same vectors, same
refusals (validation and auth), same hits, over gRPC and over the HTTP API (Serve's HTTP proxy); and a
worker node killed under load loses nothing that was acknowledged.

One cluster and one deployment for the module (minutes on 2 cores); the API suite's own checks run
against it through `staticmethod` copies of the tests in tests/api, with this module's fixtures.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from openemploi.security import append_token
from openemploi.testing.launcher import ServerProcess
from openemploi.testing.ray_cluster import LocalRayCluster
from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))  # the API suite, to run its tests here too
import test_embedding_service as embedding_suite
import test_index_service as index_suite
from harness import DEFAULT_MODEL, MAX_MESSAGE_BYTES, REPO_ROOT

RAY_MISSING = importlib.util.find_spec("ray") is None
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(RAY_MISSING, reason="ray[serve] is not installed (the `ray` extra): no cluster to test"),
    pytest.mark.timeout(600),  # the first test also waits for the cluster and the deployment
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),  # Serve's pydantic models, on importing `route`
]

SHARDS = 2
EMBED_REPLICAS = 2
# The API suite's server settings (tests/api/harness.py make_config, test_index_service's limits), as
# environment: both servers of this module read the same ones.
SERVER_ENV = {
    "OPENEMPLOI_MODEL_REPOSITORY": str(REPO_ROOT / "models"),
    "OPENEMPLOI_DEFAULT_MODEL": DEFAULT_MODEL,
    "OPENEMPLOI_MODELS": DEFAULT_MODEL,
    "OPENEMPLOI_LIMITS_MAX_TEXTS_PER_REQUEST": "64",
    "OPENEMPLOI_LIMITS_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "OPENEMPLOI_LIMITS_MAX_TEXT_CHARS": "20000",
    "OPENEMPLOI_LIMITS_STREAM_WINDOW": "4",
    "OPENEMPLOI_LIMITS_MAX_QUERY_TERMS": str(index_suite.MAX_QUERY_TERMS),
    "OPENEMPLOI_LIMITS_MAX_FILTER_TERMS": str(index_suite.MAX_FILTER_TERMS),
}
CLEAN_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Tokens:
    """A tokens file both servers read: every call of this module carries `admin` unless it tests auth."""

    path: Path
    admin: str
    embed_only: str


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Tokens:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    return Tokens(path, append_token(path, "admin", ["admin"]), append_token(path, "embed-only", ["embed"]))


@pytest.fixture(scope="module")
def server_env(tokens) -> dict[str, str]:
    return {**SERVER_ENV, "OPENEMPLOI_SECURITY_TOKENS_FILE": str(tokens.path)}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with LocalRayCluster(workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def ray_server(cluster, server_env, default_version, tmp_path_factory) -> Iterator[ServerProcess]:
    """The deployment, started as an operator would: `openemploi serve --ray --ray-address ...`."""
    command = [sys.executable, "-P", "-m", "openemploi.cli", "serve", "--ray", "--ray-address", cluster.address]
    command += ["--embed-replicas", str(EMBED_REPLICAS), "--shards", str(SHARDS)]
    server = ServerProcess(
        tmp_path_factory.mktemp("ray-collections"),
        log_dir=tmp_path_factory.mktemp("ray-server-log"),
        env={**server_env, **cluster.variables()},
        command=command,
        ready_timeout_s=480.0,
    )
    server.start()
    yield server
    server.stop(grace_s=60.0)


@pytest.fixture(scope="module")
def local_server(server_env, default_version, tmp_path_factory) -> Iterator[ServerProcess]:
    """The single-process server with the same settings: the reference."""
    server = ServerProcess(tmp_path_factory.mktemp("local-collections"), env=server_env)
    server.start()
    yield server
    server.stop()


class Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call's metadata, as a configured client does."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    intercept_stream_stream = intercept_stream_unary


@contextmanager
def channel_to(address: str, token: str | None) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as channel:
        yield channel if token is None else grpc.intercept_channel(channel, Bearer(token))


@pytest.fixture(scope="module")
def ray_channel(ray_server, tokens) -> Iterator[grpc.Channel]:
    with channel_to(ray_server.address, tokens.admin) as channel:
        yield channel


@pytest.fixture(scope="module")
def local_channel(local_server, tokens) -> Iterator[grpc.Channel]:
    with channel_to(local_server.address, tokens.admin) as channel:
        yield channel


def test_health_is_serving_for_every_service(ray_channel):
    health = health_pb2_grpc.HealthStub(ray_channel)
    for service in ("", "openemploi.v1.EmbeddingService", "openemploi.v1.IndexService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


TEXTS = [
    "Boulanger / Boulangère",
    "Aide-soignant(e) en EHPAD, soins d'hygiène et de confort",
    "Cariste CACES R489",
    "Développeur web Python / Django, API REST et bases PostgreSQL",
    "je fais du pain la nuit",
    "a",
    "Maçon coffreur sur chantiers de gros œuvre, lecture de plans " * 8,
]


@pytest.mark.parametrize("kind", [epb.QUERY, epb.PASSAGE], ids=["query", "passage"])
def test_embed_answers_the_single_process_vectors(ray_channel, local_channel, kind):
    request = epb.EmbedRequest(texts=TEXTS, kind=kind)
    ray_reply = epb_grpc.EmbeddingServiceStub(ray_channel).Embed(request, timeout=60)
    local_reply = epb_grpc.EmbeddingServiceStub(local_channel).Embed(request, timeout=60)
    assert (ray_reply.model, ray_reply.model_version, ray_reply.dim) == (local_reply.model, local_reply.model_version, 384)
    assert list(ray_reply.token_counts) == list(local_reply.token_counts)
    np.testing.assert_allclose(vectors(ray_reply), vectors(local_reply), rtol=0, atol=1e-5)


def test_embed_stream_answers_the_single_process_vectors(ray_channel, local_channel):
    requests = [epb.EmbedRequest(texts=TEXTS[i : i + 2], kind=epb.QUERY) for i in range(0, len(TEXTS), 2)]
    ray_replies = list(epb_grpc.EmbeddingServiceStub(ray_channel).EmbedStream(iter(requests), timeout=120))
    local_replies = list(epb_grpc.EmbeddingServiceStub(local_channel).EmbedStream(iter(requests), timeout=120))
    assert [r.sequence for r in ray_replies] == [r.sequence for r in local_replies] == list(range(len(requests)))
    for ray_item, local_item in zip(ray_replies, local_replies):
        np.testing.assert_allclose(vectors(ray_item.response), vectors(local_item.response), rtol=0, atol=1e-5)


def vectors(response: epb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


REFUSALS: list[tuple[str, Callable[[grpc.Channel], object]]] = [
    ("embed-empty", lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(), timeout=30)),
    ("embed-too-many", lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(texts=["a"] * 65), timeout=30)),
    (
        "embed-unknown-model",
        lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(texts=["a"], model="camembert"), timeout=30),
    ),
    (
        "embed-text-too-long",
        lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(texts=["ok", "mot " * 700]), timeout=30),
    ),
    (
        "search-unknown-collection",
        lambda ch: ipb_grpc.IndexServiceStub(ch).Search(ipb.SearchRequest(collection="absente", text="x", k=1), timeout=30),
    ),
    (
        "create-bad-name",
        lambda ch: ipb_grpc.IndexServiceStub(ch).CreateCollection(ipb.CreateCollectionRequest(name="Bad Name!"), timeout=30),
    ),
    (
        "embed-invalid-utf8",  # field 1 (texts), length 3, bytes that are not UTF-8
        lambda ch: ch.unary_unary("/openemploi.v1.EmbeddingService/Embed")(b"\x0a\x03\xff\xfe\xfd", timeout=30),
    ),
    (
        "upsert-not-unit",
        lambda ch: ipb_grpc.IndexServiceStub(ch).Upsert(
            ipb.UpsertRequest(collection="absente", documents=[ipb.Document(id="x", vector=[6.0, 8.0])]), timeout=30
        ),
    ),
]


@pytest.mark.parametrize("call", [call for _, call in REFUSALS], ids=[name for name, _ in REFUSALS])
def test_a_refusal_is_the_same_status_message_and_details(ray_channel, local_channel, call):
    ray_error, local_error = refusal(call, ray_channel), refusal(call, local_channel)
    assert (ray_error.code(), ray_error.details()) == (local_error.code(), local_error.details())
    ray_rich, local_rich = rpc_status.from_call(ray_error), rpc_status.from_call(local_error)
    assert ray_rich is not None and local_rich is not None, "no grpc-status-details-bin trailer"
    assert [d.type_url for d in ray_rich.details] == [d.type_url for d in local_rich.details]


def refusal(call: Callable[[grpc.Channel], object], channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel)
    return info.value


@pytest.mark.parametrize(
    ("token_of", "call"),
    [
        (lambda t: None, lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(texts=["a"]), timeout=30)),
        (
            lambda t: "oe_not-a-token",
            lambda ch: epb_grpc.EmbeddingServiceStub(ch).Embed(epb.EmbedRequest(texts=["a"]), timeout=30),
        ),
        (
            lambda t: t.embed_only,
            lambda ch: ipb_grpc.IndexServiceStub(ch).Search(ipb.SearchRequest(collection="x", text="x", k=1), timeout=30),
        ),
    ],
    ids=["no-token", "unknown-token", "scope-missing"],
)
def test_auth_refuses_alike(ray_server, local_server, tokens, token_of, call):
    """Tokens from one file: the gateway refuses what the single process's interceptor refuses, in the same words."""
    errors = []
    for server in (ray_server, local_server):
        with channel_to(server.address, token_of(tokens)) as channel:
            errors.append(refusal(call, channel))
    assert errors[0].code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert (errors[0].code(), errors[0].details()) == (errors[1].code(), errors[1].details())


def test_a_token_with_the_scope_is_served(ray_server, tokens):
    with channel_to(ray_server.address, tokens.embed_only) as channel:
        assert epb_grpc.EmbeddingServiceStub(channel).Embed(epb.EmbedRequest(texts=["a"]), timeout=30).dim == 384


# --------------------------------------------------------------------------- the HTTP API through Serve's HTTP proxy


@pytest.fixture(scope="module")
def http_clients(ray_server, local_server) -> Iterator[dict[str, httpx.Client]]:
    urls = {"ray": ray_server.http_url, "local": local_server.http_url}
    with httpx.Client(base_url=urls["ray"], timeout=60) as ray, httpx.Client(base_url=urls["local"], timeout=60) as local:
        yield {"ray": ray, "local": local}


def test_http_health_and_liveness_answer_200(http_clients):
    for name, http in http_clients.items():
        assert (http.get("/health").status_code, http.get("/health").json()) == (200, {"status": "SERVING"}), name
        assert http.get("/livez").status_code == 200, name


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_the_openai_client_gets_the_single_process_vectors(ray_server, local_server, tokens, encoding):
    results = []
    for server in (ray_server, local_server):
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=tokens.admin, max_retries=0, timeout=60)
        results.append(client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format=encoding))
    ray_result, local_result = results
    assert (ray_result.model, ray_result.usage) == (local_result.model, local_result.usage)
    assert [item.index for item in ray_result.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(openai_vectors(ray_result), openai_vectors(local_result), rtol=0, atol=1e-5)


def openai_vectors(result) -> np.ndarray:
    if isinstance(result.data[0].embedding, str):  # base64, asked for explicitly: the SDK leaves it encoded
        return np.array([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in result.data])
    return np.array([item.embedding for item in result.data], dtype=np.float32)


def test_the_openai_client_meets_the_same_errors(ray_server, local_server, tokens):
    errors = []
    for server in (ray_server, local_server):
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=tokens.admin, max_retries=0, timeout=60)
        with pytest.raises(openai.NotFoundError) as info:
            client.embeddings.create(model="camembert", input="x")
        errors.append(info.value)
    assert [e.status_code for e in errors] == [404, 404]
    assert errors[0].body == errors[1].body


def test_json_transcoding_gives_the_single_process_answer(http_clients, tokens):
    body = {"texts": TEXTS[:3], "kind": "QUERY"}
    auth = {"authorization": f"Bearer {tokens.admin}"}
    replies = [http.post("/openemploi.v1.EmbeddingService/Embed", json=body, headers=auth) for http in http_clients.values()]
    assert [r.status_code for r in replies] == [200, 200]
    ray_body, local_body = (r.json() for r in replies)
    ray_vectors, local_vectors = ([e["values"] for e in b.pop("embeddings")] for b in (ray_body, local_body))
    assert ray_body == local_body
    np.testing.assert_allclose(ray_vectors, local_vectors, rtol=0, atol=1e-5)


HTTP_REFUSALS = [  # (method, path, body, token: "admin", "embed" or None)
    ("POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": []}, "admin"),
    ("POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": [17, 42]}, "admin"),
    ("POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": ["ok", "mot " * 700]}, "admin"),
    ("POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": "x"}, None),
    ("POST", "/v1/embeddings", b"{not json", "admin"),
    ("POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": "x" * MAX_MESSAGE_BYTES}, "admin"),
    ("POST", "/openemploi.v1.IndexService/Search", {"collection": "absente", "text": "x", "k": 1}, "admin"),
    ("POST", "/openemploi.v1.IndexService/Search", {"collection": "absente", "text": "x", "k": 1}, "embed"),
    ("POST", "/openemploi.v1.IndexService/Search", {"collection": "absente", "k": "beaucoup"}, "admin"),
    ("POST", "/openemploi.v1.EmbeddingService/EmbedStream", {}, "admin"),
    ("POST", "/openemploi.v1.NoService/Nothing", {}, "admin"),
    ("GET", "/v1/nothing", None, "admin"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "token"),
    HTTP_REFUSALS,
    ids=[
        "empty-input",
        "token-ids",
        "text-too-long",
        "no-token",
        "not-json",
        "over-the-message-limit",
        "unknown-collection",
        "scope-missing",
        "bad-field",
        "streaming-method",
        "unknown-service",
        "unknown-route",
    ],
)
def test_an_http_refusal_is_the_same_status_body_and_headers(http_clients, tokens, method, path, body, token):
    headers = {"x-request-id": f"http-{path.rsplit('/', 1)[-1]}"}
    if token is not None:
        headers["authorization"] = f"Bearer {tokens.admin if token == 'admin' else tokens.embed_only}"
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) else body
    replies = {
        name: http.request(method, path, json=payload, content=content, headers=headers) for name, http in http_clients.items()
    }
    ray, local = replies["ray"], replies["local"]
    assert ray.status_code == local.status_code >= 400, (ray.text, local.text)
    assert ray.json() == local.json()
    for header in ("www-authenticate", "retry-after", "content-type"):
        assert ray.headers.get_list(header) == local.headers.get_list(header), header
    if local.headers.get_list("x-request-id"):  # the proxy sends the caller's id on every answer: once, as one process does
        assert ray.headers.get_list("x-request-id") == local.headers.get_list("x-request-id") == [headers["x-request-id"]]


def test_a_sharded_collection_gives_the_single_process_hits(ray_channel, local_channel):
    """Same documents into both servers; every search, get and delete answers alike (exact top-k merge)."""
    rng = np.random.default_rng(11)
    vectors_ = index_suite.unit(rng, 300)
    cities = ["Lyon", "Paris", "Nantes"]
    documents = [
        ipb.Document(id=f"v{i}", vector=vectors_[i].tolist(), metadata={"ville": cities[i % 3]}, skills=["python"] * (i % 2))
        for i in range(300)
    ]
    texts = [ipb.Document(id=i, text=t, metadata=m, skills=s) for i, t, m, s in index_suite.OFFERS]
    stubs = {"ray": ipb_grpc.IndexServiceStub(ray_channel), "local": ipb_grpc.IndexServiceStub(local_channel)}
    for stub in stubs.values():
        stub.CreateCollection(ipb.CreateCollectionRequest(name="comparaison"), timeout=30)
        for start in range(0, len(documents), 100):
            stub.Upsert(ipb.UpsertRequest(collection="comparaison", documents=documents[start : start + 100]), timeout=60)
        stub.Upsert(ipb.UpsertRequest(collection="comparaison", documents=texts), timeout=60)
    queries = [
        ipb.SearchRequest(collection="comparaison", vector=index_suite.unit(rng, 1)[0].tolist(), k=25),
        ipb.SearchRequest(collection="comparaison", vector=index_suite.unit(rng, 1)[0].tolist(), k=300),
        ipb.SearchRequest(
            collection="comparaison",
            vector=index_suite.unit(rng, 1)[0].tolist(),
            k=10,
            filters=[ipb.Filter(field="ville", values=["Lyon"])],
            skills_all=["python"],
        ),
        ipb.SearchRequest(collection="comparaison", text="programmeur backend python", k=5),
        ipb.SearchRequest(collection="comparaison", text="boulangère pain nuit", k=8, hybrid=True),
    ]
    try:
        for query in queries:
            assert_same_hits(*(stub.Search(query, timeout=30).hits for stub in stubs.values()))
        get = ipb.GetRequest(collection="comparaison", ids=["v3", "o2", "absent", "v299"], include_vectors=True)
        ray_got, local_got = (stub.Get(get, timeout=30) for stub in stubs.values())
        assert [d.id for d in ray_got.documents] == [d.id for d in local_got.documents] == ["v3", "o2", "v299"]
        assert list(ray_got.missing) == list(local_got.missing) == ["absent"]
        np.testing.assert_allclose(
            [list(d.vector) for d in ray_got.documents], [list(d.vector) for d in local_got.documents], atol=1e-6
        )
        delete = ipb.DeleteRequest(collection="comparaison", ids=[f"v{i}" for i in range(0, 300, 3)] + ["absent"])
        assert [stub.Delete(delete, timeout=30).deleted for stub in stubs.values()] == [100, 100]
        for query in queries[:2]:
            assert_same_hits(*(stub.Search(query, timeout=30).hits for stub in stubs.values()))
        sizes = [
            {c.name: c.size for c in stub.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections}["comparaison"]
            for stub in stubs.values()
        ]
        assert sizes == [205, 205]
    finally:
        for stub in stubs.values():
            stub.DropCollection(ipb.DropCollectionRequest(name="comparaison"), timeout=30)
    with pytest.raises(grpc.RpcError) as dropped:
        stubs["ray"].Search(queries[0], timeout=30)
    assert dropped.value.code() == grpc.StatusCode.NOT_FOUND


def assert_same_hits(ray_hits, local_hits) -> None:
    assert [h.id for h in ray_hits] == [h.id for h in local_hits]
    np.testing.assert_allclose([h.score for h in ray_hits], [h.score for h in local_hits], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the API suite through Ray
# After the comparisons above: its collections would show in the refusals' "(have: [...])" lists.


class ApiStub:
    """Every service's stub methods on one object (method names are unique across the services), so that
    the embedding suite's and the index suite's tests, which both ask for `stub`, can share this module."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stubs = (epb_grpc.EmbeddingServiceStub(channel), ipb_grpc.IndexServiceStub(channel))

    def __getattr__(self, name: str) -> object:
        for stub in self._stubs:
            if hasattr(stub, name):
                return getattr(stub, name)
        raise AttributeError(name)


@pytest.fixture(scope="module")
def server(ray_server):
    return ray_server


@pytest.fixture(scope="module")
def stub(ray_channel):
    return ApiStub(ray_channel)


reference = embedding_suite.reference  # each text alone through the same backend, in this process
offers = index_suite.offers
random_collection = index_suite.random_collection


class TestTheEmbeddingSuiteThroughRay:
    """tests/api/test_embedding_service.py's checks that need only a stub, against the Ray deployment."""

    test_embed = staticmethod(embedding_suite.test_embed_returns_a_384_dim_unit_vector_with_model_version)
    test_kind = staticmethod(embedding_suite.test_kind_selects_the_prefix)
    test_raw_float32 = staticmethod(embedding_suite.test_raw_float32_matches_float_list)
    test_normalize_false = staticmethod(embedding_suite.test_normalize_false_returns_pooled_vectors)
    test_truncate = staticmethod(embedding_suite.test_truncate_true_cuts_long_texts_to_the_model_limit)
    test_trailing_metadata = staticmethod(embedding_suite.test_trailing_metadata_carries_request_id_and_stage_timings)
    test_bad_input = staticmethod(embedding_suite.test_bad_input_gets_a_specific_status)
    test_embed_stream = staticmethod(embedding_suite.test_embed_stream_preserves_order_and_reports_bad_items)


class TestTheIndexSuiteThroughRay:
    """tests/api/test_index_service.py's checks against the Ray deployment, its collections sharded."""

    test_create_drop = staticmethod(index_suite.test_create_list_drop_and_their_errors)
    test_text_search = staticmethod(index_suite.test_text_search_finds_the_matching_offer)
    test_get_upsert_delete = staticmethod(index_suite.test_get_upsert_replace_and_delete)
    test_filters = staticmethod(index_suite.test_filters_match_an_exact_reference)
    test_hybrid = staticmethod(index_suite.test_hybrid_search_fuses_accent_folded_lexical_matches)
    test_bad_inputs = staticmethod(index_suite.test_bad_search_and_upsert_inputs)
    test_max_query_terms = staticmethod(index_suite.test_a_maximal_hybrid_query_keeps_its_first_max_query_terms_terms)
    test_max_filter_terms = staticmethod(index_suite.test_filter_lists_over_max_filter_terms_are_invalid_argument_naming_the_key)
    test_own_vectors = staticmethod(index_suite.test_own_vectors_must_come_from_the_collections_model_and_have_unit_length)


# --------------------------------------------------------------------------- a worker node killed under load


@dataclass
class Outcomes:
    """What the load's calls got: successes, clean failures by code, and anything else (a test failure)."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, call: Callable[[], object], elapsed_limit_s: float) -> object | None:
        started = time.monotonic()
        try:
            result = call()
        except grpc.RpcError as error:
            elapsed = time.monotonic() - started
            code = error.code()
            with self.lock:
                if code not in CLEAN_FAILURES or "Traceback" in (error.details() or ""):
                    self.bad.append(f"{kind}: {code} {error.details()!r}")
                elif elapsed > elapsed_limit_s:
                    self.bad.append(f"{kind}: {code} after {elapsed:.1f}s, past its {CALL_TIMEOUT_S}s deadline")
                else:
                    self.failed[(kind, code.name)] += 1
            return None
        with self.lock:
            self.ok[kind] += 1
        return result


def load(channel: grpc.Channel, outcomes: Outcomes, stop: threading.Event, worker: int) -> None:
    """Upsert (new ids), Search and Embed in turn until `stop`; acknowledged ids go to `outcomes`."""
    index = ipb_grpc.IndexServiceStub(channel)
    embed = epb_grpc.EmbeddingServiceStub(channel)
    limit_s = CALL_TIMEOUT_S + 5.0  # the client enforces the deadline; more than this would be a hang
    sequence = 0
    while not stop.is_set():
        sequence += 1
        doc_id = f"w{worker}-{sequence}"
        document = ipb.Document(id=doc_id, text=f"Offre {sequence} : soudeur en chaudronnerie", metadata={"n": str(sequence)})
        upsert = ipb.UpsertRequest(collection="charge", documents=[document])
        if outcomes.record("upsert", lambda r=upsert: index.Upsert(r, timeout=CALL_TIMEOUT_S), limit_s) is not None:
            with outcomes.lock:
                outcomes.acknowledged.append(doc_id)
        search = ipb.SearchRequest(collection="charge", text="soudeur", k=5)
        outcomes.record("search", lambda r=search: index.Search(r, timeout=CALL_TIMEOUT_S), limit_s)
        text = epb.EmbedRequest(texts=[f"Chaudronnier {worker}-{sequence}"])
        outcomes.record("embed", lambda r=text: embed.Embed(r, timeout=CALL_TIMEOUT_S), limit_s)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s:.0f}s")
        time.sleep(0.5)


def probe_ids() -> list[str]:
    """One document id per shard: a probe that succeeds has reached every shard."""
    from openemploi.scaleout.shards import route  # imports ray: only once the module is known to run

    ids: dict[int, str] = {}
    for n in itertools.count():
        ids.setdefault(route(f"sonde-{n}", SHARDS), f"sonde-{n}")
        if len(ids) == SHARDS:
            return list(ids.values())
    raise AssertionError("unreachable")


def answers_again(channel: grpc.Channel) -> bool:
    """Search, Embed, and an Upsert then a Get on every shard, each within its deadline."""
    index = ipb_grpc.IndexServiceStub(channel)
    try:
        index.Search(ipb.SearchRequest(collection="charge", text="soudeur", k=5), timeout=10)
        epb_grpc.EmbeddingServiceStub(channel).Embed(epb.EmbedRequest(texts=["de retour"]), timeout=10)
        for doc_id in probe_ids():
            index.Upsert(ipb.UpsertRequest(collection="charge", documents=[ipb.Document(id=doc_id, text="sonde")]), timeout=10)
            index.Get(ipb.GetRequest(collection="charge", ids=[doc_id]), timeout=10)
        return True
    except grpc.RpcError:
        return False


def test_a_worker_node_killed_under_load_loses_nothing_acknowledged(cluster, ray_server, tokens):
    """Runs last: the deployment is degraded while the node is away."""
    with channel_to(ray_server.address, tokens.admin) as setup:
        ipb_grpc.IndexServiceStub(setup).CreateCollection(ipb.CreateCollectionRequest(name="charge"), timeout=30)
    victim = next(
        (i for i, node in enumerate(cluster.workers, 1) if any("CollectionShard" in t for t in node.process_titles())), 1
    )
    outcomes, stop = Outcomes(), threading.Event()
    # One channel per client: a dead proxy's connection fails only the clients that used it.
    channels = [grpc.insecure_channel(ray_server.address) for _ in range(3)]
    authenticated = [grpc.intercept_channel(channel, Bearer(tokens.admin)) for channel in channels]
    clients = [threading.Thread(target=load, args=(ch, outcomes, stop, i), daemon=True) for i, ch in enumerate(authenticated)]
    try:
        for client in clients:
            client.start()
        wait_for(lambda: min(outcomes.ok[k] for k in ("upsert", "search", "embed")) >= 5, 120, "loaded")
        killed = cluster.kill_worker(victim)
        assert any("ServeReplica:openemploi" in title for title in killed), killed
        others = [cluster.head, *(node for i, node in enumerate(cluster.workers, 1) if i != victim)]
        assert all(node.alive() for node in others), "killing one worker took another node down"
        # The load goes on until the cluster has noticed the death (Serve then replaces the replicas).
        cluster.wait_alive_nodes(len(cluster.workers), timeout_s=120)  # the head and the other worker
        cluster.restart_worker(victim)
        with channel_to(ray_server.address, tokens.admin) as probe:
            wait_for(lambda: answers_again(probe), RECOVERY_TIMEOUT_S, "answering after the node came back")
    finally:
        stop.set()
        for client in clients:
            client.join(CALL_TIMEOUT_S * 4)
        for channel in channels:
            channel.close()
    assert not any(client.is_alive() for client in clients), "a client hangs"
    assert not outcomes.bad, outcomes.bad
    assert outcomes.acknowledged
    with channel_to(ray_server.address, tokens.admin) as channel:
        index = ipb_grpc.IndexServiceStub(channel)
        missing: list[str] = []
        for start in range(0, len(outcomes.acknowledged), 200):
            ids = outcomes.acknowledged[start : start + 200]
            missing += index.Get(ipb.GetRequest(collection="charge", ids=ids), timeout=30).missing
        assert not missing, f"{len(missing)} acknowledged upserts lost: {missing[:10]}"
    print(
        f"killed worker{victim} ({[t for t in killed if 'ServeReplica' in t]}); outcomes: ok {dict(outcomes.ok)}, clean failures {dict(outcomes.failed)}"
    )
