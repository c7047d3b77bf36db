"""Which backend serves a model: `backend = "auto" | "onnx" | "torch"` from its model.toml.

`auto` takes the first of these that this machine can run, and says why (``EncoderInfo.detail``):

1. CUDA visible, onnxruntime has its CUDA provider, fp16 graph built -> onnx, CUDA fp16
2. CUDA visible, otherwise (no ORT CUDA provider, or no fp16 graph) -> torch, CUDA fp16/bf16
3. no CUDA (or device=cpu)                                          -> onnx, CPU int8 (fp32 without int8)
4. no ONNX graph at all (a checkpoint that does not export)        -> torch (CUDA, else CPU fp32)

A candidate that fails to open (say the CUDA provider cannot load cuDNN) is logged and the next
one is tried. The decision is a pure function of `Capabilities`, so tests inject the machine.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .base import Encoder
from .onnx import BackendUnavailable, OnnxEncoder
from .options import BackendConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


class BuiltModel(Protocol):
    """What a backend needs of a built model version (`modelrepo.ModelVersion` is one)."""

    folder: Path
    manifest: dict

    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def checkpoint_path(self) -> Path: ...

    def graphs(self) -> dict[str, Path]: ...


@dataclass(frozen=True)
class Capabilities:
    """What this machine and this model version offer; `probe` reads them, tests write them."""

    has_cuda: bool
    ort_providers: tuple[str, ...]
    graphs: frozenset[str]
    torch_available: bool
    has_checkpoint: bool

    @classmethod
    def probe(cls, graphs: dict[str, Path], checkpoint: Path | None, config: BackendConfig) -> Capabilities:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
        torch_available = all(_installed(module) for module in ("torch", "transformers"))
        return cls(
            has_cuda=config.device != "cpu" and _cuda_visible(torch_available, providers),
            ort_providers=providers,
            graphs=frozenset(graphs),
            torch_available=torch_available,
            has_checkpoint=checkpoint is not None and (checkpoint / "config.json").is_file(),
        )


def _installed(module: str) -> bool:
    """Without importing it: torch costs seconds and hundreds of MB on a host that will not use it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules (set to None)
        return False


