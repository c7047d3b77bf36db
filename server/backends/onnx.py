"""ONNX Runtime backend: opens the graph a `Choice` names, on the providers it names.

It receives padded int64 arrays and returns finished vectors (pooling and
normalisation are inside the graph). It knows nothing of gRPC or batching and
decides nothing: `select.plan` picked the graph, the providers, IO binding, the
length buckets and the CPU parallel runs. On the CPU, a batch is split into
``parallel_runs`` groups of similar length, each run at once on its own
single-threaded call: at serving batch sizes a 2-thread run spends much of its
time synchronising its threads op by op, while two 1-thread runs share nothing
(benchmarks/README.md, "Packed graphs and CPU parallel runs": 1.3-1.6x the
texts/s on two cores). On CUDA, batches are padded to a few length buckets (shapes
repeat, so the provider's per-shape plans are reused) and run through IO binding
with device buffers reused per shape.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..padding import widen
from .base import BackendKind, BackendUnavailable, Choice, Device, EncoderInfo, ExecutionProvider
from .buckets import bucket_for
from .options import BackendConfig

log = logging.getLogger(__name__)

OUTPUT_NAMES = ["embedding", "pooled"]
INPUT_NAMES = ("input_ids", "attention_mask")


class DeviceBinding:
    """Run a session through IO binding: inputs copied into device buffers kept per shape.

    With length buckets the shapes repeat, so after the first batch of a shape each call is
    one host-to-device copy per input into an existing buffer, the run, and one copy of the
    outputs back: no device allocation per call. Works on any device ORT knows (the CPU too,
    which is how the CPU-only test suite exercises it).
    """

    def __init__(self, session, device: Device, device_id: int = 0, max_shapes: int = 64) -> None:
        self._session = session
        self._device = (str(device), device_id)
        self._max_shapes = max_shapes
        self._buffers: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()  # onnxruntime OrtValues

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
            binding.bind_output(name, str(Device.CPU))
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        embedding, pooled = binding.copy_outputs_to_cpu()
        return embedding, pooled


def _session_providers(
    choice: Choice, config: BackendConfig, engine_cache: Path | None, max_batch: int, max_tokens: int
) -> list[str | tuple[str, dict]]:
    """The Choice's providers as onnxruntime takes them, each with its options."""
    entries: list[str | tuple[str, dict]] = []
    for provider in choice.providers:
        if provider is ExecutionProvider.CUDA:
            entries.append((provider.value, {"device_id": config.cuda_device_id}))
        elif provider is ExecutionProvider.TENSORRT:
            entries.append((provider.value, _tensorrt_options(config, engine_cache, max_batch, max_tokens)))
        else:
            entries.append(provider.value)
    return entries


def _tensorrt_options(config: BackendConfig, engine_cache: Path | None, max_batch: int, max_tokens: int) -> dict:
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
            trt_engine_cache_enable=True,
            trt_engine_cache_path=str(engine_cache),
            trt_timing_cache_enable=True,
            trt_timing_cache_path=str(engine_cache),
        )
    return options


def split_rows(lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """Row indices of at most ``parts`` non-empty groups, by length, of about equal token counts.

    Sorting first keeps each group's own padding small; equal token counts keep the runs of
    about equal duration, so none waits long for the slowest.
    """
    order = np.argsort(lengths, kind="stable")
    parts = max(1, min(parts, len(order)))
    if parts == 1:
        return [order]
    cumulative = np.cumsum(lengths[order])
    cuts = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, parts) / parts, side="right")
    cuts = np.unique(np.clip(cuts, 1, len(order) - 1))
    return [group for group in np.split(order, cuts) if len(group)]


