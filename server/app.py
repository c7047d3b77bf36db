"""Compose the server: registry of warm models, servicers, health, reflection, shutdown.

Health reports SERVING only once every configured model is loaded and warm,
and NOT_SERVING as soon as a shutdown starts, so load balancers drain us first.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from openemploi import kernels
from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2

from . import security
from .api import embedding as embedding_api
from .api import index as index_api
from .api import match as match_api
from .api import models as models_api
from .api import skills as skills_api
from .api.http import HttpServer, HttpServices, create_app
from .api.rpc import WorkPool, registered_services
from .batching import BatchStats
from .config import ServerConfig
from .index.collection import Collection, CollectionManager, CollectionNotFound
from .matching.bootstrap import ensure_rome_collection
from .matching.catalogue import load_catalogue
from .matching.matcher import OccupationMatcher
from .metrics import Gauges, Metrics, MetricsInterceptor
from .runtime.registry import ModelRegistry
from .runtime.repository import ModelNotBuilt, ModelNotFound, ModelRepository
from .skills.bootstrap import ensure_skills_collection
from .threads import limit_math_threads, limit_openmp_threads
from .tracing import DISABLED, Tracing, TracingMiddleware, start_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
    index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name,
    match_pb2.DESCRIPTOR.services_by_name["MatchService"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    skills_pb2.DESCRIPTOR.services_by_name["SkillsService"].full_name,
)
ROME_COLLECTION = "rome"  # the catalogue the server indexes and keeps: read-only but to admin tokens
SKILLS_COLLECTION = "esco_skills"  # ESCO skills and the catalogue's French lines, managed like `rome`
GIL_SWITCH_INTERVAL_S = 0.001  # the serving process's sys.setswitchinterval (Python's default: 0.005)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    registry: ModelRegistry
    collections: CollectionManager
    metrics: Metrics
    health: health.aio.HealthServicer
    port: int
    config: ServerConfig
    index_pool: WorkPool
    metrics_port: int = 0
    tracing: Tracing = DISABLED
    http: HttpServer | None = None  # the HTTP API on the same loop; None when config.http is off

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new calls, let in-flight ones finish within the grace period, then drain batchers."""
        grace = self.config.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http else []))
        await asyncio.to_thread(self.index_pool.close)
        await self.registry.close(drain=True)
        await asyncio.to_thread(self.collections.close)
        self.metrics.close()
        await asyncio.to_thread(self.tracing.shutdown)  # exports the last spans


BatchObserver = Callable[[str, str, BatchStats], None]


