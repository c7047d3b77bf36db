"""EmbeddingService through a real gRPC channel, with the real default model."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import DEFAULT_MODEL, MAX_MESSAGE_BYTES, ServerThread, expect, make_config

from openemploi.api.embedding import EmbeddingServicer
from openemploi.api.errors import RequestError
from openemploi.backends.base import BackendKind, Device
from openemploi.backends.options import BackendConfig
from openemploi.backends.select import open_encoder
from openemploi.batching import BatcherConfig
from openemploi.build.fidelity import Probe
from openemploi.padding import pad_sequences
from openemploi.runtime.registry import INLINE_TOKENIZE_CHARS
from openemploi.tokenize import TextKind, TextTokenizer, TokenizerConfig
from openemploi.v1 import embedding_pb2 as pb
from openemploi.v1 import embedding_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def server(default_version):
    running = ServerThread(make_config())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


@pytest.fixture(scope="module")
def reference(default_version):
    """Unbatched vectors: each text alone through the same int8 backend."""
    version = default_version
    tokenizer = TextTokenizer(
        version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix)
    )
    encoder = open_encoder(version, BackendKind.ONNX, BackendConfig(device=Device.CPU))

    def embed_alone(text: str, kind: TextKind = TextKind.PASSAGE) -> np.ndarray:
        tokens = tokenizer.encode([text], kind, truncate=True)
        return encoder.encode(*pad_sequences([t.ids for t in tokens], tokenizer.pad_id))[0][0]

    return embed_alone


def vectors_of(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def test_health_is_serving_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "openemploi.v1.EmbeddingService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "openemploi.v1.EmbeddingService" in names


def test_embed_returns_a_384_dim_unit_vector_with_model_version(stub, default_version, reference):
    response = stub.Embed(pb.EmbedRequest(texts=["Boulanger / Boulangère"], kind=pb.PASSAGE), timeout=30)
    vectors = vectors_of(response)
    assert vectors.shape == (1, 384)
    assert abs(np.linalg.norm(vectors[0]) - 1.0) < 1e-4
    assert response.model == DEFAULT_MODEL and response.model_version == default_version.version
    assert response.dim == 384 and list(response.token_counts) == [11] and response.total_tokens == 11
    assert float(vectors[0] @ reference("Boulanger / Boulangère")) >= 0.9999


def test_64_concurrent_clients_get_their_unbatched_vectors_in_order(server, stub, reference):
    probe = Probe.load()
    texts = [t for t in probe.texts[20:] if t.strip()][:64]
    queries = probe.queries[:64]
    server.batch_sizes.clear()
    barrier = threading.Barrier(64)

    def client(i: int) -> tuple[int, pb.EmbedResponse]:
        barrier.wait(30)
        # every client sends two texts: its own passage and its own query (as separate requests)
        passage = stub.Embed(pb.EmbedRequest(texts=[texts[i]], kind=pb.PASSAGE, truncate=True), timeout=120)
        pair = stub.Embed(pb.EmbedRequest(texts=[queries[i], texts[i]], kind=pb.QUERY, truncate=True), timeout=120)
        return i, passage, pair

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    for i, passage, pair in results:
        got = vectors_of(passage)[0]
        assert float(got @ reference(texts[i])) >= 0.9999, f"client {i}"
        pair_vectors = vectors_of(pair)
        assert float(pair_vectors[0] @ reference(queries[i], TextKind.QUERY)) >= 0.9999, f"client {i} query"
        assert float(pair_vectors[1] @ reference(texts[i], TextKind.QUERY)) >= 0.9999, f"client {i} second text"
    assert max(server.batch_sizes) > 1, "64 concurrent clients never shared a batch"


def test_kind_selects_the_prefix(stub, reference):
    text = "conduite de chariots élévateurs, CACES 3"
    query = vectors_of(stub.Embed(pb.EmbedRequest(texts=[text], kind=pb.QUERY), timeout=30))[0]
    unspecified = vectors_of(stub.Embed(pb.EmbedRequest(texts=[text]), timeout=30))[0]
    assert float(query @ reference(text, TextKind.QUERY)) >= 0.9999
    assert float(unspecified @ reference(text, TextKind.PASSAGE)) >= 0.9999
    assert float(query @ unspecified) < 0.999


def test_raw_float32_matches_float_list(stub):
    texts = ["Infirmier / Infirmière", "Maçon / Maçonne", "Développeur / Développeuse web"]
    listed = vectors_of(stub.Embed(pb.EmbedRequest(texts=texts), timeout=30))
    raw = stub.Embed(pb.EmbedRequest(texts=texts, encoding=pb.RAW_FLOAT32), timeout=30)
    assert len(raw.embeddings) == 0
    packed = np.frombuffer(raw.raw_float32, dtype="<f4").reshape(len(texts), raw.dim)
    np.testing.assert_allclose(packed, listed, atol=1e-6)


def test_normalize_false_returns_pooled_vectors(stub):
    text = ["Chauffeur / Chauffeuse poids lourd"]
    normalized = vectors_of(stub.Embed(pb.EmbedRequest(texts=text, normalize=True), timeout=30))[0]
    pooled = vectors_of(stub.Embed(pb.EmbedRequest(texts=text, normalize=False), timeout=30))[0]
    assert abs(np.linalg.norm(pooled) - 1.0) > 0.01
    np.testing.assert_allclose(pooled / np.linalg.norm(pooled), normalized, atol=1e-5)


def test_truncate_true_cuts_long_texts_to_the_model_limit(stub):
    response = stub.Embed(pb.EmbedRequest(texts=["mot " * 700, "court"], truncate=True), timeout=60)
    assert next(iter(response.token_counts)) == 512
    assert list(response.truncated) == [True, False]


def test_trailing_metadata_carries_request_id_and_stage_timings(stub):
    _, call = stub.Embed.with_call(pb.EmbedRequest(texts=["Comptable"]), metadata=(("x-request-id", "req-42"),), timeout=30)
    trailing = dict(call.trailing_metadata())
    assert trailing["x-request-id"] == "req-42"
    for stage in ("tokenize", "queue", "inference"):
        assert float(trailing[f"x-openemploi-{stage}-ms"]) >= 0.0
    assert float(trailing["x-openemploi-inference-ms"]) > 0.0


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (pb.EmbedRequest(texts=["ok", "mot " * 700]), grpc.StatusCode.INVALID_ARGUMENT, "texts[1] has 70"),
        (pb.EmbedRequest(texts=["a"], model="camembert-xl"), grpc.StatusCode.NOT_FOUND, "camembert-xl"),
        (pb.EmbedRequest(texts=["a"], model_version="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.EmbedRequest(texts=["a"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "limit of 64"),
        (pb.EmbedRequest(texts=["é" * 20_001]), grpc.StatusCode.INVALID_ARGUMENT, "limit of 20000"),
        (pb.EmbedRequest(texts=["a"], kind=7), grpc.StatusCode.INVALID_ARGUMENT, "kind"),
        (pb.EmbedRequest(texts=["a"], encoding=9), grpc.StatusCode.INVALID_ARGUMENT, "encoding"),
        (pb.EmbedRequest(texts=["x" * (MAX_MESSAGE_BYTES + 10)]), grpc.StatusCode.RESOURCE_EXHAUSTED, str(MAX_MESSAGE_BYTES)),
    ],
    ids=[
        "empty",
        "too-long",
        "unknown-model",
        "unknown-version",
        "too-many",
        "too-many-chars",
        "bad-kind",
        "bad-encoding",
        "too-big",
    ],
)
def test_bad_input_gets_a_specific_status(stub, request_, code, needle):
    details = expect(lambda: stub.Embed(request_, timeout=30), code)
    assert needle in details
    assert stub.Embed(pb.EmbedRequest(texts=["toujours là"]), timeout=30).dim == 384


def test_invalid_utf8_is_refused_before_the_model(server, stub):
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary(
            "/openemploi.v1.EmbeddingService/Embed", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        # field 1 (texts), length 3, bytes that are not UTF-8
        details = expect(lambda: raw(b"\x0a\x03\xff\xfe\xfd", timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
    assert "UTF-8" in details
    assert stub.Embed(pb.EmbedRequest(texts=["encore là"]), timeout=30).dim == 384


def test_embed_stream_preserves_order_and_reports_bad_items(stub, reference):
    probe = Probe.load()
    chunks = [[t for t in probe.queries[i * 3 : i * 3 + 3]] for i in range(12)]
    requests = [pb.EmbedRequest(texts=chunk, kind=pb.QUERY) for chunk in chunks]
    requests.insert(5, pb.EmbedRequest(texts=[]))  # a bad item in the middle
    responses = list(stub.EmbedStream(iter(requests), timeout=120))
    assert [r.sequence for r in responses] == list(range(len(requests)))
    assert responses[5].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "empty" in responses[5].message
    good = [r for r in responses if r.code == 0]
    assert len(good) == 12
    for chunk, item in zip(chunks, good):
        vectors = vectors_of(item.response)
        assert vectors.shape == (3, 384)
        for text, vector in zip(chunk, vectors):
            assert float(vector @ reference(text, TextKind.QUERY)) >= 0.9999


def test_full_queue_is_refused_at_once(default_version):
    small = ServerThread(make_config(batching=BatcherConfig(max_queue_texts=4, max_batch_size=4, lookahead=4)))
    try:
        with grpc.insecure_channel(small.address) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            details = expect(lambda: stub.Embed(pb.EmbedRequest(texts=["a"] * 5), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "limit 4" in details
            assert len(stub.Embed(pb.EmbedRequest(texts=["a"] * 4), timeout=30).embeddings) == 4
    finally:
        small.stop()


def test_the_search_kernels_are_compiled_before_the_server_says_serving(default_version, monkeypatch):
    import openemploi.kernels

    warmed = []
    monkeypatch.setattr(openemploi.kernels, "warm_up", lambda: warmed.append(True))
    running = ServerThread(make_config())
    try:
        assert warmed == [True]  # start_server returned: health is SERVING only after the warm-up
    finally:
        running.stop()


def test_graceful_shutdown_finishes_in_flight_work(default_version):
    draining = ServerThread(make_config())
    channel = grpc.insecure_channel(draining.address)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    texts = [f"Agent / Agente de propreté, site numéro {i}" for i in range(24)]
    futures = [stub.Embed.future(pb.EmbedRequest(texts=[t] * 8), timeout=120) for t in texts]
    model = draining.running.registry.get()
    # wait until the server has accepted every request (each is in its batcher or answered)
    for _ in range(4000):
        if model.batcher.in_flight + sum(f.done() for f in futures) == len(futures):
            break
        threading.Event().wait(0.005)
    assert model.batcher.in_flight > 0, "work finished before shutdown; the test proves nothing"
    draining.stop(grace=60)
    results = [f.result() for f in futures]
    assert all(len(r.embeddings) == 8 for r in results)
    details = expect(lambda: stub.Embed(pb.EmbedRequest(texts=["trop tard"]), timeout=5), grpc.StatusCode.UNAVAILABLE)
    assert details
    channel.close()


class GatedTokenizer:
    """Stands in for a model's TextTokenizer: the first encode waits for `release` after setting `entered`."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, *args, **options):
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(60)
        return self._inner.encode(*args, **options)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_health_answers_while_a_request_is_blocked_in_the_tokenizer(server, stub):
    """Tokenising runs off the event loop: a request stuck in the tokenizer cannot stall health checks.

    (Requests of at most INLINE_TOKENIZE_CHARS characters are tokenised on the loop: microseconds.)"""
    model = server.running.registry.get()
    gate = GatedTokenizer(model.tokenizer)
    model.tokenizer = gate
    try:
        text = "Boulanger / Boulangère, fabrication du pain et des viennoiseries. " * 5
        assert len(text) > INLINE_TOKENIZE_CHARS
        pending = stub.Embed.future(pb.EmbedRequest(texts=[text]), timeout=120)
        assert gate.entered.wait(60)
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert not pending.done()
        gate.release.set()
        assert pending.result(60).dim == 384
    finally:
        gate.release.set()
        model.tokenizer = gate._inner


