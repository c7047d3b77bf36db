"""Headless locust run against openemploi (what `make loadtest` calls).

Without --host it starts `openemploi serve` on a free port (metrics on another free
port) with collections under var/loadtest-collections, so the ROME catalogue is indexed
once (minutes on 2 cores, progress shown) and reused by later runs; --no-rome starts the
server without it. Then it seeds collection `loadtest`, runs
`locust -f benchmarks/locustfile.py --headless`, writes CSV + HTML under
benchmarks/results/loadtest/<stamp>* (and locust's final stats as <stamp>.json), stops the server with SIGTERM and prints requests,
failures and latency percentiles per method. The exit status is locust's (1 when a
request failed) or 2 when the server could not start.

    .venv/bin/python benchmarks/loadtest.py --users 8 --spawn-rate 4 --run-time 30s
    .venv/bin/python benchmarks/loadtest.py --users 16 --run-time 60s --host 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from openemploi.testing.launcher import HOST, free_port, stop_process, wait_serving

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
RESULTS = ROOT / "benchmarks" / "results" / "loadtest"
CACHE_DIR = ROOT / "var" / "loadtest-collections"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def last_progress(log_path: Path) -> str:
    """The newest progress-bar state in the server log (tqdm rewrites its line with \\r)."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    pieces = [p.strip() for p in tail.replace("\r", "\n").splitlines() if "indexing" in p]
    return pieces[-1] if pieces else ""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class ServerOptions:
    collections_dir: Path
    rome: bool = True
    log_path: Path | None = None  # default: a temporary file
    ready_timeout_s: float = 1800.0  # a first start indexes the ROME catalogue
    extra_env: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Server:
    address: str
    pid: int
    metrics_port: int
    log_path: Path


@contextlib.contextmanager
def running_server(options: ServerOptions) -> Iterator[Server]:
    """`openemploi serve` in a subprocess: SERVING on entry, stopped with SIGTERM on exit.

    Unlike launcher.ServerProcess it keeps this environment as it is (ROME on, INFO logs, progress
    bars), and writes its log where the results go; first-start indexing progress is shown.
    """
    port, metrics_port = free_port(), free_port()
    scratch = None
    log_path = options.log_path
    if log_path is None:
        scratch = tempfile.TemporaryDirectory(prefix="openemploi-server-")
        log_path = Path(scratch.name) / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    options.collections_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        OPENEMPLOI_COLLECTIONS_DIR=str(options.collections_dir),
        OPENEMPLOI_METRICS_PORT=str(metrics_port),
        OPENEMPLOI_HTTP_PORT="0",  # other servers on this machine may hold 8080
        OPENEMPLOI_ROME_COLLECTION="true" if options.rome else "false",
        OPENEMPLOI_PROGRESS="true",
    )
    env.update(options.extra_env or {})
    script = BIN / "openemploi"
    command = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "openemploi.cli"]
    command += ["serve", "--port", str(port)]
    say(
        f"starting {' '.join(command)} (collections {options.collections_dir}, rome {'on' if options.rome else 'off'}, log {log_path})"
    )
    shown = {"progress": "", "at": 0.0}

    def show_progress() -> None:
        progress = last_progress(log_path)
        if progress and progress != shown["progress"] and time.monotonic() - float(shown["at"]) > 5.0:
            say(f"  server: {progress}")
            shown.update(progress=progress, at=time.monotonic())

    t0 = time.perf_counter()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        address = f"{HOST}:{port}"
        try:
            wait_serving(address, options.ready_timeout_s, process, on_poll=show_progress)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{log_tail(log_path)}") from None
        say(f"server pid {process.pid} SERVING on {address} after {time.perf_counter() - t0:.1f}s (metrics :{metrics_port})")
        yield Server(address, process.pid, metrics_port, log_path)
    finally:
        code = stop_process(process, grace_s=30.0)
        say(f"server stopped (exit {code}{', SIGKILL after 30 s' if code == -signal.SIGKILL else ''})")
        if scratch is not None:
            scratch.cleanup()


