#!/usr/bin/env python3
"""Faults against the real server: SIGKILL mid-upsert, a truncated snapshot, disconnect storms, failed model loads, a full disk.

    .venv/bin/python benchmarks/chaos.py [--quick] [--cycles 20] [--dir PATH] [--seed N] [--index auto|flat|hnsw]

The real server runs in a subprocess (``python -m server.cli serve``) on 127.0.0.1,
with its collections in a folder of ours.  One collection, "chaos", gets Upsert
requests of 20 documents each (most with explicit random unit vectors, a few with
text the server embeds), as fast as one client can send them; the ids of every
Upsert that returned OK are recorded as acknowledged.  A timer thread SIGKILLs
the server 0.2-2 s into the loop, so the kill lands in the middle of a request.
The server is restarted on the same folder and checked:

* every acknowledged document is returned by IndexService.Get, with its text,
  metadata, skills and (for explicit vectors) the exact vector it was sent with;
* every acknowledged document is searchable: Search with its own vector (k=1)
  returns it (text documents: the vector Get returns);
* the request in flight at the kill is all or nothing: each of its ids is either
  absent or present with its full content (and then searchable);
* the collection's size is the acknowledged documents plus those in-flight
  documents that turned out committed (nothing else appeared).

Besides the SIGKILL cycles (``--cycles``, 20 by default): one clean SIGTERM restart
(the shutdown snapshot then holds vectors, and later kills replay on top of a real
snapshot); one SIGKILL cycle that truncates ``<dir>/collections/chaos/index.faiss``
to half while the server is down (the restarted server must log that the snapshot
is unusable, rebuild it from the store and pass the same checks); and one client
disconnect storm: many EmbedStream calls cancelled mid-stream or cut by closing
their connection, after which the server must still be SERVING, answer Embed with
the same vector as before, complete a fresh EmbedStream, and still hold every
acknowledged document.

A model load that fails mid-swap (ChaosRun.model_swap_cycle): while 4 clients call Embed
without pause, LoadModel is called for versions that fail at three stages of a load (a truncated
ONNX graph, graph files gone after the manifest was read, a warm-up whose vectors have the wrong
dimension), each `--swap-repeats` times.  Every LoadModel must answer FAILED_PRECONDITION, no Embed
may fail or change vector or version, health must stay SERVING, nothing of a failed load may stay
loaded or keep memory, and a valid LoadModel must still swap (and back).  The versions live in a
model repository of our own (<dir>/models, links to the built ones); models/ is never written.

A full disk (ChaosRun.disk_full_cycle): the server's RLIMIT_FSIZE is lowered with prlimit so its
collection files cannot grow (writes fail with EFBIG, as they fail with ENOSPC on a full disk);
upserts must then be refused with RESOURCE_EXHAUSTED and be all or nothing, reads must go on, and
once the limit is lifted upserts must resume; a shutdown snapshot against the limit must fail
without touching the previous snapshot, and the restarted server must replay the store.

``--quick`` (4 SIGKILL cycles, a small storm, each broken version 3 times) is for development;
the default run is sized for about 10 minutes on 2 cores.

``--index hnsw`` runs the same on an HNSW collection; it exposes the replay bug that
tests/api/test_crash_recovery.py marks xfail (replayed documents tombstoned).

One table is printed at the end; the exit status is 1 when an acknowledged
document was lost or a fault was not survived.  tests/api/test_crash_recovery.py
imports this module and runs a shorter sequence.  Nothing in server/ imports it.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make `server` and `openemploi` importable
    sys.path.insert(0, str(ROOT))

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc
from openemploi.v1 import models_pb2 as mpb
from openemploi.v1 import models_pb2_grpc as mpb_grpc

HOST = "127.0.0.1"
DIM = 384
COLLECTION = "chaos"
DOCS_PER_REQUEST = 20
TEXT_REQUEST_SHARE = 0.25  # share of Upsert requests that carry text documents (2 of their 20)
TEXTS_PER_TEXT_REQUEST = 2
KILL_AFTER_S = (0.2, 2.0)
READY_TIMEOUT_S = 120.0
RPC_TIMEOUT_S = 30.0
GET_CHUNK = 256  # ids per Get with vectors: ~400 KB, well under the 4 MiB client receive limit
SEARCH_WINDOW = 32  # Search calls in flight while verifying
REBUILD_MARK = "index snapshot unusable"  # the warning Collection._recover logs before rebuilding
INDEX_KINDS = {"auto": ipb.INDEX_KIND_AUTO, "flat": ipb.FLAT, "hnsw": ipb.HNSW}
SERVICE_NAMES = ("", "openemploi.v1.EmbeddingService", "openemploi.v1.IndexService", "openemploi.v1.MatchService")
DEFAULT_MODEL = "multilingual-e5-small"
BROKEN_KINDS = ("truncated", "missing", "warmup")  # how a version fails to load: see make_version
SWAP_CLIENTS = 4  # threads calling Embed without pause while LoadModel runs
LEAK_PER_LOAD = 64 << 20  # RSS growth per failed load in the last round taken as a leak (a leak was ~250 MiB)
LEAK_ROUNDS = 3  # rounds of failed loads needed before RSS settles enough to judge (see model_swap_cycle)
DISK_HEADROOM = 1 << 20  # bytes a collection file may still grow once the disk is "full"
FULL_MARK = "collection storage is full"  # StorageFull's message: what a refused write must say
SNAPSHOT_FAILED_MARK = "index snapshot not written"  # the error Collection._snapshot_or_log logs

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the server subprocess


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_env(collections_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without its OPENEMPLOI_* keys, plus the chaos settings (and `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEMPLOI_")}
    env.update(
        OPENEMPLOI_ROME_COLLECTION="false",
        OPENEMPLOI_PROGRESS="false",
        OPENEMPLOI_COLLECTIONS_DIR=str(collections_dir),
        OPENEMPLOI_LOG_LEVEL="WARNING",
        OPENEMPLOI_HOST=HOST,
        OPENEMPLOI_METRICS_PORT="0",  # several servers may run at once; any free port
    )
    env.update(extra or {})
    return env


class ServerProcess:
    """`python -m server.cli serve` on a fresh free port per start, stderr to a log file per start."""

    def __init__(
        self, collections_dir: Path, log_dir: Path, root: Path = ROOT, ready_timeout_s: float = READY_TIMEOUT_S,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.collections_dir = Path(collections_dir)
        self.extra_env = dict(extra_env or {})
        self.log_dir = Path(log_dir)
        self.root = Path(root)
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.log_path: Path | None = None
        self.ready_s = 0.0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> float:
        """Start and wait for SERVING; return the seconds it took.  Raises with the server's stderr."""
        if self.alive():
            raise RuntimeError("server already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.port = free_port()
        self.log_path = self.log_dir / f"server-{self.starts:03d}.log"
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command, cwd=self.root, env=server_env(self.collections_dir, self.extra_env),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        self._wait_serving(t0)
        self.ready_s = time.monotonic() - t0
        return self.ready_s

    def _wait_serving(self, t0: float) -> None:
        deadline = t0 + self.ready_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with status {self.process.returncode} before SERVING; its stderr:\n{self.log_tail(60)}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"server not SERVING after {self.ready_timeout_s:.0f}s; its stderr:\n{self.log_tail(60)}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty)"

    def kill(self) -> None:
        """SIGKILL: no drain, no snapshot, no close."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain and snapshot), SIGKILL if still there after grace_s."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


# --------------------------------------------------------------------------- the workload

METIERS = [
    "Boulanger", "Cariste", "Aide-soignant", "Développeur Python", "Maçon coffreur", "Comptable", "Serveur en brasserie",
    "Plombier chauffagiste", "Infirmière de nuit", "Chauffeur poids lourd", "Électricien du bâtiment", "Agent d'accueil",
    "Préparateur de commandes", "Cuisinier", "Assistante maternelle", "Technicien de maintenance", "Vendeur en boulangerie",
]
VILLES = ["Lyon", "Paris", "Nantes", "Lille", "Marseille", "Toulouse", "Rennes", "Strasbourg", "Bordeaux", "Dijon"]
CONTRATS = ["CDI", "CDD", "Intérim", "Alternance", "Saisonnier"]
DETAILS = [
    "travail en équipe", "horaires décalés", "permis B exigé", "débutant accepté", "expérience de deux ans",
    "week-ends travaillés", "poste à temps partiel", "mutuelle et tickets restaurant", "formation assurée",
    "port de charges", "contact clientèle", "lecture de plans", "habilitation électrique", "CACES R489",
]
SKILLS = ["HACCP", "Python", "SQL", "CACES R489", "soins d'hygiène", "coffrage", "accueil", "gestion des stocks", "Excel"]


@dataclass
class Doc:
    id: str
    text: str
    vector: np.ndarray | None  # None: the server embeds `text`
    metadata: dict[str, str]
    skills: list[str]

    def message(self) -> ipb.Document:
        message = ipb.Document(id=self.id, text=self.text, metadata=self.metadata, skills=self.skills)
        if self.vector is not None:
            message.vector.extend(self.vector.tolist())
        return message


class Workload:
    """Deterministic documents from a seed: unique ids, random unit vectors, distinct French texts."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_doc = 0
        self.next_request = 0

    def _text(self, n: int) -> str:
        rng = self.rng
        details = ", ".join(str(d) for d in rng.choice(DETAILS, size=3, replace=False))
        return (
            f"{rng.choice(METIERS)} à {rng.choice(VILLES)} en {rng.choice(CONTRATS)} : {details}. "
            f"Offre numéro {n}, salaire {int(rng.integers(1700, 4200))} euros brut mensuel."
        )

    def request(self, cycle: int) -> list[Doc]:
        rng = self.rng
        number = self.next_request
        self.next_request += 1
        texts = TEXTS_PER_TEXT_REQUEST if rng.random() < TEXT_REQUEST_SHARE else 0
        vectors = rng.normal(size=(DOCS_PER_REQUEST, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        docs = []
        for j in range(DOCS_PER_REQUEST):
            n = self.next_doc
            self.next_doc += 1
            embedded = j < texts
            metadata = {
                "ville": str(rng.choice(VILLES)), "contrat": str(rng.choice(CONTRATS)), "cycle": str(cycle),
                "request": str(number), "position": str(j), "source": "text" if embedded else "vector",
            }
            skills = sorted({str(s) for s in rng.choice(SKILLS, size=int(rng.integers(0, 4)), replace=False)})
            text = self._text(n) if embedded else f"document vectoriel {n}"
            docs.append(Doc(f"doc-{n:07d}", text, None if embedded else vectors[j], metadata, skills))
        return docs


# --------------------------------------------------------------------------- checks


@dataclass
class Verification:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # not returned by Get
    corrupted: list[str] = field(default_factory=list)  # returned with other content
    unsearchable: list[str] = field(default_factory=list)  # Get has it, Search with its vector does not find it
    ties: int = 0  # k=1 returned another document with the very same score (identical vectors)
    seconds: float = 0.0

    @property
    def lost(self) -> list[str]:
        return sorted(set(self.missing) | set(self.corrupted) | set(self.unsearchable))


def _same_content(doc: Doc, got: ipb.Document) -> str:
    """Empty when `got` is `doc` in full; otherwise what differs."""
    if got.text != doc.text:
        return f"text {got.text[:40]!r} != {doc.text[:40]!r}"
    if dict(got.metadata) != doc.metadata:
        return f"metadata {dict(got.metadata)} != {doc.metadata}"
    if list(got.skills) != doc.skills:
        return f"skills {list(got.skills)} != {doc.skills}"
    vector = np.asarray(got.vector, dtype=np.float32)
    if doc.vector is not None:
        if not np.array_equal(vector, doc.vector):
            return f"vector differs (dim {vector.size}, max diff {np.max(np.abs(vector - doc.vector)) if vector.size == DIM else 'n/a'})"
    elif vector.size != DIM or abs(float(np.linalg.norm(vector)) - 1.0) > 1e-3:
        return f"embedded vector has dim {vector.size} and norm {float(np.linalg.norm(vector)) if vector.size else 0:.4f}"
    return ""


def fetch(stub: ipb_grpc.IndexServiceStub, ids: Sequence[str]) -> dict[str, ipb.Document]:
    found: dict[str, ipb.Document] = {}
    for start in range(0, len(ids), GET_CHUNK):
        chunk = list(ids[start : start + GET_CHUNK])
        reply = stub.Get(ipb.GetRequest(collection=COLLECTION, ids=chunk, include_vectors=True), timeout=RPC_TIMEOUT_S)
        for document in reply.documents:
            found[document.id] = document
    return found


def searchable(stub: ipb_grpc.IndexServiceStub, queries: Sequence[tuple[str, np.ndarray]], window: int = SEARCH_WINDOW) -> tuple[list[str], int]:
    """Search k=1 with each document's own vector; return the ids not found and the number of exact ties."""
    failed: list[str] = []
    ties = 0
    pending: deque = deque()

    def settle() -> None:
        nonlocal ties
        doc_id, vector, future = pending.popleft()
        hits = future.result().hits
        if hits and hits[0].id == doc_id:
            return
        # Another document with the very same vector ranks first: accept only an exact tie.
        wider = stub.Search(ipb.SearchRequest(collection=COLLECTION, vector=vector.tolist(), k=8), timeout=RPC_TIMEOUT_S).hits
        tied = [h for h in wider if h.score == wider[0].score]
        if any(h.id == doc_id for h in tied):
            ties += 1
        else:
            failed.append(doc_id)

    for doc_id, vector in queries:
        request = ipb.SearchRequest(collection=COLLECTION, vector=vector.tolist(), k=1)
        pending.append((doc_id, vector, stub.Search.future(request, timeout=RPC_TIMEOUT_S)))
        if len(pending) >= window:
            settle()
    while pending:
        settle()
    return failed, ties


def verify_documents(stub: ipb_grpc.IndexServiceStub, docs: dict[str, Doc]) -> tuple[Verification, dict[str, str]]:
    """Get + content + Search k=1 for every document of `docs`; also returns why each corrupted one differs."""
    t0 = time.monotonic()
    result = Verification(checked=len(docs))
    found = fetch(stub, list(docs))
    why: dict[str, str] = {}
    queries: list[tuple[str, np.ndarray]] = []
    for doc_id, doc in docs.items():
        got = found.get(doc_id)
        if got is None:
            result.missing.append(doc_id)
            continue
        difference = _same_content(doc, got)
        if difference:
            result.corrupted.append(doc_id)
            why[doc_id] = difference
            continue
        vector = doc.vector if doc.vector is not None else np.asarray(got.vector, dtype=np.float32)
        queries.append((doc_id, vector))
    result.unsearchable, result.ties = searchable(stub, queries)
    result.seconds = time.monotonic() - t0
    return result, why


def collection_size(stub: ipb_grpc.IndexServiceStub) -> int:
    infos = stub.ListCollections(ipb.ListCollectionsRequest(), timeout=RPC_TIMEOUT_S).collections
    return next(int(c.size) for c in infos if c.name == COLLECTION)


def health_statuses(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = {}
        for name in SERVICE_NAMES:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5.0)
                statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                statuses[name] = f"error {exc.code().name}"
        return statuses


# --------------------------------------------------------------------------- cycles


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

    @property
    def survived(self) -> bool:
        return not self.lost and not self.problems

    def describe(self) -> str:
        head = (
            f"cycle {self.number} [{self.fault}]: "
            + (f"SIGKILL after {self.kill_after_s:.2f}s{' mid-request' if self.kill_mid_request else ' between requests'}, " if self.killed else "")
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
FAULT_STORM = "client disconnect storm (EmbedStream)"
FAULT_SIGTERM = "SIGTERM (graceful restart)"
FAULT_SWAP = "model load failing mid-swap"
FAULT_DISK = "full disk (file size limit)"
REQUEST_FAULTS = (FAULT_SWAP,)  # their rows count Embed requests, not documents


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


def file_digest(path: Path) -> str:
    if not path.is_file():
        return "absent"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class ChaosRun:
    """One server, one collection, faults injected one cycle at a time; every cycle ends with full checks."""

    def __init__(self, workdir: Path, seed: int = 20260101, log: Log = stderr_log, index_kind: str = "auto") -> None:
        self.workdir = Path(workdir)
        self.index_kind = index_kind  # auto (flat at these sizes) | flat | hnsw
        self.collections_dir = self.workdir / "collections"
        self.model_repo = self.workdir / "models"
        self.server = ServerProcess(
            self.collections_dir, self.workdir / "logs", extra_env={"OPENEMPLOI_MODEL_REPOSITORY": str(self.model_repo)}
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
        linked_model_repository(self.model_repo, ROOT / "models")
        ready = self.server.start()
        self.log(f"server pid {self.server.pid} SERVING on {self.server.address} after {ready:.1f}s; folder {self.workdir}")
        with grpc.insecure_channel(self.server.address) as channel:
            spec = ipb.IndexSpec(kind=INDEX_KINDS[self.index_kind])
            info = ipb_grpc.IndexServiceStub(channel).CreateCollection(
                ipb.CreateCollectionRequest(name=COLLECTION, index=spec), timeout=RPC_TIMEOUT_S
            ).collection
        self.log(f"collection {info.name}: {info.model}/{info.model_version}, dim {info.dim}, {info.index_kind}")

    def close(self) -> None:
        self.server.stop()

    @property
    def snapshot_path(self) -> Path:
        return self.collections_dir / COLLECTION / "index.faiss"

    def _check_all(self, stub: ipb_grpc.IndexServiceStub, report: CycleReport, fresh_committed: int = 0) -> None:
        """Every acknowledged doc (and every committed in-flight doc of earlier cycles): Get, content, Search.
        `fresh_committed`: in-flight docs of this cycle found committed (checked apart), for the size check."""
        verification, why = verify_documents(stub, {**self.acknowledged, **self.committed_unacknowledged})
        lost = set(verification.lost)
        report.lost = sorted(lost & set(self.acknowledged))
        report.acknowledged = len(self.acknowledged)
        report.verify_s += verification.seconds
        vanished = sorted(lost & set(self.committed_unacknowledged))
        if vanished:
            report.problems.append(f"{len(vanished)} in-flight docs found committed in an earlier cycle now fail the checks, e.g. {vanished[:3]}")
        for doc_id in (verification.corrupted + verification.missing + verification.unsearchable)[:5]:
            kind = "missing from Get" if doc_id in verification.missing else "not found by Search k=1" if doc_id in verification.unsearchable else why.get(doc_id, "corrupted")
            report.notes.append(f"{doc_id}: {kind}")
        if verification.ties:
            report.notes.append(f"{verification.ties} exact score ties at k=1 (identical vectors), accepted")
        expected = len(self.acknowledged) + len(self.committed_unacknowledged) + fresh_committed
        size = collection_size(stub)
        if size != expected:
            report.problems.append(f"collection size {size} != {expected} (acknowledged + committed in-flight docs)")

    # -- SIGKILL cycles ------------------------------------------------------------
    def fill(self, requests: int) -> int:
        """Upsert `requests` requests with no fault (acknowledged as usual); return the documents added."""
        added = 0
        with grpc.insecure_channel(self.server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            for _ in range(requests):
                docs = self.workload.request(0)
                stub.Upsert(ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S)
                for doc in docs:
                    self.acknowledged[doc.id] = doc
                added += len(docs)
        return added

    def kill_cycle(self, truncate_snapshot: bool = False, duration_s: float | None = None) -> CycleReport:
        """Upsert until a SIGKILL 0.2-2 s in (or `duration_s`); optionally truncate index.faiss; restart; check everything."""
        report = CycleReport(len(self.reports) + 1, FAULT_TRUNCATE if truncate_snapshot else FAULT_KILL)
        self.reports.append(report)
        in_flight = self._upsert_for(report, kill=True, duration_s=duration_s)
        if truncate_snapshot:
            self._truncate_snapshot(report)
        if not self._restart(report):
            return report
        if truncate_snapshot:
            self._check_rebuilt(report)
        with grpc.insecure_channel(self.server.address) as channel:
            stub = ipb_grpc.IndexServiceStub(channel)
            committed = self._check_in_flight(stub, in_flight, report)
            self._check_all(stub, report, fresh_committed=len(committed))
        self.committed_unacknowledged.update(committed)
        self.log(report.describe())
        return report

    def graceful_cycle(self, duration_s: float | None = None) -> CycleReport:
        """Upsert for 0.2-2 s (or `duration_s`), SIGTERM (drain, snapshot, exit 0), restart, check everything.

        Besides the clean path, this leaves an index.faiss that holds vectors, so that a later
        truncation cuts through real data rather than through the empty snapshot of CreateCollection."""
        report = CycleReport(len(self.reports) + 1, FAULT_SIGTERM)
        self.reports.append(report)
        self._upsert_for(report, kill=False, duration_s=duration_s)
        before = self.snapshot_path.stat().st_size if self.snapshot_path.is_file() else 0
        t0 = time.monotonic()
        status = self.server.stop(grace_s=30.0)
        if status != 0:
            report.problems.append(f"SIGTERM: the server exited with status {status}:\n{self.server.log_tail(10)}")
        after = self.snapshot_path.stat().st_size if self.snapshot_path.is_file() else 0
        report.notes.append(f"stopped in {time.monotonic() - t0:.1f}s; index.faiss {before} -> {after} bytes")
        if not self._restart(report):
            return report
        if REBUILD_MARK in self.server.log_text():
            report.problems.append(f"the snapshot written at shutdown was not usable:\n{self.server.log_tail(10)}")
        with grpc.insecure_channel(self.server.address) as channel:
            self._check_all(ipb_grpc.IndexServiceStub(channel), report)
        self.log(report.describe())
        return report

    def _restart(self, report: CycleReport) -> bool:
        try:
            report.restart_s = self.server.start()
            return True
        except (RuntimeError, TimeoutError) as exc:
            report.problems.append(f"restart failed: {exc}")
            self.log(report.describe())
            return False

    def _upsert_for(self, report: CycleReport, kill: bool, duration_s: float | None = None) -> list[list[Doc]]:
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

    def _truncate_snapshot(self, report: CycleReport) -> None:
        path = self.snapshot_path
        if not path.is_file():
            report.problems.append(f"no snapshot at {path} to truncate")
            return
        size = path.stat().st_size
        os.truncate(path, size // 2)
        report.notes.append(f"index.faiss truncated from {size} to {size // 2} bytes while the server was down")
        self.truncated_to = size // 2

    def _check_rebuilt(self, report: CycleReport) -> None:
        log_text = self.server.log_text()
        if REBUILD_MARK not in log_text:
            report.problems.append(f"the restarted server did not log {REBUILD_MARK!r} after the truncation:\n{self.server.log_tail(10)}")
        size = self.snapshot_path.stat().st_size if self.snapshot_path.is_file() else -1
        if size <= self.truncated_to:
            report.problems.append(f"index.faiss was not rewritten by the rebuild (size {size})")
        else:
            report.notes.append(f"snapshot rebuilt from the store ({size} bytes)")

    def _check_in_flight(self, stub: ipb_grpc.IndexServiceStub, cut: list[list[Doc]], report: CycleReport) -> dict[str, Doc]:
        """A request cut by the kill is all or nothing, and what is there is whole and searchable.
        Returns the in-flight documents found committed (later cycles check them like acknowledged ones)."""
        committed: dict[str, Doc] = {}
        for docs in cut:
            found = fetch(stub, [d.id for d in docs])
            present = [d for d in docs if d.id in found]
            for doc in present:
                difference = _same_content(doc, found[doc.id])
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

    # -- client disconnect storm ---------------------------------------------------
    def storm_cycle(self, clients: int = 16, rounds: int = 10) -> CycleReport:
        """Many EmbedStream calls cancelled mid-stream or cut by closing their channel; then the server must be fine."""
        report = CycleReport(len(self.reports) + 1, FAULT_STORM)
        self.reports.append(report)
        address = self.server.address
        reference_text = "Chauffeur livreur en CDI à Lyon, permis C exigé, tournées le matin."
        reference = self._embed(address, reference_text)
        t0 = time.monotonic()
        stats = asyncio.run(_storm(address, clients, rounds, self.storm_rng))
        report.injected = stats["cancelled"]
        report.notes.append(
            f"{stats['cancelled']} streams cut mid-stream ({stats['cancel']} cancel(), {stats['close']} channel closed) "
            f"by {clients} clients x {rounds} rounds in {time.monotonic() - t0:.1f}s; "
            f"{stats['responses']} responses read before the cuts; {stats['errors']} unexpected errors"
        )
        if stats["errors"]:
            report.problems.append(f"unexpected stream errors during the storm: {stats['error_samples']}")
        if not self.server.alive():
            report.problems.append(f"server died during the storm:\n{self.server.log_tail(20)}")
            self.log(report.describe())
            return report
        statuses = health_statuses(address)
        if any(status != "SERVING" for status in statuses.values()):
            report.problems.append(f"health after the storm: {statuses}")
        t1 = time.monotonic()
        try:
            after = self._embed(address, reference_text)
            latency = time.monotonic() - t1
            report.notes.append(f"Embed after the storm answered in {latency * 1000:.0f} ms")
            if not np.allclose(after, reference, atol=1e-6):
                report.problems.append(f"Embed after the storm differs from before (max diff {np.max(np.abs(after - reference)):.2e})")
        except grpc.RpcError as exc:
            report.problems.append(f"Embed after the storm failed: {exc.code().name}: {exc.details()}")
        try:
            responses = self._full_stream(address)
            if [r.sequence for r in responses] != [0, 1, 2] or any(r.code for r in responses):
                report.problems.append(f"a fresh EmbedStream after the storm answered {[(r.sequence, r.code) for r in responses]}")
        except grpc.RpcError as exc:
            report.problems.append(f"a fresh EmbedStream after the storm failed: {exc.code().name}: {exc.details()}")
        cpu = _process_cpu_share(self.server.pid, 1.0)
        if cpu is not None:
            report.notes.append(f"server CPU over 1 s after the checks: {cpu:.0%} of one core")
        with grpc.insecure_channel(address) as channel:
            self._check_all(ipb_grpc.IndexServiceStub(channel), report)
        self.log(report.describe())
        return report

    @staticmethod
    def _embed(address: str, text: str) -> np.ndarray:
        with grpc.insecure_channel(address) as channel:
            reply = epb_grpc.EmbeddingServiceStub(channel).Embed(
                epb.EmbedRequest(texts=[text], kind=epb.PASSAGE), timeout=RPC_TIMEOUT_S
            )
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)

    @staticmethod
    def _full_stream(address: str) -> list:
        requests = [epb.EmbedRequest(texts=[f"Offre {i} : agent de propreté à Nantes"], kind=epb.PASSAGE) for i in range(3)]
        with grpc.insecure_channel(address) as channel:
            return list(epb_grpc.EmbeddingServiceStub(channel).EmbedStream(iter(requests), timeout=RPC_TIMEOUT_S))

    # -- a model load that fails mid-swap ------------------------------------------
    def model_swap_cycle(self, repeats: int = 4) -> CycleReport:
        """LoadModel of broken versions while clients call Embed without pause; then a valid swap and back.

        Each broken version fails at another stage of the load (see make_version): its graph is
        truncated (no session can be built), its graph files are gone (the manifest was fine), or
        its manifest's dimension is not its graph's (the session is built, the warm-up check fails).
        Checks: each LoadModel answers FAILED_PRECONDITION saying the serving version is unchanged;
        no Embed fails and each is answered by the serving version with the same vector; health
        stays SERVING; no broken version is left loaded; and a valid LoadModel still swaps (then
        back: the swapped-in version drains and unloads)."""
        report = CycleReport(len(self.reports) + 1, FAULT_SWAP, injected=0)
        self.reports.append(report)
        address = self.server.address
        folder = self.model_repo / DEFAULT_MODEL
        made: list[Path] = []
        serving = ""
        clients: EmbedClients | None = None
        try:
            with grpc.insecure_channel(address) as channel:
                admin = mpb_grpc.ModelServiceStub(channel)
                serving = self._model_info(admin).current_version
                broken = [make_version(folder / serving, folder / f"chaos-{kind}", kind) for kind in BROKEN_KINDS]
                good = make_version(folder / serving, folder / "chaos-good", "good")
                made = [folder / v for v in (*broken, good)]
                references = {text: self._embed(address, text) for text in STORM_TEXTS}
                clients = EmbedClients(address, references, SWAP_CLIENTS)
                clients.start(phase="broken")
                clients.wait_for(lambda: clients.ok >= 4 * SWAP_CLIENTS, 60)
                rss = [_rss_bytes(self.server.pid)]  # before, then after each round of failed loads
                t0 = time.monotonic()
                for _ in range(repeats):
                    for version in broken:
                        report.injected += 1
                        try:
                            admin.LoadModel(mpb.LoadModelRequest(name=DEFAULT_MODEL, version=version), timeout=300)
                            report.problems.append(f"LoadModel of the broken version {version} answered OK")
                        except grpc.RpcError as exc:
                            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or "serving version is unchanged" not in exc.details():
                                report.problems.append(f"LoadModel {version}: {exc.code().name}: {exc.details()}")
                    rss.append(_rss_bytes(self.server.pid))
                load_s = time.monotonic() - t0
                info = self._model_info(admin)
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
                    report.notes.append(f"server RSS before and after each round of failed loads: {[round(r / 2**20) for r in rss]} MiB")
                    # glibc keeps what each thread freed in that thread's arena, so the first rounds grow RSS
                    # until every executor thread has loaded once (MALLOC_ARENA_MAX=2: the first round only);
                    # a leak grows it by the whole tokenizer + session (~250 MiB) on every load, round after round.
                    if repeats >= LEAK_ROUNDS:
                        growth = (rss[-1] - rss[-2]) / len(broken)
                        if growth > LEAK_PER_LOAD:
                            report.problems.append(f"server memory grew by {growth / 2**20:.0f} MiB per failed load in the last round")
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
                while self._state(admin, good) != "built" and time.monotonic() < deadline:
                    time.sleep(0.2)
                if self._state(admin, good) != "built":
                    report.problems.append(f"{good} still {self._state(admin, good)!r} 60 s after swapping back")
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
                report.problems.append(f"{len(clients.wrong)} Embed answers from an unexpected version or vector, e.g. {clients.wrong[:3]}")
            if clients.health:
                report.problems.append(f"health was not SERVING during the swaps: {clients.health[:3]}")
            others = {v: n for (phase, v), n in clients.versions.items() if phase == "broken" and v != serving}
            if others:
                report.problems.append(f"while only broken versions were loaded, Embed was answered by {others}")
            report.notes.append(
                f"Embed answers by phase and version: {dict(sorted(clients.versions.items()))}; slowest Embed "
                f"{clients.slowest_embed_s:.1f}s, slowest health check {clients.slowest_health_s:.1f}s"
            )
        if not self.server.alive():
            report.problems.append(f"server died during the model swaps:\n{self.server.log_tail(20)}")
        report.acknowledged = len(self.acknowledged)
        self.log(report.describe())
        return report

    @staticmethod
    def _model_info(admin: mpb_grpc.ModelServiceStub, name: str = DEFAULT_MODEL) -> mpb.ModelInfo:
        models = admin.ListModels(mpb.ListModelsRequest(), timeout=RPC_TIMEOUT_S).models
        return next(m for m in models if m.name == name)

    def _state(self, admin: mpb_grpc.ModelServiceStub, version: str) -> str:
        return next((v.state for v in self._model_info(admin).versions if v.version == version), "absent")

    # -- full disk -----------------------------------------------------------------
    def disk_full_cycle(self, refusals: int = 5, resumed_requests: int = 10) -> CycleReport:
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
        report = CycleReport(len(self.reports) + 1, FAULT_DISK, injected=0)
        self.reports.append(report)
        pid = self.server.pid
        folder = self.collections_dir / COLLECTION
        soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        biggest = max(p.stat().st_size for p in folder.iterdir() if p.is_file())
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (biggest + DISK_HEADROOM, hard))
        refused: list[list[Doc]] = []
        try:
            with grpc.insecure_channel(self.server.address) as channel:
                stub = ipb_grpc.IndexServiceStub(channel)
                acknowledged_before = len(self.acknowledged)
                for _ in range(2000):  # 20 docs of ~3 KiB each in the store: the headroom fills in ~20 requests
                    docs = self.workload.request(report.number)
                    try:
                        stub.Upsert(ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        refused.append(docs)
                        report.refusals.append(f"{exc.code().name}: {exc.details()}")
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or FULL_MARK not in exc.details():
                            report.problems.append(f"Upsert on a full disk answered {exc.code().name}: {exc.details()}")
                        if len(refused) >= refusals:
                            break
                        continue
                    for doc in docs:
                        self.acknowledged[doc.id] = doc
                    report.new_acknowledged += len(docs)
                report.injected = len(refused)
                if not refused:
                    report.problems.append("the disk never filled: no Upsert was refused")
                else:
                    report.notes.append(
                        f"{len(self.acknowledged) - acknowledged_before} docs acknowledged until the disk filled "
                        f"(limit {biggest + DISK_HEADROOM} bytes per file); then {len(refused)} Upserts refused, the first with {report.refusals[0]}"
                    )
                committed = self._check_in_flight(stub, refused, report)  # refused writes: all or nothing
                self._check_all(stub, report, fresh_committed=len(committed))  # reads work on a full disk
                self.committed_unacknowledged.update(committed)
                statuses = health_statuses(self.server.address)
                if any(status != "SERVING" for status in statuses.values()):
                    report.problems.append(f"health on a full disk: {statuses}")
                try:
                    self._embed(self.server.address, STORM_TEXTS[0])
                except grpc.RpcError as exc:
                    report.problems.append(f"Embed on a full disk failed: {exc.code().name}: {exc.details()}")
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))  # space freed
                for _ in range(resumed_requests):
                    docs = self.workload.request(report.number)
                    try:
                        stub.Upsert(ipb.UpsertRequest(collection=COLLECTION, documents=[d.message() for d in docs]), timeout=RPC_TIMEOUT_S)
                    except grpc.RpcError as exc:
                        report.problems.append(f"Upsert after space was freed: {exc.code().name}: {exc.details()}")
                        break
                    for doc in docs:
                        self.acknowledged[doc.id] = doc
                    report.new_acknowledged += len(docs)
                live = collection_size(stub)
        except grpc.RpcError as exc:
            report.problems.append(f"full disk cycle: {exc.code().name}: {exc.details()}")
            live = len(self.acknowledged)
        finally:
            if self.server.alive():
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
        # A shutdown snapshot on a full disk: it fails, the previous one stays whole.
        snapshot_files = ("index.faiss", "index.faiss.tomb.json", "index.json")
        before = {name: file_digest(folder / name) for name in snapshot_files}
        limit = max(64 * 1024, live * DIM * 4 // 2)  # half the vectors the next snapshot must hold
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
        status = self.server.stop(grace_s=30.0)
        if status != 0:
            report.problems.append(f"SIGTERM on a full disk: the server exited with status {status}:\n{self.server.log_tail(10)}")
        if SNAPSHOT_FAILED_MARK not in self.server.log_text():
            report.problems.append(f"no {SNAPSHOT_FAILED_MARK!r} in the log of a shutdown on a full disk:\n{self.server.log_tail(10)}")
        after = {name: file_digest(folder / name) for name in snapshot_files}
        if after != before:
            report.problems.append(f"the previous snapshot changed on a failed snapshot: {before} -> {after}")
        leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name)
        if leftovers:
            report.problems.append(f"temp files left by the failed snapshot: {leftovers}")
        report.notes.append(f"shutdown snapshot on a full disk (limit {limit} bytes) failed cleanly; previous snapshot kept")
        if not self._restart(report):
            return report
        with grpc.insecure_channel(self.server.address) as channel:
            self._check_all(ipb_grpc.IndexServiceStub(channel), report)
        self.log(report.describe())
        return report


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
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


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


STORM_TEXTS = [
    "Aide-soignant en EHPAD, soins d'hygiène et de confort, travail de nuit un week-end sur deux.",
    "Développeur Python / Django, API REST, PostgreSQL, tests automatisés et intégration continue.",
    "Cariste CACES R489 catégorie 3, préparation de commandes, inventaires et gestion des stocks.",
    "Boulangère : fabrication du pain, des viennoiseries et des pâtisseries, respect des règles HACCP.",
]
async def _storm(address: str, clients: int, rounds: int, rng: random.Random) -> dict:
    """Each round, `clients` channels each open an endless EmbedStream (one text per request) and cut
    it mid-stream: call.cancel() (RST_STREAM) or closing the channel (the connection goes away),
    after reading 0-3 responses or 0.05-3 s, whichever comes first, so the cut lands with requests
    queued, running or answered.  Nothing the server does for a cut stream is wanted any more: if it
    kept computing it, the Embed after the storm would wait behind minutes of abandoned work."""
    stats = {"cancelled": 0, "cancel": 0, "close": 0, "responses": 0, "errors": 0, "error_samples": []}

    async def client(number: int, mode: str, read_before: int, cut_after_s: float) -> None:
        channel = grpc.aio.insecure_channel(address)
        stub = epb_grpc.EmbeddingServiceStub(channel)

        async def requests():
            for i in range(100_000):  # never ends on its own: the stream is always cut by us
                text = f"{STORM_TEXTS[(number + i) % len(STORM_TEXTS)]} Candidat {number}-{i}."
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


# --------------------------------------------------------------------------- the script


def table(reports: Sequence[CycleReport], total_acknowledged: int) -> tuple[str, bool]:
    """One row per fault kind and a total; returns the text and whether anything was lost or not survived.

    `injected` and `survived` count cycles; a row's label says how many faults a cycle of it holds when
    more than one (streams cut, failed loads, refused writes).  `acknowledged` counts documents, or
    Embed requests answered for the model swap; `lost` counts acknowledged documents lost, or requests failed.
    """
    rows = []
    failed = False
    all_lost: set[str] = set()
    failed_requests = answered = 0
    kinds = list(dict.fromkeys(r.fault for r in reports))
    for kind in kinds:
        group = [r for r in reports if r.fault == kind]
        lost = set().union(*(set(r.lost) for r in group))
        all_lost |= lost
        survived = sum(r.survived for r in group)
        faults = sum(r.injected for r in group)
        label = {
            FAULT_STORM: f"{kind}, {faults} streams cut",
            FAULT_SWAP: f"{kind}, {faults} failed loads",
            FAULT_DISK: f"{kind}, {faults} writes refused",
        }.get(kind, kind)
        injected = len(group) if kind in (FAULT_STORM, FAULT_SWAP, FAULT_DISK) else faults
        if kind in REQUEST_FAULTS:
            ok = sum(r.requests_ok for r in group)
            lost_count = sum(r.requests_failed for r in group) + len(lost)
            answered += ok
            failed_requests += lost_count - len(lost)
            acknowledged = f"{ok} requests"
        else:
            lost_count = len(lost)
            acknowledged = f"{max(r.acknowledged for r in group)} docs"
        failed |= survived != len(group) or bool(lost_count)
        rows.append((label, str(injected), str(survived), acknowledged, str(lost_count)))
    total = f"{total_acknowledged} docs" + (f" + {answered} requests" if answered else "")
    rows.append(("total", str(sum(int(r[1]) for r in rows)), str(sum(int(r[2]) for r in rows)), total, str(len(all_lost) + failed_requests)))
    header = ("fault", "injected", "survived", "acknowledged", "lost")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)]
        lines.append("  ".join(cells))
        if n == 0 or n == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines), failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for development: 4 SIGKILL cycles, a small storm, each broken load 3 times")
    parser.add_argument("--cycles", type=int, default=None, help="SIGKILL cycles (default 20, 4 with --quick; plus a SIGTERM restart, a truncated snapshot, a disconnect storm, failed model loads and a full disk)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (collections/ and logs/); default: a temporary one, removed on success")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--index", choices=sorted(INDEX_KINDS), default="auto", help="index kind of the collection (auto: flat at these sizes)")
    parser.add_argument("--storm-clients", type=int, default=None, help="default 16, 6 with --quick")
    parser.add_argument("--storm-rounds", type=int, default=None, help="default 10, 2 with --quick")
    parser.add_argument("--swap-repeats", type=int, default=None, help="LoadModel calls per kind of broken version (default 4, 3 with --quick; the memory check needs 3)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.cycles = args.cycles if args.cycles is not None else (4 if quick else 20)
    args.storm_clients = args.storm_clients or (6 if quick else 16)
    args.storm_rounds = args.storm_rounds or (2 if quick else 10)
    args.swap_repeats = args.swap_repeats or (3 if quick else 4)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="openemploi-chaos-"))
    if args.dir and (args.dir / "collections").exists() and any((args.dir / "collections").iterdir()):
        parser.error(f"{args.dir}/collections is not empty: give a fresh --dir")
    t0 = time.monotonic()
    run = ChaosRun(workdir, seed=args.seed, index_kind=args.index)
    # Half the kills, a clean SIGTERM restart (its snapshot holds vectors), the truncation of that
    # snapshot, the storm, the failed model loads, the full disk (whose failed shutdown snapshot leaves
    # the store ahead of the snapshot), then the other half of the kills, which replay on top of that.
    plan = ["kill"] * (args.cycles // 2) + ["sigterm", "truncate", "storm", "swap", "disk"] + ["kill"] * (args.cycles - args.cycles // 2)
    aborted = ""
    try:
        run.setup()
        for step in plan:
            if step == "storm":
                report = run.storm_cycle(args.storm_clients, args.storm_rounds)
            elif step == "swap":
                report = run.model_swap_cycle(args.swap_repeats)
            elif step == "disk":
                report = run.disk_full_cycle()
            elif step == "sigterm":
                report = run.graceful_cycle()
            else:
                report = run.kill_cycle(truncate_snapshot=step == "truncate")
            if not run.server.alive():
                aborted = f"stopped after cycle {report.number}: the server is not running"
                break
    except KeyboardInterrupt:
        aborted = "interrupted"
    except (grpc.RpcError, OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a check that could not run
        aborted = f"{type(exc).__name__}: {exc}"
        if run.reports:
            run.reports[-1].problems.append(f"aborted: {aborted}")
    finally:
        run.close()
    text, failed = table(run.reports, len(run.acknowledged))
    mid = sum(r.kill_mid_request for r in run.reports if r.killed)
    kills = sum(r.killed for r in run.reports)
    committed = sum(r.in_flight_committed for r in run.reports)
    cut = sum(r.in_flight for r in run.reports)
    elapsed = time.monotonic() - t0
    stderr_log(
        f"{kills} SIGKILLs, {mid} while an Upsert was in flight; {committed} of {cut} in-flight docs turned out committed; "
        f"{len(run.acknowledged)} docs acknowledged; {elapsed:.0f}s in all; logs in {workdir / 'logs'}"
    )
    print(text)
    if aborted:
        print(f"aborted: {aborted}")
        failed = True
    for report in run.reports:
        if not report.survived:
            print(report.describe())
    if failed:
        print(f"FAILED; server logs kept in {workdir / 'logs'}")
        return 1
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
