"""Checks after a fault: each document comes back whole from Get and Search finds it with its own vector.

Lost means missing from Get, returned with other content, or not found by Search k=1: a document
the server acknowledged must pass all three after any fault.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

from .workload import COLLECTION, DIM, Doc

RPC_TIMEOUT_S = 30.0
GET_CHUNK = 256  # ids per Get with vectors: ~400 KB, well under the 4 MiB client receive limit
SEARCH_WINDOW = 32  # Search calls in flight while verifying
SERVICE_NAMES = ("", "openemploi.v1.EmbeddingService", "openemploi.v1.IndexService", "openemploi.v1.MatchService")


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


def same_content(doc: Doc, got: ipb.Document) -> str:
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


def searchable(
    stub: ipb_grpc.IndexServiceStub, queries: Sequence[tuple[str, np.ndarray]], window: int = SEARCH_WINDOW
) -> tuple[list[str], int]:
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
        difference = same_content(doc, got)
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


def embed(address: str, text: str) -> np.ndarray:
    """One Embed call (PASSAGE): the vector a fault must not change."""
    with grpc.insecure_channel(address) as channel:
        reply = epb_grpc.EmbeddingServiceStub(channel).Embed(
            epb.EmbedRequest(texts=[text], kind=epb.PASSAGE), timeout=RPC_TIMEOUT_S
        )
    return np.asarray(reply.embeddings[0].values, dtype=np.float32)
