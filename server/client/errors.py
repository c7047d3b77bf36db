"""One exception per gRPC status, carrying the server's structured details (AIP-193) as plain fields.

A caller catches `NotFound` or `InvalidArgument` and reads `field_violations`, `retry_delay` or
`resource` instead of parsing the message; `request_id` joins the failure to the server's logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of the request, e.g. field="texts[3]"."""

    field: str
    description: str


@dataclass(frozen=True)
class ResourceInfo:
    """The resource a NOT_FOUND (or ALREADY_EXISTS...) is about, e.g. ("collection", "offres")."""

    resource_type: str
    resource_name: str
    owner: str = ""
    description: str = ""


class OpenEmploiError(Exception):
    """A call that failed: its status code and message, and the server's structured details when it sent them."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Iterable[FieldViolation] = (),
        retry_delay: float | None = None,
        resource: ResourceInfo | None = None,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.field_violations: list[FieldViolation] = list(field_violations)
        self.retry_delay = retry_delay  # seconds the server asked us to wait before retrying (RetryInfo)
        self.resource = resource
        self.reason = reason  # ErrorInfo.reason, a stable UPPER_SNAKE_CASE name a program can branch on
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.request_id = request_id


class Cancelled(OpenEmploiError):
    pass


class Unknown(OpenEmploiError):
    pass


class InvalidArgument(OpenEmploiError):
    pass


class DeadlineExceeded(OpenEmploiError):
    pass


class NotFound(OpenEmploiError):
    pass


class AlreadyExists(OpenEmploiError):
    pass


class PermissionDenied(OpenEmploiError):
    pass


class ResourceExhausted(OpenEmploiError):
    pass


class FailedPrecondition(OpenEmploiError):
    pass


class Aborted(OpenEmploiError):
    pass


class OutOfRange(OpenEmploiError):
    pass


class Unimplemented(OpenEmploiError):
    pass


class Internal(OpenEmploiError):
    pass


class Unavailable(OpenEmploiError):
    pass


class DataLoss(OpenEmploiError):
    pass


class Unauthenticated(OpenEmploiError):
    pass


ERROR_BY_CODE: MappingProxyType[grpc.StatusCode, type[OpenEmploiError]] = MappingProxyType(
    {
        grpc.StatusCode.CANCELLED: Cancelled,
        grpc.StatusCode.UNKNOWN: Unknown,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
        grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.ABORTED: Aborted,
        grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
        grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
        grpc.StatusCode.INTERNAL: Internal,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DATA_LOSS: DataLoss,
        grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    }
)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the server attached, or None (none sent, or one that contradicts the call's status)."""
    try:
        return rpc_status.from_call(error)
    except ValueError:
        return None


def _request_id(error: grpc.RpcError, sent: str) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return sent


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> OpenEmploiError:
    """The exception for a failed call (sync or grpc.aio), with the details the server packed in the status.

    `request_id` is the id this client sent; the server's echo in trailing metadata wins when present.
    """
    code: grpc.StatusCode = error.code()
    cls = ERROR_BY_CODE.get(code, OpenEmploiError)
    exc = cls(code, error.details() or "", request_id=_request_id(error, request_id))
    rich = _rich_status(error)
    for packed in rich.details if rich is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            exc.field_violations = [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            packed.Unpack(retry_info)
            exc.retry_delay = retry_info.retry_delay.ToTimedelta().total_seconds()
        elif packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            packed.Unpack(info)
            exc.resource = ResourceInfo(info.resource_type, info.resource_name, info.owner, info.description)
        elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            packed.Unpack(error_info)
            exc.reason, exc.domain, exc.metadata = error_info.reason, error_info.domain, dict(error_info.metadata)
    return exc
