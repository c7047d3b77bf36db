"""Faults against a real server, one cycle at a time, each ending with full checks of what was acknowledged.

A ChaosRun serves with `openemploi serve` in a subprocess (launcher.ServerProcess) on a folder of
its own. One collection, "chaos", gets Upsert requests of 20 documents each (most with explicit
random unit vectors, a few with text the server embeds), as fast as one client can send them; the
ids of every Upsert that returned OK are recorded as acknowledged. Each fault is a function of the
run that appends a CycleReport to `run.reports`:

* kill_cycle: a timer thread SIGKILLs the server 0.2-2 s into the upsert loop, so the kill lands
  in the middle of a request; with `truncate_snapshot`, index.faiss is then cut to half while the
  server is down, and the restarted server must log that the snapshot is unusable, rebuild it
  from the store and pass the same checks;
* graceful_cycle: SIGTERM (drain, snapshot, exit 0), then a restart; the snapshot it leaves holds
  vectors, so a later truncation cuts through real data and later kills replay onto it;
* snapshot_kill_cycle: the server is restarted armed to SIGKILL itself at one step of its index
  snapshot (openemploi.index.durable's crash points: temp file written, or renamed but the folder
  not fsynced), then SIGTERMed: its shutdown snapshot dies at that step;
* client_faults.storm_cycle, model_faults.model_swap_cycle, disk_faults.disk_full_cycle: a client
  disconnect storm, model loads failing mid-swap, a full disk.

After each restart: every acknowledged document is returned by Get with its text, metadata,
skills and (for explicit vectors) the exact vector it was sent with, and Search with its own
vector (k=1) returns it; the request in flight at the kill is all or nothing (each of its ids
absent, or present in full and searchable); the collection holds the acknowledged documents plus
the in-flight ones that turned out committed, and nothing else.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from openemploi.index.durable import SNAPSHOT_WRITTEN, set_crash_hook
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

from .launcher import ServerProcess
from .verify import RPC_TIMEOUT_S, collection_size, fetch, same_content, searchable, verify_documents
from .workload import COLLECTION, Doc, Workload

KILL_AFTER_S = (0.2, 2.0)
CRASH_AT_ENV = "OPENEMPLOI_TEST_CRASH_AT"  # read by this module's __main__ only: the crash point to die at
REBUILD_MARK = "index snapshot unusable"  # the warning Collection._recover logs before rebuilding
INDEX_KINDS = {"auto": ipb.INDEX_KIND_AUTO, "flat": ipb.FLAT, "hnsw": ipb.HNSW}

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class CycleReport:
    number: int
    fault: str
    injected: int = 1  # faults of this cycle (streams cancelled, for a storm)
    acknowledged: int = 0  # acknowledged documents checked after the fault (all so far)
    new_acknowledged: int = 0  # documents acknowledged during this cycle
    lost: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    killed: bool = False  # a SIGKILL ended this cycle's upserts
    kill_after_s: float = 0.0
    kill_mid_request: bool = False
    in_flight: int = 0  # documents of the request(s) cut by the kill
    in_flight_committed: int = 0  # of those, found committed after the restart
    restart_s: float = 0.0
    verify_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    requests_ok: int = 0  # faults counted in requests (model swap): calls answered OK around the fault
    requests_failed: int = 0  # ... and calls that failed (lost)
    refusals: list[str] = field(default_factory=list)  # "CODE: details" of each write refused (full disk)
    worst_ms: float = 0.0  # the slowest health Check answered (stall)

    @property
    def survived(self) -> bool:
        return not self.lost and not self.problems

    def describe(self) -> str:
        head = (
            f"cycle {self.number} [{self.fault}]: "
            + (
                f"SIGKILL after {self.kill_after_s:.2f}s{' mid-request' if self.kill_mid_request else ' between requests'}, "
                if self.killed
                else ""
            )
            + f"+{self.new_acknowledged} acknowledged docs, {self.acknowledged} checked"
            + (f", in flight {self.in_flight_committed}/{self.in_flight} committed" if self.in_flight else "")
            + (f", restart {self.restart_s:.1f}s" if self.restart_s else "")
            + (f", {self.requests_ok} requests OK, {self.requests_failed} failed" if self.fault in REQUEST_FAULTS else "")
            + f", checks {self.verify_s:.1f}s: "
            + ("OK" if self.survived else "FAILED")
        )
        lines = [head] + [f"  note: {n}" for n in self.notes] + [f"  problem: {p}" for p in self.problems]
        if self.lost:
            lines.append(f"  lost {len(self.lost)} acknowledged docs, e.g. {self.lost[:5]}")
        return "\n".join(lines)


FAULT_KILL = "SIGKILL during upserts"
FAULT_TRUNCATE = "SIGKILL + truncated index.faiss"
FAULT_SNAPSHOT_KILL = "SIGKILL between index snapshot steps"
FAULT_STORM = "client disconnect storm (EmbedStream)"
FAULT_SIGTERM = "SIGTERM (graceful restart)"
FAULT_SWAP = "model load failing mid-swap"
FAULT_DISK = "full disk (file size limit)"
FAULT_REEMBED = "SIGKILL during a Reembed"
FAULT_STALL = "health checks during a maximal Embed"
REQUEST_FAULTS = (FAULT_SWAP, FAULT_STALL)  # their rows count requests (Embed, health Check), not documents


def linked_model_repository(target: Path, source: Path) -> Path:
    """A model repository of our own whose versions are links to the built ones in `source`.

    The model-swap fault adds broken versions to it; the real `models/` is never written.
    """
    target.mkdir(parents=True, exist_ok=True)
    for model in sorted(p for p in Path(source).iterdir() if (p / "model.toml").is_file()):
        (target / model.name).mkdir(exist_ok=True)
        shutil.copy(model / "model.toml", target / model.name / "model.toml")
        for version in model.iterdir():
            link = target / model.name / version.name
            if (version / "manifest.json").is_file() and not link.exists():
                link.symlink_to(version.resolve())
    return target


class ChaosRun:
    """One server, one collection and what it acknowledged: the state every fault cycle works on.

    `models_dir` holds the built models; the run serves from links to them (see linked_model_repository).
    """

    def __init__(
        self, workdir: Path, models_dir: Path, seed: int = 20260101, log: Log = stderr_log, index_kind: str = "auto"
    ) -> None:
        self.workdir = Path(workdir)
        self.models_dir = Path(models_dir)
        self.index_kind = index_kind  # auto (flat at these sizes) | flat | hnsw
        self.collections_dir = self.workdir / "collections"
        self.model_repo = self.workdir / "models"
        self.server = ServerProcess(
            self.collections_dir, self.workdir / "logs", env={"OPENEMPLOI_MODEL_REPOSITORY": str(self.model_repo)}
        )
        self.workload = Workload(seed)
        self.kill_rng = random.Random(seed)
        self.storm_rng = random.Random(seed + 1)
        self.log = log
        self.acknowledged: dict[str, Doc] = {}
        self.committed_unacknowledged: dict[str, Doc] = {}  # in flight at a kill, found committed afterwards
        self.reports: list[CycleReport] = []
        self.truncated_to = 0  # size of the last truncated index.faiss

    # -- lifecycle -----------------------------------------------------------------
    def setup(self) -> None:
        linked_model_repository(self.model_repo, self.models_dir)
        ready = self.server.start()
        self.log(f"server pid {self.server.pid} SERVING on {self.server.address} after {ready:.1f}s; folder {self.workdir}")
        with grpc.insecure_channel(self.server.address) as channel:
            spec = ipb.IndexSpec(kind=INDEX_KINDS[self.index_kind])
            info = (
                ipb_grpc.IndexServiceStub(channel)
                .CreateCollection(ipb.CreateCollectionRequest(name=COLLECTION, index=spec), timeout=RPC_TIMEOUT_S)
                .collection
            )
        self.log(f"collection {info.name}: {info.model}/{info.model_version}, dim {info.dim}, {info.index_kind}")

    def close(self) -> None:
        self.server.stop()

    @property
    def snapshot_path(self) -> Path:
        return self.collections_dir / COLLECTION / "index.faiss"

    def new_report(self, fault: str, injected: int = 1) -> CycleReport:
        """The report of the next cycle, already in `reports`: a cycle that stops early is still counted."""
        report = CycleReport(len(self.reports) + 1, fault, injected)
        self.reports.append(report)
        return report

    def check_all(self, stub: ipb_grpc.IndexServiceStub, report: CycleReport, fresh_committed: int = 0) -> None:
        """Every acknowledged doc (and every committed in-flight doc of earlier cycles): Get, content, Search.
        `fresh_committed`: in-flight docs of this cycle found committed (checked apart), for the size check."""
        verification, why = verify_documents(stub, {**self.acknowledged, **self.committed_unacknowledged})
        lost = set(verification.lost)
        report.lost = sorted(lost & set(self.acknowledged))
        report.acknowledged = len(self.acknowledged)
        report.verify_s += verification.seconds
        vanished = sorted(lost & set(self.committed_unacknowledged))
        if vanished:
            report.problems.append(
                f"{len(vanished)} in-flight docs found committed in an earlier cycle now fail the checks, e.g. {vanished[:3]}"
            )
        for doc_id in (verification.corrupted + verification.missing + verification.unsearchable)[:5]:
            kind = (
                "missing from Get"
                if doc_id in verification.missing
                else "not found by Search k=1"
                if doc_id in verification.unsearchable
                else why.get(doc_id, "corrupted")
            )
            report.notes.append(f"{doc_id}: {kind}")
        if verification.ties:
            report.notes.append(f"{verification.ties} exact score ties at k=1 (identical vectors), accepted")
        expected = len(self.acknowledged) + len(self.committed_unacknowledged) + fresh_committed
        size = collection_size(stub)
        if size != expected:
            report.problems.append(f"collection size {size} != {expected} (acknowledged + committed in-flight docs)")

    def fill(self, requests: int) -> int:
        """Upsert `requests` requests with no fault (acknowledged as usual); return the documents added."""
        added = 0
        with grpc.insecure_channel(self.server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            for _ in range(requests):
                docs = self.workload.request(0)
                stub.Upsert(
                    ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S
                )
                for doc in docs:
                    self.acknowledged[doc.id] = doc
                added += len(docs)
        return added

    def restart(self, report: CycleReport) -> bool:
        """Start again, on a fresh port; a start that fails is a problem of `report` (the cycle's finding)."""
        try:
            report.restart_s = self.server.start()
            return True
        except (RuntimeError, TimeoutError) as exc:
            report.problems.append(f"restart failed: {exc}")
            self.log(report.describe())
            return False

    def upsert_for(self, report: CycleReport, kill: bool, duration_s: float | None = None) -> list[list[Doc]]:
        """Upsert as fast as one client can for 0.2-2 s; with `kill`, a timer thread SIGKILLs the server
        then (mid-request, as the client is nearly always waiting on one).  Returns the requests cut short."""
        cycle = report.number
        delay = self.kill_rng.uniform(*KILL_AFTER_S)  # drawn even when unused: the same seed, the same delays
        if duration_s is not None:
            delay = duration_s
        state = {"busy": False, "fired": False, "mid_request": False}

        def fire() -> None:
            state["mid_request"] = state["busy"]
            state["fired"] = True
            if kill:
                self.server.kill()

        cut: list[list[Doc]] = []
        with grpc.insecure_channel(self.server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            timer = threading.Timer(delay, fire)
            t0 = time.monotonic()
            timer.start()
            try:
                while not (state["fired"] and not kill):
                    docs = self.workload.request(cycle)
                    request = ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs])
                    state["busy"] = True
                    try:
                        reply = stub.Upsert(request, timeout=RPC_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        state["busy"] = False
                        cut.append(docs)
                        if state["fired"]:
                            break
                        report.problems.append(f"Upsert failed before the kill: {exc.code().name}: {exc.details()}")
                        continue
                    state["busy"] = False
                    if reply.upserted != len(docs):
                        report.problems.append(f"Upsert acknowledged {reply.upserted} of {len(docs)} documents")
                    for doc in docs:
                        self.acknowledged[doc.id] = doc
                    report.new_acknowledged += len(docs)
                    if time.monotonic() - t0 > delay + 60:
                        report.problems.append("the timer never stopped the upsert loop")
                        break
            finally:
                timer.cancel()
                if kill:
                    self.server.kill()
        if kill:
            report.killed = True
            report.kill_after_s = delay
            report.kill_mid_request = state["mid_request"]
            report.in_flight = sum(len(docs) for docs in cut)
        elif cut:
            report.problems.append(f"{len(cut)} Upsert requests failed without any fault")
        return cut

    def check_in_flight(self, stub: ipb_grpc.IndexServiceStub, cut: list[list[Doc]], report: CycleReport) -> dict[str, Doc]:
        """A request cut by the kill is all or nothing, and what is there is whole and searchable.
        Returns the in-flight documents found committed (later cycles check them like acknowledged ones)."""
        committed: dict[str, Doc] = {}
        for docs in cut:
            found = fetch(stub, [d.id for d in docs])
            present = [d for d in docs if d.id in found]
            for doc in present:
                difference = same_content(doc, found[doc.id])
                if difference:
                    report.problems.append(f"in-flight {doc.id} is half-visible: {difference}")
            if present and len(present) != len(docs):
                report.problems.append(
                    f"in-flight request torn: {len(present)} of {len(docs)} documents committed "
                    f"({[d.id for d in present][:3]}...)"
                )
            queries = [(d.id, d.vector if d.vector is not None else np.asarray(found[d.id].vector, np.float32)) for d in present]
            failed, _ = searchable(stub, queries)
            if failed:
                report.problems.append(f"in-flight docs committed but not searchable: {failed[:5]}")
            report.in_flight_committed += len(present)
            committed.update((doc.id, doc) for doc in present)
        return committed


def kill_cycle(run: ChaosRun, truncate_snapshot: bool = False, duration_s: float | None = None) -> CycleReport:
    """Upsert until a SIGKILL 0.2-2 s in (or `duration_s`); optionally truncate index.faiss; restart; check everything."""
    report = run.new_report(FAULT_TRUNCATE if truncate_snapshot else FAULT_KILL)
    in_flight = run.upsert_for(report, kill=True, duration_s=duration_s)
    if truncate_snapshot:
        _truncate_snapshot(run, report)
    if not run.restart(report):
        return report
    if truncate_snapshot:
        _check_rebuilt(run, report)
    with grpc.insecure_channel(run.server.address) as channel:
        stub = ipb_grpc.IndexServiceStub(channel)
        committed = run.check_in_flight(stub, in_flight, report)
        run.check_all(stub, report, fresh_committed=len(committed))
    run.committed_unacknowledged.update(committed)
    run.log(report.describe())
    return report


def graceful_cycle(run: ChaosRun, duration_s: float | None = None) -> CycleReport:
    """Upsert for 0.2-2 s (or `duration_s`), SIGTERM (drain, snapshot, exit 0), restart, check everything.

    Besides the clean path, this leaves an index.faiss that holds vectors, so that a later
    truncation cuts through real data rather than through the empty snapshot of CreateCollection."""
    report = run.new_report(FAULT_SIGTERM)
    run.upsert_for(report, kill=False, duration_s=duration_s)
    before = run.snapshot_path.stat().st_size if run.snapshot_path.is_file() else 0
    t0 = time.monotonic()
    status = run.server.stop(grace_s=30.0)
    if status != 0:
        report.problems.append(f"SIGTERM: the server exited with status {status}:\n{run.server.log_tail(10)}")
    after = run.snapshot_path.stat().st_size if run.snapshot_path.is_file() else 0
    report.notes.append(f"stopped in {time.monotonic() - t0:.1f}s; index.faiss {before} -> {after} bytes")
    if not run.restart(report):
        return report
    if REBUILD_MARK in run.server.log_text():
        report.problems.append(f"the snapshot written at shutdown was not usable:\n{run.server.log_tail(10)}")
    with grpc.insecure_channel(run.server.address) as channel:
        run.check_all(ipb_grpc.IndexServiceStub(channel), report)
    run.log(report.describe())
    return report


def _truncate_snapshot(run: ChaosRun, report: CycleReport) -> None:
    path = run.snapshot_path
    if not path.is_file():
        report.problems.append(f"no snapshot at {path} to truncate")
        return
    size = path.stat().st_size
    os.truncate(path, size // 2)
    report.notes.append(f"index.faiss truncated from {size} to {size // 2} bytes while the server was down")
    run.truncated_to = size // 2


def _check_rebuilt(run: ChaosRun, report: CycleReport) -> None:
    log_text = run.server.log_text()
    if REBUILD_MARK not in log_text:
        report.problems.append(
            f"the restarted server did not log {REBUILD_MARK!r} after the truncation:\n{run.server.log_tail(10)}"
        )
    size = run.snapshot_path.stat().st_size if run.snapshot_path.is_file() else -1
    if size <= run.truncated_to:
        report.problems.append(f"index.faiss was not rewritten by the rebuild (size {size})")
    else:
        report.notes.append(f"snapshot rebuilt from the store ({size} bytes)")


def snapshot_kill_cycle(run: ChaosRun, step: str = SNAPSHOT_WRITTEN, duration_s: float | None = None) -> CycleReport:
    """Restart armed to SIGKILL itself at `step` of an index snapshot, upsert, SIGTERM (whose shutdown
    snapshot then dies there), restart unarmed, check everything."""
    report = run.new_report(FAULT_SNAPSHOT_KILL)
    run.server.stop(grace_s=30.0)
    command, run.server.command = run.server.command, [sys.executable, "-P", "-m", "openemploi.testing.faults", "serve"]
    run.server.extra_env[CRASH_AT_ENV] = step
    try:
        if not run.restart(report):
            return report
        run.upsert_for(report, kill=False, duration_s=duration_s)
        status = run.server.stop(grace_s=30.0)
    finally:
        run.server.command = command
        del run.server.extra_env[CRASH_AT_ENV]
    report.killed = True
    if status != -signal.SIGKILL:
        report.problems.append(f"the server armed for {step!r} exited with {status}, not SIGKILL:\n{run.server.log_tail(10)}")
    report.notes.append(f"shutdown snapshot killed at {step!r}")
    return restart_and_verify(run, report)


def restart_and_verify(run: ChaosRun, report: CycleReport) -> CycleReport:
    """The common end of a fault cycle: restart, then check every acknowledged document."""
    if not run.restart(report):
        return report
    with grpc.insecure_channel(run.server.address) as channel:
        run.check_all(ipb_grpc.IndexServiceStub(channel), report)
    run.log(report.describe())
    return report


def _serve_armed() -> int:
    """`openemploi serve` that SIGKILLs itself at the crash point named by CRASH_AT_ENV."""
    from openemploi.cli import main

    step = os.environ.get(CRASH_AT_ENV, "")
    set_crash_hook(lambda at: os.kill(os.getpid(), signal.SIGKILL) if at == step else None)
    return main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(_serve_armed())
