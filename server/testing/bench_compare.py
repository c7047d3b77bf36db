"""Compare two benchmark-suite results on their ratios; exit 1 when one regressed beyond a threshold.

    .venv/bin/python benchmarks/compare.py OLD.json NEW.json [--threshold 0.15]   # runs main() below

Raw values are not compared: on a shared or differently sized machine they move by 2x between
runs.  Each figure's ratio to its baseline from the same run (e.g. server texts/s at 32 clients
over the raw backend's texts/s) is, so ``change = new ratio / old ratio - 1``.  A figure
regresses when that change goes beyond ``threshold`` in its bad direction: below ``-threshold``
when higher is better, above ``+threshold`` when lower is better.  A change of exactly the
threshold passes.  Figures in only one file, or without a ratio in one of them (a part failed),
are listed but are not failures.  Exit status: 1 if any figure regressed, 2 on unreadable
input, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_THRESHOLD = 0.15
EPSILON = 1e-9  # float slack, so that a change of exactly the threshold (0.85 / 1.0 - 1) passes

REGRESSION, IMPROVED, OK = "REGRESSION", "improved", "ok"
ONLY_OLD, ONLY_NEW, NO_RATIO = "only in OLD", "only in NEW", "no ratio"


@dataclass(frozen=True)
class Comparison:
    name: str
    old_ratio: float | None
    new_ratio: float | None
    change: float | None  # new / old - 1
    higher_is_better: bool | None
    verdict: str


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("figures"), list):
        raise ValueError(f"{path}: not a benchmark-suite result (no 'figures' list)")
    return data


def relative_change(old: float, new: float) -> float:
    if old == 0:
        return 0.0 if new == 0 else math.copysign(math.inf, new)
    return new / old - 1.0


def judge(change: float, higher_is_better: bool, threshold: float) -> str:
    bad = -change if higher_is_better else change  # > 0: moved the wrong way
    if bad > threshold + EPSILON:
        return REGRESSION
    if -bad > threshold + EPSILON:
        return IMPROVED
    return OK


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> list[Comparison]:
    """One Comparison per figure name in either result: NEW's order, then those only in OLD."""
    old_figures = {f["name"]: f for f in old["figures"]}
    new_figures = {f["name"]: f for f in new["figures"]}
    names = list(new_figures) + [n for n in old_figures if n not in new_figures]
    rows = []
    for name in names:
        o, n = old_figures.get(name), new_figures.get(name)
        old_ratio = o.get("ratio") if o else None
        new_ratio = n.get("ratio") if n else None
        higher = (n or o or {}).get("higher_is_better")
        if o is None or n is None:
            rows.append(Comparison(name, old_ratio, new_ratio, None, higher, ONLY_NEW if o is None else ONLY_OLD))
        elif old_ratio is None or new_ratio is None or higher is None:
            rows.append(Comparison(name, old_ratio, new_ratio, None, higher, NO_RATIO))
        else:
            change = relative_change(old_ratio, new_ratio)
            rows.append(Comparison(name, old_ratio, new_ratio, change, higher, judge(change, bool(higher), threshold)))
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: Sequence[Comparison]) -> str:
    head = ("figure", "old ratio", "new ratio", "change", "better", "verdict")
    lines = [head] + [
        (
            r.name,
            fmt(r.old_ratio, ".4g"),
            fmt(r.new_ratio, ".4g"),
            fmt(r.change, "+.1%"),
            "-" if r.higher_is_better is None else ("higher" if r.higher_is_better else "lower"),
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i in (0, 4, 5) else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def context_notes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes the comparison less trustworthy: different plans or hosts, noisy runs, failed parts."""
    notes = []
    om, nm = old.get("meta", {}), new.get("meta", {})
    if om.get("plan") != nm.get("plan"):
        notes.append(f"the runs used different plans ({om.get('plan')} vs {nm.get('plan')}): their figures differ in size")
    if om.get("host") != nm.get("host") or om.get("cpu_count") != nm.get("cpu_count"):
        notes.append(
            f"different machines: {om.get('host')} ({om.get('cpu_count')} CPUs) vs {nm.get('host')} ({nm.get('cpu_count')} CPUs)"
        )
    for label, data in (("OLD", old), ("NEW", new)):
        notes += [f"{label}: {w}" for w in data.get("meta", {}).get("warnings", [])]
        notes += [f"{label}: part {name} failed: {p['error']}" for name, p in data.get("parts", {}).items() if p.get("error")]
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("old", type=Path, help="the reference result (benchmarks/results/DATE-HOST.json)")
    parser.add_argument("new", type=Path, help="the result to check")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"relative change of a ratio in its bad direction that counts as a regression (default {DEFAULT_THRESHOLD}: 15%%)",
    )
    args = parser.parse_args(argv)
    if args.threshold < 0:
        parser.error("--threshold must be >= 0")
    try:
        old, new = load(args.old), load(args.new)
    except (OSError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    rows = compare(old, new, args.threshold)
    print(
        f"OLD {args.old} ({old.get('meta', {}).get('started_utc', '?')}, commit "
        f"{str(old.get('meta', {}).get('git_commit') or '?')[:10]})"
    )
    print(
        f"NEW {args.new} ({new.get('meta', {}).get('started_utc', '?')}, commit "
        f"{str(new.get('meta', {}).get('git_commit') or '?')[:10]})"
    )
    print(render(rows))
    for note in context_notes(old, new):
        print(f"note: {note}")
    counts = {v: sum(r.verdict == v for r in rows) for v in (REGRESSION, IMPROVED, OK, NO_RATIO, ONLY_OLD, ONLY_NEW)}
    print(", ".join(f"{n} {v}" for v, n in counts.items() if n))
    regressions = [r for r in rows if r.verdict == REGRESSION]
    if regressions:
        print(f"{len(regressions)} regression(s) beyond {args.threshold:.0%}: " + ", ".join(r.name for r in regressions))
        return 1
    print(f"no regression beyond {args.threshold:.0%}")
    return 0
