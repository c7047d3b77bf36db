"""Dynamic batching of tokenised texts (one batcher per served model version)."""

from server.batching.batcher import (
    FREE_PADDING_TOKENS,
    BatcherClosedError,
    BatcherConfig,
    BatcherError,
    BatchStats,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    DynamicBatcher,
    OverloadedError,
    QueueFullError,
    RunBatch,
    SubmitResult,
    pad_sequences,
    plan_batch,
)
from server.batching.cost import BatchCostModel

__all__ = [
    "FREE_PADDING_TOKENS",
    "BatchCostModel",
    "BatchStats",
    "BatcherClosedError",
    "BatcherConfig",
    "BatcherError",
    "DeadlineExceededError",
    "DeadlineUnmeetableError",
    "DynamicBatcher",
    "OverloadedError",
    "QueueFullError",
    "RunBatch",
    "SubmitResult",
    "pad_sequences",
    "plan_batch",
]
