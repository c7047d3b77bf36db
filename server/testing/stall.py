"""Stall check: the slowest health Check while one maximal Embed is served.

A maximal Embed is limits.max_texts_per_request texts adding up to limits.max_request_chars
characters, with truncate=true: the most tokenising and inference one request may ask for. While it
is served, a process with a channel of its own calls grpc.health.v1.Health/Check every POLL_S; the
cycle passes when every Check answered SERVING within STALL_BUDGET_MS. A benchmark row, not a timed
test: on a loaded machine the number measures that machine too, so the same Checks are first timed
for BASELINE_S with no Embed running, and the notes give both.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openemploi.config import LimitsConfig
from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc

from .faults import FAULT_STALL, ChaosRun, CycleReport
from .workload import DETAILS, METIERS, VILLES

POLL_S = 0.010  # pause between two health Checks
BASELINE_S = 15.0  # Checks first timed with no Embed running: what the machine alone costs (a loaded one shows)
STALL_BUDGET_MS = 100.0  # the slowest Check allowed while any single request is served
CHECK_TIMEOUT_S = 5.0
POLLER_NICE = -10  # the poller's niceness when permitted (root or CAP_SYS_NICE); unchanged otherwise
EMBED_TIMEOUT_S = 1800.0  # 1024 texts of 512 tokens: minutes on two CPU cores


def maximal_texts(limits: LimitsConfig) -> list[str]:
    """limits.max_texts_per_request distinct French texts adding up to exactly limits.max_request_chars."""
    count = limits.max_texts_per_request
    base, extra = divmod(limits.max_request_chars, count)
    texts = []
    for i in range(count):
        words = f"Offre {i} : {METIERS[i % len(METIERS)]} à {VILLES[i % len(VILLES)]}, {', '.join(DETAILS)}. "
        length = base + (i < extra)
        texts.append((words * (length // len(words) + 1))[:length])
    return texts


class HealthPoller:
    """Calls Health/Check every POLL_S from a process of its own; records each latency (ms).

    A process, not a thread: the caller serialises a 4 MB request and parses its reply, and a thread
    beside it would wait for that caller's GIL and time the client instead of the server. The process
    asks for a higher scheduling priority (POLLER_NICE) where it may: on a 2-core machine the server's
    inference threads would otherwise delay the poller's own wake-ups, timing the poller's scheduling
    rather than the server's answer. A server that does not answer is timed all the same.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._ready = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_poll, args=(address, self._stop, self._ready, child_end), name="health-poller", daemon=True
        )

    def __enter__(self) -> HealthPoller:
        self._process.start()
        self._ready.wait(CHECK_TIMEOUT_S + 30.0)  # the spawned interpreter imports grpc first
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            self.latencies_ms, self.failures = self._results.recv()
        except EOFError:
            self.failures = [f"the health poller process ended with exit code {self._process.exitcode}"]
        self._process.join()


def _poll(address: str, stop: EventType, ready: EventType, results: Connection) -> None:
    latencies_ms: list[float] = []
    failures: list[str] = []
    request = health_pb2.HealthCheckRequest(service="")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, POLLER_NICE)
    except PermissionError:
        pass  # an unprivileged run measures with the default priority
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(request, timeout=CHECK_TIMEOUT_S)  # connect before measuring
        ready.set()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status = stub.Check(request, timeout=CHECK_TIMEOUT_S).status
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
            else:
                latencies_ms.append((time.perf_counter() - t0) * 1000)
                if status != health_pb2.HealthCheckResponse.SERVING:
                    failures.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            stop.wait(POLL_S)
    results.send((latencies_ms, failures))


def stall_cycle(run: ChaosRun, limits: LimitsConfig | None = None) -> CycleReport:
    """One maximal Embed (truncate=true) against the run's server while a poller times health Checks."""
    limits = limits or LimitsConfig()
    report = run.new_report(FAULT_STALL)
    texts = maximal_texts(limits)
    request = epb.EmbedRequest(texts=texts, kind=epb.PASSAGE, truncate=True, encoding=epb.RAW_FLOAT32)
    with HealthPoller(run.server.address) as idle:
        time.sleep(BASELINE_S)
    with grpc.insecure_channel(run.server.address) as channel, HealthPoller(run.server.address) as poller:
        t0 = time.monotonic()
        try:
            reply = epb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=EMBED_TIMEOUT_S)
            if len(reply.raw_float32) != 4 * len(texts) * reply.dim:
                report.problems.append(f"Embed answered {len(reply.raw_float32)} bytes for {len(texts)} x {reply.dim} floats")
        except grpc.RpcError as exc:
            report.problems.append(f"the maximal Embed failed: {exc.code().name}: {exc.details()}")
        embed_s = time.monotonic() - t0
    latencies = np.asarray(poller.latencies_ms)
    report.worst_ms = float(latencies.max()) if len(latencies) else 0.0
    report.requests_ok = int((latencies <= STALL_BUDGET_MS).sum())
    report.requests_failed = int((latencies > STALL_BUDGET_MS).sum()) + len(poller.failures)
    report.notes.append(
        f"{len(latencies)} health Checks during a {embed_s:.1f}s Embed of {len(texts)} texts, {sum(map(len, texts))} chars: "
        f"worst {report.worst_ms:.1f} ms, p99 {np.percentile(latencies, 99) if len(latencies) else 0:.1f} ms"
    )
    if idle.latencies_ms:
        report.notes.append(
            f"baseline, no Embed: {len(idle.latencies_ms)} Checks in {BASELINE_S:.0f}s, worst {max(idle.latencies_ms):.1f} ms, "
            f"p99 {np.percentile(idle.latencies_ms, 99):.1f} ms"
        )
    if report.worst_ms > STALL_BUDGET_MS:
        report.problems.append(f"the slowest health Check took {report.worst_ms:.1f} ms (budget {STALL_BUDGET_MS:.0f} ms)")
    if poller.failures:
        report.problems.append(f"{len(poller.failures)} health Checks failed, e.g. {poller.failures[:3]}")
    if len(latencies) < 10:
        report.problems.append(f"only {len(latencies)} health Checks ran during the Embed")
    run.log(report.describe())
    return report
