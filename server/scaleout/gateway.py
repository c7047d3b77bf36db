"""The Gateway deployment: Serve's gRPC ingress, running the project's own servicers.

Serve's gRPC proxy routes `/pkg.Service/Method` to the ingress method named `Method` (names are
unique across our services). Each such method builds a `ServeContext`, applies the same token
check as the single-process interceptor (security.AuthInterceptor's own methods), then calls the
servicer method, so validation, status codes, `grpc-status-details-bin` and `x-request-id` are
the single-process ones. The proxy parses requests with `rpc.request_parser` (the api modules'
`add_to_server` are its servicer functions), so a request that does not parse is INVALID_ARGUMENT
here too. Models are remote (remote_models.py); collections live in the CollectionShard
deployments (shards.py). Health says SERVING once the models, pins and catalogues are ready.
One replica: the gateway owns the model plan and builds the catalogues at start. With `config.http`
it is Serve's HTTP ingress too, serving the single process's HTTP API on the same servicers (http.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext

from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2, skills_pb2

from .. import security
from ..api import embedding as embedding_api
from ..api import index as index_api
from ..api import match as match_api
from ..api import models as models_api
from ..api import skills as skills_api
from ..api.rpc import WorkPool, request_id
from ..app import ROME_COLLECTION, SERVICE_NAMES, SKILLS_COLLECTION, live_collections, load_pinned_versions
from ..config import ServerConfig
from ..index.collection import CollectionManager
from ..logs import configure_logging
from ..matching.bootstrap import ensure_rome_collection
from ..matching.catalogue import load_catalogue
from ..matching.matcher import OccupationMatcher
from ..runtime.registry import LoadedModel, ModelRegistry
from ..runtime.repository import ModelRepository
from ..skills.bootstrap import ensure_skills_collection
from .context import Aborted, ServeContext
from .http import http_app
from .options import RayOptions
from .remote_models import Key, RemoteRegistry

log = logging.getLogger(__name__)

SERVICES: tuple[tuple[ModuleType, str], ...] = (
    (embedding_pb2, "EmbeddingService"),
    (index_pb2, "IndexService"),
    (match_pb2, "MatchService"),
    (models_pb2, "ModelService"),
    (skills_pb2, "SkillsService"),
    (health_pb2, "Health"),
)
# The proxy registers these (Serve imports them by path in the proxy actor); health keeps grpc's own parser.
SERVICER_FUNCTIONS = (
    "openemploi.api.embedding.add_to_server",
    "openemploi.api.index.add_to_server",
    "openemploi.api.match.add_to_server",
    "openemploi.api.models.add_to_server",
    "openemploi.api.skills.add_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
GATEWAY_CPUS = 0.25  # Ray's logical share: the gateway mostly awaits replicas; its index pool threads are not counted
RETRYABLE = (RayActorError, DeploymentUnavailableError)  # the replica died or none is reachable: try another


@dataclass(frozen=True)
class Route:
    """One RPC: its gRPC path (for token scopes), its response type, whether either side streams."""

    path: str
    service: str
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def routes() -> dict[str, Route]:
    table: dict[str, Route] = {}
    for module, service in SERVICES:
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            if method.name in table:
                raise RuntimeError(f"RPC name {method.name} is used twice: Serve routes by method name alone")
            table[method.name] = Route(
                f"/{descriptor.full_name}/{method.name}",
                descriptor.full_name,
                getattr(module, method.output_type.name),
                method.client_streaming,
                method.server_streaming,
            )
    return table


ROUTES = routes()


class GatewayReplica:
    """The ingress replica: auth, servicers over remote models and sharded collections, health."""

    async def __init__(self, config: ServerConfig, options: RayOptions, embedder: Any, *shards: Any) -> None:  # type: ignore[misc]
        configure_logging(config.log_level, config.log_json)
        self._config = config
        managed = frozenset({ROME_COLLECTION}) if config.rome_collection else frozenset()
        if config.rome_collection and config.skills_collection:
            managed |= {SKILLS_COLLECTION}
        auth = security.interceptors(config.security, managed)
        self._guard = next((a for a in auth if isinstance(a, security.AuthInterceptor)), None)
        self._health = health.aio.HealthServicer()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        async def replica_call(method: str, *args: Any) -> Any:
            return await embedder.run.remote(method, *args)

        self.registry = RemoteRegistry(
            ModelRepository(config.model_repository), replica_call, retries=options.embed_retries, retryable=RETRYABLE
        )
        self.collections = await asyncio.to_thread(open_collections, config, shards)
        self._pool = WorkPool(config.limits.index_workers, config.limits.max_index_queue)
        registry = cast(ModelRegistry, self.registry)  # the servicers use the part of ModelRegistry it implements
        collections = self.collections
        self._match = match_api.MatchServicer(collections, registry, None, config.limits, self._pool)
        self._skills = skills_api.SkillsServicer(registry, config.limits, self._pool)
        servicers: dict[str, object] = {
            "openemploi.v1.EmbeddingService": embedding_api.EmbeddingServicer(registry, config.limits),
            "openemploi.v1.IndexService": index_api.IndexServicer(collections, registry, config.limits, self._pool),
            "openemploi.v1.MatchService": self._match,
            "openemploi.v1.ModelService": models_api.ModelServicer(registry),
            "openemploi.v1.SkillsService": self._skills,
            health.SERVICE_NAME: self._health,
        }
        self._servicers = servicers
        self._handlers: dict[str, Callable[..., Any]] = {
            name: getattr(servicers[route.service], name) for name, route in ROUTES.items()
        }
        self._starting = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        """What start_server does after listening: models, pinned versions, catalogues, then SERVING."""
        config, registry, collections = self._config, self.registry, self.collections
        await registry.start()
        registry.pinned = lambda: pins(collections)
        await load_pinned_versions(cast(ModelRegistry, registry), await asyncio.to_thread(pins, collections))
        if config.rome_collection:
            occupations = load_catalogue()
            manager = collections
            with registry.hold() as model:
                rome = await ensure_rome_collection(
                    manager, cast(LoadedModel, model), occupations, name=ROME_COLLECTION, progress=False
                )
            self._match.occupations = OccupationMatcher(lambda: manager.get(rome.spec.name), occupations)
            if config.skills_collection:
                with registry.hold() as model:
                    skills, engine = await ensure_skills_collection(
                        manager, cast(LoadedModel, model), occupations, rome, name=SKILLS_COLLECTION, progress=False
                    )
                self._skills.collection = lambda: manager.get(skills.spec.name)
                self._skills.occupations = self._match.occupations
                self._skills.engine = engine
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving through Ray Serve (models: %s)", ", ".join(registry.loaded()))

    async def wait_ready(self) -> list[str]:
        """Returns once SERVING (the loaded models); raises what stopped the start."""
        await asyncio.shield(self._starting)
        return self.registry.loaded()

    def __serve_build_asgi_app__(self) -> Any:
        """The HTTP API, when deployed as Serve's HTTP ingress too (config.http): see http.py."""
        return http_app(self._servicers, SERVICES, self._health, self._guard, self._config.limits)

    async def check_health(self) -> None:
        """Serve's replica health check: a failed start makes the replica unhealthy, so Serve replaces it."""
        if self._starting.done() and self._starting.exception() is not None:
            raise RuntimeError(f"gateway start failed: {self._starting.exception()}")

    def _authorize(self, route: Route, context: ServeContext) -> security.Token | None:
        """The interceptor's check, from the request metadata; raises Aborted (status and trailers set) on refusal."""
        if self._guard is None or route.service in security.OPEN_SERVICES:
            return None
        rid = request_id(cast(grpc.aio.ServicerContext, context))
        caller = self._guard.authorize(route.path, security.parse_bearer(context.metadata_value("authorization")), rid)
        if isinstance(caller, security.Refusal):
            self._refuse(context, caller, rid)
        return caller

    def _refuse(self, context: ServeContext, refusal: security.Refusal, rid: str) -> NoReturn:
        context.set_trailing_metadata(refusal.trailing_metadata(rid))
        context.set_code(refusal.code)
        context.set_details(refusal.message)
        raise Aborted(refusal.code, refusal.message)

    def _refuse_oversized(self, request: Any, context: ServeContext) -> None:
        """Serve's proxy takes messages up to about 2 GiB; one process's gRPC refuses those over
        limits.max_message_bytes before any handler, in its own words: so does the gateway."""
        limit = self._config.limits.max_message_bytes
        size = request.ByteSize() if isinstance(request, Message) else 0
        if size > limit:
            message = f"Received message larger than max ({size} vs. {limit})"
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(message)
            raise Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    async def unary(self, name: str, request: Any, grpc_context: RayServegRPCContext) -> Message:
        route = ROUTES[name]
        context = ServeContext(grpc_context)
        try:
            self._refuse_oversized(request, context)
            caller = self._authorize(route, context)
            if caller is not None and self._guard is not None and self._guard.guards_writes(route.path, caller):
                rid = request_id(cast(grpc.aio.ServicerContext, context))
                refusal = self._guard.check_write(route.path, request, caller, rid)
                if refusal is not None:
                    self._refuse(context, refusal, rid)
            response: Message = await self._handlers[name](request, context)
            return response
        except Aborted:
            return route.response()  # grpc sends no message with a non-OK status: the client sees status and trailers

    async def stream(self, name: str, requests: Any, grpc_context: RayServegRPCContext) -> AsyncIterator[Message]:
        """Bidirectional (EmbedStream) or server streaming (health Watch); an abort is re-raised (see context.py)."""
        route = ROUTES[name]
        context = ServeContext(grpc_context)
        self._authorize(route, context)
        # Every item carries the context: the request id then reaches the caller with the first one.
        rid = request_id(cast(grpc.aio.ServicerContext, context))
        context.set_trailing_metadata((("x-request-id", rid),))
        handler = self._handlers[name]
        if route.client_streaming:
            async for response in handler(requests, context):
                yield response
            return
        task = asyncio.ensure_future(handler(requests, context))  # writes with context.write (health Watch)
        getter: asyncio.Future[Message] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(context.written.get())
                done, _ = await asyncio.wait((getter, task), return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                while not context.written.empty():
                    yield context.written.get_nowait()
                task.result()
                return
        finally:
            for pending in (task, getter):
                if pending is not None:
                    pending.cancel()

    async def __del__(self) -> None:
        await self._health.enter_graceful_shutdown()
        self._starting.cancel()
        await asyncio.to_thread(self._pool.close)
        await asyncio.to_thread(self.collections.close)


def pins(collections: Any) -> set[Key]:
    """Model versions holding a collection's vectors: they stay loaded on every replica."""
    return {(c.spec.model, c.spec.model_version) for c in live_collections(collections)}


def open_collections(config: ServerConfig, shards: tuple[Any, ...]) -> Any:
    """The sharded collections over the CollectionShard handles; with no shard, a local manager (one host)."""
    if not shards:
        return CollectionManager(config.collections_dir)
    from .shard_replica import RayShardBackend
    from .shards import ShardedCollectionManager

    return ShardedCollectionManager([RayShardBackend(handle) for handle in shards])


def _unary_method(name: str) -> Callable[..., Awaitable[Message]]:
    async def method(self: GatewayReplica, request: Any, grpc_context: RayServegRPCContext) -> Message:
        return await self.unary(name, request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


def _stream_method(name: str) -> Callable[..., AsyncIterator[Message]]:
    async def method(self: GatewayReplica, requests: Any, grpc_context: RayServegRPCContext) -> AsyncIterator[Message]:
        async for response in self.stream(name, requests, grpc_context):
            yield response

    method.__name__ = method.__qualname__ = name
    return method


for _name, _route in ROUTES.items():  # one ingress method per RPC, named as Serve's proxy calls it
    setattr(GatewayReplica, _name, (_stream_method if _route.server_streaming else _unary_method)(_name))


def gateway_deployment(options: RayOptions, config: ServerConfig, embedder: Any, shards: list[Any]) -> Any:
    # With the HTTP API on, Serve's HTTP proxy hands requests to the app `__serve_build_asgi_app__` builds.
    ingress = serve.ingress()(GatewayReplica) if config.http else GatewayReplica
    deployment = serve.deployment(
        name="Gateway",
        num_replicas=1,
        ray_actor_options={"num_cpus": GATEWAY_CPUS, "resources": dict(options.gateway_resources)},
        max_ongoing_requests=max(options.max_ongoing_requests, config.limits.max_index_queue),
        graceful_shutdown_timeout_s=config.grace_period_s,
    )(ingress)
    return deployment.bind(config, options, embedder, *shards)
