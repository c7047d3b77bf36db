"""Property-based fuzzing of a live openemploi server (what `make fuzz` calls).

Hypothesis generates requests for every RPC (Embed, EmbedStream, the IndexService, the
MatchService, the ModelService): French and random Unicode texts, empty and blank texts,
huge lists, NaN / infinite / wrong-dimension / zero vectors, negative and huge k, unknown
enum values, random filters, collection and model names. A share of them is then broken
at the byte level (invalid UTF-8 in any string field, truncated, random garbage, flipped
bytes, wrong wire types, unknown fields, over-size messages): requests go through a
generic channel with identity serialisers, so the server sees exactly those bytes.

The property: every answer is OK or a documented status (ALLOWED below), never INTERNAL or
UNKNOWN, and the server keeps answering: health SERVING, and a known-good Embed returns
the same vector at the end as at the start. Writes never touch collections that existed
before the run; the collections the run created are dropped at the end.

    .venv/bin/python benchmarks/fuzz.py --requests 10000             # starts its own server (no ROME)
    .venv/bin/python benchmarks/fuzz.py --requests 2000 --rome        # with ROME (cached in var/loadtest-collections)
    .venv/bin/python benchmarks/fuzz.py --host 127.0.0.1:50051 --seed 7

Exit status: 0 when every answer was allowed and the server is still healthy, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException, HypothesisWarning

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "proto"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2

Code = grpc.StatusCode
ALLOWED: frozenset[Code] = frozenset({
    Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED,
    Code.ALREADY_EXISTS, Code.DEADLINE_EXCEEDED, Code.ABORTED,
})
CODE_BY_VALUE = {c.value[0]: c for c in Code}
DEFAULT_MODEL = "multilingual-e5-small"
KNOWN_GOOD = ("Boulanger / Boulangère", embedding_pb2.QUERY)
PROBE = ROOT / "server" / "modelrepo" / "probe" / "fr_probe.json"
HEALTH_EVERY = 250  # calls between liveness checks
TIMEOUT_S = 60.0
OVERSIZE_BYTES = 17 * 1024 * 1024  # over the default limits.max_message_bytes (16 MiB)


@dataclass(frozen=True)
class Rpc:
    name: str
    path: str
    request: type
    response: type
    streaming: bool = False


def _rpcs() -> dict[str, Rpc]:
    table = {}
    for module, service in (
        (embedding_pb2, "EmbeddingService"), (index_pb2, "IndexService"), (match_pb2, "MatchService"), (models_pb2, "ModelService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            table[method.name] = Rpc(
                method.name, f"/{descriptor.full_name}/{method.name}", getattr(module, method.input_type.name),
                getattr(module, method.output_type.name), streaming=method.client_streaming,
            )
    return table


RPCS = _rpcs()
WRITES = {"Upsert": "collection", "Delete": "collection", "DropCollection": "name", "Reembed": "collection"}


# --- hand-made protobuf bytes ------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as their 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tagged(number: int, wire: int, body: bytes) -> bytes:
    """One field: tag, then `body` (length-prefixed for wire type 2)."""
    head = varint((number << 3) | wire)
    return head + varint(len(body)) + body if wire == 2 else head + body


def nested(path: Sequence[int], leaf: bytes) -> bytes:
    """A length-delimited `leaf` at a path of field numbers (e.g. documents[0].metadata key)."""
    body = leaf
    for number in reversed(path):
        body = tagged(number, 2, body)
    return body


def string_paths(descriptor: Descriptor, depth: int = 3, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Every string field reachable in `depth` levels (map keys and values included)."""
    paths = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            paths.append(prefix + (f.number,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth > 1:
            paths.extend(string_paths(f.message_type, depth - 1, prefix + (f.number,)))
    return paths


INVALID_UTF8 = (
    b"\xff", b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80\x80", b"\xfe\xfe\xff\xff",
)


# --- strategies ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One call: the raw request bytes (several for EmbedStream), a deadline, and how they were made."""

    rpc: str
    payloads: tuple[bytes, ...]
    timeout: float
    how: str

    def __repr__(self) -> str:
        shown = []
        for p in self.payloads[:3]:
            try:
                text = repr(RPCS[self.rpc].request.FromString(p))[:300]
            except DecodeError:
                text = f"<unparsable {len(p)} bytes: {p[:80]!r}>"
            shown.append(text)
        more = f" (+{len(self.payloads) - 3} more)" if len(self.payloads) > 3 else ""
        return f"Case({self.rpc}, {self.how}, timeout={self.timeout}, sizes={[len(p) for p in self.payloads][:8]}: {shown}{more})"


@dataclass(frozen=True)
class Context:
    """What the strategies need to know about the server under test."""

    base: str  # a collection the run created and filled
    scratch: tuple[str, ...]  # names the run may create and drop
    model: str = DEFAULT_MODEL
    texts: tuple[str, ...] = ()  # French corpus
    skills: tuple[str, ...] = ()
    fields: tuple[str, ...] = ("ville", "contrat")  # metadata fields of the base documents


def french_texts() -> tuple[str, ...]:
    import json

    probe = json.loads(PROBE.read_text(encoding="utf-8"))
    return tuple(probe["texts"]) + tuple(p["text"] for p in probe["retrieval"]["passages"][:60])


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Pick a strategy with the given weights (st.one_of picks uniformly among distinct branches)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def mostly(valid: st.SearchStrategy, *junk: st.SearchStrategy) -> st.SearchStrategy:
    """`valid` three times in four: enough calls get past validation to reach the work."""
    return weighted((3, valid), (1, st.one_of(*junk)))


def _repeat(text: str, times: int) -> str:
    return (text or "a") * times


def texts(ctx: Context) -> st.SearchStrategy[str]:
    corpus = st.sampled_from(ctx.texts) if ctx.texts else st.just("Boulanger")
    return weighted(
        (10, corpus),
        (2, st.text(max_size=40)),
        (1, st.sampled_from(["", " ", "\t\n  ", "\u00a0\u202f", "\x00", "\u200b\ufeff", "é", "\U0001f469\u200d\U0001f373"])),
        (1, st.builds(_repeat, corpus, st.integers(2, 40))),  # past 512 tokens: truncated or INVALID_ARGUMENT
        (1, st.builds(_repeat, st.sampled_from(["a", "é ", "Boulanger "]), st.sampled_from([20_001, 200_001]))),  # over max_text_chars
    )


def text_lists(ctx: Context) -> st.SearchStrategy[list[str]]:
    return mostly(
        st.lists(texts(ctx), min_size=1, max_size=6),
        st.just([]),
        st.builds(lambda n, t: [t] * n, st.sampled_from([65, 1025, 5000, 50_000]), st.sampled_from(["a", "Cariste", ""])),
    )


def vectors() -> st.SearchStrategy[list[float]]:
    def make(dim: int, poison: str, seed: int) -> list[float]:
        rng = np.random.default_rng(seed)
        v = rng.normal(size=dim).astype(np.float32)
        v /= max(float(np.linalg.norm(v)), 1e-12)
        if dim and poison != "none":
            i = int(rng.integers(dim))
            if poison == "zero":
                v[:] = 0.0
            elif poison == "huge":
                v[:] = 3e38
            elif poison == "tiny":
                v[:] = 1e-45
            else:
                v[i] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[poison]
        return v.tolist()

    return st.builds(
        make,
        st.sampled_from([384] * 5 + [0, 1, 383, 385, 768]),
        st.sampled_from(["none"] * 6 + ["nan", "inf", "-inf", "zero", "huge", "tiny"]),
        st.integers(0, 2**32 - 1),
    )


def ints32() -> st.SearchStrategy[int]:
    """k: mostly usual values, sometimes the edges, negative or huge."""
    return mostly(st.integers(1, 50), st.sampled_from([0, 100, 101, 2048, 2049, -1]), st.integers(-(2**31), 2**31 - 1))


def enums(valid: Sequence[int]) -> st.SearchStrategy[int]:
    """An enum field: mostly a declared value, sometimes an unknown one (proto3 enums are open)."""
    return mostly(st.sampled_from(list(valid)), st.integers(-2, 8), st.integers(-(2**31), 2**31 - 1))


def uint32s() -> st.SearchStrategy[int]:
    return weighted((3, st.just(0)), (1, st.sampled_from([1, 3, 4, 16, 32, 100_000])), (1, st.integers(0, 2**32 - 1)))


def unit_floats() -> st.SearchStrategy[float]:
    return mostly(st.sampled_from([0.0, 0.3, 0.7, 1.0]), st.sampled_from([-0.1, 1.5]), st.floats(width=32))


def collection_names(ctx: Context, *, writable: bool, droppable: bool = False) -> st.SearchStrategy[str]:
    """Mostly the base collection (calls reach real work); never the base for a drop (the rest would be NOT_FOUND)."""
    pool = ctx.scratch + (() if writable else ("rome", "loadtest"))
    usual = st.sampled_from(pool) if droppable else st.just(ctx.base)
    return weighted(
        (5, usual), (2, st.sampled_from(pool)),
        (1, st.from_regex(r"[a-z0-9][a-z0-9_-]{0,70}", fullmatch=True)),
        (1, st.sampled_from(["", "Fuzz", "a" * 64, "../etc", "a/b", "fuzz\n", ".", "..", "con", "é"])),
        (1, st.text(max_size=20)),
    )


def model_names(ctx: Context) -> st.SearchStrategy[str]:
    return weighted(
        (3, st.sampled_from(["", ctx.model])),
        (1, st.sampled_from([ctx.model.upper(), "nope", "multilingual", ctx.model + "/", "./" + ctx.model, ".", ".."])),
        (1, st.text(max_size=20)),
    )


def short_texts() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=12), st.sampled_from(["CDI", "Lyon", "Paris", ""]))


