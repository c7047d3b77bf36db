"""The exact top-k merge of the parts' candidates (see shards.py for what is exact and what is not).

Dense: every part returns its own top k by cosine; the global top k is among them, so sorting their
union by (score desc, document id) and cutting at k gives what one collection holding every document
returns. Hybrid: each part returns its dense and lexical pools (the same pool size one collection would
use) with the exact cosine of each candidate; the global pools are cut from their union the same way,
then fused once with the single-process `fuse` (ranks over the global pools, bm25 normalised by the best
bm25 of all the candidates), under keys ordered by document id so ties go to the smaller id.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..index.collection import InvalidQuery
from ..index.search import Hit, SearchQuery, SearchResult, fuse
from ..index.vectors import MAX_K
from .shard_service import Candidates


def pool_size(query: SearchQuery) -> int:
    """The dense/lexical pool one collection fuses (Collection.candidates): each part returns as many."""
    return min(query.candidates or max(4 * query.k, 50), MAX_K)


def _top(pairs: list[tuple[str, float]], n: int) -> list[tuple[str, float]]:
    return sorted(pairs, key=lambda p: (-p[1], p[0]))[:n]


def merge(query: SearchQuery, name: str, parts: Sequence[Candidates]) -> SearchResult:
    for field_name, _ in query.filters:
        if all(field_name in p.unknown_fields for p in parts):  # as one collection: unknown only if no part has it
            raise InvalidQuery(f"filter on unknown field {field_name!r}: no document in {name!r} has it")
    docs = {doc_id: doc for p in parts for doc_id, doc in p.docs.items()}
    if not query.hybrid:
        dense = _top([pair for p in parts for pair in p.dense], query.k)
        hits = [Hit(docs[i], score, score, 0.0, rank, 0) for rank, (i, score) in enumerate(dense, 1)]
        return SearchResult(hits, "score = cosine(query, document)")
    pool = pool_size(query)
    dense = _top([pair for p in parts for pair in p.dense], pool)
    lexical = _top([pair for p in parts for pair in p.lexical], pool)
    key = {doc_id: n for n, doc_id in enumerate(sorted(docs))}
    cosine = {key[doc_id]: value for p in parts for doc_id, value in p.cosine.items()}
    return fuse(
        query,
        [(key[i], score) for i, score in dense],
        [(key[i], score) for i, score in lexical],
        {key[doc_id]: doc for doc_id, doc in docs.items()},
        cosine,
    )
