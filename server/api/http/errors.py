"""A gRPC status and its details as an HTTP error: OpenAI's JSON shape, a status code, Retry-After.

`{"error": {"message", "type", "param", "code", "status", "details"}}`: the first four as the
OpenAI API and its SDKs expect (`code` is the ErrorInfo reason in lower case), then the gRPC
status name and the AIP-193 details, so a program can act without parsing the message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
from google.protobuf import json_format
from starlette.responses import JSONResponse

from .. import status_details
from ..errors import ErrorDetails, Status

# google.rpc's HTTP mapping (code.proto), so a gateway or a client library reads them as intended.
HTTP_BY_CODE: Mapping[grpc.StatusCode, int] = MappingProxyType(
    {
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
        grpc.StatusCode.UNAUTHENTICATED: 401,
    }
)
HTTP_BY_REASON: Mapping[str, int] = MappingProxyType(
    {
        "STORAGE_FULL": 507,  # not the caller's rate: retrying sooner or later changes nothing until space is freed
        "REQUEST_TOO_LARGE": 413,
    }
)
OPENAI_TYPES: Mapping[int, str] = MappingProxyType(
    {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
)
DEFAULT_RETRY_AFTER_S = 1  # Retry-After of a 429 or 503 that has no estimate


class HttpError(Exception):
    """An HTTP error response; raised anywhere in a route, rendered by `render`."""

    def __init__(self, status: Status, details: ErrorDetails, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status.message)
        self.status = status
        self.details = details
        self.headers = dict(headers or {})


def bad_request(message: str, param: str | None, reason: str = "INVALID_ARGUMENT") -> HttpError:
    return HttpError(Status(grpc.StatusCode.INVALID_ARGUMENT, message), ErrorDetails(reason, param))


def route_not_found(message: str) -> HttpError:
    return HttpError(Status(grpc.StatusCode.NOT_FOUND, message), ErrorDetails("ROUTE_NOT_FOUND"))


def http_status(status: Status, details: ErrorDetails) -> int:
    return HTTP_BY_REASON.get(details.reason) or HTTP_BY_CODE.get(status.code, 500)


def render(error: HttpError, param_names: Mapping[str, str] | None = None) -> JSONResponse:
    """The response for `error`; `param_names` renames a gRPC field (texts) to the route's (input)."""
    code = http_status(error.status, error.details)
    param = error.details.field
    if param is not None and param_names:
        head, sep, tail = param.partition("[")
        param = param_names.get(head, head) + sep + tail
    rich = status_details.rich_status(error.status, error.details)
    body: dict[str, Any] = {
        "error": {
            "message": error.status.message,
            "type": OPENAI_TYPES.get(code, "server_error" if code >= 500 else "invalid_request_error"),
            "param": param,
            "code": error.details.reason.lower(),
            "status": error.status.code.name,
            "details": json_format.MessageToDict(rich).get("details", []),
        }
    }
    headers = dict(error.headers)
    if code in (429, 503):
        retry = error.details.retry_after_s
        headers["Retry-After"] = str(max(1, math.ceil(retry)) if retry is not None else DEFAULT_RETRY_AFTER_S)
    return JSONResponse(body, status_code=code, headers=headers)