def filters(ctx: Context, message: type) -> st.SearchStrategy[list]:
    one = st.builds(
        lambda f, v: message(field=f, values=v),
        st.one_of(st.sampled_from(ctx.fields), st.text(max_size=10)),
        st.lists(short_texts(), max_size=3),
    )
    return mostly(st.just([]), st.lists(one, min_size=1, max_size=3))


def skill_lists(ctx: Context) -> st.SearchStrategy[list[str]]:
    pool = st.sampled_from(ctx.skills) if ctx.skills else st.just("python")
    return mostly(st.lists(pool, max_size=4), st.lists(st.one_of(pool, st.text(max_size=15)), max_size=6))


def documents(ctx: Context) -> st.SearchStrategy[index_pb2.Document]:
    def make(id_: str, text: str, vector: list[float] | None, metadata: dict, skills: list[str]) -> index_pb2.Document:
        doc = index_pb2.Document(id=id_, text=text, metadata=metadata, skills=skills)
        if vector is not None:
            doc.vector.extend(vector)
        return doc

    return st.builds(
        make,
        mostly(st.sampled_from(["d1", "d2", "d3", "n1", "n2"]), st.just(""), st.text(max_size=12)),
        mostly(texts(ctx), st.just("")),
        weighted((2, st.none()), (1, vectors())),
        st.dictionaries(st.one_of(st.sampled_from(ctx.fields), st.text(max_size=8)), short_texts(), max_size=3),
        skill_lists(ctx),
    )


