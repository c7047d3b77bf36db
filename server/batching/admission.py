"""Latency-aware admission: learn what the backend costs, refuse at submit what would be served too late.

No asyncio and no threads: time comes from an injected clock (tests pass a
simulated one), so every estimate is exact under test.

The cost model.  The batcher cannot know the model, the device or how busy the
machine is, so it learns the cost from the batches it runs: ``duration =
overhead + per_token * padded_tokens`` (padded tokens = longest text x count:
what the backend computes).  The fit is a weighted least-squares line with
exponential forgetting (weight 0.9 per batch: the last ~10 batches dominate), so
it follows a machine whose speed changes (a noisy neighbour, a GPU clock drop)
within a second or so of traffic.

Why this shape: on a CPU the cost is close to proportional to padded tokens,
on a GPU a batch is dominated by a fixed launch cost up to large sizes; one
intercept and one slope capture both.  Attention's quadratic term is ignored:
it adds about a fifth at 512-token width for small encoders, and batches that
wide are rare and formed apart from short ones (see ``planning.plan_batch``).

While every observed batch had about the same size, the slope and the
intercept cannot be told apart; the model then assumes a line through the
origin (cost proportional to tokens), which over-estimates bigger batches:
the safe side for admission (it refuses a little early rather than serving
late) and it corrects itself as soon as batches of other sizes run.

The decision.  ``AdmissionControl.check`` refuses at once (instead of serving
late) a request that would wait longer than ``max_queue_delay_ms`` behind the
work already queued (``OverloadedError``) or that could not finish before its
own deadline (``DeadlineUnmeetableError``).  The same budget caps how long one
batch may take (``token_budget``), so an admitted request is not stuck behind a
huge batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import BatcherConfig
from .errors import DeadlineExceededError, DeadlineUnmeetableError, OverloadedError, QueueFullError

__all__ = ["AdmissionControl", "BatchCostModel", "QueuedWork", "RunningBatch", "validate_sequences"]


class BatchCostModel:
    """Fit of batch duration against padded tokens, plus the padding share of recent batches.

    Not thread-safe: the batcher feeds and reads it from its event loop only.
    """

    MIN_RELATIVE_SPREAD = 0.1
    """Below this coefficient of variation of batch sizes, fall back to a line through the origin."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self._decay = decay
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._padding = 1.0  # padded / real tokens, decayed average
        self._batches = 0
        self._overhead_s = 0.0
        self._per_token_s = 0.0

    # ------------------------------------------------------------------ feeding

    def observe(self, padded_tokens: int, seconds: float, real_tokens: int | None = None) -> None:
        """Record one finished batch (failed batches should not be fed: their time says nothing)."""
        if padded_tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        d = self._decay
        x, y = float(padded_tokens), float(seconds)
        self._w = self._w * d + 1.0
        self._sx = self._sx * d + x
        self._sy = self._sy * d + y
        self._sxx = self._sxx * d + x * x
        self._sxy = self._sxy * d + x * y
        if real_tokens is not None and real_tokens > 0:
            ratio = max(1.0, x / real_tokens)
            self._padding = ratio if self._batches == 0 else self._padding * d + ratio * (1.0 - d)
        self._batches += 1
        self._fit()

    def _fit(self) -> None:
        w = self._w
        mx, my = self._sx / w, self._sy / w
        var = self._sxx / w - mx * mx
        cov = self._sxy / w - mx * my
        if var <= (self.MIN_RELATIVE_SPREAD * mx) ** 2:
            self._overhead_s, self._per_token_s = 0.0, my / mx
            return
        slope = cov / var
        intercept = my - slope * mx
        if slope < 0.0:  # noise: bigger batches looked cheaper; cost independent of size
            slope, intercept = 0.0, my
        elif intercept < 0.0:  # no fixed cost visible: best line through the origin
            slope, intercept = self._sxy / self._sxx, 0.0
        self._overhead_s, self._per_token_s = intercept, slope

    # ------------------------------------------------------------------ reading

    @property
    def ready(self) -> bool:
        """Whether at least one batch was observed (before that, nothing is estimated)."""
        return self._batches > 0

    @property
    def batches(self) -> int:
        return self._batches

    @property
    def overhead_s(self) -> float:
        """Fixed cost of one batch, seconds."""
        return self._overhead_s

    @property
    def per_token_s(self) -> float:
        """Cost of one padded token, seconds."""
        return self._per_token_s

    @property
    def padding_factor(self) -> float:
        """Padded / real tokens of recent batches (>= 1): turns queued real tokens into padded cost."""
        return self._padding

    def batch_seconds(self, padded_tokens: float) -> float:
        """Estimated duration of one batch of ``padded_tokens``."""
        return self._overhead_s + self._per_token_s * padded_tokens

    def tokens_within(self, seconds: float) -> float:
        """Most padded tokens one batch may hold to take at most ``seconds`` (inf: no limit seen)."""
        if self._per_token_s <= 0.0:
            return math.inf
        return max(0.0, (seconds - self._overhead_s) / self._per_token_s)

    def work_seconds(self, texts: int, tokens: int, max_batch_size: int, max_batch_tokens: float) -> float:
        """Estimated time to run ``texts`` queued texts holding ``tokens`` real tokens.

        They are assumed to be split into as few batches as the size and token
        limits allow, each padded by the recent padding factor.
        """
        if texts <= 0:
            return 0.0
        padded = tokens * self._padding
        batches = max(math.ceil(texts / max_batch_size), 1)
        if math.isfinite(max_batch_tokens) and max_batch_tokens > 0:
            batches = max(batches, math.ceil(padded / max_batch_tokens))
        return batches * self._overhead_s + padded * self._per_token_s


