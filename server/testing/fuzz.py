"""Property-based fuzzing of a live server: hypothesis strategies for a request to every RPC.

Hypothesis generates requests for every RPC (Embed, EmbedStream, the IndexService, the
MatchService, the ModelService): French and random Unicode texts, empty and blank texts,
huge lists, NaN / infinite / wrong-dimension / zero / non-unit vectors, negative and huge k
(at and past the server's limits), unknown enum values, random and maximal filter lists,
maximal hybrid queries, collection and model names. A share of them is then broken
at the byte level (invalid UTF-8 in any string field, truncated, random garbage, flipped
bytes, wrong wire types, unknown fields, over-size messages); openemploi.testing.fuzz_driver
sends the bytes and keeps score. The only module of openemploi.testing that imports hypothesis.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from openemploi.v1 import embedding_pb2, index_pb2, match_pb2, models_pb2

from .fuzz_driver import RPCS, TIMEOUT_S, Case, Context, Driver, Report, Violation, nested, string_paths, tagged, varint

OVERSIZE_BYTES = 17 * 1024 * 1024  # over the default limits.max_message_bytes (16 MiB)
INVALID_UTF8 = (
    b"\xff",
    b"\xc3",
    b"\xc3(",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\x80\x80",
    b"\xfe\xfe\xff\xff",
)


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
        (
            1,
            st.builds(_repeat, st.sampled_from(["a", "é ", "Boulanger "]), st.sampled_from([20_001, 200_001])),
        ),  # over max_text_chars
    )


def text_lists(ctx: Context) -> st.SearchStrategy[list[str]]:
    return mostly(
        st.lists(texts(ctx), min_size=1, max_size=6),
        st.just([]),
        st.builds(lambda n, t: [t] * n, st.sampled_from([65, 1025, 5000, 50_000]), st.sampled_from(["a", "Cariste", ""])),
    )


SCALES = {"x10": 10.0, "x0.1": 0.1, "x1.01": 1.01, "x1.0005": 1.0005}  # off unit length, and one within tolerance


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
            elif poison in SCALES:
                v *= SCALES[poison]
            else:
                v[i] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[poison]
        return v.tolist()

    return st.builds(
        make,
        st.sampled_from([384] * 5 + [0, 1, 383, 385, 768]),
        st.sampled_from(["none"] * 6 + ["nan", "inf", "-inf", "zero", "huge", "tiny", *SCALES]),
        st.integers(0, 2**32 - 1),
    )


def ints32(ctx: Context) -> st.SearchStrategy[int]:
    """k: mostly usual values, sometimes the edges of the server's limits, negative or huge."""
    limits = ctx.limits
    edges = [0, limits.match_max_k, limits.match_max_k + 1, limits.max_k, limits.max_k + 1, -1]
    return mostly(st.integers(1, 50), st.sampled_from(edges), st.integers(-(2**31), 2**31 - 1))


def maximal_query_texts(ctx: Context) -> st.SearchStrategy[str]:
    """Distinct words at, just past and far past limits.max_query_terms (a pasted document as a query)."""
    cap = ctx.limits.max_query_terms
    return st.builds(
        lambda n, first: " ".join([first, *(f"mot{i}" for i in range(n))]),
        st.sampled_from([cap - 1, cap, 17_000]),
        st.sampled_from(ctx.texts[:5] or ("Boulanger",)),
    )


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
        (5, usual),
        (2, st.sampled_from(pool)),
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


def maximal_counts(ctx: Context) -> st.SearchStrategy[int]:
    """At and just past limits.max_filter_terms, and the ~1,000 that overflowed SQLite's expression tree."""
    cap = ctx.limits.max_filter_terms
    return st.sampled_from([cap, cap + 1, 1_000])


def filters(ctx: Context, message: type) -> st.SearchStrategy[list]:
    one = st.builds(
        lambda f, v: message(field=f, values=v),
        st.one_of(st.sampled_from(ctx.fields), st.text(max_size=10)),
        st.lists(short_texts(), max_size=3),
    )
    maximal = st.builds(lambda n, f: [message(field=f, values=["Lyon"])] * n, maximal_counts(ctx), st.sampled_from(ctx.fields))
    return mostly(st.just([]), st.lists(one, min_size=1, max_size=3), maximal)


def skill_lists(ctx: Context) -> st.SearchStrategy[list[str]]:
    pool = st.sampled_from(ctx.skills) if ctx.skills else st.just("python")
    return mostly(
        st.lists(pool, max_size=4),
        st.lists(st.one_of(pool, st.text(max_size=15)), max_size=6),
        st.builds(lambda n: [f"competence {i}" for i in range(n)], maximal_counts(ctx)),
    )


