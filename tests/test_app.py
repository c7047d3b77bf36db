"""Process-wide settings `openemploi serve` applies once it serves (app.serve_forever)."""

from __future__ import annotations

import json
import subprocess
import sys

# In a fresh process: threadpoolctl's view of the BLAS and OpenMP libraries, and faiss's own thread count,
# before and after limit_blas_threads(count).
PROBE = """
import json, sys
import numpy, faiss
from threadpoolctl import threadpool_info
from openemploi.app import limit_blas_threads
before = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
before["faiss.omp_get_max_threads"] = faiss.omp_get_max_threads()
limit_blas_threads(int(sys.argv[1]))
after = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
after["faiss.omp_get_max_threads"] = faiss.omp_get_max_threads()
print(json.dumps([before, after]))
"""


def blas_threads(count: int) -> tuple[dict[str, int], dict[str, int]]:
    out = subprocess.run([sys.executable, "-P", "-c", PROBE, str(count)], capture_output=True, text=True, check=True, timeout=120)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return before, after


def test_one_thread_leaves_no_spinning_workers_in_numpy_or_faiss():
    """numpy's OpenBLAS, faiss's OpenBLAS and faiss's OpenMP loops all drop to one thread: no idle
    worker spins on inference's cores."""
    before, after = blas_threads(1)
    assert len(after) >= 4  # numpy's and faiss's OpenBLAS, the OpenMP runtime, faiss's own count
    assert set(after.values()) == {1}
    assert after.keys() == before.keys()


def test_zero_leaves_the_libraries_defaults():
    before, after = blas_threads(0)
    assert after == before
