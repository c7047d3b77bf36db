"""Locust load test of an openemploi server over gRPC, with French traffic.

Locust speaks HTTP only; for gRPC its documented way ("Testing other systems/protocols")
is a client interceptor that fires `events.request` (request_type "grpc", the method
name) after each call, with grpc's gevent integration so blocking calls yield.

Traffic mix (task weights), modelled on a job board in front of the service:
  - Embed 5: the building block every client calls (apps embedding a seeker's query,
    indexing pipelines embedding offers), so the most frequent call. 70 % are one
    QUERY text (interactive), 30 % a batch of 8-32 PASSAGE texts (ingestion).
  - Search 3: a seeker's search-box query over offers; a third goes to `rome` when the
    server has it. Half are hybrid (bm25 + dense), a quarter carry a metadata filter.
  - MatchOccupation 2: called when a seeker describes their job (profile creation,
    job-title suggestion), less often than searching. Without the `rome` collection
    (`--no-rome`) it is replaced by MatchProfile over `loadtest`, same weight.

Inputs are the repository's own French texts: the probe corpus
(server/build/probe/fr_probe.json), the ROME catalogue (server/matching/data/) and
the ROME dev queries (benchmarks/data/rome_dev.jsonl); see benchmarks/data/README.md.

    .venv/bin/locust -f benchmarks/locustfile.py --host 127.0.0.1:50051       # web UI on :8089
    .venv/bin/python benchmarks/locustfile.py --prepare --host 127.0.0.1:50051 # only seed `loadtest`

OPENEMPLOI_TOKEN, when set, is sent as `authorization: Bearer <token>` metadata.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment

from openemploi.v1 import (
    embedding_pb2,
    embedding_pb2_grpc,
    index_pb2,
    index_pb2_grpc,
    match_pb2,
    match_pb2_grpc,
)

grpc_gevent.init_gevent()  # before any channel: grpc's blocking calls then yield to other users

COLLECTION = "loadtest"
ROME = "rome"
ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "server" / "build" / "probe" / "fr_probe.json"
ROME_DEV = ROOT / "benchmarks" / "data" / "rome_dev.jsonl"
OCCUPATIONS_IN_COLLECTION = 299  # with the 201 probe passages: 500 documents
CONTRACTS = ("CDI", "CDD", "Intérim", "Alternance", "Saisonnier")
REGIONS = ("Île-de-France", "Auvergne-Rhône-Alpes", "Occitanie", "Hauts-de-France", "Bretagne", "Grand Est")
UPSERT_BATCH = 64
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Corpus:
    queries: tuple[str, ...]  # short seeker / search-box / CV-line texts
    passages: tuple[str, ...]  # offer-like texts, embedded as PASSAGE
    documents: tuple[index_pb2.Document, ...]  # what `loadtest` holds
    skills: tuple[str, ...]  # skill names found in the documents


def _pick(options: Sequence[str], key: str) -> str:
    return options[zlib.crc32(key.encode()) % len(options)]


@functools.cache
def corpus() -> Corpus:
    """Derived deterministically from files shipped in the repository (no download)."""
    from openemploi.matching.catalogue import load_catalogue

    probe = json.loads(PROBE.read_text(encoding="utf-8"))
    retrieval = probe["retrieval"]
    dev = [json.loads(line)["query"] for line in ROME_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    queries = tuple(q["text"] for q in retrieval["queries"]) + tuple(dev)
    documents = []
    for p in retrieval["passages"]:
        meta = {"source": "probe", "contrat": _pick(CONTRACTS, p["id"]), "region": _pick(REGIONS, p["id"] + "r")}
        documents.append(index_pb2.Document(id=p["id"], text=p["text"], metadata=meta))
    occupations = load_catalogue()
    step = max(1, len(occupations) // OCCUPATIONS_IN_COLLECTION)
    for occupation in occupations[::step][:OCCUPATIONS_IN_COLLECTION]:
        text = f"{occupation.label} H/F. Missions : {' ; '.join(occupation.tasks)}." if occupation.tasks else occupation.label
        meta = {
            "source": "rome",
            "code": occupation.code,
            "contrat": _pick(CONTRACTS, occupation.code),
            "region": _pick(REGIONS, occupation.code + "r"),
        }
        documents.append(index_pb2.Document(id=f"rome-{occupation.code}", text=text, metadata=meta, skills=occupation.skills))
    passages = tuple(d.text for d in documents) + tuple(t for t in probe["texts"][20:] if t.strip())
    skills = tuple(sorted({s for d in documents for s in d.skills}))
    return Corpus(queries, passages, tuple(documents), skills)


def auth_metadata() -> tuple[tuple[str, str], ...]:
    token = os.environ.get("OPENEMPLOI_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def grpc_target(host: str) -> str:
    """Locust's --host as a gRPC target: accepts `host:port` or `grpc://host:port`."""
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            return host[len(scheme) :].rstrip("/")
    return host


