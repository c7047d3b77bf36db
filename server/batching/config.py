"""The limits of one batcher (the ``[batching]`` config table), validated when built so a bad config fails at startup."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BatcherConfig"]


def _require_int(name: str, value: object, minimum: int) -> None:
    """Reject non-integers (and bools, which are ints in Python) and too-small values."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"BatcherConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"BatcherConfig.{name} must be >= {minimum}, got {value}")


def _require_number(name: str, value: object) -> float:
    """Reject non-numbers (and bools); the value as a float for the range checks that follow."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"BatcherConfig.{name} must be a number, got {value!r}")
    return float(value)


def _require_finite_non_negative(name: str, value: object) -> None:
    number = _require_number(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"BatcherConfig.{name} must be finite and >= 0, got {value}")


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

    Texts of up to ``planning.FREE_PADDING_TOKENS`` tokens are exempt.  Keeps one long
    text from padding short ones to its width: 63 short queries padded to 512
    tokens cost as much as 32 times their real work.
    """

    def __post_init__(self) -> None:
        _require_int("max_batch_size", self.max_batch_size, 1)
        _require_int("max_batch_tokens", self.max_batch_tokens, 1)
        _require_int("max_queue_texts", self.max_queue_texts, 1)
        _require_int("lookahead", self.lookahead, 1)
        _require_int("pad_token_id", self.pad_token_id, 0)
        _require_finite_non_negative("max_wait_ms", self.max_wait_ms)
        _require_finite_non_negative("max_queue_delay_ms", self.max_queue_delay_ms)
        ratio = _require_number("max_length_ratio", self.max_length_ratio)
        if math.isnan(ratio) or ratio < 1:
            raise ValueError(f"BatcherConfig.max_length_ratio must be >= 1 (inf = off), got {self.max_length_ratio}")
        if self.lookahead < self.max_batch_size:
            raise ValueError(
                f"BatcherConfig.lookahead ({self.lookahead}) must be >= max_batch_size "
                f"({self.max_batch_size}), otherwise batches could never be full"
            )