def _cuda_visible(torch_available: bool, providers: tuple[str, ...]) -> bool:
    """torch's answer when torch is installed; without it, trust onnxruntime's CUDA provider.

    torch is imported only when an NVIDIA driver is there: a CPU host never pays its import.
    """
    if not torch_available:
        return CUDA_PROVIDER in providers
    if not (Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")):
        return False
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Choice:
    backend: str  # onnx | torch
    device: str  # cpu | cuda
    precision: str  # int8 | fp32 | fp16 | bf16 | auto (onnx decides among its graphs)
    reason: str


def plan(requested: str, config: BackendConfig, caps: Capabilities) -> list[Choice]:
    """The candidates to try, best first; raises BackendUnavailable when none can run here."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    gpu = config.device != "cpu" and caps.has_cuda
    if config.device == "cuda" and not caps.has_cuda:
        raise BackendUnavailable("device=cuda asked but no CUDA device is visible")
    ort_cuda = CUDA_PROVIDER in caps.ort_providers
    fp16 = "fp16" in caps.graphs
    cpu_graphs = caps.graphs & {"int8", "fp32"}
    torch_ok = caps.torch_available and caps.has_checkpoint
    no_torch = "torch/transformers not installed" if not caps.torch_available else "no checkpoint in this version"
    where = "device=cpu asked" if config.device == "cpu" else "no CUDA device visible"

    if requested == "torch":
        if not torch_ok:
            raise BackendUnavailable(f"model.toml asks backend = torch but {no_torch} (pip install -e '.[build]')")
        if gpu:
            return [Choice("torch", "cuda", config.torch_dtype, "backend = torch, CUDA visible")]
        return [Choice("torch", "cpu", "fp32", f"backend = torch, {where}")]

    if requested == "onnx":
        if gpu and ort_cuda and fp16:
            return [Choice("onnx", "cuda", "fp16", "backend = onnx, CUDA visible")]
        if config.device == "cuda":  # let the encoder say which of provider / graph is missing
            return [Choice("onnx", "cuda", "fp16", "backend = onnx, device=cuda asked")]
        return [Choice("onnx", "cpu", config.cpu_precision, f"backend = onnx, {where if not gpu else 'CUDA visible but no ORT CUDA provider or no fp16 graph'}")]

    candidates: list[Choice] = []
    if gpu:
        if ort_cuda and fp16:
            trt = " and TensorRT" if config.tensorrt and TENSORRT_PROVIDER in caps.ort_providers else ""
            candidates.append(Choice("onnx", "cuda", "fp16", f"auto: CUDA visible, onnxruntime CUDA provider{trt}, fp16 graph built"))
        if torch_ok:
            why = "fp16 graph failed to open" if (ort_cuda and fp16) else (
                "no ONNX graph (checkpoint does not export)" if not caps.graphs
                else "onnxruntime has no CUDA provider" if not ort_cuda else "no fp16 graph built"
            )
            candidates.append(Choice("torch", "cuda", config.torch_dtype, f"auto: CUDA visible, {why}"))
        elif not (ort_cuda and fp16):
            log.warning("backend auto: CUDA visible but neither onnx (provider %s, fp16 %s) nor torch (%s) can use it",
                        ort_cuda, fp16, no_torch)
    if config.device != "cuda":
        if (config.cpu_precision == "auto" and cpu_graphs) or config.cpu_precision in cpu_graphs:
            cpu_why = "CUDA backends failed to open" if candidates else where
            candidates.append(Choice("onnx", "cpu", config.cpu_precision, f"auto: {cpu_why}"))
        elif torch_ok:
            candidates.append(Choice("torch", "cpu", "fp32", f"auto: {where}, no CPU ONNX graph (checkpoint does not export)"))
    if not candidates:
        raise BackendUnavailable(
            f"no backend can serve this model here: graphs {sorted(caps.graphs)}, cuda {caps.has_cuda}, "
            f"onnxruntime providers {list(caps.ort_providers)}, torch: {'ok' if torch_ok else no_torch}"
        )
    return candidates


def open_encoder(
    version: BuiltModel, requested: str, config: BackendConfig, *, max_batch: int = 256, pad_id: int = 0,
    caps: Capabilities | None = None,
) -> Encoder:
    """Open the encoder `plan` picks for this version, falling back down the list on failure."""
    graphs = version.graphs()
    checkpoint = version.checkpoint_path if "checkpoint" in version.manifest.get("files", {}) else None
    caps = caps or Capabilities.probe(graphs, checkpoint, config)
    failures: list[str] = []
    for choice in plan(requested, config, caps):
        reason = "; ".join([choice.reason, *(f"skipped {f}" for f in failures)])
        try:
            encoder = _open(choice, version, graphs, checkpoint, config, max_batch, pad_id, reason)
        except BackendUnavailable as exc:
            log.warning("backend %s %s unavailable: %s", choice.backend, choice.device, exc)
            failures.append(f"{choice.backend} {choice.device} ({exc})")
            continue
        if encoder.info.dim != version.dim:
            encoder.close()
            raise BackendUnavailable(f"{choice.backend} gives {encoder.info.dim}-d vectors but the manifest says {version.dim}")
        return encoder
    raise BackendUnavailable("no backend could open this model: " + "; ".join(failures))


def _open(choice: Choice, version: BuiltModel, graphs, checkpoint, config, max_batch, pad_id, reason) -> Encoder:
    if choice.backend == "onnx":
        precision = choice.precision if choice.device == "cpu" else config.cpu_precision
        return OnnxEncoder(
            graphs, version.dim, dataclasses.replace(config, device=choice.device, cpu_precision=precision),
            max_tokens=version.max_tokens, max_batch=max_batch, pad_id=pad_id,
            engine_cache=version.folder / "tensorrt-cache", reason=reason,
        )
    from .torch_backend import TorchEncoder

    return TorchEncoder(
        checkpoint, version.manifest.get("pooling", "mean"), config, device=choice.device,
        max_tokens=version.max_tokens, max_batch=max_batch, pad_id=pad_id, reason=reason,
    )
