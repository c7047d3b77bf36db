"""Prometheus metrics (prefix `openemploi_`, plus the standard `process_` and `python_` ones) on their own HTTP port.

Each server owns its CollectorRegistry (no global state), so tests can run
several servers in one process. Request metrics come from a gRPC interceptor;
batch metrics from the batchers' on_batch callback; queue depth, loaded models
and collection sizes are read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .batching import BatchStats

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
REJECTIONS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded_or_too_large",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.FAILED_PRECONDITION: "failed_precondition",
    grpc.StatusCode.ALREADY_EXISTS: "already_exists",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
}


@dataclass(frozen=True)
class Gauges:
    """What the scrape reads live: (labels, value) rows for each gauge."""

    queue_depth: Callable[[], Iterable[tuple[tuple[str, str], float]]]
    models: Callable[[], Iterable[tuple[tuple[str, str, str, str], float]]]
    collections: Callable[[], Iterable[tuple[tuple[str], float]]]
    # (collection, completed, failed, running) for each collection's background index rebuilds
    rebuilds: Callable[[], Iterable[tuple[str, int, int, bool]]] = lambda: ()


class _LiveCollector:
    def __init__(self, gauges: Gauges) -> None:
        self._gauges = gauges

    def collect(self):
        queue = GaugeMetricFamily("openemploi_queue_depth", "Texts waiting in a model's batcher", labels=["model", "version"])
        labels: tuple[str, ...]
        for labels, value in self._gauges.queue_depth():
            queue.add_metric(list(labels), value)
        models = GaugeMetricFamily(
            "openemploi_model_loaded", "1 for each loaded model version", labels=["model", "version", "device", "precision"]
        )
        for labels, value in self._gauges.models():
            models.add_metric(list(labels), value)
        sizes = GaugeMetricFamily("openemploi_collection_documents", "Live documents per collection", labels=["collection"])
        for labels, value in self._gauges.collections():
            sizes.add_metric(list(labels), value)
        rebuilds = CounterMetricFamily(
            "openemploi_index_rebuilds",
            "Background index rebuilds (kind switches, tombstone clean-ups) since the collection opened, by outcome",
            labels=["collection", "outcome"],
        )
        running = GaugeMetricFamily(
            "openemploi_index_rebuild_running", "1 while a collection's index is rebuilt in the background", labels=["collection"]
        )
        for name, completed, failed, is_running in self._gauges.rebuilds():
            rebuilds.add_metric([name, "completed"], completed)
            rebuilds.add_metric([name, "failed"], failed)
            running.add_metric([name], float(is_running))
        return [queue, models, sizes, rebuilds, running]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process as the kernel sees it (process_resident_memory_bytes, process_cpu_seconds_total,
        # process_open_fds), the interpreter's garbage collector and version, read at scrape time.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("openemploi_requests", "gRPC requests by method and status code", ["rpc", "code"], registry=r)
        self.request_seconds = Histogram(
            "openemploi_request_duration_seconds", "gRPC request duration", ["rpc"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.rejected = Counter("openemploi_rejected_requests", "Requests refused, by reason", ["rpc", "reason"], registry=r)
        self.batch_size = Histogram("openemploi_batch_size", "Texts per batch", ["model"], buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "openemploi_batch_tokens", "Padded tokens per batch (longest x count)", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.padding_ratio = Histogram(
            "openemploi_batch_padding_ratio",
            "Share of a batch's tokens that are padding",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "openemploi_inference_seconds", "Backend time per batch", ["model", "version"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_failures = Counter("openemploi_batch_failures", "Batches whose inference raised", ["model"], registry=r)
        self.nonfinite_vectors = Counter(
            "openemploi_nonfinite_vectors",
            "Texts whose vector came out NaN or infinite (e.g. fp16 overflow); their requests failed, nothing was served",
            ["model", "version"],
            registry=r,
        )
        self.http_requests = Counter(
            "openemploi_http_requests", "HTTP API requests by route and status", ["route", "status"], registry=r
        )
        self.http_request_seconds = Histogram(
            "openemploi_http_request_duration_seconds",
            "HTTP API request duration",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._http: WSGIServer | None = None

    def watch(self, gauges: Gauges) -> None:
        self.registry.register(_LiveCollector(gauges))

    def on_batch(self, model: str, version: str, stats: BatchStats) -> None:
        self.batch_size.labels(model).observe(stats.size)
        self.batch_tokens.labels(model).observe(stats.padded_tokens)
        if stats.padded_tokens:
            self.padding_ratio.labels(model).observe(1.0 - stats.tokens / stats.padded_tokens)
        self.inference_seconds.labels(model, version).observe(stats.inference_s)
        if getattr(stats, "failed", False):
            self.batch_failures.labels(model).inc()

    def on_nonfinite(self, model: str, version: str, texts: int) -> None:
        self.nonfinite_vectors.labels(model, version).inc(texts)

    def observe_request(self, rpc: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(rpc, code.name).inc()
        self.request_seconds.labels(rpc).observe(seconds)
        reason = REJECTIONS.get(code)
        if reason:
            self.rejected.labels(rpc, reason).inc()

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, str(status)).inc()
        self.http_request_seconds.labels(route).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the scrape endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC by method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self._metrics

        def finish(context, started: float, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if not isinstance(code, grpc.StatusCode):
                code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if error is not None and code == grpc.StatusCode.OK:
                code = grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
            metrics.observe_request(rpc, code, time.perf_counter() - started)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                started, error = time.perf_counter(), None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)

            return handler._replace(unary_unary=unary)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                started, error = time.perf_counter(), None
                try:
                    async for item in inner_stream(request_iterator, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)

            return handler._replace(stream_stream=stream)
        return handler