@dataclass(frozen=True)
class RunningBatch:
    """The batch in the worker, as the wait estimate sees it."""

    started_at: float
    """When it was handed to the worker, by the admission clock."""
    estimate_s: float
    """Its estimated duration (0 before the cost model is ready)."""


@dataclass(frozen=True)
class QueuedWork:
    """The work ahead of a new request."""

    texts: int
    """Texts waiting (queued or prepared), not yet running."""
    tokens: int
    """Their real tokens."""
    running: RunningBatch | None = None
    """The batch in the worker, if one runs."""


def validate_sequences(sequences: Sequence[np.ndarray], max_batch_tokens: int) -> list[np.ndarray]:
    """Reject bad input before anything is queued (so errors are all-or-nothing); the texts as int64."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
        raise ValueError("sequences must be a sequence of 1-D arrays, not one 1-D array")
    seqs: list[np.ndarray] = []
    for i, seq in enumerate(sequences):
        arr = np.asarray(seq)
        if arr.ndim != 1:
            raise ValueError(f"sequence {i} must be 1-D, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"sequence {i} must hold integer token ids, got dtype {arr.dtype}")
        if len(arr) == 0:
            raise ValueError(f"sequence {i} is empty")
        if len(arr) > max_batch_tokens:
            raise ValueError(
                f"sequence {i} has {len(arr)} tokens, more than max_batch_tokens={max_batch_tokens}; "
                "truncate to the model's max length (which must be <= max_batch_tokens)"
            )
        seqs.append(arr.astype(np.int64, copy=False))
    if not seqs:
        raise ValueError("sequences must not be empty")
    return seqs


class AdmissionControl:
    """Decides at submit whether a request may queue, from the learned cost of the work ahead of it.

    ``clock`` times batches for the cost model; deadlines and ``now`` are
    ``time.monotonic()`` seconds, as the callers of ``submit`` give them.
    """

    def __init__(self, config: BatcherConfig, label: str = "batcher", clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._label = label
        self._clock = clock
        self._max_delay_s = config.max_queue_delay_ms / 1000.0
        self._cost = BatchCostModel()

    @property
    def cost(self) -> BatchCostModel:
        """The backend cost learned from executed batches."""
        return self._cost

    def token_budget(self) -> int:
        """Padded tokens a new batch may hold: the config's budget, capped by the latency budget."""
        budget = self._config.max_batch_tokens
        if self._max_delay_s > 0 and self._cost.ready:
            within = self._cost.tokens_within(self._max_delay_s)
            if within < budget:
                budget = int(within)
        return budget

    def start_batch(self, padded_tokens: int) -> RunningBatch:
        """Note when a batch went to the worker and how long it should take."""
        estimate_s = self._cost.batch_seconds(padded_tokens) if self._cost.ready else 0.0
        return RunningBatch(started_at=self._clock(), estimate_s=estimate_s)

    def estimated_wait_s(self, ahead: QueuedWork, extra_texts: int = 0, extra_tokens: int = 0) -> float | None:
        """Estimated time until the work ``ahead`` (plus ``extra`` texts) has run; None before any batch ran.

        Counts the rest of the running batch and every waiting text, in as few
        batches as the limits allow, as if served in arrival order.  A running
        batch already past its estimate means the machine is slower right now
        than the model has learned (a noisy neighbour): the queued work is
        scaled by the same factor until finished batches update the model.
        """
        cost = self._cost
        if not cost.ready:
            return None
        wait = cost.work_seconds(
            ahead.texts + extra_texts, ahead.tokens + extra_tokens, self._config.max_batch_size, self.token_budget()
        )
        if ahead.running is not None:
            elapsed = self._clock() - ahead.running.started_at
            estimate = ahead.running.estimate_s
            if 0.0 < estimate < elapsed:
                wait *= elapsed / estimate
            wait += max(0.0, estimate - elapsed)
        return wait

    def check(self, texts: int, tokens: int, deadline: float | None, now: float, ahead: QueuedWork) -> None:
        """Raise if a request of ``texts`` texts holding ``tokens`` tokens must be refused now.

        Refuses what would be served too late; admits everything the text-count
        cap allows before the cost is known.
        """
        if deadline is not None and now >= deadline:
            raise DeadlineExceededError(f"{self._label}: deadline already passed at submit")
        limit = self._config.max_queue_texts
        if ahead.texts + texts > limit:
            raise QueueFullError(f"queue full: {ahead.texts} texts waiting (limit {limit}); cannot accept {texts} more")
        wait = self.estimated_wait_s(ahead)
        if wait is None:
            return
        if self._max_delay_s > 0:
            # A request may always wait as long as it will itself run: waiting then at most doubles
            # its unloaded latency, and a big request is not starved by a stream of small ones.
            own = self._cost.work_seconds(texts, tokens, self._config.max_batch_size, self.token_budget())
            limit_s = max(self._max_delay_s, own)
            if wait > limit_s:
                raise OverloadedError(
                    f"overloaded: estimated queue wait {wait * 1e3:.0f} ms exceeds the limit of "
                    f"{limit_s * 1e3:.0f} ms (batching.max_queue_delay_ms, or the request's own "
                    "estimated run time when longer)",
                    wait,
                    limit_s,
                )
        if deadline is not None and wait > 0:
            # Only behind other work: on an idle batcher the request starts at once, and refusing it
            # on the estimate alone could refuse a tight-deadline client forever on a stale estimate
            # (nothing admitted, nothing learned); the deadline timer still drops unstarted texts.
            done = self.estimated_wait_s(ahead, texts, tokens)
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
