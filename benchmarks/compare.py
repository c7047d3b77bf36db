"""Compare two benchmark-suite results on their ratios; exit 1 when one regressed beyond a threshold.

    .venv/bin/python benchmarks/compare.py OLD.json NEW.json [--threshold 0.15]

The comparison lives in openemploi.testing.bench_compare (see its docstring for the rules and
the exit statuses), where the tests exercise it.
"""

from __future__ import annotations

from openemploi.testing.bench_compare import main

if __name__ == "__main__":
    raise SystemExit(main())
