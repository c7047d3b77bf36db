"""Which backend serves a model, decided once: `plan` turns model.toml's `backend`
(auto | onnx | torch), the `[backend]` config and what this machine offers into resolved
`Choice`s, best first; `open_encoder` opens the first one that opens.

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
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .base import BackendKind, BackendUnavailable, Choice, Device, Encoder, ExecutionProvider, Precision, parse_option
from .buckets import length_buckets
from .onnx import OnnxEncoder
from .options import BackendConfig

log = logging.getLogger(__name__)


class BuiltModel(Protocol):
    """What a backend needs of a built model version (`runtime.repository.ModelVersion` is one)."""

    @property
    def folder(self) -> Path: ...

    @property
    def manifest(self) -> dict: ...

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
    graphs: Mapping[Precision, Path]  # the version's ONNX graphs
    torch_available: bool
    checkpoint: Path | None  # a checkpoint folder transformers can load; None when the version has none
    max_tokens: int  # the model's limit, the last length bucket
    cpu_cores: int = 1  # cores this process may run on (its affinity), for CPU parallel runs

    @classmethod
    def probe(cls, version: BuiltModel, config: BackendConfig) -> Capabilities:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
        torch_available = all(_installed(module) for module in ("torch", "transformers"))
        has_checkpoint = "checkpoint" in version.manifest.get("files", {}) and (version.checkpoint_path / "config.json").is_file()
        return cls(
            has_cuda=config.device is not Device.CPU and _cuda_visible(torch_available, providers),
            ort_providers=providers,
            graphs={Precision(name): path for name, path in version.graphs().items()},
            torch_available=torch_available,
            checkpoint=version.checkpoint_path if has_checkpoint else None,
            max_tokens=version.max_tokens,
            cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
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
        return ExecutionProvider.CUDA in providers
    if not (Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")):
        return False
    import torch

    return bool(torch.cuda.is_available())


def plan(requested: BackendKind, config: BackendConfig, caps: Capabilities) -> list[Choice]:
    """The candidates to try, best first; raises BackendUnavailable when none can run here."""
    requested = parse_option(BackendKind, requested, "backend")
    gpu = config.device is not Device.CPU and caps.has_cuda
    if config.device is Device.CUDA and not caps.has_cuda:
        raise BackendUnavailable("device=cuda asked but no CUDA device is visible")
    ort_cuda = ExecutionProvider.CUDA in caps.ort_providers
    tensorrt = config.tensorrt and ExecutionProvider.TENSORRT in caps.ort_providers
    fp16 = Precision.FP16 in caps.graphs
    cpu_graphs = set(caps.graphs) & {Precision.INT8, Precision.FP32}
    torch_ok = caps.torch_available and caps.checkpoint is not None
    no_torch = "torch/transformers not installed" if not caps.torch_available else "no checkpoint in this version"
    where = "device=cpu asked" if config.device is Device.CPU else "no CUDA device visible"

    if requested is BackendKind.TORCH:
        if not torch_ok:
            raise BackendUnavailable(f"model.toml asks backend = torch but {no_torch} (pip install -e '.[build]')")
        if gpu:
            return [_torch(Device.CUDA, config.torch_dtype, "backend = torch, CUDA visible", config, caps)]
        return [_torch(Device.CPU, Precision.FP32, f"backend = torch, {where}", config, caps)]

    if requested is BackendKind.ONNX:
        if gpu and ort_cuda and fp16:
            return [_onnx_cuda("backend = onnx, CUDA visible", tensorrt, config, caps)]
        if config.device is Device.CUDA:
            if not ort_cuda:
                raise BackendUnavailable(
                    f"device=cuda asked but onnxruntime has no CUDA provider (has {list(caps.ort_providers)})"
                )
            raise BackendUnavailable("device=cuda asked but the model version has no fp16 graph; rebuild with fp16")
        why = where if not gpu else "CUDA visible but no ORT CUDA provider or no fp16 graph"
        return [_onnx_cpu(f"backend = onnx, {why}", config, caps)]

    candidates: list[Choice] = []
    if gpu:
        if ort_cuda and fp16:
            trt = " and TensorRT" if tensorrt else ""
            reason = f"auto: CUDA visible, onnxruntime CUDA provider{trt}, fp16 graph built"
            candidates.append(_onnx_cuda(reason, tensorrt, config, caps))
        if torch_ok:
            why = (
                "fp16 graph failed to open"
                if (ort_cuda and fp16)
                else (
                    "no ONNX graph (checkpoint does not export)"
                    if not caps.graphs
                    else "onnxruntime has no CUDA provider"
                    if not ort_cuda
                    else "no fp16 graph built"
                )
            )
            candidates.append(_torch(Device.CUDA, config.torch_dtype, f"auto: CUDA visible, {why}", config, caps))
        elif not (ort_cuda and fp16):
            log.warning(
                "backend auto: CUDA visible but neither onnx (provider %s, fp16 %s) nor torch (%s) can use it",
                ort_cuda,
                fp16,
                no_torch,
            )
    if config.device is not Device.CUDA:
        if (config.cpu_precision is Precision.AUTO and cpu_graphs) or config.cpu_precision in cpu_graphs:
            cpu_why = "CUDA backends failed to open" if candidates else where
            candidates.append(_onnx_cpu(f"auto: {cpu_why}", config, caps))
        elif torch_ok:
            reason = f"auto: {where}, no CPU ONNX graph (checkpoint does not export)"
            candidates.append(_torch(Device.CPU, Precision.FP32, reason, config, caps))
    if not candidates:
        raise BackendUnavailable(
            f"no backend can serve this model here: graphs {_names(caps.graphs)}, cuda {caps.has_cuda}, "
            f"onnxruntime providers {list(caps.ort_providers)}, torch: {'ok' if torch_ok else no_torch}"
        )
    return candidates


def _onnx_cuda(reason: str, tensorrt: bool, config: BackendConfig, caps: Capabilities) -> Choice:
    """The fp16 graph on the CUDA provider through IO binding; with TensorRT, TensorRT first and
    the fp32 graph when built (TensorRT picks its own fp16 kernels from it)."""
    providers: tuple[ExecutionProvider, ...] = (ExecutionProvider.CUDA, ExecutionProvider.CPU)
    graph = caps.graphs[Precision.FP16]
    if tensorrt:
        providers = (ExecutionProvider.TENSORRT, *providers)
        graph = caps.graphs.get(Precision.FP32, graph)
    return Choice(
        BackendKind.ONNX,
        Device.CUDA,
        Precision.FP16,
        graph,
        reason,
        providers=providers,
        io_binding=True,
        length_buckets=_length_buckets(Device.CUDA, config, caps),
    )


def _onnx_cpu(reason: str, config: BackendConfig, caps: Capabilities) -> Choice:
    """The `cpu_precision` graph on the CPU provider; `auto` is int8 when built, else fp32."""
    precision = config.cpu_precision
    notes: tuple[str, ...] = ()
    if precision is Precision.AUTO:
        precision = Precision.INT8 if Precision.INT8 in caps.graphs else Precision.FP32
        notes = () if precision is Precision.INT8 else ("no int8 graph built for this model",)
    if precision not in caps.graphs:
        raise BackendUnavailable(f"no {precision} graph in this model version (have {_names(caps.graphs)})")
    return Choice(
        BackendKind.ONNX,
        Device.CPU,
        precision,
        caps.graphs[precision],
        reason,
        notes,
        providers=(ExecutionProvider.CPU,),
        length_buckets=_length_buckets(Device.CPU, config, caps),
        parallel_runs=config.cpu_parallel_runs or caps.cpu_cores,
    )


def _torch(device: Device, precision: Precision, reason: str, config: BackendConfig, caps: Capabilities) -> Choice:
    assert caps.checkpoint is not None, "plan offers torch only with a checkpoint"
    return Choice(
        BackendKind.TORCH,
        device,
        precision,
        caps.checkpoint,
        reason,
        length_buckets=_length_buckets(device, config, caps),
        cuda_graphs=device is Device.CUDA and config.cuda_graphs,
    )


def _length_buckets(device: Device, config: BackendConfig, caps: Capabilities) -> tuple[int, ...]:
    """Always on CUDA, where each new shape costs a plan; on the CPU only when asked."""
    if device is Device.CUDA or config.cpu_length_buckets:
        return length_buckets(config.length_buckets, caps.max_tokens)
    return ()


def _names(graphs: Mapping[Precision, Path]) -> list[str]:
    return sorted(str(precision) for precision in graphs)


def open_encoder(
    version: BuiltModel,
    requested: BackendKind,
    config: BackendConfig,
    *,
    max_batch: int = 256,
    pad_id: int = 0,
    caps: Capabilities | None = None,
) -> Encoder:
    """Open the encoder `plan` picks for this version, falling back down the list on failure."""
    caps = caps or Capabilities.probe(version, config)
    failures: list[str] = []
    for choice in plan(requested, config, caps):
        choice = dataclasses.replace(choice, reason="; ".join([choice.reason, *(f"skipped {f}" for f in failures)]))
        try:
            encoder = _open(choice, version, config, max_batch, pad_id)
        except BackendUnavailable as exc:
            log.warning("backend %s %s unavailable: %s", choice.backend, choice.device, exc)
            failures.append(f"{choice.backend} {choice.device} ({exc})")
            continue
        if encoder.info.dim != version.dim:
            encoder.close()
            raise BackendUnavailable(f"{choice.backend} gives {encoder.info.dim}-d vectors but the manifest says {version.dim}")
        return encoder
    raise BackendUnavailable("no backend could open this model: " + "; ".join(failures))


def _open(choice: Choice, version: BuiltModel, config: BackendConfig, max_batch: int, pad_id: int) -> Encoder:
    if choice.backend is BackendKind.ONNX:
        return OnnxEncoder(
            choice,
            config,
            dim=version.dim,
            max_tokens=version.max_tokens,
            max_batch=max_batch,
            pad_id=pad_id,
            engine_cache=version.folder / "tensorrt-cache",
        )
    from .torch_backend import TorchEncoder

    return TorchEncoder(choice, config, pooling=version.manifest.get("pooling", "mean"), max_batch=max_batch, pad_id=pad_id)