class OnnxEncoder:
    def __init__(
        self,
        choice: Choice,
        config: BackendConfig,
        *,
        dim: int,
        max_tokens: int = 512,
        max_batch: int = 256,
        pad_id: int = 0,
        engine_cache: Path | None = None,
    ) -> None:
        """Open an onnx ``choice``; ``config`` gives the thread counts and the CUDA device.

        ``max_tokens``, ``max_batch`` and ``engine_cache`` size and store TensorRT engines;
        ``pad_id`` fills padded positions.
        """
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        on_cuda = choice.device is Device.CUDA
        # One run at a time on CUDA (the device serialises them) and with IO binding (its
        # device buffers are per shape, not per thread).
        self._parallel_runs = 1 if on_cuda or choice.io_binding else choice.parallel_runs
        # Parallel runs each take one thread unless intra_op_threads says otherwise.
        threads = config.intra_op_threads or (1 if self._parallel_runs > 1 else 0)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = config.inter_op_threads
        if not config.cpu_spin_wait:
            # Idle ORT workers otherwise spin on the cores the event loop needs to admit or refuse calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _session_providers(choice, config, engine_cache, max_batch, max_tokens)
        try:
            self._session = ort.InferenceSession(str(choice.model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/RuntimeError types
            if not on_cuda:
                raise
            raise BackendUnavailable(f"onnxruntime could not open the fp16 graph on CUDA: {exc}") from exc
        opened: list[str] = []  # what onnxruntime actually started, told before the reason
        if on_cuda:
            running = self._session.get_providers()
            if ExecutionProvider.CUDA not in running:
                raise BackendUnavailable(f"onnxruntime could not start its CUDA provider (running {running}); see its log")
            if running[0] == ExecutionProvider.TENSORRT:
                opened.append("TensorRT provider (fp16) over CUDA")
            elif config.tensorrt:
                opened.append("tensorrt asked but onnxruntime has no TensorRT provider")
        self._buckets = choice.length_buckets
        self._pad_id = pad_id
        self._binding = DeviceBinding(self._session, choice.device, config.cuda_device_id) if choice.io_binding else None
        # The calling thread runs one group itself: parallel_runs - 1 helpers.
        self._helpers = (
            ThreadPoolExecutor(self._parallel_runs - 1, thread_name_prefix="onnx-run") if self._parallel_runs > 1 else None
        )
        buckets = [f"length buckets {list(self._buckets)}"] if self._buckets else []
        runs = [f"{self._parallel_runs} parallel runs of {threads} thread(s)"] if self._parallel_runs > 1 else []
        detail = "; ".join(part for part in (*opened, choice.reason, *choice.notes, *buckets, *runs) if part)
        device = choice.device.placement(config.cuda_device_id)
        self.info = EncoderInfo(BackendKind.ONNX, device, choice.precision, dim, detail)
        log.info("onnx backend: %s %s (%s)", device, choice.precision, detail)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._helpers is None or len(input_ids) < 2:
            return self._run(input_ids, attention_mask)
        lengths = attention_mask.sum(axis=1)
        groups = split_rows(lengths, self._parallel_runs)
        if len(groups) == 1:
            return self._run(input_ids, attention_mask)
        pending = [self._helpers.submit(self._run_rows, input_ids, attention_mask, lengths, rows) for rows in groups[1:]]
        try:
            first = self._run_rows(input_ids, attention_mask, lengths, groups[0])
        except BaseException:
            for future in pending:
                future.exception()  # wait: the caller may reuse or free these arrays once we raise
            raise
        results = [first, *(future.result() for future in pending)]
        embedding = np.empty((len(input_ids), results[0][0].shape[1]), dtype=np.float32)
        pooled = np.empty((len(input_ids), results[0][1].shape[1]), dtype=np.float32)
        for rows, (group_embedding, group_pooled) in zip(groups, results):
            embedding[rows] = group_embedding
            pooled[rows] = group_pooled
        return embedding, pooled

    def _run_rows(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, lengths: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One group of rows, cut to its own longest text (rows are right-padded)."""
        width = max(int(lengths[rows].max()), 1)
        return self._run(np.ascontiguousarray(input_ids[rows, :width]), np.ascontiguousarray(attention_mask[rows, :width]))

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width = input_ids.shape[1]
        if self._buckets:
            input_ids, attention_mask = widen(input_ids, attention_mask, bucket_for(width, self._buckets), pad_id=self._pad_id)
        if self._binding is not None:
            embedding, pooled = self._binding.run(input_ids, attention_mask)
        else:
            embedding, pooled = self._session.run(OUTPUT_NAMES, {"input_ids": input_ids, "attention_mask": attention_mask})
        return embedding.astype(np.float32, copy=False), pooled.astype(np.float32, copy=False)

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
            self._helpers = None
        self._session = None
        self._binding = None
