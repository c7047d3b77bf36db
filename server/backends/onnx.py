"""ONNX Runtime backend: CUDA with the fp16 graph when available, else CPU int8.

It receives padded int64 arrays and returns finished vectors (pooling and
normalisation are inside the graph). It knows nothing of gRPC or batching.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import EncoderInfo

log = logging.getLogger(__name__)

OUTPUT_NAMES = ["embedding", "pooled"]


@dataclass(frozen=True)
class OnnxBackendConfig:
    device: str = "auto"  # auto | cpu | cuda
    cpu_precision: str = "auto"  # auto: int8 when the version has it, else fp32 | int8 | fp32 (strict)
    intra_op_threads: int = 0  # 0 = onnxruntime default (one per physical core)
    inter_op_threads: int = 1
    cuda_device_id: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"backend.device must be auto, cpu or cuda, got {self.device!r}")
        if self.cpu_precision not in ("auto", "int8", "fp32"):
            raise ValueError(f"backend.cpu_precision must be auto, int8 or fp32, got {self.cpu_precision!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0 or self.cuda_device_id < 0:
            raise ValueError("backend thread counts and cuda_device_id must not be negative")


class BackendUnavailable(RuntimeError):
    """The requested device or precision has no model file or no provider here."""


class OnnxEncoder:
    def __init__(self, graphs: dict[str, Path], dim: int, config: OnnxBackendConfig) -> None:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in providers
        if config.device == "cuda" and not has_cuda:
            raise BackendUnavailable(f"device=cuda asked but onnxruntime has no CUDA provider (has {providers})")
        use_cuda = config.device in ("auto", "cuda") and has_cuda and "fp16" in graphs
        if config.device == "cuda" and "fp16" not in graphs:
            raise BackendUnavailable("device=cuda asked but the model version has no fp16 graph; rebuild with fp16")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        if use_cuda:
            precision = "fp16"
            session_providers = [("CUDAExecutionProvider", {"device_id": config.cuda_device_id}), "CPUExecutionProvider"]
            device = f"cuda:{config.cuda_device_id}"
            detail = "CUDA provider present and fp16 graph built"
        else:
            precision = config.cpu_precision
            fallback = ""
            if precision == "auto":
                precision = "int8" if "int8" in graphs else "fp32"
                fallback = "" if precision == "int8" else "; no int8 graph built for this model"
            if precision not in graphs:
                raise BackendUnavailable(f"no {precision} graph in this model version (have {sorted(graphs)})")
            session_providers = ["CPUExecutionProvider"]
            device = "cpu"
            detail = "no CUDA provider" if not has_cuda else "no fp16 graph built"
            if config.device == "cpu":
                detail = "device=cpu asked"
            detail += fallback
        self._session = ort.InferenceSession(str(graphs[precision]), options, providers=session_providers)
        self.info = EncoderInfo("onnx", device, precision, dim, detail)
        log.info("onnx backend: %s %s (%s)", device, precision, detail)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, pooled = self._session.run(
            OUTPUT_NAMES, {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return embedding.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)

    def close(self) -> None:
        self._session = None
