#!/usr/bin/env python3
"""Peers: the gRPC server against the raw int8 engine and Infinity, on the same texts in the same run.

    .venv/bin/python benchmarks/peers.py [--quick] [--out PATH] [--skip-infinity]
    .venv/bin/python benchmarks/peers.py --install      # what `make bench-peers` runs first

Texts: the 1,584 ROME 4.0 occupation labels (the first masculine label of each code), embedded as
passages ("passage: " + label), one text per request. Every engine sees the same texts:

* raw: ONNX Runtime on the project's int8 graph through the product's own backend
  (``open_encoder``, the server's defaults), in its own process: length-sorted batches of 32,
  tokenisation included; and single texts one at a time (the idle floor).
* server: ``openemploi serve`` (launcher), gRPC ``Embed`` with one text, from closed-loop asyncio
  clients at 32 and 128 concurrent requests, then one client alone (idle p50); then each idle text
  paired with the raw engine in this process and a gRPC health check (``paired_idle``), which the
  idle goal is judged on.
* infinity: Infinity (``infinity_emb v2``), installed by ``--install`` into its own virtualenv
  under ``.cache/peers/infinity`` (never a project dependency; torch from the local CPU wheel,
  pinned), serving the built version's own checkpoint folder (``models/<name>/<version>/hf``) with
  no hub access, over its OpenAI-style HTTP ``/embeddings``; one configuration per entry of
  INFINITY_CONFIGS (torch fp32, torch int8 dynamic quantisation), same clients as the server.

``PEERS_INFINITY_CONFIGS=infinity_torch_int8_b32`` (names, comma-separated) measures only those
configurations: on a busy machine each one costs minutes to start.

The client runs in this process for every engine, so each pays the same client CPU on the same
2 cores. Ratios, not texts/s, are what compare across runs (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embed_bench

ROOT = Path(__file__).resolve().parents[1]
ROME_PATH = ROOT / "server" / "matching" / "data" / "rome4_enriched.jsonl"
PEERS_DIR = ROOT / ".cache" / "peers"
INFINITY_VENV = PEERS_DIR / "infinity"
INFINITY_VERSION = "0.0.78"
TORCH_PIN = "torch==2.13.0+cpu"  # the local CPU wheel: an unpinned torch pulls a multi-GB CUDA build
BATCH = 32
LEVELS = (32, 128)
RESULT_MARK = "@@peers-result "

# (name, infinity_emb v2 arguments): its CPU choices. int8 = torch dynamic quantisation of the linears;
# batch 32 is Infinity's default, 64 lets it batch all 32 clients' texts plus the next arrivals.
INFINITY_CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infinity_torch_fp32_b32", ("--engine", "torch", "--device", "cpu", "--dtype", "float32", "--batch-size", "32")),
    ("infinity_torch_int8_b32", ("--engine", "torch", "--device", "cpu", "--dtype", "int8", "--batch-size", "32")),
    ("infinity_torch_int8_b64", ("--engine", "torch", "--device", "cpu", "--dtype", "int8", "--batch-size", "64")),
)

# Goals of issue 14, judged on ratios from this run.
TARGET_VS_RAW = 0.90  # server texts/s at 32 clients / raw int8 texts/s
TARGET_SATURATION = 0.95  # server at 128 clients / server at 32 clients
TARGET_IDLE_SLACK_MS = 1.0  # server idle p50 <= raw single p50 + this
TARGET_VS_INFINITY = 2.0  # server texts/s at 32 clients / Infinity's best configuration's
TARGET_IDLE_VS_INFINITY = 3.0  # Infinity's best idle p50 / server idle p50


@dataclass(frozen=True)
class Plan:
    texts: int  # labels used (all 1,584, or the first ones with --quick)
    requests: int  # timed requests per concurrency level
    idle_requests: int  # single requests, one client
    raw_passes: int

    @classmethod
    def of(cls, quick: bool) -> Plan:
        return cls(256, 256, 32, 1) if quick else cls(1584, 768, 100, 2)


def say(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def rome_labels(count: int) -> list[str]:
    labels = [json.loads(line)["masculine"][0] for line in ROME_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    return labels[:count]


def p50(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- raw engine (a child process for throughput; the client process for paired_idle) ------------
class RawEngine:
    """The server's backend called directly (``open_encoder``, the server's defaults): tokenise + pad + run."""

    def __init__(self) -> None:
        from openemploi.backends import BackendKind
        from openemploi.backends.options import BackendConfig
        from openemploi.backends.select import open_encoder

        self.version = embed_bench.model_version()
        self.tokenizer = embed_bench.server_tokenizer(self.version)
        self.encoder = open_encoder(self.version, BackendKind.ONNX, BackendConfig(cpu_precision="int8"))

    def lengths(self, texts: Sequence[str]) -> list[int]:
        from openemploi.tokenize import TextKind

        return [len(t.ids) for t in self.tokenizer.encode(list(texts), TextKind.PASSAGE, truncate=True)]

    def run(self, batch: Sequence[str]) -> None:
        from openemploi.padding import pad_sequences
        from openemploi.tokenize import TextKind

        tokens = self.tokenizer.encode(list(batch), TextKind.PASSAGE, truncate=True)
        self.encoder.encode(*pad_sequences([t.ids for t in tokens], self.tokenizer.pad_id))


def bench_raw(plan: Plan) -> dict[str, Any]:
    """Length-sorted batches of 32, then single texts one at a time (the idle floor)."""
    import numpy as np

    engine = RawEngine()
    texts = rome_labels(plan.texts)
    chunks = [[texts[i] for i in chunk] for chunk in embed_bench.sorted_chunks(engine.lengths(texts), BATCH)]
    for chunk in (chunks[0], chunks[-1]):
        engine.run(chunk)
    rates, cpu_ms = [], []
    for _ in range(plan.raw_passes):
        started, cpu = time.perf_counter(), time.process_time()
        for chunk in chunks:
            engine.run(chunk)
        rates.append(len(texts) / (time.perf_counter() - started))
        cpu_ms.append((time.process_time() - cpu) / len(texts) * 1e3)
    singles = []
    for text in texts[: plan.idle_requests]:
        started = time.perf_counter()
        engine.run([text])
        singles.append((time.perf_counter() - started) * 1e3)
    return {
        "engine": "raw_int8",
        "model_version": engine.version.version,
        "encoder": engine.encoder.info.detail,
        "texts_per_s": statistics.median(rates),
        "passes_texts_per_s": rates,
        "cpu_ms_per_text": statistics.median(cpu_ms),
        "single_p50_ms": p50(singles),
        "single_p90_ms": float(np.percentile(singles, 90)),
    }


def run_raw_child(quick: bool) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-raw", *(["--quick"] if quick else [])]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=600, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"raw child exited with {done.returncode}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


# -- closed-loop clients ---------------------------------------------------------------------------
Send = Callable[[str], Awaitable[None]]


async def closed_loop(send: Send, texts: Sequence[str], concurrency: int, total: int, pid: int | None = None) -> dict[str, Any]:
    """`concurrency` clients, each sending its next text as soon as its previous answer came.

    CPU per text of the serving process (`pid`) and of this client, and what other processes took:
    on a shared machine these say where the time went when texts/s alone cannot."""
    counter = itertools.count()
    latencies: list[float] = []

    async def client() -> None:
        while (i := next(counter)) < total:
            started = time.perf_counter()
            await send(texts[i % len(texts)])
            latencies.append((time.perf_counter() - started) * 1e3)

    meter = embed_bench.CpuMeter(pid).start()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = meter.stop(total)
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": total,
        "texts_per_s": total / wall,
        "server_cpu_ms_per_text": None if cpu["server_cores"] is None else cpu["server_cores"] * wall / total * 1e3,
        "client_cpu_ms_per_text": cpu["self_cpu_us_per_item"] / 1e3,
        "other_cores": cpu["other_cores"],
        "p50_ms": p50(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def measure_peer(send: Send, texts: Sequence[str], plan: Plan, pid: int | None = None) -> dict[str, Any]:
    await closed_loop(send, texts, 8, 64)  # warm connections and code paths
    idle = []
    for text in texts[: plan.idle_requests]:
        started = time.perf_counter()
        await send(text)
        idle.append((time.perf_counter() - started) * 1e3)
    levels = [await closed_loop(send, texts, c, plan.requests, pid) for c in LEVELS]
    return {
        "idle_p50_ms": p50(idle),
        "levels": levels,
        **{f"c{lv['concurrency']}_texts_per_s": lv["texts_per_s"] for lv in levels},
    }


async def grpc_peer(port: int, pid: int, texts: Sequence[str], plan: Plan) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

        async def send(text: str) -> None:
            await stub.Embed(embedding_pb2.EmbedRequest(texts=[text], kind=embedding_pb2.PASSAGE, truncate=True), timeout=120)

        health = health_pb2_grpc.HealthStub(channel)

        async def check() -> None:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=120)

        measured = await measure_peer(send, texts, plan, pid)
        return {**measured, "paired": await paired_idle(send, check, RawEngine(), texts[: plan.idle_requests])}


async def paired_idle(send: Send, check: Callable[[], Awaitable[None]], raw: RawEngine, texts: Sequence[str]) -> dict[str, Any]:
    """Per text, back to back: the raw engine on it in this process, a gRPC health check, the server on it.

    On a VM the same raw call takes 3.6 ms back to back and twice that after a pause (an idle core
    runs it cold), and timings swing 2x within a minute; the raw child's singles run back to back,
    minutes before the server's. Paired, each server request has its raw twin within milliseconds,
    after the same pause. The health check is gRPC's own round trip (client and server, no model):
    the floor under the server's cost.
    """
    raw.run(texts[:1])
    raw_ms, floor_ms, server_ms = [], [], []
    for text in texts:
        started = time.perf_counter()
        raw.run([text])
        raw_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await check()
        floor_ms.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        await send(text)
        server_ms.append((time.perf_counter() - started) * 1e3)
    return {
        "requests": len(texts),
        "raw_single_p50_ms": p50(raw_ms),
        "grpc_health_p50_ms": p50(floor_ms),
        "server_p50_ms": p50(server_ms),
        "server_minus_raw_p50_ms": p50([s - r for s, r in zip(server_ms, raw_ms)]),
    }


async def http_peer(url: str, pid: int, model: str, texts: Sequence[str], plan: Plan) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=max(LEVELS), max_keepalive_connections=max(LEVELS))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def send(text: str) -> None:
            reply = await client.post("/embeddings", json={"model": model, "input": ["passage: " + text]})
            reply.raise_for_status()

        return await measure_peer(send, texts, plan, pid)


# -- Infinity --------------------------------------------------------------------------------------
def install_infinity() -> int:
    """Infinity in its own virtualenv under .cache/peers; torch pinned to the local CPU wheel."""
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    constraints = PEERS_DIR / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    python = INFINITY_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(INFINITY_VENV)], check=True)
    command = [str(python), "-m", "pip", "install", "--no-input", f"infinity-emb[server,torch]=={INFINITY_VERSION}"]
    command += ["-c", str(constraints), "--find-links", "/opt/wheels"]
    say(" ".join(command))
    return subprocess.run(command, check=False).returncode


def infinity_ready() -> bool:
    return (INFINITY_VENV / "bin" / "infinity_emb").exists()


@contextlib.contextmanager
def running_infinity(checkpoint: Path, args: Sequence[str], timeout_s: float = 600.0) -> Iterator[tuple[str, int]]:
    """`infinity_emb v2` on a free port, offline, on the project's checkpoint folder; stopped on exit."""
    from openemploi.testing.launcher import free_port, stop_process

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    command = [str(INFINITY_VENV / "bin" / "infinity_emb"), "v2", "--model-id", str(checkpoint), "--port", str(port)]
    command += ["--host", "127.0.0.1", "--no-bettertransformer", "--no-model-warmup", *args]
    log = (PEERS_DIR / f"infinity-{port}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PEERS_DIR)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", process, timeout_s)
        yield url, process.pid
    finally:
        stop_process(process, grace_s=10.0)
        log.close()