def document_lists(ctx: Context) -> st.SearchStrategy[list]:
    return mostly(
        st.lists(documents(ctx), min_size=1, max_size=4, unique_by=lambda d: d.id),
        st.lists(documents(ctx), min_size=2, max_size=3),  # duplicate ids
        st.just([]),
        st.builds(lambda n: [index_pb2.Document(id=f"x{i}", text="Cariste") for i in range(n)], st.sampled_from([4097, 10_000])),
    )


def id_lists() -> st.SearchStrategy[list[str]]:
    return st.one_of(
        st.lists(st.one_of(st.sampled_from(["d1", "d2", "p001", "D1102:label"]), st.text(max_size=10)), max_size=6),
        st.builds(lambda n: [f"id{i}" for i in range(n)], st.sampled_from([4097, 20_000])),
    )


def messages(ctx: Context) -> dict[str, st.SearchStrategy]:
    """A strategy of well-typed (not necessarily valid) requests for every RPC."""

    def embed(texts_, model, version, kind, truncate, normalize, encoding):
        request = embedding_pb2.EmbedRequest(texts=texts_, model=model, model_version=version, kind=kind, truncate=truncate, encoding=encoding)
        if normalize is not None:
            request.normalize = normalize
        return request

    embed_requests = st.builds(
        embed, text_lists(ctx), mostly(st.just(""), model_names(ctx)), mostly(st.just(""), st.text(max_size=14)),
        enums((0, 1, 2)), st.booleans(), st.one_of(st.none(), st.booleans()), enums((0, 1)),
    )

    def search(collection, text, vector, both, vector_model, k, flt, s_all, s_any, hybrid, fusion, weight, include):
        request = index_pb2.SearchRequest(
            collection=collection, text="" if vector and not both else text, vector=vector or [], vector_model=vector_model, k=k, filters=flt,
            skills_all=s_all, skills_any=s_any, hybrid=hybrid, fusion=fusion, dense_weight=weight, include_vectors=include,
        )
        return request

    return {
        "Embed": embed_requests,
        "EmbedStream": embed_requests,
        "CreateCollection": st.builds(
            lambda name, model, kind, fm, m, ef, nl, npr: index_pb2.CreateCollectionRequest(
                name=name, model=model,
                index=index_pb2.IndexSpec(kind=kind, flat_max=fm, hnsw_m=m, hnsw_ef_search=ef, ivf_nlist=nl, ivf_nprobe=npr),
            ),
            collection_names(ctx, writable=True), mostly(st.just(""), model_names(ctx)), enums((0, 1, 2, 3)),
            uint32s(), uint32s(), uint32s(), uint32s(), uint32s(),
        ),
        "ListCollections": st.just(index_pb2.ListCollectionsRequest()),
        "DropCollection": st.builds(
            lambda n: index_pb2.DropCollectionRequest(name=n), collection_names(ctx, writable=True, droppable=True).filter(lambda n: n != ctx.base)
        ),
        "Upsert": st.builds(
            lambda c, d: index_pb2.UpsertRequest(collection=c, documents=d), collection_names(ctx, writable=True), document_lists(ctx)
        ),
        "Delete": st.builds(lambda c, i: index_pb2.DeleteRequest(collection=c, ids=i), collection_names(ctx, writable=True), id_lists()),
        "Get": st.builds(
            lambda c, i, v: index_pb2.GetRequest(collection=c, ids=i, include_vectors=v),
            collection_names(ctx, writable=False), id_lists(), st.booleans(),
        ),
        "Search": st.builds(
            search, collection_names(ctx, writable=False), mostly(texts(ctx), st.just("")),
            weighted((2, st.none()), (1, vectors())), st.sampled_from([False] * 4 + [True]), mostly(st.just(""), model_names(ctx)),
            ints32(), filters(ctx, index_pb2.Filter), skill_lists(ctx), skill_lists(ctx), weighted((3, st.just(False)), (1, st.just(True))),
            enums((0, 1)), unit_floats(), st.booleans(),
        ),
        "Reembed": st.builds(
            lambda c, m: index_pb2.ReembedRequest(collection=c, model=m), collection_names(ctx, writable=True), model_names(ctx)
        ),
        "MatchOccupation": st.builds(lambda t, k: match_pb2.MatchOccupationRequest(text=t, k=k), texts(ctx), ints32()),
        "MatchProfile": st.builds(
            lambda c, t, s, k, f, w: match_pb2.MatchProfileRequest(collection=c, text=t, skills=s, k=k, filters=f, skill_weight=w),
            collection_names(ctx, writable=False), mostly(texts(ctx), st.just("")), skill_lists(ctx), ints32(),
            filters(ctx, index_pb2.Filter), unit_floats(),
        ),
        "ListModels": st.just(models_pb2.ListModelsRequest()),
        "LoadModel": st.builds(
            lambda n, v: models_pb2.LoadModelRequest(name=n, version=v), model_names(ctx), st.one_of(st.just(""), st.text(max_size=14))
        ),
        "UnloadModel": st.builds(
            lambda n, v: models_pb2.UnloadModelRequest(name=n, version=v), model_names(ctx), st.one_of(st.just(""), st.text(max_size=14))
        ),
        "SetDefault": st.builds(lambda n: models_pb2.SetDefaultRequest(name=n), model_names(ctx)),
    }


