#!/usr/bin/env python3
"""The HTTP API's cost over gRPC: the same single-text Embed through both ports of one server.

    .venv/bin/python benchmarks/http_bench.py [--quick]

One `openemploi serve` (launcher) answers both: gRPC `Embed` (FLOAT_LIST) and `POST /v1/embeddings`
(`encoding_format: float`), one ROME label per request, as passages. Closed-loop asyncio clients in
this process, at each level of LEVELS concurrent requests (1 = sequential), gRPC and HTTP taking
turns level by level; the client's own CPU is on the same cores for both. Reported: requests/s and
p50 per protocol and level, and HTTP's ratio to gRPC (the figures `make bench` keeps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

from openemploi.matching.catalogue import load_catalogue
from openemploi.testing.bench_results import Figure
from openemploi.testing.launcher import ServerProcess
from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

LEVELS = (1, 8, 32)
WARMUP = 32  # requests per protocol before timing: connections open, the batcher's cost model learned


def say(message: str) -> None:
    print(f"[http] {message}", file=sys.stderr, flush=True)


async def closed_loop(send: Callable[[str], Awaitable[None]], texts: list[str], concurrency: int) -> dict[str, float]:
    """`concurrency` workers, each sending the next text as soon as its last answer came back."""
    latencies: list[float] = []
    queue = iter(texts)

    async def worker() -> None:
        for text in queue:
            started = time.perf_counter()
            await send(text)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "requests_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e3,
    }


async def measure_against(grpc_address: str, http_url: str, texts: list[str], levels: tuple[int, ...]) -> dict[str, Any]:
    rows = []
    async with grpc.aio.insecure_channel(grpc_address) as channel, httpx.AsyncClient(base_url=http_url, timeout=60) as http:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        dims: set[int] = set()

        async def by_grpc(text: str) -> None:
            response = await stub.Embed(embedding_pb2.EmbedRequest(texts=[text], kind=embedding_pb2.PASSAGE), timeout=60)
            dims.add(len(response.embeddings[0].values))

        async def by_http(text: str) -> None:
            reply = await http.post("/v1/embeddings", json={"input": text, "encoding_format": "float"})
            reply.raise_for_status()
            dims.add(len(reply.json()["data"][0]["embedding"]))

        for send in (by_grpc, by_http):
            await closed_loop(send, texts[:WARMUP], 4)
        for level in levels:
            row: dict[str, Any] = {"concurrency": level}
            for name, send in (("grpc", by_grpc), ("http", by_http)):
                row[name] = await closed_loop(send, texts, level)
            row["http_vs_grpc_requests_per_s"] = row["http"]["requests_per_s"] / row["grpc"]["requests_per_s"]
            row["http_vs_grpc_p50"] = row["http"]["p50_ms"] / row["grpc"]["p50_ms"]
            say(
                f"c={level}: gRPC {row['grpc']['requests_per_s']:.0f} req/s p50 {row['grpc']['p50_ms']:.2f} ms, "
                f"HTTP {row['http']['requests_per_s']:.0f} req/s p50 {row['http']['p50_ms']:.2f} ms "
                f"(HTTP/gRPC throughput {row['http_vs_grpc_requests_per_s']:.2f})"
            )
            rows.append(row)
        assert len(dims) == 1, f"the protocols answered different dimensions: {dims}"
    return {"rows": rows, "texts": len(texts)}


def measure(quick: bool) -> dict[str, Any]:
    texts = [o.label for o in load_catalogue()][: 200 if quick else 600]
    with tempfile.TemporaryDirectory(prefix="openemploi-http-bench-") as scratch:
        server = ServerProcess(Path(scratch) / "collections")
        server.start()
        try:
            say(f"server on {server.address} (HTTP {server.http_url}), {len(texts)} requests per level and protocol")
            return asyncio.run(measure_against(server.address, server.http_url, texts, LEVELS))
        finally:
            server.stop()


def http_figures(report: dict[str, Any]) -> tuple[list[Figure], dict[str, Any], list[dict[str, Any]]]:
    """HTTP against gRPC on the same server and texts: throughput (higher is better) and p50 (lower)."""
    figures = []
    for row in report["rows"]:
        level = row["concurrency"]
        figures.append(
            Figure(
                f"http.c{level}.requests_per_s",
                row["http"]["requests_per_s"],
                "req/s",
                f"gRPC req/s at {level}",
                row["grpc"]["requests_per_s"],
                True,
                level == 1,
            )
        )
        figures.append(
            Figure(f"http.c{level}.p50_ms", row["http"]["p50_ms"], "ms", f"gRPC p50 at {level}", row["grpc"]["p50_ms"], False)
        )
    return figures, {}, []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