def wait_http(url: str, process: subprocess.Popen[Any], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"infinity exited with {process.returncode} before ready (log under {PEERS_DIR})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"infinity not ready after {timeout_s:.0f} s")


# -- the run ---------------------------------------------------------------------------------------
def idle_row(raw: dict[str, Any], server: dict[str, Any]) -> tuple[str, float, str, float]:
    """The idle goal on the paired run (paired_idle) when the report has one, else on the raw child's singles."""
    paired = server.get("paired")
    if paired:
        return (
            "server idle p50 ms, paired (<= raw single p50 in the same loop + 1 ms)",
            paired["server_p50_ms"],
            "<=",
            paired["raw_single_p50_ms"] + TARGET_IDLE_SLACK_MS,
        )
    return (
        "server idle p50 ms (<= raw single p50 + 1 ms)",
        server["idle_p50_ms"],
        "<=",
        raw["single_p50_ms"] + TARGET_IDLE_SLACK_MS,
    )


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    raw, server = report["raw"], report["server"]
    rows = [
        (
            "server texts/s at 32 clients / raw int8 (peers, ROME labels)",
            server["c32_texts_per_s"] / raw["texts_per_s"],
            ">=",
            TARGET_VS_RAW,
        ),
        (
            "server texts/s at 128 clients / at 32 clients",
            server["c128_texts_per_s"] / server["c32_texts_per_s"],
            ">=",
            TARGET_SATURATION,
        ),
        idle_row(raw, server),
    ]
    peers = [p for p in report["infinity"].values() if "error" not in p]
    if peers:
        best = max(peers, key=lambda p: p["c32_texts_per_s"])
        fastest = min(p["idle_p50_ms"] for p in peers)
        rows.append(
            (
                f"server texts/s at 32 clients / Infinity best ({best['config']})",
                server["c32_texts_per_s"] / best["c32_texts_per_s"],
                ">=",
                TARGET_VS_INFINITY,
            )
        )
        rows.append(("Infinity best idle p50 / server idle p50", fastest / server["idle_p50_ms"], ">=", TARGET_IDLE_VS_INFINITY))
    out = []
    for name, value, op, threshold in rows:
        ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "status": "PASS" if ok else "MISS"})
    return out


