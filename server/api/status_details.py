"""ErrorDetails <-> google.rpc.Status (AIP-193), sent in the `grpc-status-details-bin` trailer.

Clients read it with `grpc_status.rpc_status.from_call`; the HTTP API reads it back to shape
its JSON errors, so both protocols say the same thing.
"""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from .errors import ErrorDetails, Resource, Status

DOMAIN = "openemploi.v1"
DETAILS_KEY = "grpc-status-details-bin"


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(status: Status, details: ErrorDetails) -> status_pb2.Status:
    """The google.rpc.Status for `status`: ErrorInfo always, then BadRequest, ResourceInfo, RetryInfo as known."""
    parts: list[object] = [error_details_pb2.ErrorInfo(reason=details.reason, domain=DOMAIN)]
    if details.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=details.field, description=status.message)
        parts.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if details.resource is not None:
        parts.append(
            error_details_pb2.ResourceInfo(
                resource_type=details.resource.type, resource_name=details.resource.name, description=status.message
            )
        )
    if details.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, details.retry_after_s) * 1e9))
        parts.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return status_pb2.Status(code=status.code.value[0], message=status.message, details=[_packed(p) for p in parts])


def encode(status: Status, details: ErrorDetails) -> bytes:
    return rich_status(status, details).SerializeToString()


def decode(data: bytes) -> ErrorDetails:
    """The details in a serialized google.rpc.Status; unknown detail types are skipped."""
    rich = status_pb2.Status.FromString(data)
    reason, field, resource, retry = "", None, None, None
    for packed in rich.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason = info.reason
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else None
        elif packed.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            res = error_details_pb2.ResourceInfo()
            packed.Unpack(res)
            resource = Resource(res.resource_type, res.resource_name)
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            packed.Unpack(info_retry)
            retry = info_retry.retry_delay.ToNanoseconds() / 1e9
    return ErrorDetails(reason, field, resource, retry)
