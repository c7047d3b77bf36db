"""`[backend]` in the server config: how encoders run (device, precision, threads, GPU options).

Which backend serves a model (onnx or torch) is the model's own choice (`backend` in its
model.toml, `auto` by default there); these keys tune whichever runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Device, Precision, parse_option
from .buckets import DEFAULT_LENGTH_BUCKETS

CPU_PRECISIONS = (Precision.AUTO, Precision.INT8, Precision.FP32)
TORCH_DTYPES = (Precision.FP16, Precision.BF16)


@dataclass(frozen=True)
class BackendConfig:
    device: Device = Device.AUTO
    cpu_precision: Precision = Precision.AUTO  # auto: int8 when the version has it, else fp32 | int8 | fp32 (strict)
    intra_op_threads: int = 0  # 0 = runtime default (one per physical core); 1 per run with cpu_parallel_runs > 1
    inter_op_threads: int = 1
    cpu_parallel_runs: int = 0  # 0 = one per usable core; 1 = one run per batch on every intra-op thread
    cpu_spin_wait: bool = False  # let idle onnxruntime threads spin (a little faster alone, starves the event loop)
    # numpy's BLAS threads in `openemploi serve` once it serves, and faiss's OpenMP threads in the index
    # workers that search (0 = the libraries' defaults): both take cores onnxruntime needs (threads.py).
    math_threads: int = 1
    cuda_device_id: int = 0
    torch_dtype: Precision = Precision.FP16  # torch backend on CUDA: fp16 | bf16 (CPU always runs fp32)
    cuda_graphs: bool = False  # torch backend on CUDA: one CUDA graph per (batch, length) bucket
    tensorrt: bool = False  # onnx backend on CUDA: TensorRT provider first when onnxruntime has it
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS  # () = pad to the batch's longest text only
    cpu_length_buckets: bool = False  # also bucket on the CPU (off: it only adds padded tokens there)

    def __post_init__(self) -> None:
        # The config loader hands over the TOML or environment strings: make them enum members.
        object.__setattr__(self, "device", parse_option(Device, self.device, "backend.device"))
        object.__setattr__(
            self, "cpu_precision", parse_option(Precision, self.cpu_precision, "backend.cpu_precision", CPU_PRECISIONS)
        )
        object.__setattr__(self, "torch_dtype", parse_option(Precision, self.torch_dtype, "backend.torch_dtype", TORCH_DTYPES))
        counts = (self.intra_op_threads, self.inter_op_threads, self.cpu_parallel_runs, self.math_threads, self.cuda_device_id)
        if any(count < 0 for count in counts):
            raise ValueError("backend thread counts, cpu_parallel_runs and cuda_device_id must not be negative")
        # ... and tuples as strings ("16,32,64" from the environment): make them ints.
        try:
            buckets = tuple(sorted({int(size) for size in self.length_buckets}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"backend.length_buckets must be integers, got {self.length_buckets!r}") from exc
        if any(size < 1 for size in buckets):
            raise ValueError(f"backend.length_buckets must be positive, got {self.length_buckets!r}")
        object.__setattr__(self, "length_buckets", buckets)
