"""What every backend shares: the option enums, the resolved `Choice`, the `Encoder` interface.

The enums are str-valued so a member equals the string the TOML, the environment, the
manifest and the logs spell (`Device.CUDA == "cuda"`, `f"{Precision.FP16}" == "fp16"`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np


class BackendKind(StrEnum):
    """Which runtime serves a model (`backend` in its model.toml)."""

    AUTO = "auto"  # the first this machine can run, see select.plan
    ONNX = "onnx"
    TORCH = "torch"


class Device(StrEnum):
    """Where encoders run (`[backend] device`)."""

    AUTO = "auto"  # CUDA when visible, else the CPU
    CPU = "cpu"
    CUDA = "cuda"

    def placement(self, cuda_device_id: int) -> str:
        """The device as logs and ListModels name it: "cpu", "cuda:0"."""
        return f"{self}:{cuda_device_id}" if self is Device.CUDA else str(self)


class Precision(StrEnum):
    """Number format of an ONNX graph or of torch weights."""

    AUTO = "auto"  # only as `cpu_precision`: int8 when the version has it, else fp32
    INT8 = "int8"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class ExecutionProvider(StrEnum):
    """The onnxruntime execution providers this server uses, by onnxruntime's names."""

    CPU = "CPUExecutionProvider"
    CUDA = "CUDAExecutionProvider"
    TENSORRT = "TensorrtExecutionProvider"


Option = TypeVar("Option", bound=StrEnum)


def parse_option(kind: type[Option], value: object, key: str, allowed: Iterable[Option] | None = None) -> Option:
    """A config string as an enum member, or a ValueError naming the key and what it accepts."""
    accepted = tuple(kind if allowed is None else allowed)
    if isinstance(value, str) and value in accepted:
        return kind(value)
    names = [str(option) for option in accepted]
    spoken = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise ValueError(f"{key} must be {spoken}, got {value!r}")


class BackendUnavailable(RuntimeError):
    """The requested device or precision has no model file or no provider here."""


@dataclass(frozen=True)
class Choice:
    """One way to serve a model, fully decided by `select.plan`: an encoder opens it as it is."""

    backend: BackendKind  # onnx | torch
    device: Device  # cpu | cuda
    precision: Precision  # what runs: int8 | fp32 | fp16 | bf16
    model_path: Path  # the ONNX graph to open, or the checkpoint folder for torch
    reason: str  # why this candidate (and which were skipped before it), for logs and ListModels
    notes: tuple[str, ...] = ()  # what else the plan settled, told after the reason
    providers: tuple[ExecutionProvider, ...] = ()  # onnx: execution providers, most preferred first
    io_binding: bool = False  # onnx: inputs through device buffers kept per shape
    length_buckets: tuple[int, ...] = ()  # pad batch widths up to these sizes; () = no bucketing
    cuda_graphs: bool = False  # torch: one CUDA graph per (batch, length) bucket
    parallel_runs: int = 1  # onnx CPU: a batch is split into this many single-threaded runs at once

    def __post_init__(self) -> None:
        if self.backend == BackendKind.AUTO or self.device == Device.AUTO or self.precision == Precision.AUTO:
            raise ValueError(f"a Choice is resolved: backend, device and precision cannot be auto ({self})")


@dataclass(frozen=True)
class EncoderInfo:
    backend: BackendKind
    device: str  # where it runs: "cpu", "cuda:0"
    precision: Precision
    dim: int
    detail: str = ""  # why this device/precision was chosen, for logs and ListModels


class Encoder(Protocol):
    """encode(ids, mask) -> (L2-normalised vectors, pooled vectors), both float32 [n, dim]."""

    info: EncoderInfo

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...
