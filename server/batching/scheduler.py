"""Dynamic batching of tokenised sequences for one served model version.

Modelled on text-embeddings-inference's router/batcher: requests put their
already-tokenised texts into one bounded queue, a scheduler coroutine groups
queued texts of similar length into padded batches, and a single worker thread
runs them through the model.  The module knows nothing of ONNX, gRPC or
tokenizers; it only sees 1-D int64 token-id arrays and a ``run_batch`` callable.
Which texts form a batch is decided in ``planning``, whether a request may
queue at all in ``admission``; this module holds the control flow around them.

* Exactly one worker thread owns the model, so the event loop never blocks and
  the backend sees one batch at a time (what ONNX Runtime / a GPU want).
* While a batch runs, the next one is already formed and padded (and kept open
  to late arrivals until the worker takes it), so the backend never idles
  between batches under load.
* Short waits for more texts happen only on an idle backend with concurrent
  traffic; an isolated request pays raw inference latency only.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .admission import AdmissionControl, BatchCostModel, QueuedWork, RunningBatch, validate_sequences
from .config import BatcherConfig
from .errors import BatcherClosedError, BatcherError, DeadlineExceededError
from .planning import choose_batch
from .work import (
    BatchOutcome,
    BatchStats,
    FormedBatch,
    PendingRequest,
    QueuedText,
    RunBatch,
    SubmitResult,
    normalize_outputs,
)

__all__ = ["DynamicBatcher"]

logger = logging.getLogger(__name__)


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    STOPPED = "stopped"


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
        self._clock = clock
        self._admission = AdmissionControl(config, self._label, clock)

        self._state = _State.NEW
        self._abort = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

        self._queue: deque[QueuedText] = deque()  # sorted by QueuedText.seq; may hold dead texts (skipped)
        self._requests: set[PendingRequest] = set()  # live requests (in flight)
        self._waiting = 0  # live texts not yet running (queued or prepared)
        self._waiting_tokens = 0  # their real tokens
        self._seq = itertools.count()
        self._dirty = False  # something changed that may alter the prepared batch
        self._prepared: FormedBatch | None = None
        self._running: asyncio.Future[BatchOutcome] | None = None
        self._running_batch: FormedBatch | None = None
        self._running_timing: RunningBatch | None = None
        self._running_depth = 0
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
        return self._admission.cost

    def estimated_wait_s(self, extra_texts: int = 0, extra_tokens: int = 0) -> float | None:
        """Estimated time until the queued work (plus ``extra`` texts) has run; None before any batch ran."""
        return self._admission.estimated_wait_s(self._work_ahead(), extra_texts, extra_tokens)

    @property
    def running(self) -> bool:
        """Whether ``start`` was called and ``stop`` was not."""
        return self._state == _State.RUNNING

    async def start(self) -> None:
        """Bind to the running event loop and start the scheduler and worker thread."""
        if self._state == _State.RUNNING:
            return
        if self._state != _State.NEW:
            raise BatcherClosedError(f"{self._label}: cannot restart a stopped batcher")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        prefix = f"batcher-{self._name}" if self._name else "batcher"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=prefix)
        self._state = _State.RUNNING
        self._task = self._loop.create_task(self._main(), name=f"{self._label}-scheduler")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting work; ``drain`` finishes queued work, otherwise it fails with BatcherClosedError.

        A batch already running always completes (a thread cannot be interrupted).
        Idempotent; a later ``stop(drain=False)`` may escalate a draining stop.
        """
        if self._state == _State.NEW:
            self._state = _State.STOPPED
            return
        if self._state == _State.RUNNING:
            self._state = _State.CLOSING
        if not drain and not self._abort:
            self._abort = True
            self._fail_unstarted(BatcherClosedError(f"{self._label}: stopped before the request was processed"))
        assert self._wake is not None
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task})  # not shield(): our caller's cancellation must not kill the task
        self._state = _State.STOPPED

    async def submit(self, sequences: Sequence[np.ndarray], deadline: float | None = None) -> SubmitResult:
        """Queue a request's texts atomically and wait for their rows.

        ``deadline`` is absolute ``time.monotonic()`` seconds.  Raises ValueError
        for bad input, QueueFullError when all texts cannot be queued now (nothing
        is queued then), DeadlineExceededError, BatcherClosedError, or whatever
        ``run_batch`` raised for a batch holding one of the texts.  Cancelling the
        awaiting task drops the request's texts that have not started yet.
        """
        if self._state != _State.RUNNING:
            if self._state == _State.NEW:
                raise BatcherError(f"{self._label}: submit before start()")
            raise BatcherClosedError(f"{self._label}: stopped, not accepting requests")
        seqs = validate_sequences(sequences, self._config.max_batch_tokens)
        now = time.monotonic()
        n = len(seqs)
        tokens = sum(len(s) for s in seqs)
        self._admission.check(n, tokens, deadline, now, self._work_ahead())
        loop = self._loop
        assert loop is not None and self._wake is not None
        req = PendingRequest(loop.create_future(), n, deadline, now, unstarted=n, unstarted_tokens=tokens)
        if self._requests:
            self._last_overlap_at = now
        self._requests.add(req)
        for index, ids in enumerate(seqs):
            self._queue.append(QueuedText(req, index, ids, next(self._seq)))
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

    # ------------------------------------------------------------------ request bookkeeping

    def _work_ahead(self) -> QueuedWork:
        """What a new request would wait behind, for the admission estimate."""
        running = self._running_timing if self._running_batch is not None else None
        return QueuedWork(self._waiting, self._waiting_tokens, running)

    def _on_deadline(self, req: PendingRequest) -> None:
        """Timer callback: fail a request whose texts have not all started by its deadline."""
        if not req.done and req.unstarted > 0:
            self._kill(req, DeadlineExceededError(self._deadline_message(req)))

    def _deadline_message(self, req: PendingRequest) -> str:
        waited = time.monotonic() - req.submitted_at
        return f"{self._label}: deadline exceeded after {waited:.3f}s waiting for inference"

    def _kill(self, req: PendingRequest, exc: BaseException | None) -> None:
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

    def _finish(self, req: PendingRequest) -> None:
        """Answer a request whose texts all have their rows."""
        req.done = True
        self._requests.discard(req)
        if req.timer is not None:
            req.timer.cancel()
        result = req.result()
        req.outputs = None
        if not req.future.done():
            req.future.set_result(result)

    def _fail_unstarted(self, exc: BatcherError) -> None:
        """Fail every request that still has texts that have not started."""
        for req in list(self._requests):
            if req.unstarted > 0:
                self._kill(req, exc)

    def _expire(self, req: PendingRequest, now: float) -> bool:
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
            self._state = _State.STOPPED
            if self._executor is not None:
                self._executor.shutdown(wait=False)

    def _abandon(self, exc: BatcherError) -> None:
        """Fail all live requests (used only when the scheduler dies)."""
        self._state = _State.STOPPED
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
            if self._state != _State.RUNNING and self._running is None and self._prepared is None and self._waiting == 0:
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
            self._running = self._running_batch = self._running_timing = None
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
            self._queue = deque(t for t in self._queue if not t.request.done)

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

    def _fill_until(self, batch: FormedBatch, now: float) -> float | None:
        """When an idle backend should start ``batch`` at the latest; None = start now.

        Waiting only pays off when more texts are likely to come soon: traffic
        is concurrent (another request in flight, or a submit recently arrived
        while another request was in flight).  An isolated request, a sequential
        client, a full batch, a drain, or a queue that already holds more texts
        than the batch never wait.  The wait is bounded by the oldest text's age.
        """
        if self._state != _State.RUNNING or self._max_wait_s <= 0 or batch.full(self._config):
            return None
        if self._waiting > len(batch.texts):
            return None
        concurrent = len(self._requests) > 1 or now - self._last_overlap_at <= self._max_wait_s
        if not concurrent:
            return None
        oldest = min(t.request.submitted_at for t in batch.texts)
        return oldest + self._max_wait_s

    def _form(self, prev: FormedBatch | None) -> FormedBatch | None:
        """Form the next batch from the prepared one (if any) plus the oldest queued texts.

        Takes up to ``lookahead`` of the oldest live texts, lets ``choose_batch``
        group the oldest with those closest in length, and puts the rest back at
        the head of the queue in age order.  Returns ``prev`` itself when the
        choice did not change, so its padding is reused.
        """
        cfg = self._config
        now = time.monotonic()
        window: list[QueuedText] = list(prev.texts) if prev is not None else []
        queue = self._queue
        taken = 0
        while queue and taken < cfg.lookahead:
            text = queue.popleft()
            if not text.request.done:
                window.append(text)
                taken += 1
        for text in window:
            self._expire(text.request, now)
        window = [t for t in window if not t.request.done]
        if prev is not None:
            window.sort(key=lambda t: t.seq)  # prepared texts are not necessarily older than all queued ones
        if not window:
            return None
        choice = choose_batch([t.length for t in window], cfg, self._admission.token_budget())
        chosen = [window[i] for i in choice.chosen]
        queue.extendleft(reversed([window[i] for i in choice.rest]))
        if prev is not None and len(prev.texts) == len(chosen) and all(a is b for a, b in zip(prev.texts, chosen)):
            return prev
        return FormedBatch(chosen, cfg.pad_token_id, choice.token_budget)

    def _revalidate(self, batch: FormedBatch) -> FormedBatch | None:
        """Drop texts of cancelled/failed/expired requests right before running; re-pad if needed."""
        now = time.monotonic()
        for text in batch.texts:
            self._expire(text.request, now)
        live = [t for t in batch.texts if not t.request.done]
        if len(live) == len(batch.texts):
            return batch
        if not live:
            return None
        return FormedBatch(live, self._config.pad_token_id, batch.budget)

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
            text.request.unstarted -= 1
            text.request.unstarted_tokens -= text.length
        self._waiting -= len(batch.texts)
        self._waiting_tokens -= batch.tokens
        self._running_depth = self._waiting
        self._running_timing = self._admission.start_batch(len(batch.texts) * batch.max_len)
        assert self._loop is not None and self._executor is not None and self._wake is not None
        future = self._loop.run_in_executor(self._executor, self._execute, batch.input_ids, batch.attention_mask)
        future.add_done_callback(self._on_batch_done)
        self._running = future
        self._running_batch = batch

    def _on_batch_done(self, _future: asyncio.Future[BatchOutcome]) -> None:
        """Loop-thread callback: start the prepared batch and deliver rows without a task hop."""
        try:
            self._pump()
        except Exception:
            logger.exception("%s: error while handling a finished batch", self._label)
        finally:
            if self._wake is not None:
                self._wake.set()  # let the scheduler re-arm its fill timer / notice a stop

    def _execute(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> BatchOutcome:
        """Worker thread: run one batch, capturing its error so the scheduler can route it."""
        started = time.monotonic()
        cost_start = self._clock()
        try:
            outputs = self._run_batch(input_ids, attention_mask)
        except Exception as exc:
            return BatchOutcome(None, exc, started, time.monotonic(), self._clock() - cost_start)
        return BatchOutcome(outputs, None, started, time.monotonic(), self._clock() - cost_start)

    def _complete(self, batch: FormedBatch, outcome: BatchOutcome) -> None:
        """Route a finished batch's rows (or its error) to the requests that own them."""
        size = len(batch.texts)
        inference_s = outcome.finished - outcome.started
        error = outcome.error
        outputs: tuple[np.ndarray, ...] = ()
        if error is None:
            try:
                outputs = normalize_outputs(outcome.outputs, size)
            except BatcherError as exc:
                error = exc
        if error is not None:
            logger.warning("%s: batch of %d texts failed: %r", self._label, size, error)
            for req in dict.fromkeys(t.request for t in batch.texts):
                self._kill(req, error)
        else:
            self._admission.cost.observe(size * batch.max_len, outcome.cost_s, batch.tokens)
            for req, (indices, rows) in batch.rows_by_request().items():
                try:
                    req.collect(outputs, indices, rows, outcome.started, inference_s)
                except BatcherError as exc:
                    self._kill(req, exc)
                    continue
                if req.completed == req.size:
                    self._finish(req)
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
