"""The one place a failure becomes a gRPC status: the API's own refusals and a table for domain errors.

Domain code raises its own exceptions and knows nothing of gRPC; every servicer
answers through `status_for`, so one error always gets one status everywhere.
`details_for` adds what a program needs to act without parsing the message (AIP-193):
a reason, the field at fault, the resource not found, when to retry. A domain error
names its resource by a `resource_name` attribute; the table row gives its type.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import grpc

from ..batching import BatcherClosedError, DeadlineExceededError, QueueFullError
from ..index.collection import (
    CollectionExists,
    CollectionNotFound,
    CollectionReplaced,
    CollectionUnavailable,
    InvalidQuery,
    ShardUnavailable,
)
from ..index.store import StorageFull
from ..runtime.registry import ModelInUse, NonFiniteEmbeddingError
from ..runtime.repository import ModelNotBuilt, ModelNotFound
from ..skills.engine import UnknownOccupation, UnknownSkill
from ..tokenize import TextTooLongError


@dataclass(frozen=True)
class Resource:
    """What was not found: its type (`model`, `collection`, `rome_code`...) and its name."""

    type: str
    name: str


@dataclass(frozen=True)
class ErrorDetails:
    """The machine-readable side of a status (google.rpc ErrorInfo, BadRequest, ResourceInfo, RetryInfo)."""

    reason: str  # UPPER_SNAKE_CASE, stable: programs branch on it, not on the message
    field: str | None = None  # the request field at fault, e.g. "texts[3]"
    resource: Resource | None = None
    retry_after_s: float | None = None  # when a retry may succeed (overload estimates)


class RequestError(Exception):
    """A request the API refuses itself; it carries its status because no domain error says it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        resource: Resource | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = ErrorDetails(reason or code.name, field, resource, retry_after_s)


def invalid(message: str, field: str | None = None) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field=field)


def failed_precondition(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, message)


def not_found(message: str, resource_type: str, resource_name: str) -> RequestError:
    return RequestError(
        grpc.StatusCode.NOT_FOUND,
        message,
        reason=f"{resource_type.upper()}_NOT_FOUND",
        resource=Resource(resource_type, resource_name),
    )


class Status(NamedTuple):
    """What the caller sees: a code and a message it can act on."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class StatusRule:
    """How one domain error class is answered; `message` turns the error into the caller's text.

    `reason` is ErrorInfo's; `resource_type` makes a ResourceInfo of the error's `resource_name`;
    `field` names the request field at fault.
    """

    code: grpc.StatusCode
    reason: str
    message: Callable[[Exception], str] = str
    resource_type: str | None = None
    field: Callable[[Exception], str | None] = lambda _: None


STATUS_BY_ERROR: Mapping[type[Exception], StatusRule] = MappingProxyType(
    {
        CollectionNotFound: StatusRule(grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND", resource_type="collection"),
        CollectionExists: StatusRule(grpc.StatusCode.ALREADY_EXISTS, "COLLECTION_EXISTS"),
        CollectionReplaced: StatusRule(grpc.StatusCode.ABORTED, "COLLECTION_REPLACED"),
        CollectionUnavailable: StatusRule(grpc.StatusCode.FAILED_PRECONDITION, "COLLECTION_UNAVAILABLE"),
        InvalidQuery: StatusRule(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY"),
        # UNAVAILABLE, not INTERNAL: a shard's replica died or its node left (scale-out); Ray restarts it on its
        # disk, acknowledged writes included, so the same call succeeds once it is back.
        ShardUnavailable: StatusRule(grpc.StatusCode.UNAVAILABLE, "SHARD_UNAVAILABLE"),
        TextTooLongError: StatusRule(
            grpc.StatusCode.INVALID_ARGUMENT, "TEXT_TOO_LONG", field=lambda exc: f"texts[{getattr(exc, 'index', 0)}]"
        ),
        ModelNotFound: StatusRule(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", resource_type="model"),
        ModelNotBuilt: StatusRule(grpc.StatusCode.NOT_FOUND, "MODEL_NOT_BUILT", resource_type="model"),
        ModelInUse: StatusRule(grpc.StatusCode.FAILED_PRECONDITION, "MODEL_IN_USE"),
        StorageFull: StatusRule(grpc.StatusCode.RESOURCE_EXHAUSTED, "STORAGE_FULL"),  # the message says what to free
        QueueFullError: StatusRule(grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED", lambda exc: f"{exc}; retry with backoff"),
        DeadlineExceededError: StatusRule(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        BatcherClosedError: StatusRule(
            grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", lambda _: "server is shutting down; retry on another replica"
        ),
        # INTERNAL, not UNAVAILABLE: the same text overflows the same way again, so a retry does not help;
        # the message (which texts, which model) is ours to give, unlike an unnamed bug's.
        NonFiniteEmbeddingError: StatusRule(grpc.StatusCode.INTERNAL, "NON_FINITE_EMBEDDING"),
        UnknownOccupation: StatusRule(grpc.StatusCode.NOT_FOUND, "ROME_CODE_NOT_FOUND", resource_type="rome_code"),
        UnknownSkill: StatusRule(grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_SKILL_URI", field=lambda _: "skills"),
    }
)


def _rule(exc: Exception) -> StatusRule | None:
    for cls in type(exc).__mro__:
        rule = STATUS_BY_ERROR.get(cls)
        if rule is not None:
            return rule
    return None


def status_for(exc: Exception) -> Status:
    """The status of `exc`: its own for a RequestError, else the table's row for its closest class.

    Anything the table does not name is a bug of ours: INTERNAL, without details the caller cannot use.
    """
    if isinstance(exc, RequestError):
        return Status(exc.code, exc.message)
    rule = _rule(exc)
    if rule is not None:
        return Status(rule.code, rule.message(exc))
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server logged the details")


def details_for(exc: Exception) -> ErrorDetails:
    """The details that go with `status_for(exc)`; an overload's retry delay is the admission's queue-wait estimate."""
    if isinstance(exc, RequestError):
        return exc.details
    rule = _rule(exc)
    if rule is None:
        return ErrorDetails("INTERNAL")
    name = getattr(exc, "resource_name", None)
    resource = Resource(rule.resource_type, str(name)) if rule.resource_type and name else None
    wait = getattr(exc, "estimated_wait_s", None)
    return ErrorDetails(rule.reason, rule.field(exc), resource, float(wait) if wait is not None else None)
