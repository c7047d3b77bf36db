"""Dynamic batching of tokenised sequences for one served model version.

Modelled on text-embeddings-inference's router/batcher: requests put their
already-tokenised texts into one bounded queue, a scheduler coroutine groups
queued texts of similar length into padded batches, and a single worker thread
runs them through the model.  The module knows nothing of ONNX, gRPC or
tokenizers; it only sees 1-D int64 token-id arrays and a ``run_batch`` callable.

Why the pieces look the way they do:

* Length-aware grouping inside a ``lookahead`` window keeps padding (wasted
  compute) low, while always anchoring a batch on the OLDEST queued text bounds
  how long any text can be overtaken.
* Exactly one worker thread owns the model, so the event loop never blocks and
  the backend sees one batch at a time (what ONNX Runtime / a GPU want).
* While a batch runs, the next one is already formed and padded (and kept open
  to late arrivals until the worker takes it), so the backend never idles
  between batches under load.
* Short waits for more texts happen only on an idle backend with concurrent
  traffic; an isolated request pays raw inference latency only.
* Admission is latency-aware: a ``BatchCostModel`` learns the backend's cost
  from the batches it runs, and ``submit`` refuses at once (instead of serving
  late) a request that would wait longer than ``max_queue_delay_ms`` behind the
  work already queued (``OverloadedError``) or that could not finish before its
  own deadline (``DeadlineUnmeetableError``).  The same budget caps how long one
  batch may take, so an admitted request is not stuck behind a huge batch.
* A long text only shares a batch with texts of comparable length
  (``max_length_ratio``), so one 512-token text does not pad 63 short ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.batching.cost import BatchCostModel

__all__ = [
    "FREE_PADDING_TOKENS",
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

logger = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]
"""``(input_ids int64[n, L], attention_mask int64[n, L]) -> arrays with first dim n``.

Row ``i`` of every output belongs to sequence ``i``.  Rows must not depend on
padding (pool inside ``run_batch``), because one request's texts may be spread
over batches padded to different lengths.
"""


# --------------------------------------------------------------------------- config / errors


FREE_PADDING_TOKENS = 64
"""Texts up to this long always share batches (``max_length_ratio`` does not apply): padding them costs little."""


def _check_int(name: str, value: object, minimum: int) -> None:
    """Reject non-integers (and bools, which are ints in Python) and too-small values."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"BatcherConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"BatcherConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class BatcherConfig:
    """Limits of one batcher; validated eagerly so a bad config fails at startup."""

    max_batch_size: int = 64
    """Texts per batch."""
    max_batch_tokens: int = 16384
    """Padded cost of a batch = longest sequence length * count."""
    max_queue_texts: int = 4096
    """Bound on texts waiting (queued or prepared, not yet running)."""
    max_wait_ms: float = 1.0
    """Longest extra wait for more texts on an idle backend with concurrent traffic (0 = never)."""
    lookahead: int = 256
    """How many of the oldest queued texts are considered when grouping by length."""
    pad_token_id: int = 0
    max_queue_delay_ms: float = 0.0
    """Latency budget for queueing; 0 = off (refuse by ``max_queue_texts`` and deadlines only).

    When set, a request whose estimated wait behind the queued work exceeds it
    (or the request's own estimated run time, when longer) is refused at once
    with ``OverloadedError`` (RESOURCE_EXHAUSTED), and a batch is not grown past
    this estimated duration, so an admitted request waits about one budget and
    then runs in a batch of about one budget.  The own-run-time floor means
    waiting at most doubles a request's unloaded latency on slow hardware, and
    keeps a large request from being refused forever behind small ones.  Off by default
    because the right value differs tenfold between a 2-core CPU (a short query
    alone takes 10-30 ms) and a GPU (2-5 ms), and a value too small for the
    hardware refuses bursts it could absorb; set it to about the unloaded p50 of
    a typical request on the serving hardware (see benchmarks/overload.py).
    """
    max_length_ratio: float = 2.0
    """A batch's longest text is at most this many times its shortest (inf = off).

    Texts of up to ``FREE_PADDING_TOKENS`` tokens are exempt.  Keeps one long
    text from padding short ones to its width: 63 short queries padded to 512
    tokens cost as much as 32 times their real work.
    """

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, 1)
        _check_int("max_batch_tokens", self.max_batch_tokens, 1)
        _check_int("max_queue_texts", self.max_queue_texts, 1)
        _check_int("lookahead", self.lookahead, 1)
        _check_int("pad_token_id", self.pad_token_id, 0)
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float, np.integer, np.floating)):
            raise ValueError(f"BatcherConfig.max_wait_ms must be a number, got {wait!r}")
        if not math.isfinite(wait) or wait < 0:
            raise ValueError(f"BatcherConfig.max_wait_ms must be finite and >= 0, got {wait}")
        delay = self.max_queue_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float, np.integer, np.floating)):
            raise ValueError(f"BatcherConfig.max_queue_delay_ms must be a number, got {delay!r}")
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"BatcherConfig.max_queue_delay_ms must be finite and >= 0, got {delay}")
        ratio = self.max_length_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
            raise ValueError(f"BatcherConfig.max_length_ratio must be a number, got {ratio!r}")
        if math.isnan(ratio) or ratio < 1:
            raise ValueError(f"BatcherConfig.max_length_ratio must be >= 1 (inf = off), got {ratio}")
        if self.lookahead < self.max_batch_size:
            raise ValueError(
                f"BatcherConfig.lookahead ({self.lookahead}) must be >= max_batch_size "
                f"({self.max_batch_size}), otherwise batches could never be full"
            )


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


