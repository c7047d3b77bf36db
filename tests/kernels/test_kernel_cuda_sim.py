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
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["pooling", "fusion", "skills", "dispatch"])
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


def _skills_cases(np, K, cuda):
    rng = np.random.default_rng(13)

    def csr(items):
        indptr = np.zeros(len(items) + 1, np.int64)
        indptr[1:] = np.cumsum([len(i) for i in items])
        return indptr, np.array([s for i in items for s in i], np.int32)

    def check(profile, indptr, skill_ids, weights, label):
        want = K.skill_overlap_reference(profile, indptr, skill_ids, weights)
        got = K.skill_overlap(profile, indptr, skill_ids, weights, backend="cuda")
        np.testing.assert_array_equal(got[1], want[1], err_msg=label)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=label)
        return label

    yield check(np.zeros(0, np.int32), *csr([]), None, "no items")
    yield check(np.array([1, 3], np.int32), *csr([[], [1], [0, 1, 3]]), None, "hand")
    for case in range(5):
        vocab = 12
        items = [np.sort(rng.choice(vocab, rng.integers(0, 6), replace=False)).tolist() for _ in range(rng.integers(1, 20))]
        profile = np.sort(rng.choice(vocab, rng.integers(0, 8), replace=False)).astype(np.int32)
        weights = None if case % 2 else (rng.integers(0, 4, vocab) / 2).astype(np.float32)
        yield check(profile, *csr(items), weights, f"random {case}")
    indptr, skill_ids = csr([[1, 2], [2, 5]])
    got = K.skill_overlap(cuda.to_device(np.array([2], np.int32)), cuda.to_device(indptr), cuda.to_device(skill_ids))
    assert not isinstance(got[0], np.ndarray)
    np.testing.assert_allclose(got[0].copy_to_host(), [0.5, 0.5])
    yield "device arrays"
    for bad, label in (
        ((np.array([2], np.int32), *csr([[2, 1]]), None), "unsorted item"),
        ((np.array([2], np.int32), np.array([0, 2, 1, 2]), np.array([1, 2], np.int32), None), "bad indptr"),
        ((np.array([2], np.int32), *csr([[1, 9]]), np.ones(4, np.float32)), "id outside weights"),
    ):
        try:
            K.skill_overlap(*bad, backend="cuda")
            raise AssertionError(f"{label} was accepted")
        except ValueError:
            yield label


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

    import kernels as K

    out = {}
    for name, cases in (("pooling", _pooling_cases), ("fusion", _fusion_cases), ("skills", _skills_cases), ("dispatch", _dispatch_cases)):
        done, failures = [], []
        try:
            for label in cases(np, K, cuda):  # progress is kept if a case fails
                done.append(label)  # noqa: PERF402
        except Exception:  # noqa: BLE001 - every failure goes into the report
            failures.append(f"after {done[-1:] or 'start'}:\n{traceback.format_exc()}")
        out[name] = {"cases": len(done), "passed": done, "failures": failures}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
