"""numba kernels (pooling, score fusion + top-k, exact-search top-k), each with a numpy reference.

Every kernel comes in four functions of the same signature:

* ``<name>_reference``: numpy, the specification the others are tested against;
* ``<name>_numba``: numba CPU (``@njit(cache=True)``, one thread: ``parallel=True`` did not pay on the
  2 shared cores the service runs on, see the benchmark);
* ``<name>_cuda``: numba CUDA (tested on the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``);
* ``<name>(..., backend=None)``: the entry point. ``backend=None`` runs numba CPU, or CUDA when an
  input already lives on a CUDA device and ``numba.cuda.is_available()``; ``backend`` may force
  ``"numpy"``, ``"numba"`` or ``"cuda"`` (an error when no device is available).

``benchmarks/kernels_bench.py`` measures each numba kernel against its numpy reference; the product
uses a kernel only where the numba version is faster (see the verdicts in that benchmark's JSON).
"""

import numpy as np

from ._dispatch import BACKENDS, BackendUnavailable, cuda_available
from .fusion import (
    RRF_K,
    Fused,
    fuse_topk,
    fuse_topk_cuda,
    fuse_topk_numba,
    fuse_topk_reference,
    fusion_candidates,
)
from .pooling import (
    mean_pool_normalize,
    mean_pool_normalize_cuda,
    mean_pool_normalize_numba,
    mean_pool_normalize_reference,
)
from .topk import topk_rows, topk_rows_cuda, topk_rows_numba, topk_rows_reference


def warm_up() -> None:
    """Compile the CPU kernels that searches run, or load them from numba's cache, before the server
    says SERVING: otherwise the first Search or Match request pays for it (0.35 s cached, 0.5 s cold)."""
    topk_rows_numba(np.zeros((1, 4), np.float32), np.arange(4), 2)
    fuse_topk_numba([1, 2], [0.5, 0.4], [2, 3], [1.0, 0.5], 2, "rrf")


__all__ = [
    "BACKENDS",
    "RRF_K",
    "BackendUnavailable",
    "Fused",
    "cuda_available",
    "fuse_topk",
    "fuse_topk_cuda",
    "fuse_topk_numba",
    "fuse_topk_reference",
    "fusion_candidates",
    "mean_pool_normalize",
    "mean_pool_normalize_cuda",
    "mean_pool_normalize_numba",
    "mean_pool_normalize_reference",
    "topk_rows",
    "topk_rows_cuda",
    "topk_rows_numba",
    "topk_rows_reference",
    "warm_up",
]
