"""ONNX Runtime backend: CUDA (or TensorRT) with the fp16 graph when available, else CPU int8.

It receives padded int64 arrays and returns finished vectors (pooling and
normalisation are inside the graph). It knows nothing of gRPC or batching.
On CUDA, batches are padded to a few length buckets (shapes repeat, so the
provider's per-shape plans are reused) and run through IO binding with device
buffers reused per shape.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .base import EncoderInfo
from .buckets import bucket_for, length_buckets, pad_to
from .options import BackendConfig

log = logging.getLogger(__name__)

OUTPUT_NAMES = ["embedding", "pooled"]
INPUT_NAMES = ("input_ids", "attention_mask")

OnnxBackendConfig = BackendConfig  # the name this config had before the torch backend existed


class BackendUnavailable(RuntimeError):
    """The requested device or precision has no model file or no provider here."""


class DeviceBinding:
    """Run a session through IO binding: inputs copied into device buffers kept per shape.

    With length buckets the shapes repeat, so after the first batch of a shape each call is
    one host-to-device copy per input into an existing buffer, the run, and one copy of the
    outputs back: no device allocation per call. Works on any device ORT knows ("cpu" too,
    which is how the CPU-only test suite exercises it).
    """

    def __init__(self, session, device_type: str, device_id: int = 0, max_shapes: int = 64) -> None:
        self._session = session
        self._device = (device_type, device_id)
        self._max_shapes = max_shapes
        self._buffers: OrderedDict[tuple[str, tuple[int, ...]], object] = OrderedDict()

    def _buffer(self, name: str, array: np.ndarray):
        import onnxruntime as ort

        key = (name, array.shape)
        value = self._buffers.get(key)
        if value is not None:
            self._buffers.move_to_end(key)
            value.update_inplace(array)
            return value
        value = ort.OrtValue.ortvalue_from_numpy(array, *self._device)
        self._buffers[key] = value
        if len(self._buffers) > self._max_shapes:
            self._buffers.popitem(last=False)
        return value

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        binding = self._session.io_binding()
        for name, array in zip(INPUT_NAMES, (input_ids, attention_mask)):
            binding.bind_ortvalue_input(name, self._buffer(name, np.ascontiguousarray(array, dtype=np.int64)))
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cpu")
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        embedding, pooled = binding.copy_outputs_to_cpu()
        return embedding, pooled


def _cuda_providers(config: BackendConfig, available: list[str], engine_cache: Path | None, max_batch: int, max_tokens: int):
    cuda = ("CUDAExecutionProvider", {"device_id": config.cuda_device_id})
    if not (config.tensorrt and "TensorrtExecutionProvider" in available):
        return [cuda, "CPUExecutionProvider"]

    def shapes(batch: int, length: int) -> str:
        return f"input_ids:{batch}x{length},attention_mask:{batch}x{length}"

    options = {
        "device_id": config.cuda_device_id,
        "trt_fp16_enable": True,
        # one engine covers every batch and length up to the limits: no rebuild per new shape
        "trt_profile_min_shapes": shapes(1, 1),
        "trt_profile_opt_shapes": shapes(min(32, max_batch), min(128, max_tokens)),
        "trt_profile_max_shapes": shapes(max_batch, max_tokens),
    }
    if engine_cache is not None:
        engine_cache.mkdir(parents=True, exist_ok=True)
        options.update(
            trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache),
            trt_timing_cache_enable=True, trt_timing_cache_path=str(engine_cache),
        )
    return [("TensorrtExecutionProvider", options), cuda, "CPUExecutionProvider"]


class OnnxEncoder:
    def __init__(
        self,
        graphs: dict[str, Path],
        dim: int,
        config: BackendConfig,
        *,
        max_tokens: int = 512,
        max_batch: int = 256,
        pad_id: int = 0,
        engine_cache: Path | None = None,
        reason: str = "",
    ) -> None:
        """``reason``: why the caller chose this backend; it replaces the encoder's own in ``info.detail``.

        ``max_tokens`` caps the length buckets (the model's limit); ``max_batch`` and
        ``engine_cache`` size and store TensorRT engines; ``pad_id`` fills padded positions.
        """
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
        if not config.cpu_spin_wait:
            # Idle ORT workers otherwise spin on the cores the event loop needs to admit or refuse calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if use_cuda:
            precision = "fp16"
            session_providers = _cuda_providers(config, providers, engine_cache, max_batch, max_tokens)
            device = f"cuda:{config.cuda_device_id}"
            detail = reason or "CUDA provider present and fp16 graph built"
            graph = graphs["fp16"]
            if session_providers[0][0] == "TensorrtExecutionProvider" and "fp32" in graphs:
                graph = graphs["fp32"]  # TensorRT picks its own fp16 kernels from the fp32 graph
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
            detail = (reason or detail) + fallback
            graph = graphs[precision]
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=session_providers)
        except Exception as exc:  # ORT raises its own Fail/RuntimeError types
            if not use_cuda:
                raise
            raise BackendUnavailable(f"onnxruntime could not open the fp16 graph on CUDA: {exc}") from exc
        if use_cuda:
            running = self._session.get_providers()
            if "CUDAExecutionProvider" not in running:
                raise BackendUnavailable(f"onnxruntime could not start its CUDA provider (running {running}); see its log")
            if running[0] == "TensorrtExecutionProvider":
                detail = "TensorRT provider (fp16) over CUDA; " + detail
            elif config.tensorrt:
                detail = "tensorrt asked but onnxruntime has no TensorRT provider; " + detail
        bucket_here = use_cuda or config.cpu_length_buckets
        self._buckets = length_buckets(config.length_buckets, max_tokens) if bucket_here else ()
        self._pad_id = pad_id
        self._binding = DeviceBinding(self._session, "cuda", config.cuda_device_id) if use_cuda else None
        if self._buckets:
            detail += f"; length buckets {list(self._buckets)}"
        self.info = EncoderInfo("onnx", device, precision, dim, detail)
        log.info("onnx backend: %s %s (%s)", device, precision, detail)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = input_ids.shape[1]
        if self._buckets:
            input_ids, attention_mask = pad_to(input_ids, attention_mask, bucket_for(width, self._buckets), pad_id=self._pad_id)
        if self._binding is not None:
            embedding, pooled = self._binding.run(input_ids, attention_mask)
        else:
            embedding, pooled = self._session.run(
                OUTPUT_NAMES, {"input_ids": input_ids, "attention_mask": attention_mask}
            )
        return embedding.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)

    def close(self) -> None:
        self._session = None
        self._binding = None
