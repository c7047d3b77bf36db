"""Index the ESCO skills and the catalogue's French lines into `esco_skills` at first start, and derive profiles.

Mirrors matching/bootstrap.py: re-indexed only when the ESCO data, the ROME catalogue, what is
embedded per skill (INDEX_RECIPE), the profile thresholds or the model version change; the
collection records them, so a restart reads vectors, the line-to-skill map and near-duplicates
back from disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from ..index.collection import CollectionNotFound, CollectionSpec
from ..index.protocols import CollectionLike, CollectionManagerLike
from ..index.store import NewDocument
from ..index.vectors import IndexParams
from ..matching.catalogue import Occupation, catalogue_version
from ..runtime.registry import LoadedModel
from ..tokenize import TextKind
from .engine import SkillsEngine
from .esco import Skill, load_skills, skills_version
from .extract import (
    FRENCH_WEIGHT,
    LABEL_WEIGHT,
    ExtractParams,
    SkillSpace,
    centre,
    map_lines,
    skill_matrix,
)
from .lexical import LexicalIndex
from .profiles import ProfileParams, derive_profiles, near_duplicates, occupation_lines
from .transitions import TransitionParams

log = logging.getLogger(__name__)
BATCH = 64
IN_FLIGHT = 8
# What is embedded and how it is combined: part of the re-index key, so that a change here re-indexes
# production and the test catalogues. Each skill twice: as a passage its preferred label (id: URI),
# as a query its French wordings (FRENCH_ID + URI); each French catalogue line as a query, as clauses are.
INDEX_RECIPE = f"skills-4:passage(label),query(french),centred-mean({LABEL_WEIGHT}:{FRENCH_WEIGHT});lines:query"
FRENCH_ID = "esco-fr:"
LINE_ID = "rome-line:"
MAP_KEY = "skills_map"


def data_version(params: ProfileParams, skills: Sequence[Skill]) -> str:
    """The re-index key. The preferred labels are embedded but derived by code (esco.preferred_label),
    so their digest is part of it: a better label heuristic re-indexes as a new data file does."""
    labels = hashlib.sha256("\n".join(s.label for s in skills).encode()).hexdigest()[:16]
    key = f"{skills_version()}:{catalogue_version()}:{INDEX_RECIPE}:{labels}:{json.dumps(asdict(params))}"
    digest = hashlib.sha256(key.encode())
    return digest.hexdigest()[:16]


def catalogue_lines(occupations: Sequence[Occupation]) -> list[str]:
    return sorted({line for o in occupations for line in occupation_lines(o)})


async def _embed_all(
    model: LoadedModel, texts: list[str], kind: TextKind, bar: tqdm, on_chunk
) -> None:  # several chunks in flight let the batcher sort by length and keep the backend busy
    for start in range(0, len(texts), BATCH * IN_FLIGHT):
        window = range(start, min(start + BATCH * IN_FLIGHT, len(texts)), BATCH)
        results = await asyncio.gather(*(model.embed(texts[i : i + BATCH], kind, truncate=True) for i in window))
        for i, result in zip(window, results):
            await on_chunk(i, result.normalized)
            bar.update(len(result.normalized))


@dataclass(frozen=True)
class _Part:
    """One kind of entry of the collection: what is embedded, how, under which ids."""

    ids: list[str]
    texts: list[str]
    kind: TextKind
    metadata: list[dict]


def _parts(skills: list[Skill], lines: list[str]) -> list[_Part]:
    """English labels as passages; French wordings and catalogue lines as queries, as clauses are."""
    return [
        _Part(
            [s.uri for s in skills],
            [s.label for s in skills],
            TextKind.PASSAGE,
            [{"kind": "esco", "label": s.label} for s in skills],
        ),
        _Part(
            [f"{FRENCH_ID}{s.uri}" for s in skills],
            [s.french for s in skills],
            TextKind.QUERY,
            [{"kind": "esco_french"}] * len(skills),
        ),
        _Part([f"{LINE_ID}{i}" for i in range(len(lines))], lines, TextKind.QUERY, [{"kind": "rome_line"}] * len(lines)),
    ]


async def _index(
    collection: CollectionLike, model: LoadedModel, skills: list[Skill], lines: list[str], progress: bool
) -> list[np.ndarray]:
    """(label, French and line vectors), each row as embedded, also stored in the collection."""
    parts = _parts(skills, lines)
    matrices = [np.zeros((len(part.ids), model.dim), np.float32) for part in parts]
    bar = tqdm(total=sum(len(p.ids) for p in parts), desc=f"indexing {collection.spec.name}", unit="entry", disable=not progress)
    try:
        for part, matrix in zip(parts, matrices):

            async def store(start: int, vectors: np.ndarray, part: _Part = part, matrix: np.ndarray = matrix) -> None:
                end = start + len(vectors)
                matrix[start:end] = vectors
                documents = [
                    NewDocument(doc_id, text, vector, meta)
                    for doc_id, text, vector, meta in zip(
                        part.ids[start:end], part.texts[start:end], vectors, part.metadata[start:end]
                    )
                ]
                await asyncio.to_thread(collection.upsert, documents)

            await _embed_all(model, part.texts, part.kind, bar, store)
    finally:
        bar.close()
    return matrices


def _read_vectors(collection: CollectionLike, ids: list[str], dim: int) -> np.ndarray:
    docs = collection.get(ids, include_vectors=True)
    matrix = np.zeros((len(ids), dim), np.float32)
    for i, doc_id in enumerate(ids):
        vector = docs[doc_id].vector if doc_id in docs else None
        if vector is None:
            raise RuntimeError(f"collection {collection.spec.name!r} lacks {doc_id!r}: drop it to re-index")
        matrix[i] = vector
    return matrix


async def ensure_skills_collection(
    manager: CollectionManagerLike,
    model: LoadedModel,
    occupations: list[Occupation],
    rome: CollectionLike,
    name: str = "esco_skills",
    progress: bool = True,
    profile_params: ProfileParams | None = None,
    extract_params: ExtractParams | None = None,
    transition_params: TransitionParams | None = None,
) -> tuple[CollectionLike, SkillsEngine]:
    params = profile_params or ProfileParams()
    skills = await asyncio.to_thread(load_skills)
    lines = catalogue_lines(occupations)
    version = data_version(params, skills)
    collection: CollectionLike | None = None
    try:
        existing = manager.get(name)
        same_model = (existing.spec.model, existing.spec.model_version) == (model.name, model.version.version)
        if same_model and existing.store.get_info("skills_version") == version and existing.store.get_info(MAP_KEY):
            collection = existing
        else:
            log.info("collection %s is stale (ESCO data, catalogue or model changed): re-indexing", name)
            await asyncio.to_thread(manager.drop, name)
    except CollectionNotFound:
        pass
    if collection is not None:
        matrices = [await asyncio.to_thread(_read_vectors, collection, part.ids, model.dim) for part in _parts(skills, lines)]
        line_skills, neighbours = decode_map(collection.store.get_info(MAP_KEY), skills)
        space = _space(skills, *matrices)
    else:
        spec = CollectionSpec(name, model.name, model.version.version, model.dim, IndexParams(kind="flat"))
        collection = await asyncio.to_thread(manager.create, spec)
        space = _space(skills, *await _index(collection, model, skills, lines, progress))
        line_skills, neighbours = await asyncio.to_thread(map_catalogue, space, params)
        collection.store.set_info({"skills_version": version, MAP_KEY: encode_map(line_skills, neighbours, skills)})
        await asyncio.to_thread(collection.snapshot)
    profiles = derive_profiles(occupations, lines, line_skills)
    occupation_vectors = await asyncio.to_thread(_read_vectors, rome, [f"{o.code}:tasks" for o in occupations], rome.spec.dim)
    engine = await asyncio.to_thread(
        SkillsEngine, space, occupations, profiles, neighbours, occupation_vectors, extract_params, transition_params
    )
    log.info(
        "collection %s ready: %d skills, %d French lines, %d profiled occupations (viable above %.3f)",
        name,
        len(skills),
        len(lines),
        sum(1 for p in profiles.values() if p),
        engine.viable,
    )
    return collection, engine


def _space(skills: list[Skill], labels: np.ndarray, french: np.ndarray, line_vectors: np.ndarray) -> SkillSpace:
    """The French side's mean comes from the catalogue's lines: many, varied, and never the texts scored."""
    mean = line_vectors.mean(axis=0) if len(line_vectors) else np.zeros(labels.shape[1], np.float32)
    mean = mean.astype(np.float32)
    words = LexicalIndex.build([s.french for s in skills])
    return SkillSpace(skills, skill_matrix(labels, french), mean, centre(line_vectors, mean), words)


def map_catalogue(space: SkillSpace, params: ProfileParams) -> tuple[list[list[tuple[int, float]]], dict[int, list[int]]]:
    """Each French line's ESCO skills, scored as extraction scores a one-clause text, and the near-duplicates
    among the skills any line reached (cosine of their skill_matrix rows, re-normalised)."""
    line_skills = map_lines(space.lines, space.vectors, params.per_line, params.min_score)
    used = sorted({s for pairs in line_skills for s, _ in pairs})
    unit = centre(space.vectors, np.zeros(space.vectors.shape[1], np.float32))
    return line_skills, near_duplicates(used, unit, params.near_duplicate)


def encode_map(line_skills: list[list[tuple[int, float]]], neighbours: dict[int, list[int]], skills: list[Skill]) -> str:
    """URIs, not indices: the map stays readable and survives a reordered data file."""
    return json.dumps(
        {
            "lines": [[[skills[s].uri, round(score, 4)] for s, score in pairs] for pairs in line_skills],
            "neighbours": {skills[s].uri: [skills[n].uri for n in near] for s, near in neighbours.items() if near},
        }
    )


def decode_map(text: str, skills: list[Skill]) -> tuple[list[list[tuple[int, float]]], dict[int, list[int]]]:
    index = {s.uri: i for i, s in enumerate(skills)}
    data = json.loads(text)
    line_skills = [[(index[uri], float(score)) for uri, score in pairs] for pairs in data["lines"]]
    neighbours = {index[uri]: [index[n] for n in near] for uri, near in data["neighbours"].items()}
    return line_skills, neighbours