MUTATIONS = ("valid",) * 12 + ("invalid-utf8",) * 3 + ("truncated", "garbage", "bitflip", "wrong-wire-type", "unknown-field")


@st.composite
def payload_bytes(draw: st.DrawFn, rpc: str, message: st.SearchStrategy) -> tuple[bytes, str]:
    """Serialise a drawn request, then maybe break it at the byte level."""
    data = draw(message).SerializeToString()
    how = draw(st.sampled_from(MUTATIONS))
    if draw(st.integers(0, 399)) == 199:  # rare (17 MiB each); not 0, which hypothesis favours
        how = "oversized"
    descriptor = RPCS[rpc].request.DESCRIPTOR
    if how == "invalid-utf8":
        paths = string_paths(descriptor)
        if not paths:
            return data + tagged(1, 2, draw(st.sampled_from(INVALID_UTF8))), how  # unknown field: parsers keep bytes
        prefix = draw(st.text(max_size=6)).encode()
        return data + nested(draw(st.sampled_from(paths)), prefix + draw(st.sampled_from(INVALID_UTF8))), how
    if how == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))], how
    if how == "garbage":
        return draw(st.binary(max_size=64)), how
    if how == "bitflip" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :], how
    if how == "wrong-wire-type":
        number = draw(st.sampled_from([f.number for f in descriptor.fields] or [1]))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        body = {0: varint(draw(st.integers(-(2**63), 2**64 - 1))), 1: struct.pack("<d", 1.0), 5: struct.pack("<f", 1.0)}.get(wire, b"")
        if wire == 2:
            body = draw(st.binary(max_size=16))
        return data + tagged(number, wire, body), how
    if how == "unknown-field":
        return data + tagged(draw(st.integers(20, 536_870_911)), 2, draw(st.binary(max_size=16))), how
    if how == "oversized":
        return data + tagged(999, 2, b"x" * OVERSIZE_BYTES), how
    return data, "valid"


