"""How many threads numpy's and faiss's math libraries may start in the serving process.

onnxruntime's runs need every core of a small machine. OpenBLAS's idle workers spin for about
0.1 s after each matrix product, and faiss's OpenMP loops fork and join across cores for a single
query: both take cores from inference. threadpoolctl reaches the libraries loaded in the process
(numpy's OpenBLAS; faiss's OpenBLAS, built on OpenMP, and its OpenMP runtime).

OpenBLAS's thread count is process-wide. OpenMP's is per thread: a limit set in one thread leaves
the others at the runtime's default, so each thread that searches must set its own.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def limit_math_threads(count: int) -> None:
    """At most `count` threads in each BLAS library of the process (numpy's, faiss's); 0 leaves them be."""
    if count > 0:
        threadpool_limits(limits=count, user_api="blas")


def limit_openmp_threads(count: int) -> None:
    """At most `count` OpenMP threads for faiss calls made from the calling thread; 0 leaves them be.

    A thread pool's initializer: each worker then runs a single-query IVF or HNSW search without
    waiting at an OpenMP join for a core that onnxruntime holds.
    """
    if count > 0:
        threadpool_limits(limits=count, user_api="openmp")