def measure(quick: bool = False, with_infinity: bool = True) -> dict[str, Any]:
    """Raw int8 (child process), the server, then each Infinity configuration: one report."""
    plan = Plan.of(quick)
    texts = rome_labels(plan.texts)
    say(f"raw int8: {plan.texts} ROME labels, batches of {BATCH}")
    report: dict[str, Any] = {
        "benchmark": "peers",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "plan": plan.__dict__,
        "loadavg_at_start": list(os.getloadavg()),
        "raw": run_raw_child(quick),
        "infinity": {},
    }
    say(f"raw int8: {report['raw']['texts_per_s']:.1f} texts/s, single p50 {report['raw']['single_p50_ms']:.2f} ms")
    meta: dict[str, Any] = {}
    with embed_bench.running_server(meta) as server:
        report["server"] = asyncio.run(grpc_peer(server.port, server.pid, texts, plan))
    say(f"server: {report['server']['c32_texts_per_s']:.1f} texts/s at 32, idle p50 {report['server']['idle_p50_ms']:.2f} ms")
    if not with_infinity or not infinity_ready():
        report["infinity_skipped"] = f"no Infinity under {INFINITY_VENV} (run `make bench-peers` to install it)"
        say(report["infinity_skipped"])
    else:
        checkpoint = embed_bench.model_version().folder / "hf"
        wanted = os.environ.get("PEERS_INFINITY_CONFIGS")  # e.g. "infinity_torch_int8_b32": a subset, for a short run
        for name, args in INFINITY_CONFIGS:
            if wanted and name not in wanted.split(","):
                continue
            say(f"{name}: starting on {checkpoint}")
            try:
                with running_infinity(checkpoint, args) as (url, pid):
                    result = asyncio.run(http_peer(url, pid, str(checkpoint), texts, plan))
                report["infinity"][name] = {"config": name, "args": list(args), **result}
                say(f"{name}: {result['c32_texts_per_s']:.1f} texts/s at 32, idle p50 {result['idle_p50_ms']:.2f} ms")
            except embed_bench.Terminated:
                raise
            except Exception as exc:  # one configuration failing must not cost the others
                report["infinity"][name] = {"config": name, "error": f"{type(exc).__name__}: {exc}"}
                say(f"{name}: FAILED {exc}")
    report["targets"] = targets(report)
    report["loadavg_at_end"] = list(os.getloadavg())
    return report


