"""A client disconnect storm: many EmbedStream calls cut mid-stream, after which the server must be fine.

Nothing the server does for a cut stream is wanted any more: if it kept computing it, the Embed
after the storm would wait behind minutes of abandoned work. After the storm the server must still
be SERVING, answer Embed with the same vector as before, complete a fresh EmbedStream, and still
hold every acknowledged document.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import index_pb2_grpc as ipb_grpc

from .faults import FAULT_STORM, ChaosRun, CycleReport
from .verify import RPC_TIMEOUT_S, embed, health_statuses
from .workload import EMBED_TEXTS


def storm_cycle(run: ChaosRun, clients: int = 16, rounds: int = 10) -> CycleReport:
    """Many EmbedStream calls cancelled mid-stream or cut by closing their channel; then the server must be fine."""
    report = run.new_report(FAULT_STORM)
    address = run.server.address
    reference_text = "Chauffeur livreur en CDI à Lyon, permis C exigé, tournées le matin."
    reference = embed(address, reference_text)
    t0 = time.monotonic()
    stats = asyncio.run(_storm(address, clients, rounds, run.storm_rng))
    report.injected = stats["cancelled"]
    report.notes.append(
        f"{stats['cancelled']} streams cut mid-stream ({stats['cancel']} cancel(), {stats['close']} channel closed) "
        f"by {clients} clients x {rounds} rounds in {time.monotonic() - t0:.1f}s; "
        f"{stats['responses']} responses read before the cuts; {stats['errors']} unexpected errors"
    )
    if stats["errors"]:
        report.problems.append(f"unexpected stream errors during the storm: {stats['error_samples']}")
    if not run.server.alive():
        report.problems.append(f"server died during the storm:\n{run.server.log_tail(20)}")
        run.log(report.describe())
        return report
    statuses = health_statuses(address)
    if any(status != "SERVING" for status in statuses.values()):
        report.problems.append(f"health after the storm: {statuses}")
    t1 = time.monotonic()
    try:
        after = embed(address, reference_text)
        latency = time.monotonic() - t1
        report.notes.append(f"Embed after the storm answered in {latency * 1000:.0f} ms")
        if not np.allclose(after, reference, atol=1e-6):
            report.problems.append(
                f"Embed after the storm differs from before (max diff {np.max(np.abs(after - reference)):.2e})"
            )
    except grpc.RpcError as exc:
        report.problems.append(f"Embed after the storm failed: {exc.code().name}: {exc.details()}")
    try:
        responses = _full_stream(address)
        if [r.sequence for r in responses] != [0, 1, 2] or any(r.code for r in responses):
            report.problems.append(f"a fresh EmbedStream after the storm answered {[(r.sequence, r.code) for r in responses]}")
    except grpc.RpcError as exc:
        report.problems.append(f"a fresh EmbedStream after the storm failed: {exc.code().name}: {exc.details()}")
    cpu = _process_cpu_share(run.server.pid, 1.0)
    if cpu is not None:
        report.notes.append(f"server CPU over 1 s after the checks: {cpu:.0%} of one core")
    with grpc.insecure_channel(address) as channel:
        run.check_all(ipb_grpc.IndexServiceStub(channel), report)
    run.log(report.describe())
    return report


def _full_stream(address: str) -> list[epb.EmbedStreamResponse]:
    requests = [epb.EmbedRequest(texts=[f"Offre {i} : agent de propreté à Nantes"], kind=epb.PASSAGE) for i in range(3)]
    with grpc.insecure_channel(address) as channel:
        return list(epb_grpc.EmbeddingServiceStub(channel).EmbedStream(iter(requests), timeout=RPC_TIMEOUT_S))


def _process_cpu_share(pid: int, window_s: float) -> float | None:
    def ticks() -> int | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None

    before = ticks()
    time.sleep(window_s)
    after = ticks()
    if before is None or after is None:
        return None
    return (after - before) / os.sysconf("SC_CLK_TCK") / window_s


async def _storm(address: str, clients: int, rounds: int, rng: random.Random) -> dict[str, Any]:
    """Each round, `clients` channels each open an endless EmbedStream (one text per request) and cut
    it mid-stream: call.cancel() (RST_STREAM) or closing the channel (the connection goes away),
    after reading 0-3 responses or 0.05-3 s, whichever comes first, so the cut lands with requests
    queued, running or answered.  Nothing the server does for a cut stream is wanted any more: if it
    kept computing it, the Embed after the storm would wait behind minutes of abandoned work."""
    stats: dict[str, Any] = {"cancelled": 0, "cancel": 0, "close": 0, "responses": 0, "errors": 0, "error_samples": []}

    async def client(number: int, mode: str, read_before: int, cut_after_s: float) -> None:
        channel = grpc.aio.insecure_channel(address)
        stub = epb_grpc.EmbeddingServiceStub(channel)

        async def requests():
            for i in range(100_000):  # never ends on its own: the stream is always cut by us
                text = f"{EMBED_TEXTS[(number + i) % len(EMBED_TEXTS)]} Candidat {number}-{i}."
                yield epb.EmbedRequest(texts=[text], kind=epb.PASSAGE, truncate=True)

        call = stub.EmbedStream(requests(), timeout=120.0)
        try:
            read = 0
            try:
                async with asyncio.timeout(cut_after_s):
                    while read < read_before:
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            raise RuntimeError("the server ended an endless stream")
                        if response.code:
                            raise RuntimeError(f"stream item failed: {response.code} {response.message}")
                        read += 1
            except TimeoutError:
                pass
            stats["responses"] += read
            if mode == "cancel":
                call.cancel()
            else:
                await channel.close(grace=None)
            stats[mode] += 1
            stats["cancelled"] += 1
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            stats["errors"] += 1
            if len(stats["error_samples"]) < 3:
                what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                stats["error_samples"].append(f"{mode}: {what}")
        finally:
            await channel.close(grace=None)

    for _ in range(rounds):
        tasks = [
            client(n, rng.choice(["cancel", "close"]), rng.choice([0, 1, 1, 2, 3]), rng.uniform(0.05, 3.0))
            for n in range(clients)
        ]
        await asyncio.gather(*tasks)
    return stats
