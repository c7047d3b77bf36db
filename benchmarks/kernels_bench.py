#!/usr/bin/env python3
"""The numba kernels of ``kernels/`` against their numpy references, on realistic sizes.

    .venv/bin/python benchmarks/kernels_bench.py [--out PATH] [--rounds 7] [--no-parallel]

What is timed, for each kernel, is the public function of each implementation:
``<name>_numba`` (numba CPU, after a warm-up call that compiles it or loads it from numba's
cache) against ``<name>_reference`` (numpy). Both include the same argument checks, so the ratio
is what a caller saves by switching. Cases:

* pooling ``mean_pool_normalize``: hidden float32 [64, 64, 384] (a batch of the default model's
  token states), int64 mask; twice: lengths uniform in 8..64 (padding, as in an unsorted batch)
  and no padding at all (the server sorts queued texts by length, so real batches pad little).
* fusion ``fuse_topk``: 300 dense + 300 lexical candidates (ids drawn from 1M sequence numbers,
  ~half of the lexical ids also in the dense list), k = 10, rrf and weighted; many calls.
* topk ``topk_rows``: the scores of a batch-64 search over 20,000 rows, and of one query over
  100,000, k = 10. Its numpy side is not the reference (a full sort, the specification) but the
  fastest numpy way, which server/index/flat.py used before the kernel: ``argpartition`` at the
  (k+1)-th, a tie check, then ``lexsort`` of the k (``topk_argpartition`` below, checked equal).

Timing: for each case, ``--rounds`` rounds; in each round the two implementations run a batch of
calls each, alternating which goes first (the machine may be shared: interleaving exposes both to
the same load). Per-call time = batch time / calls; the table gives the median over rounds (and
the min in the JSON). ``speedup = numpy time / numba time`` (> 1: numba is faster). A case is
``faster`` when numba wins by more than 5% by both the median and the min of the rounds,
``slower`` when it loses by that much by both, else ``within noise``. A kernel **beats numpy**
when every one of its cases is ``faster``; the product keeps a kernel only where it does.

Unless ``--no-parallel``, the table also shows a ``parallel=True`` (``prange``) variant of the
pooling loop, defined here only, to document why the product kernels are single-threaded.
Every timed result is first checked against the reference.

Writes JSON to ``benchmarks/results/kernels-<YYYY-MM-DD>-<hostname>.json`` (or ``--out``):
machine, versions, load average at start and end, every case's numbers and the verdicts.
Runs in well under 60 s on 2 shared cores (most of it numba compilation when its cache is cold).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from openemploi.kernels import (
    fuse_topk_numba,
    fuse_topk_reference,
    fusion_candidates,
    mean_pool_normalize_numba,
    mean_pool_normalize_reference,
    topk_rows_numba,
    topk_rows_reference,
)

ROOT = Path(__file__).resolve().parents[1]

SEED = 20261126


# -- parallel variants, for the record only ------------------------------------------------------------
@njit(parallel=True, cache=True)
def _pool_parallel(hidden, mask, normalized, pooled):  # pragma: no cover - compiled
    n, length, d = hidden.shape
    for i in prange(n):
        acc = pooled[i]
        acc[:] = 0.0
        count = 0.0
        for t in range(length):
            m = mask[i, t]
            if m != 0:
                count += m
                w = np.float32(m)
                for j in range(d):
                    acc[j] += w * hidden[i, t, j]
        divisor = np.float32(max(count, 1.0))
        sq = 0.0
        for j in range(d):
            v = acc[j] / divisor
            acc[j] = v
            sq += np.float64(v) * np.float64(v)
        norm = np.float32(max(np.sqrt(sq), 1e-12))
        for j in range(d):
            normalized[i, j] = acc[j] / norm


def pool_parallel(hidden, mask):
    n, _, d = hidden.shape
    normalized, pooled = np.empty((n, d), np.float32), np.empty((n, d), np.float32)
    _pool_parallel(hidden, mask, normalized, pooled)
    return normalized, pooled


# -- data --------------------------------------------------------------------------------------------
def pooling_data(rng: np.random.Generator, padded: bool):
    n, length, d = 64, 64, 384
    hidden = rng.standard_normal((n, length, d), dtype=np.float32)
    lengths = rng.integers(8, length + 1, n) if padded else np.full(n, length)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return (hidden, mask), {"n": n, "L": length, "d": d, "mask_mean_tokens": float(mask.sum(1).mean())}


def fusion_data(rng: np.random.Generator, mode: str):
    a = b = 300
    pool = rng.choice(1_000_000, a + b, replace=False).astype(np.int64)
    dense_ids = pool[:a]
    overlap = rng.choice(dense_ids, b // 2, replace=False)
    lexical_ids = rng.permutation(np.concatenate([overlap, pool[a : a + b - overlap.size]]))
    dense_scores = np.sort(rng.uniform(0.3, 0.9, a).astype(np.float32))[::-1].copy()
    lexical_scores = np.sort(rng.gamma(2.0, 3.0, b).astype(np.float32))[::-1].copy()
    union = fusion_candidates(dense_ids, lexical_ids)
    union_dense = rng.uniform(0.2, 0.9, union.size).astype(np.float32) if mode == "weighted" else None
    args = (dense_ids, dense_scores, lexical_ids, lexical_scores, 10, mode, 0.7, union_dense)
    return args, {"dense": a, "lexical": b, "candidates": int(union.size), "k": 10, "mode": mode}


def topk_argpartition(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's fastest exact top-k with the kernel's tie rule (the numpy side of the topk cases)."""
    n = scores.shape[1]
    order = np.argpartition(scores, n - k - 1, axis=1)
    top = order[:, n - k :]
    cut = np.take_along_axis(scores, top, 1).min(axis=1)
    next_best = np.take_along_axis(scores, order[:, n - k - 1 : n - k], 1)[:, 0]
    for q in np.flatnonzero(next_best >= cut):  # a tie straddles the cut: keep the smaller rows
        above = np.flatnonzero(scores[q] > cut[q])
        tied = np.flatnonzero(scores[q] == cut[q])
        top[q] = np.concatenate([above, tied[np.argsort(rows[tied], kind="stable")][: k - len(above)]])
    picked, chosen = np.take_along_axis(scores, top, 1), rows[top]
    sort = np.lexsort((chosen, -picked), axis=1)
    return np.take_along_axis(picked, sort, 1), np.take_along_axis(chosen, sort, 1)