def peer_figures(report: dict[str, Any]) -> tuple[list[Any], dict[str, Any], list[dict[str, Any]]]:
    """The suite's figures: the server against the raw engine and each Infinity configuration."""
    from openemploi.testing.bench_results import Figure

    raw, server = report["raw"], report["server"]
    figures = [
        Figure(
            "peers.server.c32.texts_per_s",
            server["c32_texts_per_s"],
            "texts/s",
            "raw int8 texts/s",
            raw["texts_per_s"],
            True,
            True,
        ),
        Figure(
            "peers.server.c128.texts_per_s",
            server["c128_texts_per_s"],
            "texts/s",
            "server at 32 clients",
            server["c32_texts_per_s"],
            True,
            True,
        ),
        Figure("peers.server.idle_p50_ms", server["idle_p50_ms"], "ms", "raw int8 single p50", raw["single_p50_ms"], False, True),
    ]
    if server.get("paired"):
        paired = server["paired"]
        figures.append(
            Figure(
                "peers.server.idle_paired_p50_ms",
                paired["server_p50_ms"],
                "ms",
                "raw int8 single p50, paired",
                paired["raw_single_p50_ms"],
                False,
                True,
            )
        )
    for name, peer in report["infinity"].items():
        if "error" in peer:
            continue
        figures.append(
            Figure(
                f"peers.server.c32_vs_{name}",
                server["c32_texts_per_s"],
                "texts/s",
                f"{name} texts/s at 32",
                peer["c32_texts_per_s"],
                True,
                True,
            )
        )
        figures.append(
            Figure(f"peers.{name}.idle_p50_ms", peer["idle_p50_ms"], "ms", "server idle p50", server["idle_p50_ms"], True, True)
        )
    targets = [{**t, "part": "peers"} for t in report["targets"]]
    if "infinity_skipped" in report:
        targets.append(
            {
                "target": "Infinity measured in this run",
                "value": None,
                "op": "",
                "threshold": None,
                "status": "SKIPPED",
                "part": "peers",
                "best": report["infinity_skipped"],
            }
        )
    return figures, {"peers": {"raw": raw, "server": server, "infinity": report["infinity"]}}, targets


