"""The ASGI app: routes, the OpenAI-shaped error for anything refused, request metrics.

Routes: POST /v1/embeddings and GET /v1/models (OpenAI), POST /<grpc method path> (JSON
transcoding of every unary RPC), GET /health (200 only while gRPC health is SERVING), GET /livez.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ErrorDetails, Status
from . import openai_api, transcoding
from .context import Aborted, HttpContext
from .errors import HTTP_BY_CODE, HttpError, render
from .services import HttpServices

log = logging.getLogger(__name__)

Endpoint = Callable[[HttpServices, Request], Awaitable[Response]]
CODE_BY_HTTP = {status: code for code, status in HTTP_BY_CODE.items() if code != grpc.StatusCode.FAILED_PRECONDITION}


async def health(services: HttpServices, request: Request) -> Response:
    """Ready: the gRPC health servicer's own answer for the whole server, so both protocols agree."""
    try:
        reply = await services.health.Check(health_pb2.HealthCheckRequest(service=""), HttpContext(()))
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    except Aborted:
        serving = False
    return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)


async def livez(services: HttpServices, request: Request) -> Response:
    """Alive: the event loop answers, whether or not the models are ready."""
    return JSONResponse({"status": "alive"})


class RequestMetrics:
    """Counts and times every HTTP request by route and status, in the server's registry."""

    def __init__(self, app: ASGIApp, services: HttpServices, routes: frozenset[str]) -> None:
        self._app = app
        self._metrics = services.metrics
        self._routes = routes  # paths as routed; anything else is "other", so a scan cannot grow the label set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started, status, counted = time.perf_counter(), 500, False
        route = scope["path"] if scope["path"] in self._routes else "other"

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self._metrics.observe_http(route, status, time.perf_counter() - started)

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()  # before the last bytes leave: a client holding the answer finds it counted
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            count()  # no complete response was sent (the app raised): counted as its status, 500 by default


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = CODE_BY_HTTP.get(exc.status_code, grpc.StatusCode.UNKNOWN)
    reason = "ROUTE_NOT_FOUND" if exc.status_code == 404 else "HTTP_" + str(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return render(HttpError(Status(code, message), ErrorDetails(reason)))


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    status = Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details")
    return render(HttpError(status, ErrorDetails("INTERNAL")))


def create_app(services: HttpServices) -> ASGIApp:
    def bound(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        return functools.partial(endpoint, services)

    routes = [
        Route("/v1/embeddings", bound(openai_api.embeddings), methods=["POST"]),
        Route("/v1/models", bound(openai_api.models), methods=["GET"]),
        Route("/health", bound(health), methods=["GET"]),
        Route("/livez", bound(livez), methods=["GET"]),
        Route("/{service}/{method}", bound(transcoding.transcode), methods=["POST"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: _http_exception,
        Exception: _internal,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    known = frozenset({"/v1/embeddings", "/v1/models", "/health", "/livez", *transcoding.unary_methods(services)})
    return RequestMetrics(app, services, known)
