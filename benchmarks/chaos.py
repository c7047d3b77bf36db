#!/usr/bin/env python3
"""Faults against the real server: SIGKILL mid-upsert or mid-Reembed, a truncated snapshot, disconnect storms, stalls, failed model loads, a full disk.

    .venv/bin/python benchmarks/chaos.py [--quick] [--cycles 20] [--dir PATH] [--seed N] [--index auto|flat|hnsw]

The fault cycles and their checks live in openemploi.testing (faults.py, client_faults.py,
model_faults.py, disk_faults.py; tests/api/test_crash_recovery.py, test_storage_full.py and
test_failed_model_load.py run shorter sequences of them). This run, on one server and one
collection: half the SIGKILL cycles (``--cycles``, 20 by default), a clean SIGTERM restart (its
snapshot then holds vectors), a SIGKILL cycle that truncates ``<dir>/collections/chaos/index.faiss``
to half while the server is down, two shutdown snapshots SIGKILLed between their steps (the
server armed with a crash point of openemploi.index.durable), three SIGKILLs during a Reembed
to a second model (while it copies, after the new generation is staged, after the switch:
reembed_faults.py; the collection must come back whole, on one generation), a client disconnect
storm, a stall check (the slowest health Check while one maximal Embed is served must stay within
100 ms: stall.py), model loads failing mid-swap (each broken version ``--swap-repeats`` times), a
full disk (whose failed shutdown snapshot leaves the store ahead of the snapshot), then the other
half of the SIGKILL cycles, which replay on top of that. Every cycle ends with a check of every
acknowledged document.

``--quick`` (4 SIGKILL cycles, a small storm, each broken version 3 times) is for development;
the default run is sized for about 10 minutes on 2 cores. ``--index hnsw`` runs the same on an
HNSW collection, whose replay after a kill follows another path than a flat index's.

One table is printed at the end; the exit status is 1 when an acknowledged document was lost or
a fault was not survived.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from openemploi.testing.client_faults import storm_cycle
from openemploi.testing.disk_faults import disk_full_cycle
from openemploi.testing.faults import (
    FAULT_DISK,
    FAULT_STALL,
    FAULT_STORM,
    FAULT_SWAP,
    INDEX_KINDS,
    REQUEST_FAULTS,
    ChaosRun,
    CycleReport,
    graceful_cycle,
    kill_cycle,
    snapshot_kill_cycle,
    stderr_log,
)
from openemploi.testing.model_faults import model_swap_cycle
from openemploi.testing.reembed_faults import REEMBED_KILLS, reembed_kill_cycle
from openemploi.testing.stall import stall_cycle

ROOT = Path(__file__).resolve().parents[1]


def table(reports: Sequence[CycleReport], total_acknowledged: int) -> tuple[str, bool]:
    """One row per fault kind and a total; returns the text and whether anything was lost or not survived.

    `injected` and `survived` count cycles; a row's label says how many faults a cycle of it holds when
    more than one (streams cut, failed loads, refused writes).  `acknowledged` counts documents, or
    Embed requests answered for the model swap, or health Checks within budget for the stall; `lost` counts
    acknowledged documents lost, or requests failed (Checks over budget or failed, for the stall).
    """
    rows = []
    failed = False
    all_lost: set[str] = set()
    failed_requests = answered = 0
    kinds = list(dict.fromkeys(r.fault for r in reports))
    for kind in kinds:
        group = [r for r in reports if r.fault == kind]
        lost = set().union(*(set(r.lost) for r in group))
        all_lost |= lost
        survived = sum(r.survived for r in group)
        faults = sum(r.injected for r in group)
        label = {
            FAULT_STORM: f"{kind}, {faults} streams cut",
            FAULT_SWAP: f"{kind}, {faults} failed loads",
            FAULT_DISK: f"{kind}, {faults} writes refused",
            FAULT_STALL: f"{kind}, worst {max(r.worst_ms for r in group):.0f} ms",
        }.get(kind, kind)
        injected = len(group) if kind in (FAULT_STORM, FAULT_SWAP, FAULT_DISK) else faults
        if kind in REQUEST_FAULTS:
            ok = sum(r.requests_ok for r in group)
            lost_count = sum(r.requests_failed for r in group) + len(lost)
            answered += ok
            failed_requests += lost_count - len(lost)
            acknowledged = f"{ok} requests"
        else:
            lost_count = len(lost)
            acknowledged = f"{max(r.acknowledged for r in group)} docs"
        failed |= survived != len(group) or bool(lost_count)
        rows.append((label, str(injected), str(survived), acknowledged, str(lost_count)))
    total = f"{total_acknowledged} docs" + (f" + {answered} requests" if answered else "")
    rows.append(
        (
            "total",
            str(sum(int(r[1]) for r in rows)),
            str(sum(int(r[2]) for r in rows)),
            total,
            str(len(all_lost) + failed_requests),
        )
    )
    header = ("fault", "injected", "survived", "acknowledged", "lost")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)]
        lines.append("  ".join(cells))
        if n == 0 or n == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines), failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run for development: 4 SIGKILL cycles, a small storm, each broken load 3 times",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="SIGKILL cycles (default 20, 4 with --quick; plus a SIGTERM restart, a truncated snapshot, a disconnect storm, failed model loads and a full disk)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work folder (collections/ and logs/); default: a temporary one, removed on success",
    )
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument(
        "--index", choices=sorted(INDEX_KINDS), default="auto", help="index kind of the collection (auto: flat at these sizes)"
    )
    parser.add_argument("--storm-clients", type=int, default=None, help="default 16, 6 with --quick")
    parser.add_argument("--storm-rounds", type=int, default=None, help="default 10, 2 with --quick")
    parser.add_argument(
        "--swap-repeats",
        type=int,
        default=None,
        help="LoadModel calls per kind of broken version (default 4, 3 with --quick; the memory check needs 3)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.cycles = args.cycles if args.cycles is not None else (4 if quick else 20)
    args.storm_clients = args.storm_clients or (6 if quick else 16)
    args.storm_rounds = args.storm_rounds or (2 if quick else 10)
    args.swap_repeats = args.swap_repeats or (3 if quick else 4)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="openemploi-chaos-"))
    if args.dir and (args.dir / "collections").exists() and any((args.dir / "collections").iterdir()):
        parser.error(f"{args.dir}/collections is not empty: give a fresh --dir")
    t0 = time.monotonic()
    run = ChaosRun(workdir, ROOT / "models", seed=args.seed, index_kind=args.index)
    # Half the kills, a clean SIGTERM restart (its snapshot holds vectors), the truncation of that
    # snapshot, the storm, the failed model loads, the full disk (whose failed shutdown snapshot leaves
    # the store ahead of the snapshot), then the other half of the kills, which replay on top of that.
    plan = (
        ["kill"] * (args.cycles // 2)
        + ["sigterm", "truncate", "snapshot-written", "snapshot-renamed"]
        + [f"reembed:{at}" for at in REEMBED_KILLS]
        + ["storm", "stall", "swap", "disk"]
        + ["kill"] * (args.cycles - args.cycles // 2)
    )
    aborted = ""
    try:
        run.setup()
        for step in plan:
            if step == "storm":
                report = storm_cycle(run, args.storm_clients, args.storm_rounds)
            elif step == "swap":
                report = model_swap_cycle(run, args.swap_repeats)
            elif step == "stall":
                report = stall_cycle(run)
            elif step.startswith("reembed:"):
                report = reembed_kill_cycle(run, step.removeprefix("reembed:"))
            elif step == "disk":
                report = disk_full_cycle(run)
            elif step == "sigterm":
                report = graceful_cycle(run)
            elif step.startswith("snapshot-"):
                report = snapshot_kill_cycle(run, step)
            else:
                report = kill_cycle(run, truncate_snapshot=step == "truncate")
            if not run.server.alive():
                aborted = f"stopped after cycle {report.number}: the server is not running"
                break
    except KeyboardInterrupt:
        aborted = "interrupted"
    except (grpc.RpcError, OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a check that could not run
        aborted = f"{type(exc).__name__}: {exc}"
        if run.reports:
            run.reports[-1].problems.append(f"aborted: {aborted}")
    finally:
        run.close()
    text, failed = table(run.reports, len(run.acknowledged))
    mid = sum(r.kill_mid_request for r in run.reports if r.killed)
    kills = sum(r.killed for r in run.reports)
    committed = sum(r.in_flight_committed for r in run.reports)
    cut = sum(r.in_flight for r in run.reports)
    elapsed = time.monotonic() - t0
    stderr_log(
        f"{kills} SIGKILLs, {mid} while an Upsert was in flight; {committed} of {cut} in-flight docs turned out committed; "
        f"{len(run.acknowledged)} docs acknowledged; {elapsed:.0f}s in all; logs in {workdir / 'logs'}"
    )
    print(text)
    if aborted:
        print(f"aborted: {aborted}")
        failed = True
    for report in run.reports:
        if not report.survived:
            print(report.describe())
    if failed:
        print(f"FAILED; server logs kept in {workdir / 'logs'}")
        return 1
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
