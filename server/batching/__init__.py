"""Dynamic batching of tokenised texts (one batcher per served model version)."""

from server.batching.batcher import (
    BatchStats,
    BatcherClosedError,
    BatcherConfig,
    BatcherError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
    RunBatch,
    SubmitResult,
    pad_sequences,
    plan_batch,
)

__all__ = [
    "BatchStats",
    "BatcherClosedError",
    "BatcherConfig",
    "BatcherError",
    "DeadlineExceededError",
    "DynamicBatcher",
    "QueueFullError",
    "RunBatch",
    "SubmitResult",
    "pad_sequences",
    "plan_batch",
]
