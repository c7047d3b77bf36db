"""Overload behaviour of the gRPC server: admitted latency, refusals, memory, graceful drain.

    .venv/bin/python benchmarks/overload.py [--quick] [--max-queue-delay-ms 25] [--factor 4] [--out PATH]

Starts ``openemploi serve`` in its own process (this process is the client, with
``grpc.aio``) and measures, on short French queries from the probe set:

1. unloaded: one request at a time -> p50 / p99 (the reference latency);
2. capacity: closed-loop clients, 1, 2, 4, ... until OK/s stops growing -> the best OK/s;
3. overload: an open-loop Poisson generator at ``--factor`` x capacity for ``--overload-s``:
   each request's status and client-side latency; admitted (OK) p99 against 2 x unloaded p99,
   RESOURCE_EXHAUSTED refusal latency against 5 ms, DEADLINE_EXCEEDED refusals (a share of the
   requests carries a tight deadline: refused early, or expired = served late), the server's RSS
   before / during / after;
4. shutdown: SIGTERM while an open-loop load runs -> requests in flight at that moment that
   completed OK vs failed, requests sent afterwards (refused UNAVAILABLE), exit code and time;
5. baseline (full run only, ``--no-baseline`` skips it): the same overload against a fresh server
   with ``max_queue_delay_ms = 0``, to show what the admission buys.

Prints one table and writes JSON to benchmarks/results/overload-<date>-<host>[-quick].json.
The machine may be shared: the report carries the CPU used by other tenants during each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import embed_bench as eb  # benchmarks/ helpers: percentiles, CPU meter, machine info, stop reports

from openemploi.testing.launcher import ServerProcess

ROOT = eb.ROOT
RESULTS_DIR = ROOT / "benchmarks" / "results"
REFUSAL_TARGET_MS = 5.0
P99_TARGET_FACTOR = 2.0
NORMAL_TIMEOUT_S = 5.0
MAX_OUTSTANDING = 20_000  # client-side guard: an open loop must not eat this machine's memory
BULK_TEXTS = 32  # the shutdown phase's long request: certainly in flight when SIGTERM lands


@dataclass(frozen=True)
class Plan:
    unloaded_requests: int
    warm_requests: int
    level_s: float
    max_concurrency: int
    overload_s: float
    settle_s: float
    shutdown_before_s: float
    shutdown_after_s: float

    @classmethod
    def of(cls, quick: bool, overload_s: float | None) -> Plan:
        if quick:
            return cls(100, 10, 3.0, 16, overload_s or 15.0, 2.0, 1.5, 1.0)
        return cls(300, 20, 5.0, 32, overload_s or 30.0, 3.0, 2.0, 1.5)


@dataclass
class Call:
    sent: float  # perf_counter seconds
    latency_ms: float
    code: str
    deadline_ms: float
    unmeetable: bool = False  # DEADLINE_EXCEEDED from the admission check (not an expiry)
    queue_ms: float | None = None  # server's own stage timings (trailing metadata of an OK call)
    inference_ms: float | None = None


def progress(message: str) -> None:
    print(f"[overload] {message}", file=sys.stderr, flush=True)


def load_queries() -> list[str]:
    """Short French job-search queries (the probe set's retrieval queries: about 18 tokens each)."""
    data = json.loads(eb.PROBE_PATH.read_text(encoding="utf-8"))
    return [q["text"] for q in data["retrieval"]["queries"] if q["text"].strip()]


def pct(values: Sequence[float]) -> dict[str, float] | None:
    return eb.percentiles(values, (50, 90, 99)) if values else None


# --------------------------------------------------------------------------- server process


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    overrides: dict[str, str]
    ready_s: float = 0.0
    stop: dict[str, Any] = field(default_factory=dict)

    def rss_mb(self) -> float | None:
        """Resident memory of the server process (VmRSS), MiB."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            return None
        return None


@contextlib.contextmanager
def running_server(overrides: dict[str, str], ready_timeout_s: float = 240.0) -> Iterator[Server]:
    """`openemploi serve` on a free port with `overrides` (and the shell's OPENEMPLOI_* settings) in its
    environment; SIGTERM'd on exit unless the shutdown phase already stopped it."""
    with tempfile.TemporaryDirectory(prefix="overload-server-") as scratch:
        launched = ServerProcess(
            Path(scratch) / "collections",
            Path(scratch),
            cwd=ROOT,
            env={**eb.SERVER_ENV, **overrides},
            ready_timeout_s=ready_timeout_s,
            keep_settings=True,
        )
        server: Server | None = None
        try:
            ready_s = launched.start()
            assert launched.process is not None and launched.log_path is not None
            server = Server(launched.process, launched.port, launched.log_path, overrides, ready_s)
            progress(f"server pid {launched.pid} SERVING on port {launched.port} after {ready_s:.1f}s")
            yield server
        finally:
            if launched.process is not None:
                if server is not None and not server.stop:
                    server.stop = eb.stop_report(launched.process, grace_s=30.0)
                if launched.process.returncode not in (0, None):
                    progress(f"server log (tail):\n{launched.log_tail(20)}")


# --------------------------------------------------------------------------- client


class Client:
    def __init__(self, port: int, queries: Sequence[str]) -> None:
        import grpc

        from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = embedding_pb2_grpc.EmbeddingServiceStub(self.channel)
        self.requests = [embedding_pb2.EmbedRequest(texts=[q], kind=embedding_pb2.QUERY) for q in queries]
        self.bulk = embedding_pb2.EmbedRequest(texts=list(queries[:BULK_TEXTS]), kind=embedding_pb2.QUERY)
        self._next = 0

    def request(self):
        self._next += 1
        return self.requests[self._next % len(self.requests)]

    async def call(self, timeout_s: float, request: Any = None) -> Call:
        request = request or self.request()
        sent = time.perf_counter()
        unmeetable = False
        stages: dict[str, str] = {}
        call = self.stub.Embed(request, timeout=timeout_s)
        try:
            await call
            code = "OK"
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code().name
            unmeetable = "cannot be met" in (exc.details() or "")
        latency_ms = (time.perf_counter() - sent) * 1e3
        if code == "OK":
            stages = {k: v for k, v in (await call.trailing_metadata() or ())}
        return Call(
            sent,
            latency_ms,
            code,
            timeout_s * 1e3,
            unmeetable,
            float(stages.get("x-openemploi-queue-ms", "nan")) if stages else None,
            float(stages.get("x-openemploi-inference-ms", "nan")) if stages else None,
        )

    async def close(self) -> None:
        await self.channel.close()


async def unloaded(client: Client, plan: Plan) -> dict[str, Any]:
    for _ in range(plan.warm_requests):
        await client.call(NORMAL_TIMEOUT_S)
    calls = [await client.call(NORMAL_TIMEOUT_S) for _ in range(plan.unloaded_requests)]
    ok = [c.latency_ms for c in calls if c.code == "OK"]
    return {"requests": len(calls), "ok": len(ok), "latency_ms": pct(ok), "codes": codes_of(calls)}


async def closed_loop(client: Client, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the previous one is answered.
    A refused client backs off 2-10 ms (as a real one would) instead of spinning."""
    calls: list[Call] = []
    end = time.perf_counter() + seconds

    async def one() -> None:
        while time.perf_counter() < end:
            call = await client.call(NORMAL_TIMEOUT_S)
            calls.append(call)
            if call.code != "OK":
                await asyncio.sleep(random.uniform(0.002, 0.010))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [c.latency_ms for c in calls if c.code == "OK"]
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "ok_per_s": len(ok) / wall,
        "latency_ms": pct(ok),
        "codes": codes_of(calls),
    }


async def capacity(client: Client, plan: Plan) -> dict[str, Any]:
    """Ramp closed-loop concurrency until OK/s has not grown by 5% for two levels."""
    levels = []
    best: dict[str, Any] | None = None
    stale = 0
    concurrency = 1
    while concurrency <= plan.max_concurrency:
        level = await closed_loop(client, concurrency, plan.level_s)
        levels.append(level)
        progress(f"capacity: {concurrency} clients -> {level['ok_per_s']:.1f} OK/s {level['codes']}")
        if best is None or level["ok_per_s"] > best["ok_per_s"] * 1.05:
            best, stale = level, 0
        else:
            stale += 1
            if best is not None and level["ok_per_s"] > best["ok_per_s"]:
                best = level
            if stale >= 2:
                break
        concurrency *= 2
    assert best is not None
    return {"ok_per_s": best["ok_per_s"], "at_concurrency": best["concurrency"], "levels": levels}


async def open_loop(
    client: Client,
    rate: float,
    seconds: float,
    tight_share: float,
    tight_deadline_s: float,
    rng: random.Random,
    on_tick: Any = None,
) -> list[Call]:
    """Poisson arrivals at `rate`/s for `seconds`, each request its own task (sends never wait
    for answers).  A `tight_share` of them carries `tight_deadline_s` instead of the normal one."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Call]] = set()
    done: list[Call] = []

    def collect(task: asyncio.Task[Call]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            done.append(task.result())

    start = loop.time()
    next_at = start
    end = start + seconds
    while next_at < end:
        now = loop.time()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if len(tasks) < MAX_OUTSTANDING:
            timeout = tight_deadline_s if rng.random() < tight_share else NORMAL_TIMEOUT_S
            task = asyncio.create_task(client.call(timeout))
            task.add_done_callback(collect)
            tasks.add(task)
        if on_tick is not None:
            on_tick(loop.time() - start)
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.wait(set(tasks))
    return done


def codes_of(calls: Sequence[Call]) -> dict[str, int]:
    out: dict[str, int] = {}
    for call in calls:
        out[call.code] = out.get(call.code, 0) + 1
    return out


async def sample_rss(server: Server, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        rss = server.rss_mb()
        if rss is not None:
            samples.append((time.perf_counter() - t0, rss))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def overload(
    client: Client, server: Server, plan: Plan, rate: float, tight_deadline_s: float, tight_share: float
) -> dict[str, Any]:
    rss_before = server.rss_mb()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(server, samples, stop))
    meter = eb.CpuMeter(server.process.pid).start()
    t0 = time.perf_counter()
    calls = await open_loop(client, rate, plan.overload_s, tight_share, tight_deadline_s, random.Random(7))
    wall = time.perf_counter() - t0
    cpu = meter.stop(max(1, len(calls)))
    stop.set()
    await sampler
    await asyncio.sleep(plan.settle_s)
    rss_after = server.rss_mb()

    ok = [c for c in calls if c.code == "OK"]
    exhausted = [c.latency_ms for c in calls if c.code == "RESOURCE_EXHAUSTED"]
    deadline = [c for c in calls if c.code == "DEADLINE_EXCEEDED"]
    # refused early: the server's admission said the deadline cannot be met; expired: the deadline
    # ran out while the request waited or ran (served late)
    early = [c for c in deadline if c.unmeetable]
    expired = [c for c in deadline if not c.unmeetable]
    tight = [c for c in calls if c.deadline_ms < NORMAL_TIMEOUT_S * 1e3]
    return {
        "offered_per_s": rate,
        "seconds": plan.overload_s,
        "wall_s": wall,
        "sent": len(calls),
        "codes": codes_of(calls),
        "ok_per_s": len(ok) / wall,
        "ok_latency_ms": pct([c.latency_ms for c in ok]),
        # where an admitted request's time went: the server's queue wait (what admission bounds),
        # inference, and the rest (gRPC, tokenisation, both event loops: what a busy machine inflates)
        "ok_server_queue_ms": pct([c.queue_ms for c in ok if c.queue_ms is not None]),
        "ok_server_inference_ms": pct([c.inference_ms for c in ok if c.inference_ms is not None]),
        "ok_other_ms": pct(
            [c.latency_ms - c.queue_ms - c.inference_ms for c in ok if c.queue_ms is not None and c.inference_ms is not None]
        ),
        "resource_exhausted_latency_ms": pct(exhausted),
        "resource_exhausted_within_target": (
            sum(v <= REFUSAL_TARGET_MS for v in exhausted) / len(exhausted) if exhausted else None
        ),
        "deadline": {
            "tight_deadline_ms": tight_deadline_s * 1e3,
            "tight_share": tight_share,
            "tight_sent": len(tight),
            "tight_ok": sum(c.code == "OK" for c in tight),
            "tight_refused_early": sum(c.code == "DEADLINE_EXCEEDED" and c.unmeetable for c in tight),
            "refused_early": len(early),  # all requests (normal ones carry a 5 s deadline)
            "refused_early_latency_ms": pct([c.latency_ms for c in early]),
            "expired": len(expired),
        },
        "rss_mb": {
            "before": rss_before,
            "max_during": max((r for _, r in samples), default=None),
            "after": rss_after,
            "samples": [[round(t, 2), round(r, 1)] for t, r in samples],
        },
        "cpu": cpu,
        "other_failures": {
            k: v for k, v in codes_of(calls).items() if k not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
        },
    }


async def shutdown(client: Client, server: Server, plan: Plan, rate: float) -> dict[str, Any]:
    """Open-loop load; SIGTERM part-way; keep sending for a while; then wait for every answer.

    Right before SIGTERM the load pauses (the queue drains), one request of 32 texts goes out
    (admitted: nothing queued ahead of it; it runs for several batches) and SIGTERM follows
    50 ms later, so at least that request is certainly in flight while the server drains."""
    sigterm_at: list[float] = []
    in_flight_at_sigterm: list[asyncio.Task[Call]] = []
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Call]] = []
    rng = random.Random(11)
    start = loop.time()
    next_at = start
    end = start + plan.shutdown_before_s + plan.shutdown_after_s
    while next_at < end:
        now = loop.time()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        if not sigterm_at and loop.time() - start >= plan.shutdown_before_s:
            await asyncio.sleep(0.2)
            tasks.append(asyncio.create_task(client.call(60.0, client.bulk)))
            await asyncio.sleep(0.05)
            in_flight_at_sigterm = [t for t in tasks if not t.done()]
            sigterm_at.append(time.perf_counter())
            server.process.send_signal(signal.SIGTERM)
            progress(f"shutdown: SIGTERM with {len(in_flight_at_sigterm)} requests in flight")
            next_at = loop.time()
        tasks.append(asyncio.create_task(client.call(30.0)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    exit_code = await asyncio.to_thread(server.process.wait, 60)
    stop_s = time.perf_counter() - sigterm_at[0]
    server.stop = {"returncode": exit_code, "signal": "SIGTERM", "stop_s": stop_s}
    in_flight = [t.result() for t in in_flight_at_sigterm]
    after = [t.result() for t in tasks if t.result().sent > sigterm_at[0]]
    admitted = [c for c in in_flight if c.code != "RESOURCE_EXHAUSTED"]
    return {
        "offered_per_s": rate,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_codes": codes_of(in_flight),
        "in_flight_admitted": len(admitted),
        "in_flight_ok": sum(c.code == "OK" for c in admitted),
        "in_flight_failed": sum(c.code != "OK" for c in admitted),
        "sent_after_sigterm": len(after),
        "after_codes": codes_of(after),
        "exit_code": exit_code,
        "exit_s_after_sigterm": stop_s,
    }


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def evaluate(report: dict[str, Any]) -> dict[str, Any]:
    unloaded_p99 = (report["unloaded"]["latency_ms"] or {}).get("p99")
    over = report["overload"]
    ok_p99 = (over["ok_latency_ms"] or {}).get("p99")
    refusal_p99 = (over["resource_exhausted_latency_ms"] or {}).get("p99")
    rss = over["rss_mb"]
    down = report["shutdown"]
    return {
        "admitted_p99_vs_unloaded": None if not (ok_p99 and unloaded_p99) else ok_p99 / unloaded_p99,
        "admitted_p99_ok": None if not (ok_p99 and unloaded_p99) else ok_p99 <= P99_TARGET_FACTOR * unloaded_p99,
        "refusal_p99_ok": None if refusal_p99 is None else refusal_p99 <= REFUSAL_TARGET_MS,
        "served_late": over["deadline"]["expired"],
        "memory_growth_mb": None if not (rss["before"] and rss["max_during"]) else rss["max_during"] - rss["before"],
        "drain_ok": down["in_flight_failed"] == 0 and down["exit_code"] == 0,
    }


def print_table(report: dict[str, Any]) -> None:
    u = report["unloaded"]["latency_ms"] or {}
    cap = report["capacity"]
    o = report["overload"]
    ok = o["ok_latency_ms"] or {}
    re_ = o["resource_exhausted_latency_ms"] or {}
    d = o["deadline"]
    rss = o["rss_mb"]
    s = report["shutdown"]
    e = report["evaluation"]
    target_p99 = P99_TARGET_FACTOR * u["p99"] if u.get("p99") else None
    rows = [
        (
            "server config",
            " ".join(
                f"{k}={v}" for k, v in report["config"]["server_env_overrides"].items() if k != "OPENEMPLOI_COLLECTIONS_DIR"
            ),
        ),
        ("unloaded p50 / p99", f"{fmt(u.get('p50'))} / {fmt(u.get('p99'))} ms ({report['unloaded']['ok']} sequential requests)"),
        ("capacity", f"{fmt(cap['ok_per_s'])} OK/s (closed loop, best at {cap['at_concurrency']} clients)"),
        (
            "overload offered",
            f"{fmt(o['offered_per_s'])} req/s = {report['config']['factor']:g} x capacity, Poisson, {o['seconds']:g} s, {o['sent']} sent",
        ),
        (
            "  admitted (OK)",
            f"{o['codes'].get('OK', 0)} ({fmt(o['ok_per_s'])}/s); p50 {fmt(ok.get('p50'))}, p99 {fmt(ok.get('p99'))} ms",
        ),
        (
            "  admitted p99 target",
            f"<= {P99_TARGET_FACTOR:g} x unloaded p99 = {fmt(target_p99)} ms: {verdict(e['admitted_p99_ok'])} (ratio {fmt(e['admitted_p99_vs_unloaded'], '.2f')})",
        ),
        (
            "  RESOURCE_EXHAUSTED",
            f"{o['codes'].get('RESOURCE_EXHAUSTED', 0)}; p50 {fmt(re_.get('p50'), '.2f')}, p99 {fmt(re_.get('p99'), '.2f')} ms; <= {REFUSAL_TARGET_MS:g} ms: {verdict(e['refusal_p99_ok'])} ({fmt(100 * o['resource_exhausted_within_target'] if o['resource_exhausted_within_target'] is not None else None)}% within)",
        ),
        (
            "  admitted time split p99",
            f"server queue {fmt((o['ok_server_queue_ms'] or {}).get('p99'))}, inference {fmt((o['ok_server_inference_ms'] or {}).get('p99'))}, rest (gRPC, tokenise, loops) {fmt((o['ok_other_ms'] or {}).get('p99'))} ms (p50: {fmt((o['ok_server_queue_ms'] or {}).get('p50'))} / {fmt((o['ok_server_inference_ms'] or {}).get('p50'))} / {fmt((o['ok_other_ms'] or {}).get('p50'))})",
        ),
        (
            "  DEADLINE_EXCEEDED",
            f"{d['refused_early']} refused at submit (p50 {fmt((d['refused_early_latency_ms'] or {}).get('p50'), '.2f')} ms), {d['expired']} expired (served late); tight deadline {d['tight_deadline_ms']:.0f} ms on {d['tight_sent']}: {d['tight_ok']} OK, {d['tight_refused_early']} refused at submit",
        ),
        ("  other failures", json.dumps(o["other_failures"]) if o["other_failures"] else "none"),
        (
            "server RSS",
            f"before {fmt(rss['before'])} MiB, max during {fmt(rss['max_during'])} MiB, after {fmt(rss['after'])} MiB",
        ),
        (
            "CPU during overload",
            f"server {fmt(o['cpu'].get('server_cores'), '.2f')} cores, client {fmt(o['cpu'].get('self_cores'), '.2f')}, other tenants {fmt(o['cpu'].get('other_cores'), '.2f')}",
        ),
        (
            "shutdown (SIGTERM)",
            f"{s['in_flight_at_sigterm']} in flight ({s['in_flight_admitted']} admitted): {s['in_flight_ok']} OK, {s['in_flight_failed']} failed; drain: {verdict(e['drain_ok'])}",
        ),
        (
            "  after SIGTERM",
            f"{s['sent_after_sigterm']} sent: {json.dumps(s['after_codes'])}; exit code {s['exit_code']} after {fmt(s['exit_s_after_sigterm'], '.2f')} s",
        ),
    ]
    b = report.get("baseline_admission_off")
    if b:
        bok = b["ok_latency_ms"] or {}
        rows += [
            (
                "same overload, admission off",
                f"max_queue_delay_ms=0: {b['codes'].get('OK', 0)} OK ({fmt(b['ok_per_s'])}/s); p50 {fmt(bok.get('p50'))}, p99 {fmt(bok.get('p99'))} ms; codes {json.dumps(b['codes'])}",
            ),
            (
                "  its RSS / deadlines",
                f"max {fmt(b['rss_mb']['max_during'])} MiB (before {fmt(b['rss_mb']['before'])}); {b['deadline']['refused_early']} refused at submit, {b['deadline']['expired']} expired; tight: {b['deadline']['tight_ok']} OK; other tenants {fmt(b['cpu'].get('other_cores'), '.2f')} cores",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    print(
        f"{'overload benchmark'.ljust(width)}  {report['started_utc']}  ({report['machine']['hostname']}, {report['machine']['cpu_count']} cpus)"
    )
    print("-" * (width + 2 + 90))
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, server: Server, plan: Plan) -> dict[str, Any]:
    queries = load_queries()
    client = Client(server.port, queries)
    try:
        progress("unloaded: sequential requests")
        base = await unloaded(client, plan)
        progress(f"unloaded p50 {base['latency_ms']['p50']:.1f} ms, p99 {base['latency_ms']['p99']:.1f} ms")
        progress("capacity: closed-loop ramp")
        cap = await capacity(client, plan)
        rate = args.factor * cap["ok_per_s"]
        tight_s = args.tight_deadline_ms / 1e3 if args.tight_deadline_ms else 1.5 * base["latency_ms"]["p50"] / 1e3
        progress(f"overload: {rate:.1f} req/s for {plan.overload_s:g} s")
        over = await overload(client, server, plan, rate, tight_s, args.tight_share)
        progress(f"overload done: {over['codes']}")
        progress("shutdown: open loop at capacity, a 32-text request, SIGTERM")
        down = await shutdown(client, server, plan, max(cap["ok_per_s"], 1.0))
    finally:
        await client.close()
    return {"unloaded": base, "capacity": cap, "overload": over, "shutdown": down, "tight_deadline_s": tight_s}


async def run_baseline(args: argparse.Namespace, server: Server, plan: Plan, rate: float, tight_s: float) -> dict[str, Any]:
    """The same open-loop overload against a server with admission by time off (the contrast)."""
    client = Client(server.port, load_queries())
    try:
        for _ in range(plan.warm_requests):
            await client.call(NORMAL_TIMEOUT_S)
        progress(f"baseline (max_queue_delay_ms=0): {rate:.1f} req/s for {plan.overload_s:g} s")
        return await overload(client, server, plan, rate, tight_s, args.tight_share)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter phases")
    parser.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=15.0,
        help="the server's batching.max_queue_delay_ms (0 = admission by time off); "
        "15 = about the unloaded p50 of a short query on 2 quiet CPU cores",
    )
    parser.add_argument("--factor", type=float, default=4.0, help="overload rate as a multiple of measured capacity")
    parser.add_argument("--overload-s", type=float, default=None, help="overload duration (default 30, quick 15)")
    parser.add_argument("--tight-share", type=float, default=0.1, help="share of overload requests with a tight deadline")
    parser.add_argument("--tight-deadline-ms", type=float, default=0.0, help="tight deadline (default 1.5 x unloaded p50)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra OPENEMPLOI_* setting for the server (repeatable), e.g. OPENEMPLOI_BACKEND_INTRA_OP_THREADS=1",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the same overload against a server with admission by time off (full run only)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    plan = Plan.of(args.quick, args.overload_s)
    started = datetime.datetime.now(datetime.UTC)
    overrides = {
        "OPENEMPLOI_BATCHING_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
        "OPENEMPLOI_METRICS_PORT": "0",  # other servers on this machine may hold 9100
    }
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OPENEMPLOI_"):
            parser.error(f"--server-env wants OPENEMPLOI_KEY=VALUE, got {item!r}")
        overrides[key] = value
    t0 = time.perf_counter()
    with running_server(overrides) as server:
        results = asyncio.run(run(args, server, plan))
    baseline = None
    if not args.quick and not args.no_baseline:
        off = {**overrides, "OPENEMPLOI_BATCHING_MAX_QUEUE_DELAY_MS": "0"}
        rate = results["overload"]["offered_per_s"]
        with running_server(off) as base_server:
            baseline = asyncio.run(run_baseline(args, base_server, plan, rate, results["tight_deadline_s"]))
    report: dict[str, Any] = {
        "benchmark": "overload",
        "command": " ".join([".venv/bin/python", "benchmarks/overload.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": eb.machine_info(),
        "config": {
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "factor": args.factor,
            "server_env_overrides": {**eb.SERVER_ENV, **overrides},
            "plan": plan.__dict__,
            "targets": {"admitted_p99_factor": P99_TARGET_FACTOR, "refusal_ms": REFUSAL_TARGET_MS},
        },
        "server": {"ready_s": server.ready_s, "stop": server.stop},
        **results,
        "baseline_admission_off": baseline,
    }
    report["evaluation"] = evaluate(report)
    report["total_s"] = time.perf_counter() - t0
    out = args.out or RESULTS_DIR / (
        f"overload-{started:%Y-%m-%d}-{report['machine']['hostname']}{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print_table(report)
    print(f"\nJSON: {out}  (total {report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
