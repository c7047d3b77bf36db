"""Evaluate free-text -> ROME occupation matching on the team's dev set.

Reports top-1, top-5 and MRR (over the top 10) for lexical only, dense only and
hybrid, with the int8 and the fp32 graph of the default model, all in one run.
The `rome` collection is built for each precision exactly as the server builds
it at first start, in benchmarks/.cache/ (reused while the catalogue and the
model version are unchanged).

    .venv/bin/python benchmarks/eval_rome.py [--precisions int8,fp32] [--out PATH]

Target for the default (hybrid, int8, CPU): top-1 >= 0.60 and top-5 >= 0.85.
The dev set (benchmarks/data/rome_dev.jsonl) must not be used to tune the
matcher beyond what generalises: a separate hidden set exists.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import socket
import time
from pathlib import Path

from openemploi.backends.options import BackendConfig
from openemploi.batching import BatcherConfig
from openemploi.index.collection import CollectionManager
from openemploi.matching.bootstrap import ensure_rome_collection
from openemploi.matching.catalogue import load_catalogue
from openemploi.matching.matcher import OccupationMatcher
from openemploi.runtime.registry import ModelRegistry
from openemploi.runtime.repository import ModelRepository
from openemploi.tokenize import TextKind

REPO = Path(__file__).resolve().parents[1]

DEV_SET = REPO / "benchmarks" / "data" / "rome_dev.jsonl"
MODES = ("lexical", "dense", "hybrid")


def load_dev_set(path: Path = DEV_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scores_for(ranked: list[list[str]], expected: list[str]) -> dict[str, float]:
    top1 = sum(r[:1] == [e] for r, e in zip(ranked, expected)) / len(expected)
    top5 = sum(e in r[:5] for r, e in zip(ranked, expected)) / len(expected)
    mrr = sum(1.0 / (r[:10].index(e) + 1) if e in r[:10] else 0.0 for r, e in zip(ranked, expected)) / len(expected)
    return {"top1": round(top1, 4), "top5": round(top5, 4), "mrr": round(mrr, 4)}


async def evaluate_precision(precision: str, dev: list[dict]) -> dict:
    repo = ModelRepository(REPO / "models")
    registry = ModelRegistry(repo, BatcherConfig(), BackendConfig(device="cpu", cpu_precision=precision), "multilingual-e5-small")
    model = await registry.load("multilingual-e5-small")
    occupations = load_catalogue()
    cache = REPO / "benchmarks" / ".cache" / f"rome-{precision}"  # reused while catalogue and model are unchanged
    manager = CollectionManager(cache)
    started = time.perf_counter()
    collection = await ensure_rome_collection(manager, model, occupations, progress=True)
    index_s = time.perf_counter() - started
    matcher = OccupationMatcher(lambda: collection, occupations)
    queries = [d["query"] for d in dev]
    vectors = (await model.embed(queries, TextKind.QUERY, truncate=True)).normalized
    results: dict[str, dict] = {}
    by_style: dict[str, dict] = {}
    for mode in MODES:
        started = time.perf_counter()
        ranked = [[m.occupation.code for m in matcher.match(q, v, 10, mode)] for q, v in zip(queries, vectors)]
        results[mode] = scores_for(ranked, [d["code"] for d in dev])
        results[mode]["ms_per_query"] = round((time.perf_counter() - started) * 1e3 / len(dev), 2)
        if mode == "hybrid":
            for style in sorted({d["style"] for d in dev}):
                rows = [i for i, d in enumerate(dev) if d["style"] == style]
                by_style[style] = scores_for([ranked[i] for i in rows], [dev[i]["code"] for i in rows])
    manager.close()
    await registry.close()
    return {"precision": precision, "index_seconds": round(index_s, 1), "modes": results, "hybrid_by_style": by_style}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="int8,fp32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dev = load_dev_set()
    runs = [asyncio.run(evaluate_precision(p, dev)) for p in args.precisions.split(",")]
    print(f"\nROME dev set: {len(dev)} queries ({DEV_SET.relative_to(REPO)})\n")
    print(f"{'precision':<9} {'mode':<8} {'top-1':>6} {'top-5':>6} {'MRR':>6} {'ms/query':>9}")
    for run in runs:
        for mode in MODES:
            r = run["modes"][mode]
            print(
                f"{run['precision']:<9} {mode:<8} {r['top1']:>6.3f} {r['top5']:>6.3f} {r['mrr']:>6.3f} {r['ms_per_query']:>9.2f}"
            )
    default = next((r for r in runs if r["precision"] == "int8"), runs[0])["modes"]["hybrid"]
    passed = default["top1"] >= 0.60 and default["top5"] >= 0.85
    print(
        f"\ntarget (hybrid, int8): top-1 >= 0.60 and top-5 >= 0.85: {'PASS' if passed else 'MISS'} "
        f"(top-1 {default['top1']:.3f}, top-5 {default['top5']:.3f})"
    )
    for run in runs:
        styles = ", ".join(f"{s} {v['top1']:.2f}/{v['top5']:.2f}" for s, v in run["hybrid_by_style"].items())
        print(f"hybrid {run['precision']} by style (top-1/top-5): {styles}")
    out = args.out or REPO / "benchmarks" / "results" / f"rome-eval-{dt.date.today()}-{socket.gethostname()}.json"
    out.write_text(
        json.dumps(
            {
                "date": str(dt.date.today()),
                "machine": platform.platform(),
                "queries": len(dev),
                "runs": runs,
                "target_passed": passed,
            },
            indent=1,
        )
    )
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
