"""Property-based fuzzing of a live openemploi server (what `make fuzz` calls).

The strategies (openemploi.testing.fuzz) generate requests for every RPC, a share of them broken at
the byte level; the driver (openemploi.testing.fuzz_driver) sends them as raw bytes and checks that
every answer is OK or a documented status, never INTERNAL or UNKNOWN, and that the server keeps
answering: health SERVING, and a known-good Embed returns the same vector at the end as at the
start. Writes never touch collections that existed before the run; the collections the run
created are dropped at the end.

    .venv/bin/python benchmarks/fuzz.py --requests 10000             # starts its own server (no ROME)
    .venv/bin/python benchmarks/fuzz.py --requests 2000 --rome        # with ROME (cached in var/loadtest-collections)
    .venv/bin/python benchmarks/fuzz.py --host 127.0.0.1:50051 --seed 7

Exit status: 0 when every answer was allowed and the server is still healthy, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from hypothesis.errors import HypothesisWarning

from openemploi.testing.fuzz import fuzz
from openemploi.testing.fuzz_driver import Driver, Report, base_documents, make_context


def print_report(report: Report, out=sys.stdout) -> None:
    print(
        f"\n{report.tried} calls tried ({report.skipped} writes to pre-existing collections skipped) in {report.seconds:.0f}s",
        file=out,
    )
    print(report.table(), file=out)
    for (rpc, code), (case, details) in sorted(report.first_bad.items()):
        print(f"\nDISALLOWED {rpc} -> {code}: {details}\n  first case: {case}", file=out)
    if report.violation:
        print(f"\nstopped on a disallowed status; minimal case:\n{report.violation}", file=out)
    if report.dead:
        print(f"\nSERVER STOPPED ANSWERING: {report.dead}", file=out)
    print(f"\nfinal check: {report.final_check}", file=out)
    print("PASS" if report.ok else "FAIL", file=out)


def run_against(address: str, args: argparse.Namespace) -> Report:
    token = os.environ.get("OPENEMPLOI_TOKEN", "")
    driver = Driver(address, (("authorization", f"Bearer {token}"),) if token else ())
    driver.progress_every = max(100, args.requests // 20)
    ctx = make_context(args.base)
    try:
        driver.prepare(ctx, base_documents(ctx))
        report = fuzz(driver, ctx, args.requests, args.seed, keep_going=args.keep_going)
        dropped = driver.cleanup()
        print(f"dropped the run's collections: {', '.join(dropped) or '(none)'}", file=sys.stderr)
        return report
    finally:
        driver.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="generated calls (a stream counts as one)")
    parser.add_argument("--host", default=None, help="a running server (host:port); default: start one")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random; printed)")
    parser.add_argument(
        "--rome", action="store_true", help="started server: with the ROME collection (cached in var/loadtest-collections)"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="count every disallowed status instead of stopping and shrinking"
    )
    parser.add_argument("--base", default="fuzz-base", help="name of the collection the run creates and fills")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=HypothesisWarning)  # "overly large repr" of the corpus strategies
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    print(f"fuzz: {args.requests} calls, seed {args.seed}", file=sys.stderr)
    if args.host:
        report = run_against(args.host, args)
    else:
        from loadtest import CACHE_DIR, ServerOptions, log_tail, running_server

        with tempfile.TemporaryDirectory(prefix="openemploi-fuzz-") as scratch:
            collections = CACHE_DIR if args.rome else Path(scratch) / "collections"
            options = ServerOptions(collections, rome=args.rome, log_path=Path(scratch) / "server.log")
            with running_server(options) as server:
                report = run_against(server.address, args)
                if not report.ok:
                    print(f"\nserver log (tail):\n{log_tail(server.log_path, 40)}", file=sys.stderr)
    print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
