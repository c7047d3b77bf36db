"""Calling a servicer method from an HTTP route: body limits, auth, the context adapter, errors.

Every route goes through `invoke`, so the token table, the scope of each RPC, the managed
collections' guard and the request id work as they do over gRPC.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
from google.protobuf.message import Message
from starlette.requests import Request

from ...security import Refusal, Token, parse_bearer
from ..errors import ErrorDetails, Status
from ..rpc import MAX_REQUEST_ID_CHARS, REQUEST_ID_KEY
from .context import Aborted, HttpContext
from .errors import HttpError, bad_request
from .services import HttpServices

HIDDEN_HEADERS = frozenset({"authorization", REQUEST_ID_KEY})  # the servicers never need the token


def request_id(request: Request) -> str:
    return (request.headers.get(REQUEST_ID_KEY) or uuid.uuid4().hex)[:MAX_REQUEST_ID_CHARS]


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, refused past `limit` bytes (limits.max_message_bytes) before it is all read."""
    too_large = HttpError(
        Status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body is over the limit of {limit} bytes (limits.max_message_bytes)"),
        ErrorDetails("REQUEST_TOO_LARGE"),
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON ({exc})", None, "INVALID_JSON") from None


def _refused(refusal: Refusal, rid: str) -> HttpError:
    headers = {REQUEST_ID_KEY: rid}
    if refusal.code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return HttpError(Status(refusal.code, refusal.message), ErrorDetails(refusal.reason), headers)


def authorize(services: HttpServices, request: Request, method: str, rid: str) -> Token | None:
    """The caller, by the same token table and RPC scopes as gRPC; None when the server is open."""
    if services.guard is None:
        return None
    caller = services.guard.authorize(method, parse_bearer(request.headers.get("authorization")), rid)
    if isinstance(caller, Refusal):
        raise _refused(caller, rid)
    return caller


async def invoke(services: HttpServices, request: Request, method: str, message: Message, rid: str) -> tuple[Any, HttpContext]:
    """Call the servicer behind `method` (a gRPC path, "/openemploi.v1.MatchService/MatchOccupation")."""
    caller = authorize(services, request, method, rid)
    if caller is not None and services.guard is not None and services.guard.guards_writes(method, caller):
        refusal = services.guard.check_write(method, message, caller, rid)
        if refusal is not None:
            raise _refused(refusal, rid)
    service, _, name = method.strip("/").partition("/")
    servicer = services.services[service].servicer
    metadata = [(k, v) for k, v in request.headers.items() if k.lower() not in HIDDEN_HEADERS]
    context = HttpContext([*metadata, (REQUEST_ID_KEY, rid)])
    try:
        response = await getattr(servicer, name)(message, context)
    except Aborted as exc:
        raise HttpError(exc.status, exc.details, {**context.headers(), REQUEST_ID_KEY: rid}) from None
    return response, context
