"""Dynamic batching of tokenised texts (one batcher per served model version).

``config`` holds the limits, ``planning`` decides which texts form a batch,
``admission`` learns the backend's cost and refuses at submit what would be
served too late, ``scheduler`` runs the queue and the worker, ``work`` holds
the records they pass around, and ``errors`` what they raise.
"""

from .admission import BatchCostModel
from .config import BatcherConfig
from .errors import (
    BatcherClosedError,
    BatcherError,
    DeadlineExceededError,
    DeadlineUnmeetableError,
    OverloadedError,
    QueueFullError,
)
from .planning import FREE_PADDING_TOKENS, plan_batch
from .scheduler import DynamicBatcher
from .work import BatchStats, RunBatch, SubmitResult

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
    "plan_batch",
]
