"""Backend selection shared by the kernels: numpy reference, numba CPU (default), numba CUDA.

``backend=None`` (or ``"auto"``) picks numba CPU, unless an input already lives on a CUDA device
(a numba device array, or anything exposing ``__cuda_array_interface__``: CuPy, torch) and
``numba.cuda.is_available()``: then the CUDA kernel runs and the outputs stay on the device.
``backend="cuda"`` runs on the device whatever the inputs (host arrays are copied there and the
outputs come back as numpy arrays); it raises when ``numba.cuda.is_available()`` is false.
``numba.cuda`` is imported only when a CUDA path is considered, never for host inputs.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

BACKENDS = ("numpy", "numba", "cuda")


class BackendUnavailable(RuntimeError):
    """backend="cuda" was asked but numba.cuda has no usable device."""


def on_device(x: Any) -> bool:
    """True for arrays that live on a CUDA device (numba device arrays, CuPy, torch CUDA tensors)."""
    if x is None or isinstance(x, np.ndarray | int | float | str):
        return False
    return hasattr(x, "__cuda_array_interface__") or bool(getattr(x, "__cuda_ndarray__", False))


@functools.cache
def cuda_available() -> bool:
    try:
        from numba import cuda
    except Exception:  # pragma: no cover - numba without its cuda package
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - a broken driver means no CUDA
        return False


def pick(backend: str | None, *arrays: Any) -> str:
    """The backend a call runs on; see the module docstring."""
    if backend is None or backend == "auto":
        if any(on_device(a) for a in arrays):
            if not cuda_available():
                raise BackendUnavailable("an input is a CUDA array but numba.cuda.is_available() is False")
            return "cuda"
        return "numba"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} (or None for auto)")
    if backend == "cuda" and not cuda_available():
        raise BackendUnavailable("backend='cuda' asked but numba.cuda.is_available() is False")
    return backend


def to_host(x: Any) -> Any:
    """A device array copied to a numpy array (host backends given device inputs); others unchanged."""
    if not on_device(x):
        return x
    if hasattr(x, "copy_to_host"):
        return x.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(x).copy_to_host()


def to_device(x: Any) -> Any:
    """A numba device array for ``x`` (host arrays are copied; device arrays are wrapped, not copied)."""
    from numba import cuda

    if cuda.devicearray.is_cuda_ndarray(x):
        return x
    if on_device(x):
        return cuda.as_cuda_array(x)
    return cuda.to_device(np.ascontiguousarray(x))


def cuda_threads(default: int) -> int:
    """Threads per block: ``default`` on a real GPU, 16 under the simulator (one Python thread each)."""
    from numba import config

    return 16 if config.ENABLE_CUDASIM else default


def as_int_array(x: Any, dtype: type, what: str, ndim: int = 1) -> np.ndarray:
    """A C-contiguous integer array of ``dtype``; other integer dtypes are range-checked then cast."""
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype)
    if arr.dtype.kind not in "iub":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    if arr.dtype.kind != "b" and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{what} has values outside {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


def as_k(k: Any) -> int:
    """A result count: a non-negative integer (bool is refused, numpy integers are accepted)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return int(k)
