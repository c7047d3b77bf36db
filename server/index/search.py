"""What a search asks and answers, and the fusion of dense and lexical candidates into one ranking.

Apart from Collection so that a sharded collection (scaleout) fuses the candidates of all its shards
with the same code, under keys of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from openemploi.kernels import RRF_K, fuse_topk, fusion_candidates

from .store import StoredDocument


@dataclass(frozen=True)
class SearchQuery:
    vector: np.ndarray | None
    k: int
    text: str = ""
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    skills_all: tuple[str, ...] = ()
    skills_any: tuple[str, ...] = ()
    hybrid: bool = False
    fusion: str = "rrf"  # rrf | weighted
    dense_weight: float = 0.7
    candidates: int = 0  # dense/lexical pool before fusion; 0: max(4k, 50)
    include_vectors: bool = False


@dataclass
class Hit:
    document: StoredDocument
    score: float
    dense_score: float
    lexical_score: float
    dense_rank: int
    lexical_rank: int


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    explanation: str


def fuse(
    query: SearchQuery,
    dense: Sequence[tuple[int, float]],
    lexical: Sequence[tuple[int, float]],
    docs: Mapping[int, StoredDocument],
    cosine: Mapping[int, float],
) -> SearchResult:
    """Fuse the two candidate lists (key, score) with the numba kernel (kernels.fuse_topk, 7x numpy here).

    `docs` and `cosine` hold every candidate still live (others are dropped); ties go to the smaller key.
    A sharded collection (scaleout) fuses its shards' candidates with it, under keys of its own.
    """
    dense = [(s, score) for s, score in dense if s in docs]
    lexical = [(s, score) for s, score in lexical if s in docs]
    union = fusion_candidates([s for s, _ in dense], [s for s, _ in lexical]).tolist()
    fused = fuse_topk(
        np.asarray([s for s, _ in dense], np.int64),
        np.asarray([c for _, c in dense], np.float64),
        np.asarray([s for s, _ in lexical], np.int64),
        np.asarray([c for _, c in lexical], np.float64),
        query.k,
        query.fusion,
        query.dense_weight,
        np.asarray([cosine[s] for s in union], np.float64),
    )
    lexical_score = dict(lexical)
    hits = []
    for s, score, dense_rank, lexical_rank in zip(
        fused.ids.tolist(), fused.scores.tolist(), fused.dense_rank.tolist(), fused.lexical_rank.tolist()
    ):
        doc = docs[s]
        if not query.include_vectors:
            doc = StoredDocument(doc.seq, doc.id, doc.text, doc.metadata, doc.skills, None, doc.model_version)
        hits.append(Hit(doc, score, cosine[s], lexical_score.get(s, 0.0), dense_rank, lexical_rank))
    if query.fusion == "weighted":
        explanation = f"score = {query.dense_weight:g} * cosine + {1 - query.dense_weight:g} * bm25 / max bm25 of the candidates"
    else:
        explanation = f"score = sum over the dense and lexical rankings of 1 / ({RRF_K} + rank) (reciprocal rank fusion)"
    return SearchResult(hits, explanation)