def percentile(response_times: Mapping[int, int], count: int, share: float) -> int:
    """Locust's own rule (stats.calculate_response_time_percentile) over its rounded-ms histogram."""
    below = int(count * share)
    seen = 0
    for ms in sorted(response_times, reverse=True):
        seen += response_times[ms]
        if count - seen <= below:
            return ms
    return 0


def summary_table(stats_json: Path) -> str:
    """Requests, failures and latency per method from locust's final JSON stats (`--json-file`):
    unlike the CSV, written every second, it includes the calls that ended while locust stopped."""
    entries = json.loads(stats_json.read_text())
    total: dict = {
        "name": "Aggregated",
        "num_requests": 0,
        "num_failures": 0,
        "response_times": Counter(),
        "max_response_time": 0,
        "start_time": min((e["start_time"] for e in entries), default=0),
        "last_request_timestamp": 0,
    }
    for e in entries:
        e["response_times"] = {int(k): v for k, v in e["response_times"].items()}
        total["num_requests"] += e["num_requests"]
        total["num_failures"] += e["num_failures"]
        total["response_times"].update(e["response_times"])
        total["max_response_time"] = max(total["max_response_time"], e["max_response_time"] or 0)
        total["last_request_timestamp"] = max(total["last_request_timestamp"], e["last_request_timestamp"] or 0)
    header = f"{'method':<22} {'requests':>9} {'failures':>9} {'req/s':>6} {'median':>7} {'p95':>7} {'p99':>7} {'max':>7}  (ms)"
    lines = [header, "-" * len(header)]
    for e in [*sorted(entries, key=lambda e: e["name"]), total]:
        n = e["num_requests"]
        seconds = max((e["last_request_timestamp"] or 0) - (e["start_time"] or 0), 1e-9)
        cells = [percentile(e["response_times"], n, q) for q in (0.5, 0.95, 0.99)]
        lines.append(
            f"{e['name']:<22} {n:>9} {e['num_failures']:>9} {n / seconds:>6.1f} "
            + " ".join(f"{c:>7}" for c in cells)
            + f" {float(e['max_response_time'] or 0):>7.0f}"
        )
    return "\n".join(lines)


def run_locust(host: str, args: argparse.Namespace, prefix: Path) -> int:
    env = dict(os.environ)
    seed = subprocess.run([sys.executable, str(LOCUSTFILE), "--prepare", "--host", host], cwd=ROOT, env=env, check=False)
    if seed.returncode != 0:
        say("seeding collection 'loadtest' failed")
        return seed.returncode
    locust = BIN / "locust"
    command = [
        str(locust) if locust.exists() else sys.executable,
        *([] if locust.exists() else ["-m", "locust"]),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        args.run_time,
        "--host",
        host,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--json-file",
        str(prefix),
    ]
    say("running " + " ".join(command))
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument("--run-time", default="60s", help="locust duration, e.g. 30s, 2m")
    parser.add_argument("--host", default=None, help="an already running server (host:port); default: start one")
    parser.add_argument(
        "--no-rome", action="store_true", help="started server: no ROME collection (MatchProfile replaces MatchOccupation)"
    )
    parser.add_argument(
        "--collections-dir", type=Path, default=CACHE_DIR, help="started server's collections (kept between runs)"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / stamp
    if args.host:
        code = run_locust(args.host, args, prefix)
    else:
        options = ServerOptions(args.collections_dir, rome=not args.no_rome, log_path=args.out_dir / f"{stamp}-server.log")
        try:
            with running_server(options) as server:
                code = run_locust(server.address, args, prefix)
        except (RuntimeError, TimeoutError) as exc:
            say(f"loadtest: {exc}")
            return 2
    stats = Path(f"{prefix}.json")
    if stats.is_file():
        print(
            f"\nlocust: {args.users} users, spawn rate {args.spawn_rate}/s, {args.run_time} (CSV {prefix}_*.csv, HTML {prefix}.html)"
        )
        print(summary_table(stats))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
