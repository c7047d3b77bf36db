"""Map domain errors to gRPC status codes with a message the caller can act on."""
from __future__ import annotations

import grpc

from ..batching import BatcherClosedError, DeadlineExceededError, QueueFullError
from ..index.collection import CollectionExists, CollectionNotFound, CollectionReplaced, InvalidQuery
from ..index.store import StorageFull
from ..modelrepo.repository import ModelNotBuilt, ModelNotFound
from ..tokenize import TextTooLongError


class RequestError(Exception):
    """A request we refuse before doing any work."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, CollectionNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, CollectionExists):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, CollectionReplaced):
        return grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, InvalidQuery):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TextTooLongError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (ModelNotFound, ModelNotBuilt)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, StorageFull):  # the message says what to free; the write can be retried after
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry with backoff"
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details"


def failed_precondition(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


async def handle_unary(request, context, work, log, name: str):
    """The body of every unary RPC: refuse unparsable bytes, run `work`, map failures to a status.

    The request id (from `x-request-id` metadata, or generated) goes back in trailing metadata
    whether the call succeeds or fails.
    """
    from .embedding import request_id  # local: embedding imports this module

    rid = request_id(context)
    context.set_trailing_metadata((("x-request-id", rid),))
    try:
        if isinstance(request, Malformed):
            raise invalid(f"request could not be parsed ({request.error}); strings must be valid UTF-8")
        return await work()
    except Exception as exc:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name, extra={"request_id": rid})
        await context.abort(code, message)


class Malformed:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def register_unary_service(servicer, server: grpc.aio.Server, pb_module, service: str) -> None:
    """Register every unary method of `service` with deserialisers that never raise."""
    descriptor = pb_module.DESCRIPTOR.services_by_name[service]
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(getattr(pb_module, method.input_type.name)),
            response_serializer=getattr(pb_module, method.output_type.name).SerializeToString,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def safe_deserializer(message_type):
    """Parse requests ourselves so bad bytes become INVALID_ARGUMENT, not INTERNAL."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf raises DecodeError (invalid UTF-8, truncated field...)
            return Malformed(exc)

    return parse