def documents(ctx: Context) -> st.SearchStrategy[index_pb2.Document]:
    def make(
        id_: str, text: str, vector: list[float] | None, metadata: dict, skills: list[str], vector_model: str
    ) -> index_pb2.Document:
        doc = index_pb2.Document(id=id_, text=text, metadata=metadata, skills=skills, vector_model=vector_model)
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
        mostly(st.just(""), st.sampled_from([ctx.model, f"{ctx.model}/not-a-version", "all-MiniLM-L6-v2"])),
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
        request = embedding_pb2.EmbedRequest(
            texts=texts_, model=model, model_version=version, kind=kind, truncate=truncate, encoding=encoding
        )
        if normalize is not None:
            request.normalize = normalize
        return request

    embed_requests = st.builds(
        embed,
        text_lists(ctx),
        mostly(st.just(""), model_names(ctx)),
        mostly(st.just(""), st.text(max_size=14)),
        enums((0, 1, 2)),
        st.booleans(),
        st.one_of(st.none(), st.booleans()),
        enums((0, 1)),
    )

    def search(collection, text, vector, both, vector_model, k, flt, s_all, s_any, hybrid, fusion, weight, include):
        request = index_pb2.SearchRequest(
            collection=collection,
            text="" if vector and not both else text,
            vector=vector or [],
            vector_model=vector_model,
            k=k,
            filters=flt,
            skills_all=s_all,
            skills_any=s_any,
            hybrid=hybrid,
            fusion=fusion,
            dense_weight=weight,
            include_vectors=include,
        )
        return request

    return {
        "Embed": embed_requests,
        "EmbedStream": embed_requests,
        "CreateCollection": st.builds(
            lambda name, model, kind, fm, m, ef, nl, npr: index_pb2.CreateCollectionRequest(
                name=name,
                model=model,
                index=index_pb2.IndexSpec(kind=kind, flat_max=fm, hnsw_m=m, hnsw_ef_search=ef, ivf_nlist=nl, ivf_nprobe=npr),
            ),
            collection_names(ctx, writable=True),
            mostly(st.just(""), model_names(ctx)),
            enums((0, 1, 2, 3)),
            uint32s(),
            uint32s(),
            uint32s(),
            uint32s(),
            uint32s(),
        ),
        "ListCollections": st.just(index_pb2.ListCollectionsRequest()),
        "DropCollection": st.builds(
            lambda n: index_pb2.DropCollectionRequest(name=n),
            collection_names(ctx, writable=True, droppable=True).filter(lambda n: n != ctx.base),
        ),
        "Upsert": st.builds(
            lambda c, d: index_pb2.UpsertRequest(collection=c, documents=d),
            collection_names(ctx, writable=True),
            document_lists(ctx),
        ),
        "Delete": st.builds(
            lambda c, i: index_pb2.DeleteRequest(collection=c, ids=i), collection_names(ctx, writable=True), id_lists()
        ),
        "Get": st.builds(
            lambda c, i, v: index_pb2.GetRequest(collection=c, ids=i, include_vectors=v),
            collection_names(ctx, writable=False),
            id_lists(),
            st.booleans(),
        ),
        "Search": weighted(
            (
                5,
                st.builds(
                    search,
                    collection_names(ctx, writable=False),
                    mostly(texts(ctx), st.just("")),
                    weighted((2, st.none()), (1, vectors())),
                    st.sampled_from([False] * 4 + [True]),
                    mostly(st.just(""), model_names(ctx)),
                    ints32(ctx),
                    filters(ctx, index_pb2.Filter),
                    skill_lists(ctx),
                    skill_lists(ctx),
                    weighted((3, st.just(False)), (1, st.just(True))),
                    enums((0, 1)),
                    unit_floats(),
                    st.booleans(),
                ),
            ),
            (
                1,
                st.builds(  # a maximal hybrid query: thousands of words, maximal filters, the largest k
                    lambda text, flt, s_all, k: index_pb2.SearchRequest(
                        collection=ctx.base, text=text, hybrid=True, filters=flt, skills_all=s_all, k=k
                    ),
                    maximal_query_texts(ctx),
                    filters(ctx, index_pb2.Filter),
                    skill_lists(ctx),
                    st.sampled_from([10, ctx.limits.max_k]),
                ),
            ),
        ),
        "Reembed": st.builds(
            lambda c, m: index_pb2.ReembedRequest(collection=c, model=m), collection_names(ctx, writable=True), model_names(ctx)
        ),
        "MatchOccupation": st.builds(
            lambda t, k: match_pb2.MatchOccupationRequest(text=t, k=k),
            weighted((5, texts(ctx)), (1, maximal_query_texts(ctx))),
            ints32(ctx),
        ),
        "MatchProfile": st.builds(
            lambda c, t, s, k, f, w: match_pb2.MatchProfileRequest(
                collection=c, text=t, skills=s, k=k, filters=f, skill_weight=w
            ),
            collection_names(ctx, writable=False),
            mostly(texts(ctx), st.just("")),
            skill_lists(ctx),
            ints32(ctx),
            filters(ctx, index_pb2.Filter),
            unit_floats(),
        ),
        "ListModels": st.just(models_pb2.ListModelsRequest()),
        "LoadModel": st.builds(
            lambda n, v: models_pb2.LoadModelRequest(name=n, version=v),
            model_names(ctx),
            st.one_of(st.just(""), st.text(max_size=14)),
        ),
        "UnloadModel": st.builds(
            lambda n, v: models_pb2.UnloadModelRequest(name=n, version=v),
            model_names(ctx),
            st.one_of(st.just(""), st.text(max_size=14)),
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
        body = {0: varint(draw(st.integers(-(2**63), 2**64 - 1))), 1: struct.pack("<d", 1.0), 5: struct.pack("<f", 1.0)}.get(
            wire, b""
        )
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
            lambda ps, t: Case("EmbedStream", tuple(p for p, _ in ps), t, ",".join(sorted({h for _, h in ps})) or "empty"),
            items,
            timeouts,
        )

    return st.one_of([stream() if name == "EmbedStream" else unary(name) for name in names])


def fuzz(
    driver: Driver,
    ctx: Context,
    requests: int,
    seed: int | None = None,
    *,
    derandomize: bool = False,
    keep_going: bool = False,
    rpcs: Iterable[str] | None = None,
) -> Report:
    """Run `requests` generated calls through `driver` (the server must be prepared), then the final checks.

    On the first disallowed status hypothesis shrinks the case and the report keeps it,
    unless keep_going, which counts every call without stopping."""
    driver.keep_going = keep_going
    t0 = time.perf_counter()

    @settings(
        max_examples=requests,
        deadline=None,
        database=None,
        derandomize=derandomize,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
        print_blob=False,
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
