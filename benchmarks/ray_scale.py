"""1 vs 2 Embedder replicas on Ray Serve, against the single-process server, in one run.

    .venv/bin/python -P benchmarks/ray_scale.py [--quick] [--out benchmarks/results/ray-scale-DATE-vm]

A real local Ray cluster (a head and two worker nodes, `openemploi.testing.ray_cluster`) serves
`openemploi serve --ray --embed-replicas N`; the same closed-loop gRPC clients (one text per
request, PASSAGE, truncated) drive it and `openemploi serve` with the same settings. For each
server: texts/s at 8 and 32 clients, and the latency of one client alone (p50), then the ratios
2 replicas / 1 and Ray / one process, and the proxy overhead per request: Ray's single-client p50
minus the single process's, and CPU time per text of all the cluster's processes against the
server process's (CPU time is steadier than wall time on a shared machine).

The single-process server is measured first and again last: the two runs bracket the machine's noise.
Results: `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil

from openemploi.build.fidelity import Probe
from openemploi.testing.launcher import ServerProcess
from openemploi.testing.ray_cluster import LocalRayCluster
from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
MODEL = "multilingual-e5-small"
SERVER_ENV = {
    "OPENEMPLOI_MODEL_REPOSITORY": str(ROOT / "models"),
    "OPENEMPLOI_DEFAULT_MODEL": MODEL,
    "OPENEMPLOI_MODELS": MODEL,
    "OPENEMPLOI_LOG_LEVEL": "WARNING",
}
CALL_TIMEOUT_S = 120.0
IDLE_S = 3.0  # how long each server's idle CPU draw is measured, to net it out of CPU per text


def texts() -> list[str]:
    """Short French texts (job titles, queries, passages of the fidelity probe), blank ones left out."""
    probe = Probe.load()
    return [t for t in (*probe.texts, *probe.queries, *probe.passages) if t.strip()]


async def drive(address: str, requests: Sequence[embedding_pb2.EmbedRequest], clients: int, total: int) -> list[float]:
    """`clients` closed-loop clients on one channel share `total` requests; returns each latency (ms)."""
    counter = itertools.count()
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        embed = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed

        async def client() -> None:
            while (i := next(counter)) < total:
                started = time.perf_counter()
                await embed(requests[i % len(requests)], timeout=CALL_TIMEOUT_S)
                latencies.append((time.perf_counter() - started) * 1e3)

        await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


ROLES = (  # a Ray process's title -> what it does for a request
    ("ProxyActor", "proxy"),
    ("openemploi:Gateway", "gateway"),
    ("openemploi:Embedder", "embedder"),
    ("CollectionShard", "shards"),
    ("ServeController", "controller"),
)


def role(process: psutil.Process) -> str:
    """`server` (the single process), a Serve role, or `ray` (raylets, GCS, agents, monitors)."""
    title = " ".join(process.cmdline())
    if "openemploi.cli" in title and "--ray" not in title:
        return "server"
    return next((name for mark, name in ROLES if mark in title), "ray")


def cpu_by_role(processes: Sequence[psutil.Process]) -> Counter[str]:
    seconds: Counter[str] = Counter()
    for process in processes:
        try:
            times = process.cpu_times()
            seconds[role(process)] += times.user + times.system
        except psutil.Error:
            continue
    return seconds


def measure(
    address: str, processes: Callable[[], list[psutil.Process]], requests: list[Any], levels: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """Each (clients, requests) level after a short warm-up; CPU of `processes` (listed at each level's start),
    by role, less what they draw idle."""
    result: dict[str, Any] = {}
    idle = processes()
    before = cpu_by_role(idle)
    time.sleep(IDLE_S)
    idle_per_s = {name: value / IDLE_S for name, value in (cpu_by_role(idle) - before).items()}
    result["idle_cpu_cores"] = round(sum(idle_per_s.values()), 3)
    for clients, total in levels:
        asyncio.run(drive(address, requests[::-1], clients, 2 * clients))  # warm-up: other texts, batches formed
        watched = processes()
        before, t0 = cpu_by_role(watched), time.perf_counter()
        latencies = asyncio.run(drive(address, requests, clients, total))
        wall, used = time.perf_counter() - t0, cpu_by_role(watched)
        net = {name: (used[name] - before[name] - idle_per_s.get(name, 0.0) * wall) * 1e3 / total for name in used}
        result[f"c{clients}"] = {
            "clients": clients,
            "requests": total,
            "wall_s": round(wall, 3),
            "texts_per_s": round(total / wall, 2),
            "p50_ms": round(statistics.median(latencies), 2),
            "p90_ms": round(statistics.quantiles(latencies, n=10)[-1], 2),
            "cpu_ms_per_text": round((sum(used.values()) - sum(before.values())) * 1e3 / total, 2),
            "cpu_ms_per_text_net": round(sum(net.values()), 2),  # less the idle draw
            "cpu_ms_per_text_net_by_role": {name: round(value, 2) for name, value in sorted(net.items())},
            "processes_watched": len(watched),
        }
        print(f"  {clients:>2} clients: {result[f'c{clients}']}", flush=True)
    return result


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@contextmanager
def single_process_server(folder: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(Path(tempfile.mkdtemp(dir=folder)), log_dir=Path(tempfile.mkdtemp(dir=folder)), env=SERVER_ENV)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def ray_server(cluster: LocalRayCluster, folder: Path, replicas: int) -> Iterator[ServerProcess]:
    command = [sys.executable, "-P", "-m", "openemploi.cli", "serve", "--ray", "--ray-address", cluster.address]
    command += ["--embed-replicas", str(replicas), "--shards", "1"]
    server = ServerProcess(
        Path(tempfile.mkdtemp(dir=folder)),
        log_dir=Path(tempfile.mkdtemp(dir=folder)),
        env={**SERVER_ENV, **cluster.variables()},
        command=command,
        ready_timeout_s=600.0,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_s=60.0)


def cluster_processes(cluster: LocalRayCluster) -> list[psutil.Process]:
    """Every process of every node: replicas, proxies, controller, raylets, GCS."""
    return [process for node in (cluster.head, *cluster.workers) for process in node.processes()]


def ratio(value: float, base: float) -> float:
    return round(value / base, 3) if base else float("nan")


def net_cpu(run: dict[str, Any], level: str) -> float:
    return float(run[level]["cpu_ms_per_text_net"])


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios against the mean of the two single-process runs (before and after the Ray ones)."""
    locals_ = [runs["single_process"], runs.get("single_process_again", runs["single_process"])]
    one, two = runs["ray_1_replica"], runs["ray_2_replicas"]

    def local(level: str, key: str) -> float:
        return statistics.fmean(float(run[level][key]) for run in locals_)

    summary: dict[str, Any] = {}
    for level in ("c8", "c32"):
        base = local(level, "texts_per_s")
        summary[level] = {
            "two_vs_one_replica": ratio(two[level]["texts_per_s"], one[level]["texts_per_s"]),
            "ray_1_vs_single_process": ratio(one[level]["texts_per_s"], base),
            "ray_2_vs_single_process": ratio(two[level]["texts_per_s"], base),
            "cpu_ms_per_text_net_ray_1_minus_single_process": round(net_cpu(one, level) - local(level, "cpu_ms_per_text_net"), 2),
        }
    summary["proxy_overhead_p50_ms"] = {
        "ray_1_replica": round(one["c1"]["p50_ms"] - local("c1", "p50_ms"), 2),
        "ray_2_replicas": round(two["c1"]["p50_ms"] - local("c1", "p50_ms"), 2),
    }
    summary["proxy_overhead_cpu_ms_per_request"] = round(net_cpu(one, "c1") - local("c1", "cpu_ms_per_text_net"), 2)
    return summary


def render(report: dict[str, Any]) -> str:
    runs, summary = report["runs"], report["summary"]
    machine = report["machine"]
    lines = [
        f"# Ray Serve scale-out: {report['date']} on {machine['hostname']}",
        "",
        f"`{report['command']}` at commit `{report['commit']}`; {machine['cpu_count']} CPUs, load average "
        f"{machine['loadavg_at_start']} at start, {machine['loadavg_at_end']} at end; {report['wall_s']:.0f} s in all.",
        "",
        "Cluster: a head and two worker nodes on this host (1 logical CPU each), `openemploi serve --ray "
        "--embed-replicas N --shards 1`; clients: one text per Embed request, closed loop, in one process on this host too. "
        "CPU ms/text: CPU time of the server process (single process) or of every process of the cluster (Ray) "
        "during the level, less their idle draw, per text.",
        "",
        "| server | idle CPU (cores) | 1 client p50 ms | 1 client CPU ms/text | 8 clients texts/s | 8 p50 ms "
        "| 32 clients texts/s | 32 p50 ms | CPU ms/text at 32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['idle_cpu_cores']} | {run['c1']['p50_ms']} | {run['c1']['cpu_ms_per_text_net']} "
            f"| {run['c8']['texts_per_s']} | {run['c8']['p50_ms']} | {run['c32']['texts_per_s']} | {run['c32']['p50_ms']} "
            f"| {run['c32']['cpu_ms_per_text_net']} |"
        )
    lines += ["", "CPU ms per text at 32 clients, by role (net of idle):", "", "| server | by role |", "|---|---|"]
    for name, run in runs.items():
        roles = ", ".join(f"{role} {value}" for role, value in run["c32"]["cpu_ms_per_text_net_by_role"].items())
        lines.append(f"| {name} | {roles} |")
    c8, c32 = summary["c8"], summary["c32"]
    overhead = summary["proxy_overhead_p50_ms"]
    lines += [
        "",
        "| ratio | 8 clients | 32 clients |",
        "|---|---|---|",
        f"| 2 replicas / 1 replica (texts/s) | {c8['two_vs_one_replica']} | {c32['two_vs_one_replica']} |",
        f"| Ray 1 replica / single process | {c8['ray_1_vs_single_process']} | {c32['ray_1_vs_single_process']} |",
        f"| Ray 2 replicas / single process | {c8['ray_2_vs_single_process']} | {c32['ray_2_vs_single_process']} |",
        f"| CPU ms/text, Ray 1 replica - single process | {c8['cpu_ms_per_text_net_ray_1_minus_single_process']} "
        f"| {c32['cpu_ms_per_text_net_ray_1_minus_single_process']} |",
        "",
        f"Proxy overhead per request, one client alone: p50 +{overhead['ray_1_replica']} ms (1 replica), "
        f"+{overhead['ray_2_replicas']} ms (2 replicas); CPU +{summary['proxy_overhead_cpu_ms_per_request']} ms per request.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per level (a smoke run)")
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"ray-scale-{today}-vm")
    args = parser.parse_args(argv)
    scale = 1 if args.quick else 3
    levels = [(1, 40 * scale), (8, 120 * scale), (32, 240 * scale)]
    requests = [embedding_pb2.EmbedRequest(texts=[t], kind=embedding_pb2.PASSAGE, truncate=True) for t in texts()]
    started, load_at_start = time.monotonic(), list(os.getloadavg())
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as scratch:
        folder = Path(scratch)
        print("single process", flush=True)
        with single_process_server(folder) as server:
            runs["single_process"] = measure(server.address, lambda: tree(server.pid), requests, levels)
        with LocalRayCluster(workers=2) as cluster:
            for replicas in (1, 2):
                name = "ray_1_replica" if replicas == 1 else "ray_2_replicas"
                print(name, flush=True)
                with ray_server(cluster, folder, replicas) as server:
                    runs[name] = measure(server.address, lambda: cluster_processes(cluster), requests, levels)
        print("single process, again", flush=True)
        with single_process_server(folder) as server:
            runs["single_process_again"] = measure(server.address, lambda: tree(server.pid), requests, levels)
    report = {
        "date": today,
        "command": " ".join(["python -P benchmarks/ray_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "wall_s": time.monotonic() - started,
        "machine": {
            "hostname": platform.node(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in load_at_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "levels": [{"clients": c, "requests": n} for c, n in levels],
        "runs": runs,
    }
    report["summary"] = summarise(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
