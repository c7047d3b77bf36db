"""Validation of ``BatcherConfig``: a bad ``[batching]`` table fails at startup, not under load."""

from __future__ import annotations

import math
from typing import Any

import pytest

from openemploi.batching import BatcherConfig


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_tokens": -1}, "max_batch_tokens"),
        ({"max_queue_texts": 0}, "max_queue_texts"),
        ({"lookahead": 0}, "lookahead"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_batch_size": True}, "max_batch_size"),
        ({"max_batch_size": 64, "lookahead": 32}, "lookahead"),
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BatcherConfig(**kwargs)


def test_config_defaults_are_valid() -> None:
    cfg = BatcherConfig()
    assert (cfg.max_batch_size, cfg.max_batch_tokens, cfg.max_queue_texts) == (64, 16384, 4096)
    assert BatcherConfig(max_wait_ms=0).max_wait_ms == 0


def test_config_validates_admission_fields() -> None:
    assert BatcherConfig().max_queue_delay_ms == 0.0  # off unless the operator sets a budget
    assert BatcherConfig(max_length_ratio=math.inf).max_length_ratio == math.inf
    for bad in ({"max_queue_delay_ms": -1.0}, {"max_queue_delay_ms": float("nan")}, {"max_queue_delay_ms": True}):
        with pytest.raises(ValueError, match="max_queue_delay_ms"):
            BatcherConfig(**bad)
    for bad in ({"max_length_ratio": 0.5}, {"max_length_ratio": float("nan")}):
        with pytest.raises(ValueError, match="max_length_ratio"):
            BatcherConfig(**bad)
