"""The one place a failure becomes a gRPC status: the API's own refusals and a table for domain errors.

Domain code raises its own exceptions and knows nothing of gRPC; every servicer
answers through `status_for`, so one error always gets one status everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import grpc

from ..batching import BatcherClosedError, DeadlineExceededError, QueueFullError
from ..index.collection import CollectionExists, CollectionNotFound, CollectionReplaced, CollectionUnavailable, InvalidQuery
from ..index.store import StorageFull
from ..runtime.registry import ModelInUse, NonFiniteEmbeddingError
from ..runtime.repository import ModelNotBuilt, ModelNotFound
from ..tokenize import TextTooLongError


class RequestError(Exception):
    """A request the API refuses itself; it carries its status because no domain error says it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


class Status(NamedTuple):
    """What the caller sees: a code and a message it can act on."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class StatusRule:
    """How one domain error class is answered; `message` turns the error into the caller's text."""

    code: grpc.StatusCode
    message: Callable[[Exception], str] = str


STATUS_BY_ERROR: Mapping[type[Exception], StatusRule] = MappingProxyType(
    {
        CollectionNotFound: StatusRule(grpc.StatusCode.NOT_FOUND),
        CollectionExists: StatusRule(grpc.StatusCode.ALREADY_EXISTS),
        CollectionReplaced: StatusRule(grpc.StatusCode.ABORTED),
        CollectionUnavailable: StatusRule(grpc.StatusCode.FAILED_PRECONDITION),
        InvalidQuery: StatusRule(grpc.StatusCode.INVALID_ARGUMENT),
        TextTooLongError: StatusRule(grpc.StatusCode.INVALID_ARGUMENT),
        ModelNotFound: StatusRule(grpc.StatusCode.NOT_FOUND),
        ModelNotBuilt: StatusRule(grpc.StatusCode.NOT_FOUND),
        ModelInUse: StatusRule(grpc.StatusCode.FAILED_PRECONDITION),
        StorageFull: StatusRule(grpc.StatusCode.RESOURCE_EXHAUSTED),  # the message says what to free; retry after
        QueueFullError: StatusRule(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda exc: f"{exc}; retry with backoff"),
        DeadlineExceededError: StatusRule(grpc.StatusCode.DEADLINE_EXCEEDED),
        BatcherClosedError: StatusRule(
            grpc.StatusCode.UNAVAILABLE, lambda _: "server is shutting down; retry on another replica"
        ),
        # INTERNAL, not UNAVAILABLE: the same text overflows the same way again, so a retry does not help;
        # the message (which texts, which model) is ours to give, unlike an unnamed bug's.
        NonFiniteEmbeddingError: StatusRule(grpc.StatusCode.INTERNAL),
    }
)


def status_for(exc: Exception) -> Status:
    """The status of `exc`: its own for a RequestError, else the table's row for its closest class.

    Anything the table does not name is a bug of ours: INTERNAL, without details the caller cannot use.
    """
    if isinstance(exc, RequestError):
        return Status(exc.code, exc.message)
    for cls in type(exc).__mro__:
        rule = STATUS_BY_ERROR.get(cls)
        if rule is not None:
            return Status(rule.code, rule.message(exc))
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details")
