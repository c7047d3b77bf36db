"""Online estimate of how long the backend takes for a batch, for latency-aware admission.

The batcher cannot know the model, the device or how busy the machine is, so it
learns the cost from the batches it runs: ``duration = overhead + per_token *
padded_tokens`` (padded tokens = longest text x count: what the backend
computes).  The fit is a weighted least-squares line with exponential
forgetting (weight 0.9 per batch: the last ~10 batches dominate), so it follows
a machine whose speed changes (a noisy neighbour, a GPU clock drop) within a
second or so of traffic.

Why this shape: on a CPU the cost is close to proportional to padded tokens,
on a GPU a batch is dominated by a fixed launch cost up to large sizes; one
intercept and one slope capture both.  Attention's quadratic term is ignored:
it adds about a fifth at 512-token width for small encoders, and batches that
wide are rare and formed apart from short ones (see ``plan_batch``).

While every observed batch had about the same size, the slope and the
intercept cannot be told apart; the model then assumes a line through the
origin (cost proportional to tokens), which over-estimates bigger batches:
the safe side for admission (it refuses a little early rather than serving
late) and it corrects itself as soon as batches of other sizes run.
"""

from __future__ import annotations

import math

__all__ = ["BatchCostModel"]


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
