"""OpenTelemetry tracing: the span tree of a live request, trace ids in logs, and nothing when it is off."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest
from harness import REPO_ROOT, ServerThread
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from openemploi.config import ConfigError, ServerConfig, TraceExporter, TracingConfig, load_config
from openemploi.logs import JsonFormatter
from openemploi.tracing import DISABLED, TracingMiddleware, start_tracing
from openemploi.v1 import embedding_pb2, embedding_pb2_grpc, index_pb2, index_pb2_grpc, models_pb2, models_pb2_grpc

DEFAULT_MODEL = "multilingual-e5-small"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"),)


def server_config(tmp_path: Path, **tracing: object) -> ServerConfig:
    return ServerConfig(
        port=0,
        metrics=False,
        rome_collection=False,
        progress=False,
        collections_dir=tmp_path / "collections",
        model_repository=REPO_ROOT / "models",
        http_port=0,
        tracing=TracingConfig(**tracing),  # type: ignore[arg-type]
    )


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"


@pytest.fixture(scope="module")
def traced(default_version, tmp_path_factory):
    """A server tracing every caller-sampled request, and none of its own (sample_ratio 0)."""
    exporter = InMemorySpanExporter()
    config = server_config(tmp_path_factory.mktemp("traced"), enabled=True, sample_ratio=0.0)
    server = ServerThread(config, exporter)
    log_lines = io.StringIO()
    handler = logging.StreamHandler(log_lines)
    handler.setFormatter(JsonFormatter())
    package_log = logging.getLogger("openemploi")
    package_log.addHandler(handler)
    level = package_log.level
    package_log.setLevel(logging.INFO)
    logging.getLogger("openemploi.tests").info("outside any request")
    try:
        with grpc.insecure_channel(server.address) as channel:
            embed = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            embed.Embed(embedding_pb2.EmbedRequest(texts=["Plombier chauffagiste"]), timeout=30)  # a new trace: not sampled
            embed.Embed(
                embedding_pb2.EmbedRequest(texts=["Aide-soignante", "Boulanger"], kind=embedding_pb2.QUERY),
                timeout=30,
                metadata=TRACEPARENT,
            )
            index = index_pb2_grpc.IndexServiceStub(channel)
            index.CreateCollection(index_pb2.CreateCollectionRequest(name="traces"), timeout=30)
            index.Upsert(
                index_pb2.UpsertRequest(collection="traces", documents=[index_pb2.Document(id="a", text="Serveuse")]), timeout=30
            )
            index.Search(index_pb2.SearchRequest(collection="traces", text="serveur", k=1), timeout=30, metadata=TRACEPARENT)
            models = models_pb2_grpc.ModelServiceStub(channel)
            models.LoadModel(models_pb2.LoadModelRequest(name=DEFAULT_MODEL), timeout=60, metadata=TRACEPARENT)
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.running.http_port}/v1/embeddings",
            data=json.dumps({"input": ["Cariste"], "model": DEFAULT_MODEL}).encode(),
            headers={"content-type": "application/json", **dict(TRACEPARENT)},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(level)
        server.stop()  # flushes the batch span processor
    yield exporter.get_finished_spans(), [json.loads(line) for line in log_lines.getvalue().splitlines()]


def server_span(spans: tuple[ReadableSpan, ...], method: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == method]
    return found


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id}


def test_embed_spans_continue_the_callers_trace(traced):
    spans, _ = traced
    embed = server_span(spans, "/openemploi.v1.EmbeddingService/Embed")
    assert hex_id(embed.context.trace_id, 32) == TRACE_ID
    assert embed.parent is not None and hex_id(embed.parent.span_id, 16) == CALLER_SPAN_ID
    assert embed.kind == trace.SpanKind.SERVER
    stages = children(spans, embed)
    assert set(stages) == {"tokenize", "queue", "inference"}
    assert stages["tokenize"].attributes["texts"] == 2
    assert stages["tokenize"].end_time <= stages["queue"].start_time <= stages["queue"].end_time
    assert stages["queue"].end_time <= stages["inference"].start_time < stages["inference"].end_time
    assert stages["inference"].end_time <= embed.end_time
    assert stages["inference"].attributes["batches"] >= 1


def test_http_embeddings_span_continues_the_callers_trace(traced):
    spans, _ = traced
    request = server_span(spans, "POST /v1/embeddings")
    assert request.kind == trace.SpanKind.SERVER
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    assert request.parent is not None and hex_id(request.parent.span_id, 16) == CALLER_SPAN_ID
    assert request.attributes["http.response.status_code"] == 200
    assert set(children(spans, request)) == {"tokenize", "queue", "inference"}


def test_an_unsampled_new_trace_records_nothing(traced):
    spans, _ = traced
    assert {hex_id(s.context.trace_id, 32) for s in spans} == {TRACE_ID}  # sample_ratio 0: only the caller's trace
    assert len([s for s in spans if s.name.endswith("/Embed")]) == 1
    assert not [s for s in spans if s.name.endswith(("/Upsert", "/CreateCollection"))]


def test_search_has_an_index_search_span(traced):
    spans, _ = traced
    search = server_span(spans, "/openemploi.v1.IndexService/Search")
    stages = children(spans, search)
    assert {"tokenize", "queue", "inference", "index.search"} <= set(stages)  # the query text is embedded first
    assert stages["index.search"].attributes["collection"] == "traces"
    assert stages["index.search"].attributes["k"] == 1


def test_log_lines_in_a_traced_request_carry_its_trace_id(traced):
    spans, lines = traced
    load = server_span(spans, "/openemploi.v1.ModelService/LoadModel")
    (ready,) = [line for line in lines if line["msg"].startswith("model ready")]
    assert ready["trace_id"] == TRACE_ID
    assert ready["span_id"] == hex_id(load.context.span_id, 16)
    (outside,) = [line for line in lines if line["msg"] == "outside any request"]
    assert "trace_id" not in outside and "span_id" not in outside


def test_tracing_off_has_no_provider_and_serves_traced_callers(default_version, tmp_path):
    config = server_config(tmp_path)
    assert start_tracing(config.tracing) is DISABLED and DISABLED.provider is None
    server = ServerThread(config)
    try:
        assert server.running.tracing is DISABLED
        assert all(model.tracing is DISABLED for model in server.running.registry.models())
        with grpc.insecure_channel(server.address) as channel:
            reply = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                embedding_pb2.EmbedRequest(texts=["Maçon"]), timeout=30, metadata=TRACEPARENT
            )
        assert reply.dim == default_version.dim
    finally:
        server.stop()
    with DISABLED.span("tokenize") as span:  # the off path creates nothing
        assert span is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # nothing set globally, on or off


def test_tracing_keys_come_from_the_environment():
    config = load_config(
        env={
            "OPENEMPLOI_TRACING_ENABLED": "true",
            "OPENEMPLOI_TRACING_EXPORTER": "console",
            "OPENEMPLOI_TRACING_ENDPOINT": "http://collector:4317",
            "OPENEMPLOI_TRACING_SERVICE_NAME": "openemploi-staging",
            "OPENEMPLOI_TRACING_SAMPLE_RATIO": "0.25",
        }
    )
    assert config.tracing == TracingConfig(True, TraceExporter.CONSOLE, "http://collector:4317", "openemploi-staging", 0.25)
    with pytest.raises(ConfigError, match="tracing.exporter must be otlp or console"):
        load_config(env={"OPENEMPLOI_TRACING_EXPORTER": "jaeger"})
    with pytest.raises(ConfigError, match="sample_ratio must be between 0 and 1"):
        load_config(env={"OPENEMPLOI_TRACING_SAMPLE_RATIO": "2"})


def test_console_exporter_writes_one_json_span_per_line(capsys):
    tracing = start_tracing(TracingConfig(enabled=True, exporter=TraceExporter.CONSOLE, service_name="console-check"))
    assert tracing.provider is not None
    with tracing.provider.get_tracer("test").start_as_current_span("request"), tracing.span("tokenize", texts=3):
        pass
    tracing.shutdown()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["name"] for line in lines] == ["tokenize", "request"]
    assert lines[0]["resource"]["attributes"]["service.name"] == "console-check"
    assert lines[0]["parent_id"] == lines[1]["context"]["span_id"]


def test_http_middleware_continues_the_callers_trace():
    exporter = InMemorySpanExporter()
    tracing = start_tracing(TracingConfig(enabled=True, sample_ratio=0.0), exporter)
    sent: list[dict] = []

    async def app(scope, receive, send):
        with tracing.span("tokenize"):
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embeddings",
        "headers": [(b"traceparent", TRACEPARENT[0][1].encode())],
    }
    asyncio.run(TracingMiddleware(app, tracing)(scope, receive, send))
    tracing.shutdown()
    request, tokenize = sorted(exporter.get_finished_spans(), key=lambda s: s.name != "POST /v1/embeddings")
    assert request.name == "POST /v1/embeddings" and request.kind == trace.SpanKind.SERVER
    assert hex_id(request.context.trace_id, 32) == TRACE_ID
    assert request.parent is not None and hex_id(request.parent.span_id, 16) == CALLER_SPAN_ID
    assert request.attributes["http.response.status_code"] == 503
    assert request.status.status_code == trace.StatusCode.ERROR
    assert tokenize.parent is not None and tokenize.parent.span_id == request.context.span_id
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_http_middleware_passes_through_when_tracing_is_off():
    calls = []

    async def app(scope, receive, send):
        calls.append(trace.get_current_span().get_span_context().is_valid)

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"traceparent", TRACEPARENT[0][1].encode())]}
    asyncio.run(TracingMiddleware(app, DISABLED)(scope, None, None))  # type: ignore[arg-type]
    assert calls == [False]


def test_server_config_nests_tracing_off_by_default():
    assert dataclasses.asdict(ServerConfig())["tracing"]["enabled"] is False
