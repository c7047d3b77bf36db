#!/usr/bin/env python3
"""One query against a Flat collection: faiss's one-thread SIMD loop or BLAS's two threads?

    .venv/bin/python benchmarks/flat_single_query.py [--queries 60] [--out PATH]

Every Search RPC is one query, and the server's other core is usually busy encoding. This times
the two ways server/index/flat.py can score one query (``_scores`` with SINGLE_QUERY_BLAS_ROWS
forced either way) on the search benchmark's data at 20k, 50k and 100k rows, interleaved query by
query, on a quiet machine and then with 1 and 2 busy-looping processes holding the cores. The
threshold in flat.py is where BLAS stops losing under full load. Prints p50/p90 per case and
writes JSON (default benchmarks/results/flat-single-query-<date>-<host>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import search_bench  # the search benchmark's deterministic data (benchmarks/ is the script's folder)

from openemploi.index import flat

ROOT = Path(__file__).resolve().parents[1]
SIZES = (20_000, 50_000, 100_000)
WAYS = {"one_thread_loop": 1 << 62, "blas": 0}  # SINGLE_QUERY_BLAS_ROWS forcing each way


def time_case(base: np.ndarray, queries: np.ndarray) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for i, query in enumerate(queries):
        order = list(WAYS) if i % 2 else list(WAYS)[::-1]
        for way in order:
            flat.SINGLE_QUERY_BLAS_ROWS = WAYS[way]
            start = time.perf_counter()
            flat._scores(query[None], base)
            times[way].append(time.perf_counter() - start)
    return {way: {"p50_ms": float(np.median(t) * 1e3), "p90_ms": float(np.quantile(t, 0.9) * 1e3)} for way, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    centres, subspaces = search_bench.basis()
    base_all = search_bench.make_vectors(max(SIZES), 1, centres, subspaces)
    queries = search_bench.make_vectors(args.queries, 2, centres, subspaces)
    kept = flat.SINGLE_QUERY_BLAS_ROWS
    rows = []
    try:
        for busy in (0, 1, 2):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                time.sleep(0.5)
                for n in SIZES:
                    result = time_case(np.ascontiguousarray(base_all[:n]), queries)
                    rows.append({"busy_processes": busy, "rows": n, **result})
                    cells = "  ".join(f"{way} p50 {r['p50_ms']:.2f} p90 {r['p90_ms']:.2f} ms" for way, r in result.items())
                    print(f"busy {busy}  {n:>7,} rows  {cells}", flush=True)
            finally:
                for spinner in spinners:
                    spinner.kill()
    finally:
        flat.SINGLE_QUERY_BLAS_ROWS = kept
    host = socket.gethostname()
    out = args.out or ROOT / "benchmarks" / "results" / f"flat-single-query-{dt.date.today()}-{host}.json"
    report = {"benchmark": "flat_single_query", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    report.update(host=host, cpu_count=os.cpu_count(), threshold_rows=kept, queries=args.queries, rows=rows)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