def topk_data(rng: np.random.Generator, queries: int, n: int):
    scores = rng.uniform(0.2, 0.9, (queries, n)).astype(np.float32)
    rows = np.arange(n, dtype=np.int64)
    for got, want in zip(topk_argpartition(scores, rows, 10), topk_rows_reference(scores, rows, 10)):
        np.testing.assert_array_equal(got, want)
    return (scores, rows, 10), {"queries": queries, "n": n, "k": 10}


# -- timing ------------------------------------------------------------------------------------------
def per_call(fn: Callable, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def calls_for(fn: Callable, args: tuple, budget_s: float) -> int:
    one = per_call(fn, args, 1)
    return max(1, min(5000, int(budget_s / max(one, 1e-7))))


def compare(name: str, impls: dict[str, Callable], args: tuple, check: Callable, rounds: int, budget_s: float) -> dict:
    want = impls["numpy"](*args)
    for fn in impls.values():
        check(fn(*args), want)  # also the warm-up (compilation or numba cache load)
    calls = {impl: calls_for(fn, args, budget_s) for impl, fn in impls.items()}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    order = list(impls)
    for r in range(rounds):
        for impl in order if r % 2 == 0 else order[::-1]:
            times[impl].append(per_call(impls[impl], args, calls[impl]))
    row = {"case": name, "calls_per_round": calls, "rounds": rounds}
    for impl, ts in times.items():
        row[f"{impl}_us_median"] = statistics.median(ts) * 1e6
        row[f"{impl}_us_min"] = min(ts) * 1e6
    for impl in impls:
        if impl != "numpy":
            row[f"speedup_{impl}_median"] = row["numpy_us_median"] / row[f"{impl}_us_median"]
            row[f"speedup_{impl}_min"] = row["numpy_us_min"] / row[f"{impl}_us_min"]
    return row


NOISE = 0.05  # a ratio within 5% of 1, by the median or by the min, is not a win


def judge(row: dict) -> dict:
    """faster: numba wins by more than NOISE by both the median and the min of the rounds."""
    median, best = row["speedup_numba_median"], row["speedup_numba_min"]
    if median > 1 + NOISE and best > 1 + NOISE:
        verdict = "faster"
    elif median < 1 - NOISE and best < 1 - NOISE:
        verdict = "slower"
    else:
        verdict = "within noise"
    return {"verdict": verdict, "beats_numpy": verdict == "faster"}


def check_pool(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def check_fusion(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def machine() -> dict:
    return {
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "threading_layer": numba.config.THREADING_LAYER,
    }


def measure(rounds: int = 7, budget: float = 0.08, parallel: bool = True) -> dict:
    """Time every case (and the prange variants unless `parallel` is False): the JSON report.
    Prints nothing; benchmarks/suite.py calls this too."""
    started = time.time()
    load_start = os.getloadavg()
    rng = np.random.default_rng(SEED)

    cases = []  # (kernel, case name, impls, args, info, check)
    parallel_cases = {}  # case name -> the prange variant, timed after every single-threaded case
    for padded in (True, False):
        data, info = pooling_data(rng, padded)
        name = "pooling 64x64x384 " + ("lengths 8..64" if padded else "no padding")
        cases.append(
            (
                "pooling",
                name,
                {"numpy": mean_pool_normalize_reference, "numba": mean_pool_normalize_numba},
                data,
                info,
                check_pool,
            )
        )
        parallel_cases[name] = pool_parallel
    for mode in ("rrf", "weighted"):
        data, info = fusion_data(rng, mode)
        cases.append(
            (
                "fusion",
                f"fusion 300+300 k=10 {mode}",
                {"numpy": fuse_topk_reference, "numba": fuse_topk_numba},
                data,
                info,
                check_fusion,
            )
        )

    for queries, n in ((64, 20_000), (1, 100_000)):
        data, info = topk_data(rng, queries, n)
        impls = {"numpy": topk_argpartition, "numba": topk_rows_numba}
        cases.append(("topk", f"topk {queries}x{n:,} k=10", impls, data, info, check_fusion))

    rows = []
    for kernel, name, impls, data, info, check in cases:
        row = compare(name, impls, data, check, rounds, budget)
        row.update(kernel=kernel, sizes=info, **judge(row))
        rows.append(row)
    # last: OpenMP workers keep spinning after a parallel region and would slow what runs next
    if parallel:
        for (_, name, impls, data, _, check), row in zip(cases, rows):
            if name in parallel_cases:
                extra = compare(
                    name, {"numpy": impls["numpy"], "numba_parallel": parallel_cases[name]}, data, check, rounds, budget
                )
                row["parallel"] = {**extra, "threading_layer": numba.threading_layer()}

    verdicts = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        beats = all(r["beats_numpy"] for r in mine)
        worst = min(mine, key=lambda r: r["speedup_numba_median"])
        if beats:
            statement = (
                f"{kernel}: numba BEATS numpy in every case (median speedup >= "
                f"{worst['speedup_numba_median']:.2f}x): keep the numba kernel"
            )
        else:
            others = [r["case"] for r in mine if not r["beats_numpy"]]
            statement = (
                f"{kernel}: numba does NOT clearly beat numpy in every case ({'; '.join(others)}: "
                f"{', '.join(r['verdict'] for r in mine if not r['beats_numpy'])}): keep it only where it wins"
            )
        verdicts[kernel] = {"beats_numpy": beats, "min_median_speedup": worst["speedup_numba_median"], "statement": statement}

    return {
        "benchmark": "kernels",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "seed": SEED,
        "rounds": rounds,
        "budget_s": budget,
        "cases": rows,
        "verdicts": verdicts,
        "wall_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.08, help="seconds per implementation per round")
    parser.add_argument("--no-parallel", action="store_true", help="skip the prange variants")
    args = parser.parse_args(argv)
    report = measure(args.rounds, args.budget, not args.no_parallel)
    rows, verdicts = report["cases"], report["verdicts"]
    header = (
        f"{'case':<48} {'numpy us':>10} {'numba us':>10} {'numba/numpy':>12}  {'verdict':<12}  "
        f"{'parallel us':>11} {'par/numpy':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        par = (
            f"{r['parallel']['numba_parallel_us_median']:>11.1f} {r['parallel']['speedup_numba_parallel_median']:>8.2f}x"
            if "parallel" in r
            else f"{'-':>11} {'-':>9}"
        )
        print(
            f"{r['case']:<48} {r['numpy_us_median']:>10.1f} {r['numba_us_median']:>10.1f} "
            f"{r['speedup_numba_median']:>11.2f}x  {r['verdict']:<12}  {par}"
        )
    print()
    print("numba/numpy = numpy time / numba time (median of rounds; > 1: numba faster). verdict: faster when")
    print(f"numba wins by > {NOISE:.0%} by both the median and the min of the rounds. parallel: a prange variant")
    print("timed after all the others, against numpy again (par/numpy), for the record")
    for v in verdicts.values():
        print(v["statement"])

    load_start, load_end = report["load_average_start"], report["load_average_end"]
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels-{dt.date.today().isoformat()}-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"\nload average {load_start[0]:.2f} -> {load_end[0]:.2f}; {report['wall_s']:.1f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