def cases(ctx: Context, rpcs: Iterable[str] | None = None) -> st.SearchStrategy[Case]:
    """Calls of every RPC in `rpcs` (default: every RPC of the four services)."""
    strategies = messages(ctx)
    names = sorted(rpcs or strategies)
    timeouts = st.sampled_from([TIMEOUT_S] * 12 + [0.001, 0.02, 0.5])

    def unary(rpc: str) -> st.SearchStrategy[Case]:
        return st.builds(lambda p, t: Case(rpc, (p[0],), t, p[1]), payload_bytes(rpc, strategies[rpc]), timeouts)

    def stream() -> st.SearchStrategy[Case]:
        items = st.lists(payload_bytes("EmbedStream", strategies["EmbedStream"]), max_size=6)
        return st.builds(
            lambda ps, t: Case("EmbedStream", tuple(p for p, _ in ps), t, ",".join(sorted({h for _, h in ps})) or "empty"), items, timeouts
        )

    return st.one_of([stream() if name == "EmbedStream" else unary(name) for name in names])


# --- the driver ---------------------------------------------------------------------------

class Violation(AssertionError):
    """A call was answered with a status outside ALLOWED."""


@dataclass
class Report:
    tried: int = 0
    skipped: int = 0  # writes aimed at collections that existed before the run
    counts: Counter = field(default_factory=Counter)  # (rpc, code name) -> calls
    first_bad: dict = field(default_factory=dict)  # (rpc, code name) -> (case repr, details)
    dead: str = ""  # why the server is considered gone, if it is
    final_check: str = ""
    violation: str = ""  # the (shrunk) failing case, when the run stopped on one
    seconds: float = 0.0

    @property
    def bad(self) -> dict:
        return {k: v for k, v in self.counts.items() if k[1] not in {c.name for c in ALLOWED}}

    @property
    def ok(self) -> bool:
        return not self.bad and not self.dead and self.final_check.startswith("ok")

    def table(self) -> str:
        codes = sorted({c for _, c in self.counts}, key=lambda c: (c != "OK", c))
        rpcs = sorted({r for r, _ in self.counts})
        width = max([len(r) for r in rpcs] + [12])
        lines = [f"{'rpc':<{width}} " + " ".join(f"{c:>19}" for c in codes) + f" {'total':>7}"]
        for rpc in rpcs:
            row = [self.counts.get((rpc, c), 0) for c in codes]
            lines.append(f"{rpc:<{width}} " + " ".join(f"{n:>19}" for n in row) + f" {sum(row):>7}")
        total = [sum(self.counts.get((r, c), 0) for r in rpcs if not r.endswith(" items")) for c in codes]
        lines.append(f"{'all calls':<{width}} " + " ".join(f"{n:>19}" for n in total) + f" {sum(total):>7}")
        return "\n".join(lines)