# --------------------------------------------------------------------------- pure helpers


def _lengths_compatible(shortest: int, longest: int, max_length_ratio: float) -> bool:
    """Whether texts of these lengths may share a batch (see ``BatcherConfig.max_length_ratio``)."""
    return longest <= FREE_PADDING_TOKENS or longest <= max_length_ratio * shortest


def plan_batch(
    lengths: Sequence[int],
    max_batch_size: int,
    max_batch_tokens: int,
    max_length_ratio: float = math.inf,
) -> list[int]:
    """Choose which texts of a window form the next batch.

    ``lengths[0]`` must be the OLDEST text: it is always chosen, so nothing
    starves.  Texts are sorted by length and the batch grows from the oldest
    text to its neighbours in length order, each step taking the neighbour that
    adds the least padding (a shorter text pads itself up to the current max, a
    longer one pads every row already chosen), while respecting
    ``max_batch_size``, ``max_batch_tokens`` (max length * count) and
    ``max_length_ratio`` (longest / shortest, for texts over
    ``FREE_PADDING_TOKENS``).  Returns indices into ``lengths`` (unordered).
    """
    n = len(lengths)
    if n == 0:
        return []
    if lengths[0] > max_batch_tokens:
        raise ValueError(f"text of {lengths[0]} tokens exceeds max_batch_tokens={max_batch_tokens}")
    first = lengths[0]
    # Ties in length are broken so the OLDER text is always the nearer neighbour of text 0.
    order = sorted(range(n), key=lambda i: (lengths[i], i if lengths[i] >= first else -i))
    pos = order.index(0)
    lo = hi = pos
    max_len = first
    count = 1
    while count < max_batch_size:
        best_side = 0
        best_waste = -1
        min_len = lengths[order[lo]]
        if (
            lo > 0
            and max_len * (count + 1) <= max_batch_tokens
            and _lengths_compatible(lengths[order[lo - 1]], max_len, max_length_ratio)
        ):
            best_side, best_waste = -1, max_len - lengths[order[lo - 1]]
        if hi < n - 1:
            longer = lengths[order[hi + 1]]  # >= max_len: order[hi] is the longest chosen
            if longer * (count + 1) <= max_batch_tokens and _lengths_compatible(min_len, longer, max_length_ratio):
                waste = (longer - max_len) * count
                if best_side == 0 or waste < best_waste:
                    best_side, best_waste = 1, waste
        if best_side == 0:
            break
        if best_side < 0:
            lo -= 1
        else:
            hi += 1
            max_len = lengths[order[hi]]
        count += 1
    return order[lo : hi + 1]


