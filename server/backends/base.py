"""The one small interface every backend implements (TEI's backend trait, in Python)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EncoderInfo:
    backend: str  # "onnx", "torch"
    device: str  # "cpu", "cuda:0"
    precision: str  # "int8", "fp16", "fp32"
    dim: int
    detail: str = ""  # why this device/precision was chosen, for logs and ListModels


class Encoder(Protocol):
    """encode(ids, mask) -> (L2-normalised vectors, pooled vectors), both float32 [n, dim]."""

    info: EncoderInfo

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
