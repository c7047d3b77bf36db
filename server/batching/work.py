"""What moves through the batcher: requests in flight, their queued texts, formed batches, what the worker reports.

Plain records with the bookkeeping that belongs to each (padding a batch,
collecting a request's rows), kept apart from the scheduler so its module holds
only the control flow.  No asyncio runs here; futures and timers are only held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..padding import pad_sequences
from .config import BatcherConfig
from .errors import BatcherError

__all__ = [
    "BatchOutcome",
    "BatchStats",
    "FormedBatch",
    "PendingRequest",
    "QueuedText",
    "RunBatch",
    "SubmitResult",
    "normalize_outputs",
]

RunBatch = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]
"""``(input_ids int64[n, L], attention_mask int64[n, L]) -> arrays with first dim n``.

Row ``i`` of every output belongs to sequence ``i``.  Rows must not depend on
padding (pool inside ``run_batch``), because one request's texts may be spread
over batches padded to different lengths.
"""


@dataclass(frozen=True)
class BatchStats:
    """Facts about one executed batch, handed to ``on_batch`` (for metrics)."""

    size: int
    """Texts in the batch."""
    tokens: int
    """Real (unpadded) tokens in the batch."""
    padded_tokens: int
    """size * padded length: what the backend actually computed."""
    inference_s: float
    """Wall time of the ``run_batch`` call."""
    queue_depth: int
    """Texts still waiting when the batch started."""
    failed: bool = False
    """Whether ``run_batch`` raised (or returned malformed outputs)."""


@dataclass(frozen=True, eq=False)
class SubmitResult:
    """What ``submit`` returns: the request's own rows plus timing for logs/metrics."""

    outputs: tuple[np.ndarray, ...]
    """For each output of run_batch, this request's rows, in request order."""
    queue_s: float
    """Longest wait from submit to the start of a batch holding one of its texts."""
    inference_s: float
    """Sum of inference time of the batches holding its texts."""
    batches: int
    """Number of batches its texts were spread over."""


@dataclass(eq=False, slots=True)
class PendingRequest:
    """One submit() call: its future, deadline and the rows collected so far (hashed by identity)."""

    future: asyncio.Future[SubmitResult]
    size: int
    """Texts in the request."""
    deadline: float | None
    submitted_at: float
    unstarted: int
    """Texts not yet handed to the worker (they count as "waiting")."""
    unstarted_tokens: int
    """Their real tokens (for the queued-work estimate)."""
    completed: int = 0
    """Texts whose rows have been stored."""
    outputs: list[np.ndarray] | None = None
    queue_s: float = 0.0
    inference_s: float = 0.0
    batches: int = 0
    done: bool = False
    """Answered, failed or cancelled: its remaining texts are dead."""
    timer: asyncio.TimerHandle | None = None

    def collect(
        self, outputs: tuple[np.ndarray, ...], indices: list[int], rows: list[int], started: float, inference_s: float
    ) -> None:
        """Copy this request's ``rows`` of one batch's outputs to its texts ``indices``; BatcherError if they do not fit."""
        row_idx = np.asarray(rows, dtype=np.intp)
        try:
            if self.outputs is None:
                if len(indices) == self.size:  # whole request in one batch; indices are in order
                    self.outputs = [arr[row_idx] for arr in outputs]
                else:
                    self.outputs = [np.empty((self.size, *arr.shape[1:]), dtype=arr.dtype) for arr in outputs]
                    dest = np.asarray(indices, dtype=np.intp)
                    for out, arr in zip(self.outputs, outputs):
                        out[dest] = arr[row_idx]
            else:
                if len(self.outputs) != len(outputs) or any(
                    out.shape[1:] != arr.shape[1:] for out, arr in zip(self.outputs, outputs)
                ):
                    raise BatcherError(
                        "run_batch returned rows of different shapes for batches of one request; "
                        "its outputs must not depend on padding or batch composition"
                    )
                dest = np.asarray(indices, dtype=np.intp)
                for out, arr in zip(self.outputs, outputs):
                    out[dest] = arr[row_idx]
        except (ValueError, TypeError) as exc:
            raise BatcherError(f"cannot collect run_batch outputs: {exc}") from exc
        self.completed += len(indices)
        self.batches += 1
        self.inference_s += inference_s
        self.queue_s = max(self.queue_s, started - self.submitted_at)

    def result(self) -> SubmitResult:
        """The answer once every text has its rows."""
        assert self.outputs is not None
        return SubmitResult(
            outputs=tuple(self.outputs),
            queue_s=self.queue_s,
            inference_s=self.inference_s,
            batches=self.batches,
        )


@dataclass(eq=False, slots=True)
class QueuedText:
    """One queued sequence; ``seq`` is a global arrival number that defines age."""

    request: PendingRequest
    index: int
    """Position in its request."""
    ids: np.ndarray
    seq: int
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.ids)


class FormedBatch:
    """A formed, padded batch waiting for (or in) the worker."""

    __slots__ = ("attention_mask", "budget", "input_ids", "max_len", "texts", "tokens")

    def __init__(self, texts: list[QueuedText], pad_token_id: int, budget: int) -> None:
        self.texts = texts
        self.budget = budget  # padded-token limit it was formed under (config or latency cap)
        self.input_ids, self.attention_mask = pad_sequences([t.ids for t in texts], pad_token_id)
        self.max_len = max(t.length for t in texts)
        self.tokens = sum(t.length for t in texts)

    def full(self, config: BatcherConfig) -> bool:
        """True when not even one more text of length <= max_len could join."""
        count = len(self.texts)
        return count >= config.max_batch_size or self.max_len * (count + 1) > self.budget

    def rows_by_request(self) -> dict[PendingRequest, tuple[list[int], list[int]]]:
        """For each live request in the batch: its text indices and the batch rows holding them."""
        groups: dict[PendingRequest, tuple[list[int], list[int]]] = {}
        for row, text in enumerate(self.texts):
            if not text.request.done:
                indices, rows = groups.setdefault(text.request, ([], []))
                indices.append(text.index)
                rows.append(row)
        return groups


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What the worker thread reports back for one batch."""

    outputs: object
    error: BaseException | None
    started: float
    finished: float
    cost_s: float
    """Duration by the batcher's cost clock (feeds the cost model)."""


def normalize_outputs(raw: object, n: int) -> tuple[np.ndarray, ...]:
    """Check run_batch's return value so a malformed one fails its batch, not the batcher."""
    if isinstance(raw, np.ndarray):
        raw = (raw,)
    if not isinstance(raw, (tuple, list)) or len(raw) == 0:
        raise BatcherError(f"run_batch must return a non-empty tuple of arrays, got {type(raw).__name__}")
    arrays = []
    for k, item in enumerate(raw):
        arr = np.asarray(item)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise BatcherError(f"run_batch output {k} has shape {arr.shape}; expected first dimension {n}")
        arrays.append(arr)
    return tuple(arrays)
