"""torch backend: the Hugging Face checkpoint itself, for GPUs whose onnxruntime has no CUDA
provider and for checkpoints that do not export to ONNX.

fp32 on the CPU; fp16 or bf16 on CUDA, attention through ``scaled_dot_product_attention``
(``attn_implementation="sdpa"``). Batches are padded to length buckets (and, with CUDA graphs,
to batch buckets), so each (batch, length) shape can be captured once as a CUDA graph and
replayed. Pooling (mean, or CLS as a mask on the first position) and L2 normalisation are
``kernels.mean_pool_normalize``: numba on the CPU, numba CUDA on the device when numba sees
it, otherwise the same formula in torch. Output is the ONNX graph's: (normalized, pooled).
It opens the `Choice` `select.plan` made (checkpoint, device, dtype, buckets, CUDA graphs) and
decides none of it; it knows nothing of gRPC or batching.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from openemploi import kernels

from ..padding import widen
from .base import BackendKind, BackendUnavailable, Choice, Device, EncoderInfo, Precision
from .buckets import batch_bucket, bucket_for
from .options import BackendConfig

log = logging.getLogger(__name__)

MAX_GRAPHS = 64  # captured shapes kept; other shapes run eagerly
POOLINGS = ("mean", "cls")


@dataclass
class _Graph:
    """One captured forward pass: copy inputs into ``ids``/``mask``, replay, read ``hidden``."""

    graph: Any
    ids: Any
    mask: Any
    hidden: Any


class TorchEncoder:
    def __init__(
        self, choice: Choice, config: BackendConfig, *, pooling: str = "mean", max_batch: int = 256, pad_id: int = 0
    ) -> None:
        """Open a torch ``choice``; ``config`` gives the CPU threads and the CUDA device.

        ``max_batch`` caps the batch buckets of CUDA graphs; ``pad_id`` fills padded positions.
        """
        try:
            import torch
            from transformers import AutoConfig, AutoModel
        except ImportError as exc:
            raise BackendUnavailable(
                f"the torch backend needs torch and transformers (pip install -e '.[build]'): {exc}"
            ) from exc
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self._torch = torch
        self._pooling = pooling
        self._pad_id = pad_id
        self._max_batch = max_batch
        self._lock = threading.Lock()  # static graph buffers: one batch at a time
        on_cuda = choice.device is Device.CUDA
        if on_cuda:
            if not torch.cuda.is_available():
                raise BackendUnavailable("device=cuda asked but torch sees no CUDA device")
            if choice.precision is Precision.BF16 and not torch.cuda.is_bf16_supported():
                raise BackendUnavailable("torch_dtype=bf16 asked but this GPU has no bf16 support; use fp16")
            self._device = torch.device(str(Device.CUDA), config.cuda_device_id)
        else:
            self._device = torch.device(str(Device.CPU))
            if config.intra_op_threads:
                torch.set_num_threads(config.intra_op_threads)  # process-wide: torch has no per-model pool
        dtype = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[choice.precision]
        from transformers.utils import logging as hf_logging

        # as in build/export.py: no per-load weight report ("pooler MISSING": we never use it) or bar
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            hf_config = AutoConfig.from_pretrained(choice.model_path)
            model = AutoModel.from_pretrained(choice.model_path, attn_implementation="sdpa", dtype=dtype)
        except (OSError, ValueError) as exc:
            raise BackendUnavailable(f"cannot load the checkpoint {choice.model_path} with transformers: {exc}") from exc
        if hf_config.model_type in ("bert", "roberta", "xlm-roberta") and getattr(model, "pooler", None) is not None:
            model.pooler = None  # we pool ourselves; these models' forward skips a None pooler
        self._model = model.to(self._device).eval()
        dim = int(hf_config.hidden_size)
        notes = []
        self._buckets = choice.length_buckets
        if self._buckets:
            notes.append(f"length buckets {list(self._buckets)}")
        self._use_graphs = choice.cuda_graphs
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self._use_graphs else None
        if self._use_graphs:
            notes.append("CUDA graphs per (batch, length) bucket")
        self._numba_cuda = on_cuda and self._numba_pool_works()
        if on_cuda:
            notes.append("pooling: numba CUDA" if self._numba_cuda else "pooling: torch (numba CUDA unusable here)")
        detail = "; ".join([d for d in (choice.reason, f"transformers {type(model).__name__} sdpa", *notes) if d])
        where = choice.device.placement(config.cuda_device_id)
        self.info = EncoderInfo(BackendKind.TORCH, where, choice.precision, dim, detail)
        log.info("torch backend: %s %s (%s)", where, choice.precision, detail)

    # ------------------------------------------------------------------ encode

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, width = input_ids.shape
        length = bucket_for(width, self._buckets)
        padded_rows = batch_bucket(rows, self._max_batch) if self._use_graphs else rows
        ids, mask = widen(input_ids, attention_mask, length, padded_rows, self._pad_id)
        pool_mask = attention_mask if self._pooling == "mean" else _first_position(attention_mask)
        pool_mask = widen(pool_mask, pool_mask, length, rows)[1]
        with self._lock, self._torch.inference_mode():
            hidden = self._forward(ids, mask)[:rows]
            return self._pool(hidden, pool_mask)

    def _forward(self, ids: np.ndarray, mask: np.ndarray):
        torch = self._torch
        if self._use_graphs:
            graph = self._graph(ids.shape)
            if graph is not None:
                graph.ids.copy_(torch.from_numpy(ids))
                graph.mask.copy_(torch.from_numpy(mask))
                graph.graph.replay()
                return graph.hidden
        ids_t = torch.from_numpy(ids).to(self._device)
        mask_t = torch.from_numpy(mask).to(self._device)
        return self._model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

    def _pool(self, hidden, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        if self._device.type == Device.CPU:
            return kernels.mean_pool_normalize(hidden.float().numpy(), mask)
        hidden = hidden.float().contiguous()
        mask_t = torch.from_numpy(np.ascontiguousarray(mask)).to(self._device)
        if self._numba_cuda:
            # torch and numba both launch on the legacy default stream: the kernel sees `hidden` done
            normalized, pooled = kernels.mean_pool_normalize(hidden, mask_t)
            return normalized.copy_to_host(), pooled.copy_to_host()
        weights = mask_t.to(hidden.dtype)
        pooled_t = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
        normalized_t = pooled_t / pooled_t.norm(dim=-1, keepdim=True).clamp(min=kernels.pooling.NORM_EPS)
        return normalized_t.cpu().numpy(), pooled_t.cpu().numpy()

    def _numba_pool_works(self) -> bool:
        """numba may see the GPU yet fail to compile (no NVVM in a runtime image): try it once here."""
        if not kernels.cuda_available():
            return False
        torch = self._torch
        try:
            hidden = torch.arange(2 * 3 * 4, dtype=torch.float32, device=self._device).reshape(2, 3, 4)
            mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.int64, device=self._device)
            normalized, _ = kernels.mean_pool_normalize(hidden, mask)
            expected, _ = kernels.mean_pool_normalize_reference(hidden.cpu().numpy(), mask.cpu().numpy())
            return bool(np.allclose(normalized.copy_to_host(), expected, atol=1e-5))
        except Exception as exc:
            log.warning("torch backend: numba CUDA pooling unusable here, pooling in torch: %s", exc)
            return False

    # ------------------------------------------------------------------ CUDA graphs

    def _graph(self, shape: tuple[int, int]) -> _Graph | None:
        """The graph of this shape, captured on first use after a warm-up run (None: run eagerly)."""
        if shape in self._graphs:
            return self._graphs[shape]
        if len(self._graphs) >= MAX_GRAPHS:
            return None
        torch = self._torch
        length = shape[1]
        ids = torch.full(shape, self._pad_id, dtype=torch.int64, device=self._device)
        mask = torch.ones(shape, dtype=torch.int64, device=self._device)
        if length > 1:
            mask[:, -1] = 0  # warm up the masked attention path the capture records
        try:
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._model(input_ids=ids, attention_mask=mask)
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # One pool for every shape: safe here because each replay's output is read before the
            # next replay (one batch at a time, under the lock). thread_local: other threads' CUDA
            # work (FAISS, numba) during a capture must not abort it.
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
        except Exception as exc:
            log.warning("torch backend: CUDA graph capture failed for shape %s, running without graphs: %s", shape, exc)
            self._use_graphs = False
            self.info = dataclasses.replace(self.info, detail=f"{self.info.detail}; CUDA graphs off ({str(exc)[:200]})")
            return None
        captured = _Graph(graph, ids, mask, hidden)
        self._graphs[shape] = captured
        return captured

    @property
    def graph_shapes(self) -> list[tuple[int, int]]:
        """Shapes captured so far (benchmarks and logs)."""
        return sorted(self._graphs)

    def close(self) -> None:
        self._graphs.clear()
        self._model = None
        if self._device.type == Device.CUDA:
            self._torch.cuda.empty_cache()


def _first_position(attention_mask: np.ndarray) -> np.ndarray:
    """CLS pooling as mean pooling over a mask that keeps only the first position."""
    mask = np.zeros_like(attention_mask)
    mask[:, 0] = attention_mask[:, 0]
    return mask
