"""A full disk under the server: refused writes are RESOURCE_EXHAUSTED, nothing acknowledged is lost.

A disk that really fills cannot be had on demand in a test; a file size limit on the server
process fails its writes the same way (see disk_full_cycle).
"""

from __future__ import annotations

import hashlib
import resource
from pathlib import Path

import grpc

from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

from .faults import FAULT_DISK, ChaosRun, CycleReport, restart_and_verify
from .verify import RPC_TIMEOUT_S, collection_size, embed, health_statuses
from .workload import COLLECTION, DIM, EMBED_TEXTS, Doc

DISK_HEADROOM = 1 << 20  # bytes a collection file may still grow once the disk is "full"
FULL_MARK = "collection storage is full"  # StorageFull's message: what a refused write must say
SNAPSHOT_FAILED_MARK = "index snapshot not written"  # the error Collection._snapshot_or_log logs


def disk_full_cycle(run: ChaosRun, refusals: int = 5, resumed_requests: int = 10) -> CycleReport:
    """Upserts against a full disk, space freed, then a shutdown snapshot against a full disk.

    The disk fills for real from the server's point of view: its RLIMIT_FSIZE (set from here
    with prlimit; Python ignores SIGXFSZ, so writes past it fail with EFBIG) lets the collection's
    files grow by DISK_HEADROOM bytes only.  Upserts run until `refusals` are refused: each must be
    RESOURCE_EXHAUSTED saying the storage is full, and be all or nothing.  While full, Get, Search,
    Embed and health must work, with every acknowledged document there.  Then the limit is lifted
    (space freed) and `resumed_requests` upserts must succeed at once, with no restart.  Last, the
    limit drops below the size of the next index snapshot and the server gets SIGTERM: the snapshot
    fails, the previous snapshot must stay byte for byte with no temp file left, the server must
    exit cleanly, and the restarted server must replay the store and hold every acknowledged document."""
    report = run.new_report(FAULT_DISK, injected=0)
    pid = run.server.pid
    folder = run.collections_dir / COLLECTION
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    biggest = max(p.stat().st_size for p in folder.iterdir() if p.is_file())
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (biggest + DISK_HEADROOM, hard))
    refused: list[list[Doc]] = []
    try:
        with grpc.insecure_channel(run.server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            acknowledged_before = len(run.acknowledged)
            for _ in range(2000):  # 20 docs of ~3 KiB each in the store: the headroom fills in ~20 requests
                docs = run.workload.request(report.number)
                try:
                    stub.Upsert(
                        ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S
                    )
                except grpc.RpcError as exc:
                    refused.append(docs)
                    report.refusals.append(f"{exc.code().name}: {exc.details()}")
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or FULL_MARK not in exc.details():
                        report.problems.append(f"Upsert on a full disk answered {exc.code().name}: {exc.details()}")
                    if len(refused) >= refusals:
                        break
                    continue
                for doc in docs:
                    run.acknowledged[doc.id] = doc
                report.new_acknowledged += len(docs)
            report.injected = len(refused)
            if not refused:
                report.problems.append("the disk never filled: no Upsert was refused")
            else:
                report.notes.append(
                    f"{len(run.acknowledged) - acknowledged_before} docs acknowledged until the disk filled "
                    f"(limit {biggest + DISK_HEADROOM} bytes per file); then {len(refused)} Upserts refused, the first with {report.refusals[0]}"
                )
            committed = run.check_in_flight(stub, refused, report)  # refused writes: all or nothing
            run.check_all(stub, report, fresh_committed=len(committed))  # reads work on a full disk
            run.committed_unacknowledged.update(committed)
            statuses = health_statuses(run.server.address)
            if any(status != "SERVING" for status in statuses.values()):
                report.problems.append(f"health on a full disk: {statuses}")
            try:
                embed(run.server.address, EMBED_TEXTS[0])
            except grpc.RpcError as exc:
                report.problems.append(f"Embed on a full disk failed: {exc.code().name}: {exc.details()}")
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))  # space freed
            for _ in range(resumed_requests):
                docs = run.workload.request(report.number)
                try:
                    stub.Upsert(
                        ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S
                    )
                except grpc.RpcError as exc:
                    report.problems.append(f"Upsert after space was freed: {exc.code().name}: {exc.details()}")
                    break
                for doc in docs:
                    run.acknowledged[doc.id] = doc
                report.new_acknowledged += len(docs)
            live = collection_size(stub)
    except grpc.RpcError as exc:
        report.problems.append(f"full disk cycle: {exc.code().name}: {exc.details()}")
        live = len(run.acknowledged)
    finally:
        if run.server.alive():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
    # A shutdown snapshot on a full disk: it fails, the previous one stays whole.
    snapshot_files = ("index.faiss",)  # one file: the index, its sequence and tombstones
    before = {name: file_digest(folder / name) for name in snapshot_files}
    limit = max(64 * 1024, live * DIM * 4 // 2)  # half the vectors the next snapshot must hold
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    status = run.server.stop(grace_s=30.0)
    if status != 0:
        report.problems.append(f"SIGTERM on a full disk: the server exited with status {status}:\n{run.server.log_tail(10)}")
    if SNAPSHOT_FAILED_MARK not in run.server.log_text():
        report.problems.append(f"no {SNAPSHOT_FAILED_MARK!r} in the log of a shutdown on a full disk:\n{run.server.log_tail(10)}")
    after = {name: file_digest(folder / name) for name in snapshot_files}
    if after != before:
        report.problems.append(f"the previous snapshot changed on a failed snapshot: {before} -> {after}")
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name)
    if leftovers:
        report.problems.append(f"temp files left by the failed snapshot: {leftovers}")
    report.notes.append(f"shutdown snapshot on a full disk (limit {limit} bytes) failed cleanly; previous snapshot kept")
    return restart_and_verify(run, report)


def file_digest(path: Path) -> str:
    if not path.is_file():
        return "absent"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