class Driver:
    """Sends raw request bytes to a live server and keeps score."""

    def __init__(self, address: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.address = address
        self.metadata = tuple(metadata)
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self.channel = grpc.insecure_channel(address, options=options)
        self.calls = {
            name: (self.channel.stream_stream(rpc.path) if rpc.streaming else self.channel.unary_unary(rpc.path))
            for name, rpc in RPCS.items()
        }
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.report = Report()
        self.protected: frozenset[str] = frozenset()
        self.recent: deque[Case] = deque(maxlen=5)
        self.reference: np.ndarray | None = None
        self.keep_going = False
        self.progress_every = 0  # print a line every N calls (the CLI sets it)

    def close(self) -> None:
        self.channel.close()

    # set-up and tear-down use the same raw calls, so they also go through the server's parsing
    def _unary(self, rpc: str, request, timeout: float = TIMEOUT_S):
        raw = self.calls[rpc](request.SerializeToString(), timeout=timeout, metadata=self.metadata)
        return RPCS[rpc].response.FromString(raw)

    def collections(self) -> set[str]:
        return {c.name for c in self._unary("ListCollections", index_pb2.ListCollectionsRequest()).collections}

    def known_good(self) -> np.ndarray:
        text, kind = KNOWN_GOOD
        response = self._unary("Embed", embedding_pb2.EmbedRequest(texts=[text], kind=kind))
        return np.asarray(response.embeddings[0].values, dtype=np.float32)

    def prepare(self, ctx: Context, documents: Sequence[index_pb2.Document]) -> None:
        """Note what exists (never written to), create and fill the base collection, embed the reference."""
        existing = self.collections()
        if ctx.base in existing:
            raise RuntimeError(f"collection {ctx.base!r} already exists on {self.address}; pick another --base")
        self.protected = frozenset(existing)
        self._unary("CreateCollection", index_pb2.CreateCollectionRequest(name=ctx.base))
        self._unary("Upsert", index_pb2.UpsertRequest(collection=ctx.base, documents=documents), timeout=600)
        self.reference = self.known_good()

    def alive(self) -> bool:
        for _ in range(3):
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=self.metadata).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(1.0)
        return False

    def _guarded(self, case: Case) -> bool:
        """True when the case would write to a collection that existed before the run."""
        key = WRITES.get(case.rpc)
        if key is None:
            return False
        try:
            name = getattr(RPCS[case.rpc].request.FromString(case.payloads[0]), key)
        except DecodeError:
            return False  # the server cannot parse it either
        return name in self.protected

    def _record(self, case: Case, rpc: str, code: Code, details: str) -> None:
        self.report.counts[(rpc, code.name)] += 1
        if code not in ALLOWED:
            self.report.first_bad.setdefault((rpc, code.name), (repr(case), details))

    def send(self, case: Case) -> None:
        """Make the call; raise Violation on a status outside ALLOWED (unless keep_going)."""
        if self.report.dead:
            return
        if self._guarded(case):
            self.report.skipped += 1
            return
        self.report.tried += 1
        self.recent.append(case)
        if self.progress_every and self.report.tried % self.progress_every == 0:
            codes = Counter()
            for (_, code), n in self.report.counts.items():
                codes[code] += n
            print(f"  {self.report.tried} calls: {dict(codes.most_common())}", file=sys.stderr, flush=True)
        bad: list[str] = []
        try:
            if RPCS[case.rpc].streaming:
                for raw in self.calls[case.rpc](iter(case.payloads), timeout=case.timeout, metadata=self.metadata):
                    item = embedding_pb2.EmbedStreamResponse.FromString(raw)
                    item_code = CODE_BY_VALUE.get(item.code, Code.UNKNOWN)
                    self._record(case, "EmbedStream items", item_code, item.message)
                    if item_code not in ALLOWED:
                        bad.append(f"stream item {item.sequence}: {item_code.name}: {item.message}")
            else:
                self.calls[case.rpc](case.payloads[0], timeout=case.timeout, metadata=self.metadata)
            code, details = Code.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self._record(case, case.rpc, code, details)
        if code not in ALLOWED:
            bad.append(f"{case.rpc}: {code.name}: {details}")
        if (code == Code.UNAVAILABLE or self.report.tried % HEALTH_EVERY == 0) and not self.alive():
            self.report.dead = f"no SERVING health answer after call #{self.report.tried}; last calls: {list(self.recent)}"
            return
        if bad and not self.keep_going:
            raise Violation("; ".join(bad))

    def finish(self) -> None:
        """Health SERVING and the known-good vector unchanged."""
        if self.report.dead:
            self.report.final_check = "server gone"
            return
        if not self.alive():
            self.report.final_check = "health is not SERVING"
            return
        try:
            vector = self.known_good()
        except grpc.RpcError as exc:
            self.report.final_check = f"known-good Embed failed: {exc.code().name}: {exc.details()}"
            return
        diff = float(np.max(np.abs(vector - self.reference))) if self.reference is not None and vector.shape == self.reference.shape else float("inf")
        self.report.final_check = f"ok (known-good vector max |diff| {diff:.2e})" if diff <= 1e-5 else f"known-good vector changed: max |diff| {diff:.2e}"

    def cleanup(self) -> list[str]:
        """Drop what the run created; never what existed before it."""
        dropped = []
        try:
            for name in sorted(self.collections() - self.protected):
                try:
                    self._unary("DropCollection", index_pb2.DropCollectionRequest(name=name))
                    dropped.append(name)
                except grpc.RpcError:
                    pass
        except grpc.RpcError:
            pass
        return dropped


