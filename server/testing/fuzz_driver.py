"""Raw calls to every RPC of a live server, and the score of how each was answered.

The fuzzer (openemploi.testing.fuzz) sends requests as bytes through a generic channel with identity
serialisers, so the server sees exactly what was generated, broken bytes included. The property
the Driver checks: every answer is OK or a documented status (ALLOWED), never INTERNAL or UNKNOWN,
and the server keeps answering (health SERVING, the same vector for a known text at the end as at
the start). Writes never touch collections that existed before the run.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc import StatusCode
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2

from ..config import LimitsConfig

ALLOWED: frozenset[StatusCode] = frozenset(
    {
        StatusCode.OK,
        StatusCode.INVALID_ARGUMENT,
        StatusCode.NOT_FOUND,
        StatusCode.FAILED_PRECONDITION,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.ALREADY_EXISTS,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.ABORTED,
    }
)
CODE_BY_VALUE = {c.value[0]: c for c in StatusCode}
DEFAULT_MODEL = "multilingual-e5-small"
KNOWN_GOOD = ("Boulanger / Boulangère", embedding_pb2.QUERY)
HEALTH_EVERY = 250  # calls between liveness checks
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Rpc:
    name: str
    path: str
    request: type[Message]
    response: type[Message]
    streaming: bool = False


def _rpcs() -> dict[str, Rpc]:
    table = {}
    for module, service in (
        (embedding_pb2, "EmbeddingService"),
        (index_pb2, "IndexService"),
        (match_pb2, "MatchService"),
        (models_pb2, "ModelService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            table[method.name] = Rpc(
                method.name,
                f"/{descriptor.full_name}/{method.name}",
                getattr(module, method.input_type.name),
                getattr(module, method.output_type.name),
                streaming=method.client_streaming,
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
            paths.append((*prefix, f.number))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth > 1:
            paths.extend(string_paths(f.message_type, depth - 1, (*prefix, f.number)))
    return paths


# --- calls, and what they know of the server under test -----------------------------


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
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # the server's, for requests at and just past each


def french_texts() -> tuple[str, ...]:
    """The probe set's French texts and passages (shipped with openemploi.build): realistic inputs."""
    probe = json.loads(resources.files("openemploi.build").joinpath("probe/fr_probe.json").read_text(encoding="utf-8"))
    return tuple(probe["texts"]) + tuple(p["text"] for p in probe["retrieval"]["passages"][:60])


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

    def _record(self, case: Case, rpc: str, code: StatusCode, details: str) -> None:
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
            codes: Counter[str] = Counter()
            for (_, code), n in self.report.counts.items():
                codes[code] += n
            print(f"  {self.report.tried} calls: {dict(codes.most_common())}", file=sys.stderr, flush=True)
        bad: list[str] = []
        try:
            if RPCS[case.rpc].streaming:
                for raw in self.calls[case.rpc](iter(case.payloads), timeout=case.timeout, metadata=self.metadata):
                    item = embedding_pb2.EmbedStreamResponse.FromString(raw)
                    item_code = CODE_BY_VALUE.get(item.code, StatusCode.UNKNOWN)
                    self._record(case, "EmbedStream items", item_code, item.message)
                    if item_code not in ALLOWED:
                        bad.append(f"stream item {item.sequence}: {item_code.name}: {item.message}")
            else:
                self.calls[case.rpc](case.payloads[0], timeout=case.timeout, metadata=self.metadata)
            code, details = StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self._record(case, case.rpc, code, details)
        if code not in ALLOWED:
            bad.append(f"{case.rpc}: {code.name}: {details}")
        if (code == StatusCode.UNAVAILABLE or self.report.tried % HEALTH_EVERY == 0) and not self.alive():
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
        diff = (
            float(np.max(np.abs(vector - self.reference)))
            if self.reference is not None and vector.shape == self.reference.shape
            else float("inf")
        )
        self.report.final_check = (
            f"ok (known-good vector max |diff| {diff:.2e})"
            if diff <= 1e-5
            else f"known-good vector changed: max |diff| {diff:.2e}"
        )

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


def make_context(base: str = "fuzz-base", limits: LimitsConfig | None = None) -> Context:
    """`limits`: the server's (default: the defaults), so edge cases sit at its limits, not at guessed ones."""
    skills = ("Python", "SQL", "CACES R489", "HACCP", "soins d'hygiène", "permis B", "anglais", "gestion des stocks")
    return Context(
        base=base,
        scratch=("fuzz-a", "fuzz-b", "fuzz_c"),
        texts=french_texts(),
        skills=skills,
        limits=limits or LimitsConfig(),
    )
