"""The math libraries' thread limits of the serving process (threads.py), each in a fresh process:
the limits are process or thread state that must not leak into other tests."""

from __future__ import annotations

import json
import subprocess
import sys

# Prints, as JSON: threadpoolctl's view of every pool and faiss's own thread count, in the main
# thread and in a new worker thread, before and after the call given as argv[1] with argv[2].
PROBE = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy, faiss
from threadpoolctl import threadpool_info
from openemploi import threads

def view():
    seen = {i["filepath"] + ":" + i["user_api"]: i["num_threads"] for i in threadpool_info()}
    seen["faiss.omp_get_max_threads"] = faiss.omp_get_max_threads()
    return seen

def in_worker(setup=None):
    with ThreadPoolExecutor(1, initializer=setup) as pool:
        return pool.submit(view).result()

limit, count = getattr(threads, sys.argv[1]), int(sys.argv[2])
before = {"main": view(), "worker": in_worker()}
if sys.argv[3] == "main":
    limit(count)
    after = {"main": view(), "worker": in_worker()}
else:
    after = {"main": view(), "worker": in_worker(lambda: limit(count))}
print(json.dumps([before, after]))
"""


def probe(function: str, count: int, where: str) -> tuple[dict, dict]:
    command = [sys.executable, "-P", "-c", PROBE, function, str(count), where]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return before, after


def test_one_math_thread_stops_numpys_blas_workers_for_every_thread():
    """numpy's OpenBLAS is process-wide: after the call, no thread's product starts a second worker
    (the spinning one that took a core from onnxruntime)."""
    before, after = probe("limit_math_threads", 1, "main")
    numpy_blas = [key for key in after["main"] if "numpy" in key and key.endswith(":blas")]
    assert numpy_blas and all(after["worker"][key] == 1 for key in numpy_blas)
    assert after["main"].keys() == before["main"].keys()  # the same libraries, only their counts changed


def test_openmp_limits_hold_per_thread_so_index_workers_set_their_own():
    """OpenMP's count is per thread: a worker started with limit_openmp_threads runs faiss on one
    thread, while the main thread keeps the runtime's default."""
    before, after = probe("limit_openmp_threads", 1, "worker")
    assert after["worker"]["faiss.omp_get_max_threads"] == 1
    assert after["main"]["faiss.omp_get_max_threads"] == before["main"]["faiss.omp_get_max_threads"]


def test_zero_leaves_the_libraries_defaults():
    before, after = probe("limit_math_threads", 0, "main")
    assert after == before
    before, after = probe("limit_openmp_threads", 0, "worker")
    assert after == before