def test_total_characters_over_limits_max_request_chars_are_refused_naming_the_key(server):
    limits = dataclasses.replace(server.running.config.limits, max_request_chars=1000)
    servicer = EmbeddingServicer(server.running.registry, limits)
    servicer.validate(pb.EmbedRequest(texts=["a" * 500, "b" * 500]))
    with pytest.raises(RequestError) as info:
        servicer.validate(pb.EmbedRequest(texts=["a" * 500, "b" * 501]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1001 characters" in info.value.message and "limits.max_request_chars" in info.value.message


def test_a_non_finite_vector_is_never_served_and_is_counted(server, stub):
    """An fp16 overflow gives NaN rows: the request fails with INTERNAL naming the text, nothing is returned."""
    model = server.running.registry.get()
    batcher = model.batcher
    inner = batcher._run_batch

    def overflowing(input_ids, attention_mask):
        normalized, pooled = inner(input_ids, attention_mask)
        long_rows = attention_mask.sum(axis=1) > 20
        normalized[long_rows] = np.nan
        pooled[long_rows] = np.inf
        return normalized, pooled

    metric = server.running.metrics.nonfinite_vectors.labels(DEFAULT_MODEL, model.version.version)
    before = metric._value.get()
    batcher._run_batch = overflowing
    try:
        long_text = "Conducteur / Conductrice de travaux tous corps d'état, expérience en réhabilitation de logements"
        details = expect(
            lambda: stub.Embed(pb.EmbedRequest(texts=["court", long_text], encoding=pb.RAW_FLOAT32), timeout=30),
            grpc.StatusCode.INTERNAL,
        )
        assert "non-finite" in details and "[1]" in details
        assert np.all(np.isfinite(vectors_of(stub.Embed(pb.EmbedRequest(texts=["court"]), timeout=30))))
    finally:
        batcher._run_batch = inner
    assert metric._value.get() == before + 1
