"""benchmarks/compare.py (openemploi.testing.bench_compare): runs are compared on ratios, and only a
move in the bad direction beyond the threshold fails (exit 1); what CI relies on to gate a change
on `make bench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openemploi.testing import bench_compare


def figure(name: str, value: float | None, baseline: float | None, higher: bool = True) -> dict:
    ratio = None if value is None or not baseline else value / baseline
    return {
        "name": name,
        "value": value,
        "unit": "x",
        "baseline_name": "base",
        "baseline_value": baseline,
        "ratio": ratio,
        "higher_is_better": higher,
    }


def result(*figures: dict, warnings: tuple[str, ...] = ()) -> dict:
    return {
        "meta": {"host": "h", "cpu_count": 2, "plan": "full", "warnings": list(warnings)},
        "figures": list(figures),
        "curves": {},
        "parts": {},
    }


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def verdicts(old: dict, new: dict, threshold: float = 0.15) -> dict[str, str]:
    return {row.name: row.verdict for row in bench_compare.compare(old, new, threshold)}


def test_a_ratio_that_drops_beyond_the_threshold_is_a_regression():
    old = result(figure("tput", 40.0, 40.0), figure("p99", 100.0, 100.0, higher=False))
    new = result(figure("tput", 30.0, 40.0), figure("p99", 130.0, 100.0, higher=False))
    assert verdicts(old, new) == {"tput": bench_compare.REGRESSION, "p99": bench_compare.REGRESSION}


def test_improvements_are_not_regressions():
    old = result(figure("tput", 40.0, 40.0), figure("p99", 100.0, 100.0, higher=False))
    new = result(figure("tput", 60.0, 40.0), figure("p99", 50.0, 100.0, higher=False))
    assert verdicts(old, new) == {"tput": bench_compare.IMPROVED, "p99": bench_compare.IMPROVED}


def test_only_ratios_count_not_raw_values():
    # the NEW machine is twice as slow, but server and baseline slowed down together
    old = result(figure("tput", 40.0, 40.0))
    new = result(figure("tput", 20.0, 20.0))
    row = bench_compare.compare(old, new)[0]
    assert row.verdict == bench_compare.OK and row.change == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("new_ratio", "higher", "expected"),
    [
        (0.85, True, bench_compare.OK),  # exactly -15%: passes
        (0.8499, True, bench_compare.REGRESSION),
        (1.15, False, bench_compare.OK),  # exactly +15% where lower is better: passes
        (1.1501, False, bench_compare.REGRESSION),
        (1.15, True, bench_compare.OK),  # exactly +15% the good way: not yet "improved"
        (1.1501, True, bench_compare.IMPROVED),
    ],
)
def test_threshold_edge(new_ratio, higher, expected):
    old = result(figure("f", 1.0, 1.0, higher))
    new = result(figure("f", new_ratio, 1.0, higher))
    assert verdicts(old, new) == {"f": expected}


def test_the_threshold_is_configurable():
    old, new = result(figure("f", 1.0, 1.0)), result(figure("f", 0.8, 1.0))
    assert verdicts(old, new, threshold=0.15) == {"f": bench_compare.REGRESSION}
    assert verdicts(old, new, threshold=0.25) == {"f": bench_compare.OK}


def test_figures_in_one_file_only_or_without_ratio_are_listed_not_failed(tmp_path, capsys):
    old = result(figure("kept", 1.0, 1.0), figure("dropped", 1.0, 1.0), figure("failed", 1.0, 1.0))
    new = result(figure("kept", 1.0, 1.0), figure("added", 1.0, 1.0), figure("failed", None, 1.0))
    assert verdicts(old, new) == {
        "kept": bench_compare.OK,
        "added": bench_compare.ONLY_NEW,
        "failed": bench_compare.NO_RATIO,
        "dropped": bench_compare.ONLY_OLD,
    }
    code = bench_compare.main([str(write(tmp_path / "old.json", old)), str(write(tmp_path / "new.json", new))])
    out = capsys.readouterr().out
    assert code == 0
    assert "only in OLD" in out and "only in NEW" in out and "dropped" in out and "added" in out


def test_exit_code_and_report(tmp_path, capsys):
    old = write(tmp_path / "old.json", result(figure("good", 1.0, 1.0), figure("bad", 1.0, 1.0)))
    worse = write(
        tmp_path / "worse.json",
        result(figure("good", 1.0, 1.0), figure("bad", 0.5, 1.0), warnings=("other processes used 1.20 cores",)),
    )
    assert bench_compare.main([str(old), str(old)]) == 0
    assert "no regression" in capsys.readouterr().out
    assert bench_compare.main([str(old), str(worse)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "-50.0%" in out and "1 regression(s) beyond 15%: bad" in out
    assert "other processes used 1.20 cores" in out  # a noisy NEW run is pointed out
    assert bench_compare.main([str(old), str(worse), "--threshold", "0.6"]) == 0


def test_unreadable_input_exits_2(tmp_path):
    good = write(tmp_path / "old.json", result(figure("f", 1.0, 1.0)))
    not_a_result = write(tmp_path / "x.json", {"rows": []})
    assert bench_compare.main([str(good), str(not_a_result)]) == 2
    assert bench_compare.main([str(good), str(tmp_path / "missing.json")]) == 2
