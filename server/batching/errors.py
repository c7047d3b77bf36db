"""Errors the batcher raises itself; the API layer maps each family to one gRPC status."""

from __future__ import annotations

__all__ = [
    "BatcherClosedError",
    "BatcherError",
    "DeadlineExceededError",
    "DeadlineUnmeetableError",
    "OverloadedError",
    "QueueFullError",
]


class BatcherError(Exception):
    """Base class of every error the batcher raises itself."""


class QueueFullError(BatcherError):
    """The queue cannot take all texts of a request right now (back-pressure; retryable)."""


class OverloadedError(QueueFullError):
    """The work queued ahead would make the request wait longer than ``max_queue_delay_ms``."""

    def __init__(self, message: str, estimated_wait_s: float, limit_s: float) -> None:
        super().__init__(message)
        self.estimated_wait_s = estimated_wait_s
        self.limit_s = limit_s


class DeadlineExceededError(BatcherError):
    """The request's deadline passed before all its texts started inference."""


class DeadlineUnmeetableError(DeadlineExceededError):
    """Refused at submit: the estimated completion time is past the request's deadline."""

    def __init__(self, message: str, estimated_s: float, remaining_s: float) -> None:
        super().__init__(message)
        self.estimated_s = estimated_s
        self.remaining_s = remaining_s


class BatcherClosedError(BatcherError):
    """The batcher is stopping/stopped and will not process the request."""
