"""Model loads that fail mid-swap, under Embed traffic: the serving version must not notice.

While SWAP_CLIENTS clients call Embed without pause, LoadModel is called for versions that fail at
three stages of a load (make_version: a truncated ONNX graph, graph files gone after the manifest
was read, a warm-up whose vectors have the wrong dimension). Every LoadModel must answer
FAILED_PRECONDITION, no Embed may fail or change vector or version, health must stay SERVING,
nothing of a failed load may stay loaded or keep memory, and a valid LoadModel must still swap
(and back). The versions live in the run's own model repository (links to the built ones), so the
real models/ is never written.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import models_pb2 as mpb
from openemploi.v1 import models_pb2_grpc as mpb_grpc

from .faults import FAULT_SWAP, ChaosRun, CycleReport
from .verify import RPC_TIMEOUT_S, embed
from .workload import EMBED_TEXTS

DEFAULT_MODEL = "multilingual-e5-small"
BROKEN_KINDS = ("truncated", "missing", "warmup")  # how a version fails to load: see make_version
SWAP_CLIENTS = 4  # threads calling Embed without pause while LoadModel runs
LEAK_PER_LOAD = 64 << 20  # RSS growth per failed load in the last round taken as a leak (a leaked load holds ~250 MiB)
LEAK_ROUNDS = 3  # rounds of failed loads needed before RSS settles enough to judge (see model_swap_cycle)


def model_swap_cycle(run: ChaosRun, repeats: int = 4) -> CycleReport:
    """LoadModel of broken versions while clients call Embed without pause; then a valid swap and back.

    Each broken version fails at another stage of the load (see make_version): its graph is
    truncated (no session can be built), its graph files are gone (the manifest was fine), or
    its manifest's dimension is not its graph's (the session is built, the warm-up check fails).
    Checks: each LoadModel answers FAILED_PRECONDITION saying the serving version is unchanged;
    no Embed fails and each is answered by the serving version with the same vector; health
    stays SERVING; no broken version is left loaded; and a valid LoadModel still swaps (then
    back: the swapped-in version drains and unloads)."""
    report = run.new_report(FAULT_SWAP, injected=0)
    address = run.server.address
    folder = run.model_repo / DEFAULT_MODEL
    made: list[Path] = []
    serving = ""
    clients: EmbedClients | None = None
    try:
        with grpc.insecure_channel(address) as channel:
            admin = mpb_grpc.ModelServiceStub(channel)
            serving = _model_info(admin).current_version
            broken = [make_version(folder / serving, folder / f"chaos-{kind}", kind) for kind in BROKEN_KINDS]
            good = make_version(folder / serving, folder / "chaos-good", "good")
            made = [folder / v for v in (*broken, good)]
            references = {text: embed(address, text) for text in EMBED_TEXTS}
            clients = EmbedClients(address, references, SWAP_CLIENTS)
            clients.start(phase="broken")
            clients.wait_for(lambda: clients.ok >= 4 * SWAP_CLIENTS, 60)
            rss = [_rss_bytes(run.server.pid)]  # before, then after each round of failed loads
            t0 = time.monotonic()
            for _ in range(repeats):
                for version in broken:
                    report.injected += 1
                    try:
                        admin.LoadModel(mpb.LoadModelRequest(name=DEFAULT_MODEL, version=version), timeout=300)
                        report.problems.append(f"LoadModel of the broken version {version} answered OK")
                    except grpc.RpcError as exc:
                        if (
                            exc.code() != grpc.StatusCode.FAILED_PRECONDITION
                            or "serving version is unchanged" not in exc.details()
                        ):
                            report.problems.append(f"LoadModel {version}: {exc.code().name}: {exc.details()}")
                rss.append(_rss_bytes(run.server.pid))
            load_s = time.monotonic() - t0
            info = _model_info(admin)
            states = {v.version: v.state for v in info.versions}
            if info.current_version != serving:
                report.problems.append(f"after the failed loads the current version is {info.current_version}, not {serving}")
            left = {v: states.get(v) for v in broken if states.get(v) != "built"}
            if left:
                report.problems.append(f"broken versions left loaded: {left}")
            during = clients.ok
            report.notes.append(
                f"{report.injected} LoadModel calls of broken versions ({', '.join(BROKEN_KINDS)}) in {load_s:.1f}s, "
                f"{during} Embed calls answered meanwhile by {SWAP_CLIENTS} clients"
            )
            if all(rss):
                report.notes.append(
                    f"server RSS before and after each round of failed loads: {[round(r / 2**20) for r in rss]} MiB"
                )
                # glibc keeps what each thread freed in that thread's arena, so the first rounds grow RSS
                # until every executor thread has loaded once (MALLOC_ARENA_MAX=2: the first round only);
                # a leak grows it by the whole tokenizer + session (~250 MiB) on every load, round after round.
                if repeats >= LEAK_ROUNDS:
                    growth = (rss[-1] - rss[-2]) / len(broken)
                    if growth > LEAK_PER_LOAD:
                        report.problems.append(
                            f"server memory grew by {growth / 2**20:.0f} MiB per failed load in the last round"
                        )
            # A valid load still swaps: new traffic goes to it; then swap back, and it drains and unloads.
            clients.phase = "swapped"
            loaded = admin.LoadModel(mpb.LoadModelRequest(name=DEFAULT_MODEL, version=good), timeout=300).model
            if loaded.current_version != good:
                report.problems.append(f"LoadModel {good} answered current version {loaded.current_version}")
            if not clients.wait_for(lambda: clients.versions.get(("swapped", good), 0) >= 2 * SWAP_CLIENTS, 60):
                report.problems.append(f"no Embed answered by {good} within 60 s of its LoadModel")
            admin.LoadModel(mpb.LoadModelRequest(name=DEFAULT_MODEL, version=serving), timeout=300)
            clients.phase = "back"
            deadline = time.monotonic() + 60
            while _state(admin, good) != "built" and time.monotonic() < deadline:
                time.sleep(0.2)
            if _state(admin, good) != "built":
                report.problems.append(f"{good} still {_state(admin, good)!r} 60 s after swapping back")
            clients.wait_for(lambda: clients.versions.get(("back", serving), 0) >= 2 * SWAP_CLIENTS, 60)
    except grpc.RpcError as exc:
        report.problems.append(f"model swap cycle: {exc.code().name}: {exc.details()}")
    finally:
        if clients is not None:
            clients.stop()
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
    if clients is not None:
        report.requests_ok, report.requests_failed = clients.ok, len(clients.failures)
        if clients.failures:
            report.problems.append(f"{len(clients.failures)} Embed calls failed during the swaps, e.g. {clients.failures[:3]}")
        if clients.wrong:
            report.problems.append(
                f"{len(clients.wrong)} Embed answers from an unexpected version or vector, e.g. {clients.wrong[:3]}"
            )
        if clients.health:
            report.problems.append(f"health was not SERVING during the swaps: {clients.health[:3]}")
        others = {v: n for (phase, v), n in clients.versions.items() if phase == "broken" and v != serving}
        if others:
            report.problems.append(f"while only broken versions were loaded, Embed was answered by {others}")
        report.notes.append(
            f"Embed answers by phase and version: {dict(sorted(clients.versions.items()))}; slowest Embed "
            f"{clients.slowest_embed_s:.1f}s, slowest health check {clients.slowest_health_s:.1f}s"
        )
    if not run.server.alive():
        report.problems.append(f"server died during the model swaps:\n{run.server.log_tail(20)}")
    report.acknowledged = len(run.acknowledged)
    run.log(report.describe())
    return report


def _model_info(admin: mpb_grpc.ModelServiceStub, name: str = DEFAULT_MODEL) -> mpb.ModelInfo:
    models = admin.ListModels(mpb.ListModelsRequest(), timeout=RPC_TIMEOUT_S).models
    return next(m for m in models if m.name == name)


def _state(admin: mpb_grpc.ModelServiceStub, version: str) -> str:
    return next((v.state for v in _model_info(admin).versions if v.version == version), "absent")


class EmbedClients:
    """Threads calling Embed without pause (one text a call), checking each answer against `references`.

    `phase` is set by the fault driver; answers are counted by (phase, model_version).  In phase
    "broken" only `serving` may answer.  A health poller thread records any status but SERVING.
    """

    def __init__(self, address: str, references: dict[str, np.ndarray], threads: int) -> None:
        self.address = address
        self.references = references
        self.threads = threads
        self.phase = ""
        self.ok = 0
        self.versions: dict[tuple[str, str], int] = {}
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self.health: list[str] = []
        self.slowest_health_s = 0.0
        self.slowest_embed_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self, phase: str) -> None:
        self.phase = phase
        self._workers = [threading.Thread(target=self._embed_loop, args=(n,), daemon=True) for n in range(self.threads)]
        self._workers.append(threading.Thread(target=self._health_loop, daemon=True))
        for worker in self._workers:
            worker.start()

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(RPC_TIMEOUT_S + 5)

    def _embed_loop(self, number: int) -> None:
        texts = list(self.references)
        with grpc.insecure_channel(self.address) as channel:
            stub = epb_grpc.EmbeddingServiceStub(channel)
            i = number
            while not self._stop.is_set():
                text = texts[i % len(texts)]
                i += 1
                phase = self.phase
                t0 = time.monotonic()
                try:
                    reply = stub.Embed(epb.EmbedRequest(texts=[text], kind=epb.PASSAGE), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append(f"{phase}: {exc.code().name}: {exc.details()}")
                    continue
                vector = np.asarray(reply.embeddings[0].values, dtype=np.float32)
                with self._lock:
                    self.slowest_embed_s = max(self.slowest_embed_s, time.monotonic() - t0)
                    self.ok += 1
                    key = (phase, reply.model_version)
                    self.versions[key] = self.versions.get(key, 0) + 1
                    if float(vector @ self.references[text]) < 0.9999:
                        self.wrong.append(f"{phase}: {reply.model_version} gave another vector for {text[:30]!r}")

    def _health_loop(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.2):
                t0 = time.monotonic()
                try:  # a generous deadline: on a loaded 2-core machine a check can wait seconds for a core
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_S).status
                    self.slowest_health_s = max(self.slowest_health_s, time.monotonic() - t0)
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        self.health.append(f"{self.phase}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
                except grpc.RpcError as exc:
                    self.health.append(f"{self.phase}: {exc.code().name}")


def make_version(source: Path, target: Path, kind: str) -> str:
    """A version folder beside `source`, its files linked to it, that fails to load in the way `kind` says.

    truncated: every ONNX graph cut to its first 64 KiB (no session can be built);
    missing: the manifest lists graphs that are not there (gone after the repository read it);
    warmup: the manifest's dimension is twice the graph's (the session is built, the warm-up check fails);
    good: a faithful copy under another version id, which loads.
    Its built_at is year 0, so it never becomes the newest version a restart would load.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    manifest = json.loads((source / "manifest.json").read_text())
    graphs = sorted(set(manifest["files"]["onnx"].values()))
    for item in source.iterdir():
        if item.name == "manifest.json":
            continue
        if item.name == "onnx" and kind in ("truncated", "missing"):
            (target / "onnx").mkdir()
            for relative in graphs if kind == "truncated" else ():
                with open(source / relative, "rb") as handle:
                    (target / relative).write_bytes(handle.read(64 * 1024))
            continue
        (target / item.name).symlink_to(item.resolve())
    if kind == "warmup":
        manifest["dim"] = int(manifest["dim"]) * 2
    manifest.update(version=target.name, built_at="0000-01-01T00:00:00+00:00")
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target.name


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (VmRSS), 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