def prepare_collection(channel: grpc.Channel, log: Callable[[str], None] = print) -> int:
    """Create `loadtest` and fill it unless it already holds the corpus; returns its size.

    Idempotent (fixed ids, upsert replaces), so every locust worker may call it."""
    stub = index_pb2_grpc.IndexServiceStub(channel)
    metadata = auth_metadata()
    documents = corpus().documents
    sizes = {
        c.name: c.size
        for c in stub.ListCollections(index_pb2.ListCollectionsRequest(), timeout=TIMEOUT_S, metadata=metadata).collections
    }
    if sizes.get(COLLECTION, 0) >= len(documents):
        return sizes[COLLECTION]
    if COLLECTION not in sizes:
        try:
            stub.CreateCollection(index_pb2.CreateCollectionRequest(name=COLLECTION), timeout=TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    t0 = time.perf_counter()
    for start in range(0, len(documents), UPSERT_BATCH):
        batch = documents[start : start + UPSERT_BATCH]
        stub.Upsert(index_pb2.UpsertRequest(collection=COLLECTION, documents=batch), timeout=300, metadata=metadata)
    log(f"loadtest: upserted {len(documents)} documents into {COLLECTION!r} in {time.perf_counter() - t0:.1f}s")
    return len(documents)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Sequence[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to locust; adds the bearer token when one is configured.

    The name is the RPC method, plus `[collection]` for calls that target one (searches over
    `loadtest` and `rome` get separate rows) and `[batch]` for an Embed of several texts."""

    def __init__(self, environment: Environment, metadata: Sequence[tuple[str, str]]) -> None:
        self._env = environment
        self._metadata = tuple(metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = _CallDetails(client_call_details, tuple(client_call_details.metadata or ()) + self._metadata)
        name = client_call_details.method.rsplit("/", 1)[-1]
        collection = getattr(request, "collection", "")
        if collection:
            name = f"{name}[{collection}]"
        elif len(getattr(request, "texts", ())) > 1:
            name = f"{name}[batch]"
        start = time.perf_counter()
        call = continuation(details, request)
        exception: BaseException | None = None
        length = 0
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        self._env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
        return call


class OpenEmploiUser(User):
    """A client of the service: embeds, searches offers and matches occupations."""

    wait_time = between(0.1, 0.5)  # think time between calls; lower it to push harder

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("give the server address: --host 127.0.0.1:50051")
        self._channel = grpc.insecure_channel(grpc_target(self.host))
        intercepted = grpc.intercept_channel(self._channel, LocustInterceptor(environment, auth_metadata()))
        self.embedding = embedding_pb2_grpc.EmbeddingServiceStub(intercepted)
        self.index = index_pb2_grpc.IndexServiceStub(intercepted)
        self.match = match_pb2_grpc.MatchServiceStub(intercepted)
        self.corpus = corpus()
        self.rng = random.Random()
        self.has_rome = False

    def on_start(self) -> None:
        # Not through the interceptor: set-up is not part of the measured traffic.
        collections = (
            index_pb2_grpc.IndexServiceStub(self._channel)
            .ListCollections(index_pb2.ListCollectionsRequest(), timeout=TIMEOUT_S, metadata=auth_metadata())
            .collections
        )
        self.has_rome = any(c.name == ROME and c.size > 0 for c in collections)

    def on_stop(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> None:
        try:
            method(request, timeout=TIMEOUT_S)
        except grpc.RpcError:
            pass  # already reported to locust as a failure by the interceptor

    @task(5)
    def embed(self) -> None:
        if self.rng.random() < 0.7:
            request = embedding_pb2.EmbedRequest(texts=[self.rng.choice(self.corpus.queries)], kind=embedding_pb2.QUERY)
        else:
            texts = self.rng.sample(self.corpus.passages, self.rng.randint(8, 32))
            request = embedding_pb2.EmbedRequest(texts=texts, kind=embedding_pb2.PASSAGE, truncate=True)
        self._call(self.embedding.Embed, request)

    @task(3)
    def search(self) -> None:
        query = self.rng.choice(self.corpus.queries)
        if self.has_rome and self.rng.random() < 1 / 3:
            request = index_pb2.SearchRequest(collection=ROME, text=query, k=10, hybrid=self.rng.random() < 0.5)
        else:
            request = index_pb2.SearchRequest(collection=COLLECTION, text=query, k=10, hybrid=self.rng.random() < 0.5)
            if self.rng.random() < 0.25:
                request.filters.add(field="contrat", values=self.rng.sample(CONTRACTS, self.rng.randint(1, 2)))
        self._call(self.index.Search, request)

    @task(2)
    def match_occupation(self) -> None:
        text = self.rng.choice(self.corpus.queries)
        if self.has_rome:
            self._call(self.match.MatchOccupation, match_pb2.MatchOccupationRequest(text=text, k=5))
        else:
            skills = self.rng.sample(self.corpus.skills, min(3, len(self.corpus.skills)))
            self._call(
                self.match.MatchProfile, match_pb2.MatchProfileRequest(collection=COLLECTION, text=text, skills=skills, k=10)
            )


@events.test_start.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    if not environment.host:
        return
    with grpc.insecure_channel(grpc_target(environment.host)) as channel:
        prepare_collection(channel)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="seed the `loadtest` collection (the locust run does it too)")
    parser.add_argument("--prepare", action="store_true", required=True)
    parser.add_argument("--host", required=True, help="server address, host:port")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(grpc_target(args.host)) as channel:
        size = prepare_collection(channel)
    print(f"collection {COLLECTION!r} holds {size} documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