def render(report: dict[str, Any]) -> str:
    raw, server = report["raw"], report["server"]
    lines = ["| engine | texts/s at 32 | texts/s at 128 | idle single p50 ms |", "|---|---|---|---|"]
    lines.append(
        f"| raw int8 ({raw['model_version']}, batches of {BATCH}) | {raw['texts_per_s']:.1f} | - | {raw['single_p50_ms']:.2f} |"
    )
    lines.append(
        f"| openemploi gRPC | {server['c32_texts_per_s']:.1f} | {server['c128_texts_per_s']:.1f} | {server['idle_p50_ms']:.2f} |"
    )
    paired = server.get("paired")
    if paired:
        lines.append(
            f"| paired, one text at a time: raw / gRPC health / server | - | - | {paired['raw_single_p50_ms']:.2f} / "
            f"{paired['grpc_health_p50_ms']:.2f} / {paired['server_p50_ms']:.2f} |"
        )
    for name, peer in report["infinity"].items():
        if "error" in peer:
            lines.append(f"| {name} | failed: {peer['error']} | | |")
        else:
            lines.append(
                f"| {name} | {peer['c32_texts_per_s']:.1f} | {peer['c128_texts_per_s']:.1f} | {peer['idle_p50_ms']:.2f} |"
            )
    if "infinity_skipped" in report:
        lines.append(f"\nInfinity skipped: {report['infinity_skipped']}")
    lines += ["", "| target | value | op | threshold | status |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']:.3f} | {t['op']} | {t['threshold']:.3f} | {t['status']} |" for t in report["targets"]
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="256 labels and requests per level (smoke)")
    parser.add_argument("--install", action="store_true", help="install Infinity under .cache/peers and exit")
    parser.add_argument("--skip-infinity", action="store_true", help="raw engine and server only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/peers-DATE-HOST.json)")
    parser.add_argument("--child-raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.install:
        return install_infinity()
    if args.child_raw:
        sys.stdout.write(RESULT_MARK + json.dumps(bench_raw(Plan.of(args.quick))) + "\n")
        return 0
    report = measure(args.quick, not args.skip_infinity)
    print(render(report))
    out = args.out or ROOT / "benchmarks" / "results" / f"peers-{datetime.date.today()}-{socket.gethostname()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
