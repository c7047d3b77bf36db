"""The CUDA kernels on numba's CUDA simulator, against the numpy references (tiny shapes).

NUMBA_ENABLE_CUDASIM must be set before numba is imported, and the other kernel tests import it
in this pytest process: so this file runs itself as a script in a subprocess with the variable set
(one subprocess for all kernels), and each test reads its kernel's report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reports() -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["pooling", "fusion", "topk", "dispatch"])
def test_cuda_kernel_on_simulator(reports, kernel):
    report = reports[kernel]
    assert report["cases"] > 0
    assert not report["failures"], "\n\n".join(report["failures"])


# -- the script, run with NUMBA_ENABLE_CUDASIM=1 ------------------------------------------------------
def _pooling_cases(np, K, cuda):
    rng = np.random.default_rng(11)
    shapes = [(0, 3, 4), (2, 0, 4), (2, 3, 0), (1, 1, 1), (1, 4, 20), (3, 5, 37)]
    for n, length, d in shapes:
        hidden = rng.standard_normal((n, length, d)).astype(np.float32)
        for dtype in (np.int32, np.int64):
            mask = (rng.random((n, length)) < 0.6).astype(dtype)
            if n > 1:
                mask[1] = 0  # all padding
            want = K.mean_pool_normalize_reference(hidden, mask)
            got = K.mean_pool_normalize(hidden, mask, backend="cuda")
            assert isinstance(got[0], np.ndarray)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            yield f"host {n}x{length}x{d} {dtype.__name__}"
    hidden = rng.standard_normal((2, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    got = K.mean_pool_normalize(cuda.to_device(hidden), cuda.to_device(mask))  # auto: device in, device out
    assert not isinstance(got[0], np.ndarray)
    for g, w in zip(got, K.mean_pool_normalize_reference(hidden, mask)):
        np.testing.assert_allclose(g.copy_to_host(), w, rtol=1e-5, atol=1e-6)
    yield "device arrays"


def _fusion_cases(np, K, cuda):
    rng = np.random.default_rng(12)

    def check(args, label):
        want = K.fuse_topk_reference(*args)
        got = K.fuse_topk(*args, backend="cuda")
        for g, w in zip(got, want):
            assert g.dtype == w.dtype, label
            np.testing.assert_array_equal(g, w, err_msg=label)
        return label

    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    yield check((*empty, *empty, 5, "rrf", 0.7, None), "empty rrf")
    yield check((*empty, *empty, 5, "weighted", 0.7, []), "empty weighted")
    yield check(([7], [0.5], [], [], 3, "rrf", 0.7, None), "one dense")
    yield check(([], [], [7], [2.0], 3, "weighted", 0.4, [0.25]), "one lexical")
    yield check(([10, 20, 30], [0.9, 0.8, 0.7], [30, 40], [7.0, 3.0], 10, "rrf", 0.7, None), "hand rrf, ties")
    yield check(([1, 2], [0.9, 0.8], [3, 1], [4.0, 2.0], 0, "rrf", 0.7, None), "k = 0")
    for case in range(8):
        a, b = rng.integers(0, 9, 2)
        dense = rng.choice(14, a, replace=False) * (1 << 40 if case % 2 else 1)
        lexical = rng.choice(14, b, replace=False) * (1 << 40 if case % 2 else 1)
        if case == 7 and b > 1:
            lexical[-1] = lexical[0]  # a duplicate: the last occurrence wins
        u = len(K.fusion_candidates(dense, lexical))
        lexical_scores = np.sort(rng.choice([0.0, 1.0, 2.5, 4.0], b))[::-1].astype(np.float32)
        dense_scores = np.sort(rng.random(a))[::-1].astype(np.float32)
        union_dense = rng.choice([0.1, 0.5, 0.9], u).astype(np.float32)
        k = int(rng.integers(1, u + 3)) if u else 2
        for mode in ("rrf", "weighted"):
            yield check((dense, dense_scores, lexical, lexical_scores, k, mode, 0.6, union_dense), f"random {case} {mode}")
    try:
        K.fuse_topk([1], [1.0], [2], [1.0], 2, "weighted", 0.5, [0.3], backend="cuda")
        raise AssertionError("a union_dense of the wrong length was accepted")
    except ValueError:
        yield "union_dense mismatch"


def _topk_cases(np, K, cuda):
    rng = np.random.default_rng(13)
    for queries, n, k in [(1, 1, 1), (3, 40, 5), (17, 60, 8), (2, 6, 10), (2, 6, 0)]:
        scores = np.round(rng.standard_normal((queries, n)), 1).astype(np.float32)  # ties
        rows = rng.permutation(n).astype(np.int64)
        want = K.topk_rows_reference(scores, rows, k)
        got = K.topk_rows(scores, rows, k, backend="cuda")
        for g, w in zip(got, want):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
        yield f"host {queries}x{n} k={k}"
    scores = rng.standard_normal((3, 20)).astype(np.float32)
    rows = np.broadcast_to(np.arange(20, dtype=np.int64), (3, 20)).copy()
    got = K.topk_rows(cuda.to_device(scores), cuda.to_device(rows), 4)  # auto: device in, device out
    assert not isinstance(got[0], np.ndarray)
    for g, w in zip(got, K.topk_rows_reference(scores, rows, 4)):
        np.testing.assert_array_equal(g.copy_to_host(), w)
    yield "device arrays"


def _dispatch_cases(np, K, cuda):
    assert K.cuda_available()
    assert K._dispatch.pick(None, cuda.to_device(np.zeros(2))) == "cuda"
    yield "device input picks cuda"
    assert K._dispatch.pick(None, np.zeros(2)) == "numba"
    yield "host input stays on numba"
    hidden = cuda.to_device(np.ones((1, 2, 3), np.float32))
    normalized, _ = K.mean_pool_normalize(hidden, cuda.to_device(np.ones((1, 2), np.int64)), backend="numba")
    assert isinstance(normalized, np.ndarray)
    yield "host backend copies device inputs back"


def _main() -> None:
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    import numpy as np
    from numba import cuda

    import openemploi.kernels as K

    out = {}
    for name, cases in (
        ("pooling", _pooling_cases),
        ("fusion", _fusion_cases),
        ("topk", _topk_cases),
        ("dispatch", _dispatch_cases),
    ):
        done, failures = [], []
        try:
            for label in cases(np, K, cuda):  # progress is kept if a case fails
                done.append(label)
        except Exception:  # every failure goes into the report
            failures.append(f"after {done[-1:] or 'start'}:\n{traceback.format_exc()}")
        out[name] = {"cases": len(done), "passed": done, "failures": failures}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