def pad_sequences(sequences: Sequence[np.ndarray], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence of THIS batch; mask is 1 on real tokens, 0 on padding."""
    if len(sequences) == 1:  # common case of an isolated request: nothing to pad
        ids = np.array(sequences[0], dtype=np.int64, ndmin=2)
        return ids, np.ones_like(ids)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max()) if len(sequences) else 0
    input_ids = np.full((len(sequences), width), pad_token_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
    attention_mask = (np.arange(width, dtype=np.int64)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask


# --------------------------------------------------------------------------- internal records


class _Request:
    """One submit() call: its future, deadline and the rows collected so far."""

    __slots__ = (
        "future", "n", "deadline", "submitted_at", "unstarted", "unstarted_tokens", "completed",
        "outputs", "queue_s", "inference_s", "batches", "done", "timer",
    )

    def __init__(
        self, future: asyncio.Future[SubmitResult], n: int, tokens: int, deadline: float | None, now: float
    ) -> None:
        self.future = future
        self.n = n
        self.deadline = deadline
        self.submitted_at = now
        self.unstarted = n  # texts not yet handed to the worker (they count as "waiting")
        self.unstarted_tokens = tokens  # their real tokens (for the queued-work estimate)
        self.completed = 0  # texts whose rows have been stored
        self.outputs: list[np.ndarray] | None = None
        self.queue_s = 0.0
        self.inference_s = 0.0
        self.batches = 0
        self.done = False  # answered, failed or cancelled: remaining texts are dead
        self.timer: asyncio.TimerHandle | None = None


class _Text:
    """One queued sequence; ``seq`` is a global arrival number that defines age."""

    __slots__ = ("req", "index", "ids", "length", "seq")

    def __init__(self, req: _Request, index: int, ids: np.ndarray, seq: int) -> None:
        self.req = req
        self.index = index
        self.ids = ids
        self.length = len(ids)
        self.seq = seq


class _Batch:
    """A formed, padded batch waiting for (or in) the worker."""

    __slots__ = ("texts", "input_ids", "attention_mask", "max_len", "tokens", "budget")

    def __init__(self, texts: list[_Text], pad_token_id: int, budget: int) -> None:
        self.texts = texts
        self.budget = budget  # padded-token limit it was formed under (config or latency cap)
        self.input_ids, self.attention_mask = pad_sequences([t.ids for t in texts], pad_token_id)
        self.max_len = max(t.length for t in texts)
        self.tokens = sum(t.length for t in texts)

    def full(self, config: BatcherConfig) -> bool:
        """True when not even one more text of length <= max_len could join."""
        count = len(self.texts)
        return count >= config.max_batch_size or self.max_len * (count + 1) > self.budget


class _Outcome:
    """What the worker thread reports back for one batch."""

    __slots__ = ("outputs", "error", "started", "finished", "cost_s")

    def __init__(
        self, outputs: object, error: BaseException | None, started: float, finished: float, cost_s: float
    ) -> None:
        self.outputs = outputs
        self.error = error
        self.started = started
        self.finished = finished
        self.cost_s = cost_s  # duration by the batcher's cost clock (feeds the cost model)


def _normalize_outputs(raw: object, n: int) -> tuple[np.ndarray, ...]:
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


_NEW, _RUNNING, _CLOSING, _STOPPED = "new", "running", "closing", "stopped"


# --------------------------------------------------------------------------- the batcher


class DynamicBatcher:
    """Dynamic batcher for one model version: asyncio front, one worker thread behind.

    All state is touched only from the event loop that called ``start``; the
    worker thread only ever sees the padded arrays of the batch it runs.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        config: BatcherConfig,
        name: str = "",
        on_batch: Callable[[BatchStats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` times batches for the cost model (tests inject a simulated one)."""
        if not callable(run_batch):
            raise TypeError("run_batch must be callable")
        if not isinstance(config, BatcherConfig):
            raise TypeError(f"config must be a BatcherConfig, got {type(config).__name__}")
        self._run_batch = run_batch
        self._config = config
        self._name = name
        self._label = f"batcher[{name}]" if name else "batcher"
        self._on_batch = on_batch
        self._max_wait_s = config.max_wait_ms / 1000.0
        self._max_delay_s = config.max_queue_delay_ms / 1000.0
        self._clock = clock
        self._cost = BatchCostModel()

        self._state = _NEW
        self._abort = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

        self._queue: deque[_Text] = deque()  # sorted by _Text.seq; may hold dead texts (skipped)
        self._requests: set[_Request] = set()  # live requests (in flight)
        self._waiting = 0  # live texts not yet running (queued or prepared)
        self._waiting_tokens = 0  # their real tokens
        self._seq = itertools.count()
        self._dirty = False  # something changed that may alter the prepared batch
        self._prepared: _Batch | None = None
        self._running: asyncio.Future[_Outcome] | None = None
        self._running_batch: _Batch | None = None
        self._running_depth = 0
        self._running_since = 0.0  # cost-clock time the running batch was launched
        self._running_estimate_s = 0.0  # its estimated duration (0 before the model is ready)
        self._last_overlap_at = -math.inf  # last submit that arrived while another request was in flight

    # ------------------------------------------------------------------ public API

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> BatcherConfig:
        return self._config

    @property
    def queue_depth(self) -> int:
        """Texts waiting (queued or in the prepared batch), not yet running."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self._requests)

    @property
    def prepared_size(self) -> int:
        """Texts in the batch formed and padded ahead of the worker (0 if none)."""
        return len(self._prepared.texts) if self._prepared is not None else 0

    @property
    def cost_model(self) -> BatchCostModel:
        """The backend cost estimate learned from executed batches (read-only use)."""
        return self._cost

    def estimated_wait_s(self, extra_texts: int = 0, extra_tokens: int = 0) -> float | None:
        """Estimated time until the queued work (plus ``extra`` texts) has run; None before any batch ran.

        Counts the rest of the running batch and every waiting text, in as few
        batches as the limits allow, as if served in arrival order.  A running
        batch already past its estimate means the machine is slower right now
        than the model has learned (a noisy neighbour): the queued work is
        scaled by the same factor until finished batches update the model.
        """
        cost = self._cost
        if not cost.ready:
            return None
        cfg = self._config
        wait = cost.work_seconds(
            self._waiting + extra_texts, self._waiting_tokens + extra_tokens, cfg.max_batch_size, self._token_budget()
        )
        if self._running_batch is not None:
            elapsed = self._clock() - self._running_since
            estimate = self._running_estimate_s
            if 0.0 < estimate < elapsed:
                wait *= elapsed / estimate
            wait += max(0.0, estimate - elapsed)
        return wait

    def _token_budget(self) -> int:
        """Padded tokens a new batch may hold: the config's budget, capped by the latency budget."""
        budget = self._config.max_batch_tokens
        if self._max_delay_s > 0 and self._cost.ready:
            within = self._cost.tokens_within(self._max_delay_s)
            if within < budget:
                budget = int(within)
        return budget

    @property
    def running(self) -> bool:
        """Whether ``start`` was called and ``stop`` was not."""
        return self._state == _RUNNING

    async def start(self) -> None:
        """Bind to the running event loop and start the scheduler and worker thread."""
        if self._state == _RUNNING:
            return
        if self._state != _NEW:
            raise BatcherClosedError(f"{self._label}: cannot restart a stopped batcher")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        prefix = f"batcher-{self._name}" if self._name else "batcher"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=prefix)
        self._state = _RUNNING
        self._task = self._loop.create_task(self._main(), name=f"{self._label}-scheduler")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting work; ``drain`` finishes queued work, otherwise it fails with BatcherClosedError.

        A batch already running always completes (a thread cannot be interrupted).
        Idempotent; a later ``stop(drain=False)`` may escalate a draining stop.
        """
        if self._state == _NEW:
            self._state = _STOPPED
            return
        if self._state == _RUNNING:
            self._state = _CLOSING
        if not drain and not self._abort:
            self._abort = True
            self._fail_unstarted(BatcherClosedError(f"{self._label}: stopped before the request was processed"))
        assert self._wake is not None
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task})  # not shield(): our caller's cancellation must not kill the task
        self._state = _STOPPED

    async def submit(self, sequences: Sequence[np.ndarray], deadline: float | None = None) -> SubmitResult:
        """Queue a request's texts atomically and wait for their rows.

        ``deadline`` is absolute ``time.monotonic()`` seconds.  Raises ValueError
        for bad input, QueueFullError when all texts cannot be queued now (nothing
        is queued then), DeadlineExceededError, BatcherClosedError, or whatever
        ``run_batch`` raised for a batch holding one of the texts.  Cancelling the
        awaiting task drops the request's texts that have not started yet.
        """
        if self._state != _RUNNING:
            if self._state == _NEW:
                raise BatcherError(f"{self._label}: submit before start()")
            raise BatcherClosedError(f"{self._label}: stopped, not accepting requests")
        seqs = self._validate(sequences)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceededError(f"{self._label}: deadline already passed at submit")
        n = len(seqs)
        limit = self._config.max_queue_texts
        if self._waiting + n > limit:
            raise QueueFullError(
                f"queue full: {self._waiting} texts waiting (limit {limit}); cannot accept {n} more"
            )
        tokens = sum(len(s) for s in seqs)
        self._admit(n, tokens, deadline, now)
        loop = self._loop
        assert loop is not None and self._wake is not None
        req = _Request(loop.create_future(), n, tokens, deadline, now)
        if self._requests:
            self._last_overlap_at = now
        self._requests.add(req)
        for index, ids in enumerate(seqs):
            self._queue.append(_Text(req, index, ids, next(self._seq)))
        self._waiting += n
        self._waiting_tokens += tokens
        if deadline is not None:
            req.timer = loop.call_later(deadline - now, self._on_deadline, req)
        self._dirty = True
        self._wake.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            self._kill(req, None)  # client went away: skip its texts that have not started
            raise

    # ------------------------------------------------------------------ submit helpers

    def _admit(self, n: int, tokens: int, deadline: float | None, now: float) -> None:
        """Refuse now what would be served too late; admit everything before the cost is known."""
        ahead = self.estimated_wait_s()
        if ahead is None:
            return
        if self._max_delay_s > 0:
            # A request may always wait as long as it will itself run: waiting then at most doubles
            # its unloaded latency, and a big request is not starved by a stream of small ones.
            cfg = self._config
            own = self._cost.work_seconds(n, tokens, cfg.max_batch_size, self._token_budget())
            limit = max(self._max_delay_s, own)
            if ahead > limit:
                raise OverloadedError(
                    f"overloaded: estimated queue wait {ahead * 1e3:.0f} ms exceeds the limit of "
                    f"{limit * 1e3:.0f} ms (batching.max_queue_delay_ms, or the request's own "
                    "estimated run time when longer)",
                    ahead,
                    limit,
                )
        if deadline is not None and ahead > 0:
            # Only behind other work: on an idle batcher the request starts at once, and refusing it
            # on the estimate alone could refuse a tight-deadline client forever on a stale estimate
            # (nothing admitted, nothing learned); the deadline timer still drops unstarted texts.
            done = self.estimated_wait_s(n, tokens)
            assert done is not None
            remaining = deadline - now
            if done > remaining:
                raise DeadlineUnmeetableError(
                    f"deadline cannot be met: {remaining * 1e3:.0f} ms left, but the queued work and this "
                    f"request need about {done * 1e3:.0f} ms; refused before queueing "
                    "(send a longer deadline or retry later)",
                    done,
                    remaining,
                )

    def _validate(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Reject bad input before anything is queued (so errors are all-or-nothing)."""
        if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
            raise ValueError("sequences must be a sequence of 1-D arrays, not one 1-D array")
        seqs: list[np.ndarray] = []
        limit = self._config.max_batch_tokens
        for i, seq in enumerate(sequences):
            arr = np.asarray(seq)
            if arr.ndim != 1:
                raise ValueError(f"sequence {i} must be 1-D, got shape {arr.shape}")
            if arr.dtype.kind not in "iu":
                raise ValueError(f"sequence {i} must hold integer token ids, got dtype {arr.dtype}")
            if len(arr) == 0:
                raise ValueError(f"sequence {i} is empty")
            if len(arr) > limit:
                raise ValueError(
                    f"sequence {i} has {len(arr)} tokens, more than max_batch_tokens={limit}; "
                    "truncate to the model's max length (which must be <= max_batch_tokens)"
                )
            seqs.append(arr.astype(np.int64, copy=False))
        if not seqs:
            raise ValueError("sequences must not be empty")
        return seqs

    def _on_deadline(self, req: _Request) -> None:
        """Timer callback: fail a request whose texts have not all started by its deadline."""
        if not req.done and req.unstarted > 0:
            self._kill(req, DeadlineExceededError(self._deadline_message(req)))

    def _deadline_message(self, req: _Request) -> str:
        waited = time.monotonic() - req.submitted_at
        return f"{self._label}: deadline exceeded after {waited:.3f}s waiting for inference"

    def _kill(self, req: _Request, exc: BaseException | None) -> None:
        """End a request early (error, expiry or cancellation); its pending texts become dead."""
        if req.done:
            return
        req.done = True
        self._waiting -= req.unstarted
        self._waiting_tokens -= req.unstarted_tokens
        req.unstarted = 0
        req.unstarted_tokens = 0
        req.outputs = None
        self._requests.discard(req)
        if req.timer is not None:
            req.timer.cancel()
        if exc is not None and not req.future.done():
            req.future.set_exception(exc)
        self._dirty = True
        if self._wake is not None:
            self._wake.set()

    def _finish(self, req: _Request) -> None:
        """Answer a request whose texts all have their rows."""
        req.done = True
        self._requests.discard(req)
        if req.timer is not None:
            req.timer.cancel()
        assert req.outputs is not None
        result = SubmitResult(
            outputs=tuple(req.outputs),
            queue_s=req.queue_s,
            inference_s=req.inference_s,
            batches=req.batches,
        )
        req.outputs = None
        if not req.future.done():
            req.future.set_result(result)

    def _fail_unstarted(self, exc: BatcherError) -> None:
        """Fail every request that still has texts that have not started."""
        for req in list(self._requests):
            if req.unstarted > 0:
                self._kill(req, exc)

    def _expire(self, req: _Request, now: float) -> bool:
        """Kill ``req`` if its deadline has passed; returns whether it is dead."""
        if not req.done and req.deadline is not None and now >= req.deadline:
            self._kill(req, DeadlineExceededError(self._deadline_message(req)))
        return req.done

    # ------------------------------------------------------------------ scheduler

    async def _main(self) -> None:
        """Scheduler task: never lets an exception escape without answering every request."""
        try:
            await self._serve()
        except asyncio.CancelledError:
            self._abandon(BatcherClosedError(f"{self._label}: scheduler cancelled"))
            raise
        except Exception as exc:  # a bug here must not leave callers hanging forever
            logger.exception("%s: scheduler crashed", self._label)
            self._abandon(BatcherError(f"{self._label}: internal error: {exc!r}"))
        finally:
            self._state = _STOPPED
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def _abandon(self, exc: BatcherError) -> None:
        """Fail all live requests (used only when the scheduler dies)."""
        self._state = _STOPPED
        for req in list(self._requests):
            self._kill(req, exc)
        self._queue.clear()
        self._prepared = None

    async def _serve(self) -> None:
        """Scheduler loop: advance the state machine on every wake-up until stopped and drained."""
        wake = self._wake
        assert wake is not None
        while True:
            wake.clear()
            timeout = self._pump()
            if (
                self._state != _RUNNING
                and self._running is None
                and self._prepared is None
                and self._waiting == 0
            ):
                return
            await self._sleep(timeout)

    def _pump(self) -> float | None:
        """Harvest a finished batch, (re)form the next one and start it when possible.

        Never blocks, so it can run both in the scheduler task and directly in
        the worker's done-callback (saving a task hop between batches).  Returns
        how long an idle backend should wait for more texts (None: until woken).
        """
        cfg = self._config
        running = self._running
        if running is not None and running.done():
            finished = self._running_batch
            assert finished is not None
            self._running = self._running_batch = None
            outcome = running.result()
            if outcome.error is None:
                # Keep the backend busy first; delivering rows can wait a moment.
                self._launch_prepared()
                self._complete(finished, outcome)
            else:
                # Fail first so the failed requests' other texts are dropped from the next batch.
                self._complete(finished, outcome)
                self._launch_prepared()

        if len(self._queue) > 2 * self._waiting + cfg.lookahead:
            self._queue = deque(t for t in self._queue if not t.req.done)

        while True:
            if self._dirty and (self._prepared is None or not self._prepared.full(cfg)):
                # The prepared batch stays open: re-form it as texts arrive until the worker takes it.
                self._dirty = False
                self._prepared = self._form(self._prepared)
            if self._running is not None or self._prepared is None:
                return None
            batch = self._revalidate(self._prepared)
            self._prepared = batch
            if batch is None:
                continue  # everything in it died; form again from the queue if anything is left
            now = time.monotonic()
            until = self._fill_until(batch, now)
            if until is not None and now < until:
                return until - now
            self._launch_prepared()

    async def _sleep(self, timeout: float | None) -> None:
        """Wait for a wake-up (submit, cancellation, batch done, stop) or the timeout."""
        wake = self._wake
        assert wake is not None and self._loop is not None
        if timeout is None:
            await wake.wait()
            return
        handle = self._loop.call_later(timeout, wake.set)
        try:
            await wake.wait()
        finally:
            handle.cancel()

    def _fill_until(self, batch: _Batch, now: float) -> float | None:
        """When an idle backend should start ``batch`` at the latest; None = start now.

        Waiting only pays off when more texts are likely to come soon: traffic
        is concurrent (another request in flight, or a submit recently arrived
        while another request was in flight).  An isolated request, a sequential
        client, a full batch, a drain, or a queue that already holds more texts
        than the batch never wait.  The wait is bounded by the oldest text's age.
        """
        if self._state != _RUNNING or self._max_wait_s <= 0 or batch.full(self._config):
            return None
        if self._waiting > len(batch.texts):
            return None
        concurrent = len(self._requests) > 1 or now - self._last_overlap_at <= self._max_wait_s
        if not concurrent:
            return None
        oldest = min(t.req.submitted_at for t in batch.texts)
        return oldest + self._max_wait_s

    def _form(self, prev: _Batch | None) -> _Batch | None:
        """Form the next batch from the prepared one (if any) plus the oldest queued texts.

        Takes up to ``lookahead`` of the oldest live texts, lets ``plan_batch``
        group the oldest with those closest in length, and puts the rest back at
        the head of the queue in age order.  Returns ``prev`` itself when the
        choice did not change, so its padding is reused.
        """
        cfg = self._config
        now = time.monotonic()
        window: list[_Text] = list(prev.texts) if prev is not None else []
        queue = self._queue
        taken = 0
        while queue and taken < cfg.lookahead:
            text = queue.popleft()
            if not text.req.done:
                window.append(text)
                taken += 1
        for text in window:
            self._expire(text.req, now)
        window = [t for t in window if not t.req.done]
        if prev is not None:
            window.sort(key=lambda t: t.seq)  # prepared texts are not necessarily older than all queued ones
        overflow = window[cfg.lookahead :]
        window = window[: cfg.lookahead]
        if not window:
            return None
        budget = max(self._token_budget(), window[0].length)  # the oldest text always goes
        picks = sorted(plan_batch([t.length for t in window], cfg.max_batch_size, budget, cfg.max_length_ratio))
        chosen = [window[i] for i in picks]
        picked = set(picks)
        rest = [t for i, t in enumerate(window) if i not in picked]
        rest.extend(overflow)  # overflow is younger than every window text: order is kept
        queue.extendleft(reversed(rest))
        if prev is not None and len(prev.texts) == len(chosen) and all(
            a is b for a, b in zip(prev.texts, chosen)
        ):
            return prev
        return _Batch(chosen, cfg.pad_token_id, budget)

    def _revalidate(self, batch: _Batch) -> _Batch | None:
        """Drop texts of cancelled/failed/expired requests right before running; re-pad if needed."""
        now = time.monotonic()
        for text in batch.texts:
            self._expire(text.req, now)
        live = [t for t in batch.texts if not t.req.done]
        if len(live) == len(batch.texts):
            return batch
        if not live:
            return None
        return _Batch(live, self._config.pad_token_id, batch.budget)

    def _launch_prepared(self) -> None:
        """Hand the prepared batch (after a last check) to the worker thread."""
        batch = self._prepared
        self._prepared = None
        if self._queue:
            self._dirty = True  # form the next batch from what is left
        if batch is None:
            return
        batch = self._revalidate(batch)
        if batch is None:
            return
        for text in batch.texts:
            text.req.unstarted -= 1
            text.req.unstarted_tokens -= text.length
        self._waiting -= len(batch.texts)
        self._waiting_tokens -= batch.tokens
        self._running_depth = self._waiting
        self._running_since = self._clock()
        padded = len(batch.texts) * batch.max_len
        self._running_estimate_s = self._cost.batch_seconds(padded) if self._cost.ready else 0.0
        assert self._loop is not None and self._executor is not None and self._wake is not None
        future = self._loop.run_in_executor(
            self._executor, self._execute, batch.input_ids, batch.attention_mask
        )
        future.add_done_callback(self._on_batch_done)
        self._running = future
        self._running_batch = batch

    def _on_batch_done(self, _future: asyncio.Future[_Outcome]) -> None:
        """Loop-thread callback: start the prepared batch and deliver rows without a task hop."""
        try:
            self._pump()
        except Exception:
            logger.exception("%s: error while handling a finished batch", self._label)
        finally:
            if self._wake is not None:
                self._wake.set()  # let the scheduler re-arm its fill timer / notice a stop

    def _execute(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> _Outcome:
        """Worker thread: run one batch, capturing its error so the scheduler can route it."""
        started = time.monotonic()
        cost_start = self._clock()
        try:
            outputs = self._run_batch(input_ids, attention_mask)
        except Exception as exc:
            return _Outcome(None, exc, started, time.monotonic(), self._clock() - cost_start)
        return _Outcome(outputs, None, started, time.monotonic(), self._clock() - cost_start)

    def _complete(self, batch: _Batch, outcome: _Outcome) -> None:
        """Route a finished batch's rows (or its error) to the requests that own them."""
        size = len(batch.texts)
        inference_s = outcome.finished - outcome.started
        error = outcome.error
        outputs: tuple[np.ndarray, ...] = ()
        if error is None:
            try:
                outputs = _normalize_outputs(outcome.outputs, size)
            except BatcherError as exc:
                error = exc
        if error is not None:
            logger.warning("%s: batch of %d texts failed: %r", self._label, size, error)
            for req in dict.fromkeys(t.req for t in batch.texts):
                self._kill(req, error)
        else:
            self._cost.observe(size * batch.max_len, outcome.cost_s, batch.tokens)
            groups: dict[_Request, tuple[list[int], list[int]]] = {}
            for row, text in enumerate(batch.texts):
                if not text.req.done:
                    indices, rows = groups.setdefault(text.req, ([], []))
                    indices.append(text.index)
                    rows.append(row)
            for req, (indices, rows) in groups.items():
                self._deliver(req, outputs, indices, rows, outcome.started, inference_s)
        if self._on_batch is not None:
            stats = BatchStats(
                size=size,
                tokens=batch.tokens,
                padded_tokens=size * batch.max_len,
                inference_s=inference_s,
                queue_depth=self._running_depth,
                failed=error is not None,
            )
            try:
                self._on_batch(stats)
            except Exception:
                logger.exception("%s: on_batch callback failed", self._label)

    def _deliver(
        self,
        req: _Request,
        outputs: tuple[np.ndarray, ...],
        indices: list[int],
        rows: list[int],
        started: float,
        inference_s: float,
    ) -> None:
        """Copy a request's rows out of a batch's outputs; answer it once all rows are in."""
        row_idx = np.asarray(rows, dtype=np.intp)
        try:
            if req.outputs is None:
                if len(indices) == req.n:  # whole request in one batch; indices are in order
                    req.outputs = [arr[row_idx] for arr in outputs]
                else:
                    req.outputs = [np.empty((req.n,) + arr.shape[1:], dtype=arr.dtype) for arr in outputs]
                    dest = np.asarray(indices, dtype=np.intp)
                    for out, arr in zip(req.outputs, outputs):
                        out[dest] = arr[row_idx]
            else:
                if len(req.outputs) != len(outputs) or any(
                    out.shape[1:] != arr.shape[1:] for out, arr in zip(req.outputs, outputs)
                ):
                    raise BatcherError(
                        "run_batch returned rows of different shapes for batches of one request; "
                        "its outputs must not depend on padding or batch composition"
                    )
                dest = np.asarray(indices, dtype=np.intp)
                for out, arr in zip(req.outputs, outputs):
                    out[dest] = arr[row_idx]
        except BatcherError as exc:
            self._kill(req, exc)
            return
        except (ValueError, TypeError) as exc:
            self._kill(req, BatcherError(f"cannot collect run_batch outputs: {exc}"))
            return
        req.completed += len(indices)
        req.batches += 1
        req.inference_s += inference_s
        req.queue_s = max(req.queue_s, started - req.submitted_at)
        if req.completed == req.n:
            self._finish(req)
