"""The HTTP API through Serve's HTTP proxy: the single process's ASGI app (api/http) on the gateway's servicers.

The gateway replica is Serve's gRPC ingress (one method per RPC) and, with `config.http`, its HTTP
ingress too (`serve.ingress()`): Serve builds the app here after the replica's constructor, over the
same servicers, health servicer, token guard and limits as the gRPC methods, so both protocols and
both paths (one process, Ray) answer alike. Its request metrics go to a registry of the replica's own:
Serve's proxy reports the cluster's request metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import ModuleType

from grpc_health.v1 import health
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..api.http import HttpServices, create_app
from ..api.rpc import REQUEST_ID_KEY, Registered, describe_service
from ..config import LimitsConfig
from ..metrics import Metrics
from ..security import AuthInterceptor

REQUEST_ID_HEADER = REQUEST_ID_KEY.encode()


def registered(servicers: Mapping[str, object], services: Iterable[tuple[ModuleType, str]]) -> dict[str, Registered]:
    """The gateway's servicers as one process's gRPC server records them: health stays out, as there."""
    table: dict[str, Registered] = {}
    for module, service in services:
        full_name = module.DESCRIPTOR.services_by_name[service].full_name
        if full_name != health.SERVICE_NAME:
            table[full_name] = describe_service(servicers[full_name], module, service)
    return table


def http_app(
    servicers: Mapping[str, object],
    services: Iterable[tuple[ModuleType, str]],
    health_servicer: health.aio.HealthServicer,
    guard: AuthInterceptor | None,
    limits: LimitsConfig,
) -> ASGIApp:
    """`create_app` of one process, for the gateway replica that holds `servicers` (by full service name)."""
    shared = HttpServices(registered(servicers, services), health_servicer, guard, limits, Metrics())
    return OneRequestId(create_app(shared))


class OneRequestId:
    """Serve's proxy puts an `x-request-id` on the request when the caller sent none, and echoes the
    request's on every response: the app's own copy (the same id) is dropped, so a caller reads one."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(key == REQUEST_ID_HEADER for key, _ in scope.get("headers", ())):
            await self._app(scope, receive, send)  # lifespan; behind the proxy a request always has one
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, sending)
