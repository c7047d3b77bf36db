"""Map domain errors to gRPC status codes with a message the caller can act on."""
from __future__ import annotations

import grpc

from ..batching import BatcherClosedError, DeadlineExceededError, QueueFullError
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
    if isinstance(exc, TextTooLongError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (ModelNotFound, ModelNotBuilt)):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry with backoff"
    if isinstance(exc, DeadlineExceededError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details"


class Malformed:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def safe_deserializer(message_type):
    """Parse requests ourselves so bad bytes become INVALID_ARGUMENT, not INTERNAL."""

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf raises DecodeError (invalid UTF-8, truncated field...)
            return Malformed(exc)

    return parse