def base_documents(ctx: Context, n: int = 40) -> list[index_pb2.Document]:
    rng = random.Random(0)
    docs = []
    for i, text in enumerate(t for t in ctx.texts[20:] if t.strip()):
        if i >= n:
            break
        skills = rng.sample(ctx.skills, 2) if len(ctx.skills) >= 2 else []
        meta = {"ville": rng.choice(["Lyon", "Paris", "Lille"]), "contrat": rng.choice(["CDI", "CDD"])}
        docs.append(index_pb2.Document(id=f"d{i}", text=text, metadata=meta, skills=skills))
    return docs


def make_context(base: str = "fuzz-base") -> Context:
    skills = ("Python", "SQL", "CACES R489", "HACCP", "soins d'hygiène", "permis B", "anglais", "gestion des stocks")
    return Context(base=base, scratch=("fuzz-a", "fuzz-b", "fuzz_c"), texts=french_texts(), skills=skills)


def fuzz(
    driver: Driver, ctx: Context, requests: int, seed: int | None = None, *,
    derandomize: bool = False, keep_going: bool = False, rpcs: Iterable[str] | None = None,
) -> Report:
    """Run `requests` generated calls through `driver` (the server must be prepared), then the final checks.

    On the first disallowed status hypothesis shrinks the case and the report keeps it,
    unless keep_going, which counts every call without stopping."""
    driver.keep_going = keep_going
    t0 = time.perf_counter()

    @settings(
        max_examples=requests, deadline=None, database=None, derandomize=derandomize, report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink), print_blob=False,
    )
    @given(case=cases(ctx, rpcs))
    def check(case: Case) -> None:
        driver.send(case)

    if seed is not None and not derandomize:
        check = hypothesis_seed(seed)(check)
    try:
        check()
    except (Violation, HypothesisException, ExceptionGroup) as exc:  # the shrunk failure, minimal example as a note
        notes = "\n".join(getattr(exc, "__notes__", []))
        driver.report.violation = f"{type(exc).__name__}: {exc}\n{notes}"
    driver.finish()
    driver.report.seconds = time.perf_counter() - t0
    return driver.report


