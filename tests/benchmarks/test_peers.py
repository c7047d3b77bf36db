"""The peers part's verdicts, from hand-made reports (nothing is benchmarked here): each goal of issue 14
is judged on ratios of the same run, the best Infinity configuration is the one compared, and a run
without Infinity says so instead of passing silently."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import peers as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def report(infinity: dict | None = None) -> dict:
    return {
        "raw": {"texts_per_s": 400.0, "single_p50_ms": 4.0, "model_version": "v"},
        "server": {"c32_texts_per_s": 380.0, "c128_texts_per_s": 350.0, "idle_p50_ms": 4.5},
        "infinity": infinity or {},
    }


def by_name(targets: list[dict]) -> dict[str, dict]:
    return {t["target"].split(" (")[0]: t for t in targets}


def test_server_goals_are_ratios_to_the_same_run(peers):
    targets = by_name(peers.targets(report()))
    assert targets["server texts/s at 32 clients / raw int8"]["value"] == pytest.approx(0.95)
    assert targets["server texts/s at 32 clients / raw int8"]["status"] == "PASS"
    assert targets["server texts/s at 128 clients / at 32 clients"]["status"] == "MISS"  # 0.92 < 0.95
    idle = targets["server idle p50 ms"]
    assert idle["threshold"] == pytest.approx(5.0) and idle["status"] == "PASS"


def test_the_best_infinity_configuration_is_the_one_compared(peers):
    infinity = {
        "a": {"config": "a", "c32_texts_per_s": 150.0, "c128_texts_per_s": 150.0, "idle_p50_ms": 20.0},
        "b": {"config": "b", "c32_texts_per_s": 200.0, "c128_texts_per_s": 190.0, "idle_p50_ms": 12.0},
        "broken": {"config": "broken", "error": "RuntimeError: exited"},
    }
    targets = peers.targets(report(infinity))
    throughput = next(t for t in targets if "Infinity best (b)" in t["target"])
    assert throughput["value"] == pytest.approx(380 / 200) and throughput["status"] == "MISS"
    latency = next(t for t in targets if t["target"].startswith("Infinity best idle p50"))
    assert latency["value"] == pytest.approx(12.0 / 4.5) and latency["status"] == "MISS"


def test_a_run_without_infinity_says_it_was_skipped(peers):
    skipped = {**report(), "infinity_skipped": "no Infinity under .cache/peers/infinity"}
    skipped["targets"] = peers.targets(skipped)
    figures, _, targets = peers.peer_figures(skipped)
    assert not any("Infinity best" in t["target"] for t in skipped["targets"])
    assert targets[-1]["status"] == "SKIPPED" and ".cache/peers" in targets[-1]["best"]
    ratios = {f.name: f.ratio for f in figures}
    assert ratios["peers.server.c32.texts_per_s"] == pytest.approx(0.95)
    assert "peers.server.c32_vs_a" not in ratios


def test_the_idle_goal_is_judged_on_the_paired_run_when_there_is_one(peers):
    """The raw child's singles ran minutes earlier; the paired raw call ran milliseconds before each server call."""
    paired = report()
    paired["server"] = {
        **paired["server"],
        "paired": {"raw_single_p50_ms": 7.0, "grpc_health_p50_ms": 0.8, "server_p50_ms": 8.5, "server_minus_raw_p50_ms": 1.5},
    }
    idle = next(t for t in peers.targets(paired) if t["target"].startswith("server idle p50"))
    assert "paired" in idle["target"]
    assert idle["value"] == pytest.approx(8.5) and idle["threshold"] == pytest.approx(8.0)
    assert idle["status"] == "MISS"  # the unpaired numbers (4.5 vs 4.0 + 1) would have passed
    figures, _, _ = peers.peer_figures({**paired, "targets": peers.targets(paired)})
    assert {f.name for f in figures} >= {"peers.server.idle_p50_ms", "peers.server.idle_paired_p50_ms"}
