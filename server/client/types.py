"""What the client's methods take and return: enums and frozen dataclasses, never generated protos.

Field meanings follow proto/openemploi/v1/*.proto, where each one is documented.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from openemploi.v1 import embedding_pb2, index_pb2


class TextKind(enum.Enum):
    """Which side of a retrieval pair a text is; it picks the model's prefix ("query: " / "passage: " for E5)."""

    QUERY = embedding_pb2.QUERY
    PASSAGE = embedding_pb2.PASSAGE


class IndexKind(enum.Enum):
    AUTO = index_pb2.INDEX_KIND_AUTO  # flat up to IndexSpec.flat_max vectors, then HNSW
    FLAT = index_pb2.FLAT
    HNSW = index_pb2.HNSW
    IVF = index_pb2.IVF


class Fusion(enum.Enum):
    """How a hybrid search fuses the lexical and dense rankings."""

    RRF = index_pb2.RRF
    WEIGHTED = index_pb2.WEIGHTED


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Vectors (n x dim float32, rows in the order of the texts) and what made them."""

    vectors: np.ndarray
    model: str
    model_version: str
    token_counts: tuple[int, ...]  # tokens fed to the model per text, specials and prefix included
    truncated: tuple[bool, ...]  # per text: cut to the model's token limit (only with truncate=True)

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass(frozen=True)
class OccupationMatch:
    code: str  # ROME code, e.g. D1102
    label: str
    score: float
    dense_score: float
    lexical_score: float
    matched_terms: tuple[str, ...]
    matched_entry: str
    sectors: tuple[str, ...]


@dataclass(frozen=True)
class ProfileMatch:
    id: str
    score: float
    dense_score: float
    skill_score: float
    matched_skills: tuple[str, ...]
    missing_skills: tuple[str, ...]
    text: str
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float  # what the ranking used: the dense cosine, or the fused score of a hybrid search
    dense_score: float
    lexical_score: float
    dense_rank: int  # 1-based; 0 = not among the dense candidates
    lexical_rank: int  # 1-based; 0 = not among the lexical candidates
    text: str
    metadata: Mapping[str, str]
    skills: tuple[str, ...]
    vector: tuple[float, ...] | None  # only with include_vectors=True


@dataclass(frozen=True)
class Document:
    """A document to upsert (give `text`, or your own unit-length `vector`), or one that Get returned."""

    id: str
    text: str = ""
    vector: tuple[float, ...] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    skills: tuple[str, ...] = ()
    vector_model: str = ""  # "name" or "name/version" that made `vector`; empty: the collection's model


@dataclass(frozen=True)
class UpsertResult:
    upserted: int
    last_sequence: int  # sequence number of the last committed change


@dataclass(frozen=True)
class GetResult:
    documents: tuple[Document, ...]  # the ids found, in request order
    missing: tuple[str, ...]


@dataclass(frozen=True)
class IndexSpec:
    """Index settings for a new collection; 0 leaves a number to the server's default."""

    kind: IndexKind = IndexKind.AUTO
    flat_max: int = 0
    hnsw_m: int = 0
    hnsw_ef_search: int = 0
    ivf_nlist: int = 0
    ivf_nprobe: int = 0


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    model: str
    model_version: str
    dim: int
    size: int  # live documents
    index_kind: str  # the index in use now: flat, hnsw, ivf
    device: str
    last_sequence: int
    created_at: str


@dataclass(frozen=True)
class ModelVersionInfo:
    version: str
    state: str  # current | serving | draining | built
    device: str
    precision: str
    built_at: str
    detail: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dim: int
    max_tokens: int
    current_version: str  # empty when not loaded
    is_default: bool
    versions: tuple[ModelVersionInfo, ...]


@dataclass(frozen=True)
class ExtractedSkill:
    uri: str  # ESCO URI
    label: str
    score: float
    evidence: str  # the sentence or clause of the text that supports the skill
    label_fr: str = ""  # the team's French label (not ESCO's official one)


@dataclass(frozen=True)
class OccupationSkill:
    uri: str
    label: str
    score: float
    specificity: float  # 1 for a skill few occupations share, near 0 for a generic one
    evidence: str
    label_fr: str = ""


@dataclass(frozen=True)
class Occupation:
    """A ROME occupation with its titles, tasks and ESCO skills profile (GetOccupation)."""

    code: str
    label: str
    sectors: tuple[str, ...]
    titles: tuple[str, ...]
    tasks: tuple[str, ...]
    skills: tuple[OccupationSkill, ...]


@dataclass(frozen=True)
class Transition:
    code: str
    label: str
    score: float
    transferable_skills: tuple[str, ...]
    missing_skills: tuple[str, ...]
    skill_overlap: float
    proximity: float
    same_family: bool
    viable: bool
    transferable_skills_fr: tuple[str, ...] = ()  # French labels of transferable_skills, same order
    missing_skills_fr: tuple[str, ...] = ()


@dataclass(frozen=True)
class Needs:
    """What a job ad asks for (DescribeNeeds): the occupations it matches and the skills it names."""

    occupations: tuple[OccupationMatch, ...]
    typical_skills: tuple[ExtractedSkill, ...]
    specific_skills: tuple[ExtractedSkill, ...]
    model: str
    model_version: str