def print_report(report: Report, out=sys.stdout) -> None:
    print(f"\n{report.tried} calls tried ({report.skipped} writes to pre-existing collections skipped) in {report.seconds:.0f}s", file=out)
    print(report.table(), file=out)
    for (rpc, code), (case, details) in sorted(report.first_bad.items()):
        print(f"\nDISALLOWED {rpc} -> {code}: {details}\n  first case: {case}", file=out)
    if report.violation:
        print(f"\nstopped on a disallowed status; minimal case:\n{report.violation}", file=out)
    if report.dead:
        print(f"\nSERVER STOPPED ANSWERING: {report.dead}", file=out)
    print(f"\nfinal check: {report.final_check}", file=out)
    print("PASS" if report.ok else "FAIL", file=out)


def run_against(address: str, args: argparse.Namespace) -> Report:
    token = os.environ.get("OPENEMPLOI_TOKEN", "")
    driver = Driver(address, (("authorization", f"Bearer {token}"),) if token else ())
    driver.progress_every = max(100, args.requests // 20)
    ctx = make_context(args.base)
    try:
        driver.prepare(ctx, base_documents(ctx))
        report = fuzz(driver, ctx, args.requests, args.seed, keep_going=args.keep_going)
        dropped = driver.cleanup()
        print(f"dropped the run's collections: {', '.join(dropped) or '(none)'}", file=sys.stderr)
        return report
    finally:
        driver.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="generated calls (a stream counts as one)")
    parser.add_argument("--host", default=None, help="a running server (host:port); default: start one")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random; printed)")
    parser.add_argument("--rome", action="store_true", help="started server: with the ROME collection (cached in var/loadtest-collections)")
    parser.add_argument("--keep-going", action="store_true", help="count every disallowed status instead of stopping and shrinking")
    parser.add_argument("--base", default="fuzz-base", help="name of the collection the run creates and fills")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=HypothesisWarning)  # "overly large repr" of the corpus strategies
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    print(f"fuzz: {args.requests} calls, seed {args.seed}", file=sys.stderr)
    if args.host:
        report = run_against(args.host, args)
    else:
        from loadtest import CACHE_DIR, ServerOptions, log_tail, running_server

        with tempfile.TemporaryDirectory(prefix="openemploi-fuzz-") as scratch:
            collections = CACHE_DIR if args.rome else Path(scratch) / "collections"
            options = ServerOptions(collections, rome=args.rome, log_path=Path(scratch) / "server.log")
            with running_server(options) as server:
                report = run_against(server.address, args)
                if not report.ok:
                    print(f"\nserver log (tail):\n{log_tail(server.log_path, 40)}", file=sys.stderr)
    print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
