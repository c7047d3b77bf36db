"""When and how long to wait before trying a call again: pure functions, so the policy is tested without a clock.

Only UNAVAILABLE (server restarting, draining, unreachable) and RESOURCE_EXHAUSTED (overload: the
server refused before doing the work) are retried; any other status is the same on a second try.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by `max_attempts` and by the call's own deadline.

    A delay the server sends (RetryInfo, its admission estimate) replaces the backoff: waiting less
    would be refused again. `max_attempts=1` turns retries off.
    """

    max_attempts: int = 5  # tries of one call, the first included
    initial_backoff_s: float = 0.1  # wait after the first failure
    max_backoff_s: float = 5.0  # the exponential growth stops here
    multiplier: float = 2.0
    jitter: float = 0.2  # each wait is stretched by up to this share, so clients refused together spread out

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def backoff(self, failures: int, server_delay: float | None, rand: float) -> float:
        """Seconds to wait after the `failures`-th failure (1-based); `rand` in [0, 1) draws the jitter."""
        if server_delay is not None and server_delay > 0:
            base = server_delay
        else:
            base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (failures - 1))
        return base * (1.0 + self.jitter * rand)

    def next_delay(
        self, code: grpc.StatusCode, failures: int, server_delay: float | None, remaining_s: float | None, rand: float
    ) -> float | None:
        """The wait before the next try, or None to give up now.

        None when `code` is not retryable, the attempts are spent, or the wait would outlast the call's
        deadline (`remaining_s` seconds left; None means no deadline).
        """
        if code not in RETRYABLE or failures >= self.max_attempts:
            return None
        delay = self.backoff(failures, server_delay, rand)
        if remaining_s is not None and delay >= remaining_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