async def start_server(
    config: ServerConfig, on_batch: BatchObserver | None = None, span_exporter: SpanExporter | None = None
) -> RunningServer:
    """Start serving; `on_batch(model, version, stats)` sees every batch (metrics, tests).

    `span_exporter` receives the spans instead of `tracing.exporter` when tracing is on (tests).
    """
    options = [
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", max(config.limits.max_message_bytes, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 0),
    ]
    # Refuse a bad tokens file or certificate before anything listens.
    managed = frozenset({ROME_COLLECTION}) if config.rome_collection else frozenset()
    if config.rome_collection and config.skills_collection:
        managed |= {SKILLS_COLLECTION}
    auth = security.interceptors(config.security, managed)
    credentials = security.server_credentials(config.security)
    metrics = Metrics()

    def observe_batch(model: str, version: str, stats: BatchStats) -> None:
        metrics.on_batch(model, version, stats)
        if on_batch is not None:
            on_batch(model, version, stats)

    tracing = start_tracing(config.tracing, span_exporter)
    # The span of each call (its parent from the caller's `traceparent`) outermost, then metrics: both see refusals too.
    traced: list[grpc.aio.ServerInterceptor] = []
    if tracing.enabled:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        traced.append(aio_server_interceptor(tracer_provider=tracing.provider))
    server = grpc.aio.server(options=options, interceptors=[*traced, MetricsInterceptor(metrics), *auth])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    collections: CollectionManager | None = None

    def pinned_versions() -> set[tuple[str, str]]:
        """Model versions holding a collection's vectors stay loaded after a swap."""
        if collections is None:
            return set()
        return {(c.spec.model, c.spec.model_version) for c in live_collections(collections)}

    registry = ModelRegistry(
        ModelRepository(config.model_repository),
        config.batching,
        config.backend,
        config.default_model,
        observe_batch,
        pinned_versions,
        tokenize_threads=config.limits.tokenize_threads,
        on_nonfinite=metrics.on_nonfinite,
        tracing=tracing,
    )
    collections = await asyncio.to_thread(CollectionManager, config.collections_dir)
    metrics.watch(
        Gauges(
            queue_depth=lambda: [((m.name, m.version.version), m.batcher.queue_depth) for m in registry.models()],
            models=lambda: [
                ((m.name, m.version.version, m.encoder.info.device, m.encoder.info.precision), 1.0) for m in registry.models()
            ],
            collections=lambda: [((c.spec.name,), c.size()) for c in live_collections(collections)],
            rebuilds=lambda: [
                (c.spec.name, c.rebuilds.completed, c.rebuilds.failed, c.rebuilds.running) for c in live_collections(collections)
            ],
        )
    )
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics else 0
    index_pool = WorkPool(
        config.limits.index_workers,
        config.limits.max_index_queue,
        thread_start=functools.partial(limit_openmp_threads, config.backend.math_threads),
    )
    embedding_api.add_to_server(embedding_api.EmbeddingServicer(registry, config.limits), server)
    index_api.add_to_server(index_api.IndexServicer(collections, registry, config.limits, index_pool, tracing), server)
    match_servicer = match_api.MatchServicer(collections, registry, None, config.limits, index_pool)
    match_api.add_to_server(match_servicer, server)
    skills_servicer = skills_api.SkillsServicer(registry, config.limits, index_pool)
    skills_api.add_to_server(skills_servicer, server)
    models_api.add_to_server(models_api.ModelServicer(registry), server)
    if config.reflection:
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = security.bind(server, config.address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.address}")
    await server.start()
    http = None
    if config.http:
        guard = next((a for a in auth if isinstance(a, security.AuthInterceptor)), None)
        services = HttpServices(registered_services(server), health_servicer, guard, config.limits, metrics)
        app = create_app(services)
        if tracing.enabled:  # a SERVER span per HTTP request, from the `traceparent` header
            app = TracingMiddleware(app, tracing)
        http = HttpServer(app, config.host, config.http_port, config.security)
    try:
        if http is not None:  # before the models load: /livez answers and /health says 503 meanwhile
            await http.start()
        for name in dict.fromkeys((config.default_model, *tuple(config.models))):
            await registry.load(name)
        await load_pinned_versions(registry, pinned_versions())
        if config.rome_collection:
            occupations = load_catalogue()
            with registry.hold() as model:  # an admin LoadModel during indexing keeps the version it binds
                rome = await ensure_rome_collection(
                    collections, model, occupations, name=ROME_COLLECTION, progress=config.progress
                )
            match_servicer.occupations = OccupationMatcher(lambda: collections.get(rome.spec.name), occupations)
            if config.skills_collection:
                with registry.hold() as model:
                    skills, engine = await ensure_skills_collection(
                        collections, model, occupations, rome, name=SKILLS_COLLECTION, progress=config.progress
                    )
                skills_servicer.collection = lambda: collections.get(skills.spec.name)
                skills_servicer.occupations = match_servicer.occupations
                skills_servicer.engine = engine
        await asyncio.to_thread(kernels.warm_up)
    except BaseException:
        await asyncio.gather(server.stop(0), *([http.stop(0)] if http else []))
        await asyncio.to_thread(index_pool.close)
        await registry.close(drain=False)
        await asyncio.to_thread(collections.close)
        metrics.close()
        await asyncio.to_thread(tracing.shutdown)
        raise
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s:%d (models: %s)", config.host, port, ", ".join(registry.loaded()))
    if http is not None:
        log.info("HTTP API on %s://%s:%d", "https" if http.tls else "http", config.host, http.port)
    return RunningServer(
        server, registry, collections, metrics, health_servicer, port, config, index_pool, metrics_port, tracing, http
    )


def live_collections(manager: CollectionManager) -> list[Collection]:
    """The open collections; one dropped between `names()` and `get()` is skipped, not an error
    (a scrape, or a model swap computing its pins, runs beside DropCollection)."""
    found = []
    for name in manager.names():
        try:
            found.append(manager.get(name))
        except CollectionNotFound:
            continue
    return found


async def load_pinned_versions(registry: ModelRegistry, pinned: set[tuple[str, str]]) -> None:
    """Collections keep working across a model rebuild: load the versions they were embedded with."""
    for name, version in sorted(pinned):
        try:
            registry.get(name, version)
        except ModelNotFound:
            try:
                await registry.load(name, version, make_current=False)
            except (ModelNotFound, ModelNotBuilt):
                log.warning("collections hold %s/%s vectors but that version is not built; re-embed them", name, version)


async def serve_forever(config: ServerConfig) -> None:
    running = await start_server(config)
    # Models, catalogues and their indexes are loaded for good: out of the cyclic GC's sight, so a
    # full collection under load walks only what requests allocate (a pause the event loop feels).
    gc.freeze()
    # Tokenising, padding and index threads hold the GIL for up to this long before the event loop
    # may take it back; an RPC takes it several times, so the default 5 ms adds up to a stall.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # numpy's BLAS threads once serving: start-up indexing above kept every core (threads.py).
    limit_math_threads(config.backend.math_threads)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested: draining for up to %.1fs", config.grace_period_s)
    await running.stop()
    log.info("stopped")
