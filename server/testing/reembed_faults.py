"""A SIGKILL of the server during a Reembed: after the restart the collection is whole, on one generation.

The run's server is restarted with a second model (MiniLM) and, for the swap steps, armed to SIGKILL
itself at a crash point of openemploi.index.durable: `swap-staged` (the re-embedded generation is in
place, the name still points at the old one) or `swap-switched` (the name points at the new one, the
old one is not yet removed); at `copying` the kill comes from here while the job still copies
documents. A collection of its own (text documents: a re-embedding rewrites every vector, so the
checks of the main collection, which compare vectors, cannot apply) gets documents, then a Reembed
to MiniLM, then writes while the job runs, until the kill.

After an unarmed restart: exactly one generation folder holds the collection and the name points
at it; it is the old model's before the switch and MiniLM's after it; every acknowledged document
is there with its text and metadata, its vector made by that one model (`vector_model`) and found by
Search with that vector; deletes stay deleted; a write cut by the kill is all or nothing. The main
collection is checked as in every cycle; then this collection is dropped.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import Future

import grpc

from openemploi.index.durable import SWAP_STAGED, SWAP_SWITCHED
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

from .faults import CRASH_AT_ENV, FAULT_REEMBED, ChaosRun, CycleReport
from .verify import RPC_TIMEOUT_S
from .workload import METIERS, VILLES

COPYING = "copying"  # killed from here while the job copies documents (not a crash point)
REEMBED_KILLS = (COPYING, SWAP_STAGED, SWAP_SWITCHED)
COLLECTION = "chaos-reembed"
FIRST_MODEL = "multilingual-e5-small"
SECOND_MODEL = "all-minilm-l6-v2"
DOCS = 240  # before the Reembed: enough that the copy is still running after the first writes
WRITES = 12  # Upsert/Delete requests while the job runs (the kill at `copying` comes after KILL_AFTER_WRITES)
KILL_AFTER_WRITES = 3
REEMBED_TIMEOUT_S = 600.0
Acknowledged = dict[str, tuple[str, dict[str, str]]]  # id -> (text, metadata)


def _documents(start: int, n: int, tag: str) -> list[ipb.Document]:
    return [
        ipb.Document(
            id=f"r{i:05d}",
            text=f"{METIERS[i % len(METIERS)]} à {VILLES[i % len(VILLES)]}, offre {i} ({tag})",
            metadata={"tag": tag},
        )
        for i in range(start, start + n)
    ]


class _Writer:
    """Upserts and deletes against the collection, remembering what was acknowledged and what a kill cut."""

    def __init__(self, stub: ipb_grpc.IndexServiceStub) -> None:
        self.stub = stub
        self.live: Acknowledged = {}
        self.deleted: set[str] = set()
        self.cut_upsert: list[ipb.Document] = []  # the write in flight at the kill: all or nothing
        self.cut_delete: list[str] = []

    def upsert(self, documents: list[ipb.Document]) -> bool:
        try:
            self.stub.Upsert(ipb.UpsertRequest(collection=COLLECTION, documents=documents), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            self.cut_upsert = documents
            return False
        for doc in documents:
            self.live[doc.id] = (doc.text, dict(doc.metadata))
            self.deleted.discard(doc.id)
        return True

    def delete(self, ids: list[str]) -> bool:
        try:
            self.stub.Delete(ipb.DeleteRequest(collection=COLLECTION, ids=ids), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            self.cut_delete = ids
            return False
        for doc_id in ids:
            self.live.pop(doc_id, None)
            self.deleted.add(doc_id)
        return True


def reembed_kill_cycle(run: ChaosRun, at: str) -> CycleReport:
    """Restart with MiniLM (armed to die at `at` unless it is COPYING), Reembed under writes, the kill, restart, checks."""
    report = run.new_report(FAULT_REEMBED)
    report.notes.append(f"killed at {at!r}")
    server = run.server
    server.stop(grace_s=30.0)
    command = server.command
    server.extra_env["OPENEMPLOI_MODELS"] = f"{FIRST_MODEL},{SECOND_MODEL}"
    if at != COPYING:
        server.command = [sys.executable, "-P", "-m", "openemploi.testing.faults", "serve"]
        server.extra_env[CRASH_AT_ENV] = at
    try:
        writer = _write_through_a_reembed(run, report, at) if run.restart(report) else None
    finally:
        server.command = command
        server.extra_env.pop(CRASH_AT_ENV, None)
    report.killed = report.kill_mid_request = True  # the Reembed was in flight
    if writer is not None:
        report.new_acknowledged = len(writer.live)
    if writer is not None and run.restart(report):
        with grpc.insecure_channel(server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            run.check_all(stub, report)  # the main collection, as after every fault
            _check_reembedded(run, stub, report, writer, at)
            stub.DropCollection(ipb.DropCollectionRequest(name=COLLECTION), timeout=RPC_TIMEOUT_S)
    server.extra_env.pop("OPENEMPLOI_MODELS", None)  # the next restart serves the usual model only
    run.log(report.describe())
    return report


def _write_through_a_reembed(run: ChaosRun, report: CycleReport, at: str) -> _Writer | None:
    """Fill the collection, start the Reembed, write while it runs; returns once the server is dead."""
    with grpc.insecure_channel(run.server.address) as channel:
        stub = ipb_grpc.IndexServiceStub(channel)
        stub.CreateCollection(ipb.CreateCollectionRequest(name=COLLECTION, model=FIRST_MODEL), timeout=RPC_TIMEOUT_S)
        writer = _Writer(stub)
        for start in range(0, DOCS, 60):
            if not writer.upsert(_documents(start, 60, "initial")):
                report.problems.append("an Upsert failed before the Reembed")
                run.server.kill()
                return None
        request = ipb.ReembedRequest(collection=COLLECTION, model=SECOND_MODEL)
        job: Future = stub.Reembed.future(request, timeout=REEMBED_TIMEOUT_S)
        for n in range(WRITES):
            if job.done():
                break
            if at == COPYING and n == KILL_AFTER_WRITES:
                run.server.kill()
                break
            ok = writer.delete([f"r{7 * n:05d}"]) if n % 3 == 0 else writer.upsert(_documents(DOCS + 10 * n, 10, f"during-{n}"))
            if not ok:
                break  # the server died at its crash point
        try:
            job.result(timeout=REEMBED_TIMEOUT_S)
            report.problems.append(f"the Reembed returned OK: the server was not killed at {at!r} (raise DOCS)")
        except grpc.RpcError as exc:
            report.notes.append(f"Reembed ended with {exc.code().name}")
    status = run.server.stop(grace_s=30.0)
    if status != -signal.SIGKILL:
        report.problems.append(f"the server exited with {status}, not SIGKILL:\n{run.server.log_tail(10)}")
    return writer


def _check_reembedded(run: ChaosRun, stub: ipb_grpc.IndexServiceStub, report: CycleReport, writer: _Writer, at: str) -> None:
    root = run.collections_dir
    ours = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(f"-{COLLECTION}"))
    pointed = os.readlink(root / COLLECTION) if (root / COLLECTION).is_symlink() else "(no pointer)"
    if ours != [pointed]:
        report.problems.append(f"after the restart {ours} on disk, the name points at {pointed}: not one generation")
    infos = stub.ListCollections(ipb.ListCollectionsRequest(), timeout=RPC_TIMEOUT_S).collections
    info = next(c for c in infos if c.name == COLLECTION)
    generation = f"{info.model}/{info.model_version}"
    expected = SECOND_MODEL if at == SWAP_SWITCHED else FIRST_MODEL
    if info.model != expected:
        report.problems.append(f"served by {info.model} after a kill at {at!r}, expected {expected}")
    report.notes.append(f"after the restart: {pointed}, {generation}, {info.size} docs")
    ids = sorted(set(writer.live) | writer.deleted | {d.id for d in writer.cut_upsert} | set(writer.cut_delete))
    reply = stub.Get(ipb.GetRequest(collection=COLLECTION, ids=ids, include_vectors=True), timeout=RPC_TIMEOUT_S)
    found = {d.id: d for d in reply.documents}
    if info.size != len(found):
        report.problems.append(f"collection size {info.size}, {len(found)} of its documents found by Get")
    models = {d.vector_model for d in found.values()}
    if models != {generation}:
        report.problems.append(f"vectors of {sorted(models)} in a collection served as {generation}")
    report.acknowledged += len(writer.live)  # after the main collection's, counted by check_all
    lost = {
        doc_id
        for doc_id, content in writer.live.items()
        if doc_id not in found
        or (found[doc_id].text, dict(found[doc_id].metadata)) != content
        or _first_hit(stub, found[doc_id]) != doc_id
    }
    report.lost = sorted(set(report.lost) | lost)
    back = sorted(doc_id for doc_id in writer.deleted if doc_id in found)
    if back:
        report.problems.append(f"deleted documents came back: {back}")
    _all_or_nothing(report, writer, found)


def _all_or_nothing(report: CycleReport, writer: _Writer, found: dict[str, ipb.Document]) -> None:
    cut = [d.id for d in writer.cut_upsert]
    present = sum(doc_id in found for doc_id in cut)
    if present not in (0, len(cut)):
        report.problems.append(f"the Upsert cut by the kill is torn: {present} of {len(cut)} documents")
    gone = sum(doc_id not in found for doc_id in writer.cut_delete)
    if gone not in (0, len(writer.cut_delete)):
        report.problems.append(f"the Delete cut by the kill is torn: {gone} of {len(writer.cut_delete)} ids gone")
    report.in_flight = len(cut) + len(writer.cut_delete)
    report.in_flight_committed = present + gone


def _first_hit(stub: ipb_grpc.IndexServiceStub, document: ipb.Document) -> str:
    """The first hit of a Search with the document's stored vector (texts are distinct: no exact ties)."""
    request = ipb.SearchRequest(collection=COLLECTION, vector=list(document.vector), k=1)
    hits = stub.Search(request, timeout=RPC_TIMEOUT_S).hits
    return hits[0].id if hits else ""
