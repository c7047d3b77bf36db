"""Index the ROME catalogue into the `rome` collection at first start (with a progress bar).

Re-indexed only when the catalogue files or the model version change; the
collection records both, so a restart reuses what is on disk.
"""

from __future__ import annotations

import asyncio
import logging

from tqdm import tqdm

from ..index.collection import CollectionNotFound, CollectionSpec
from ..index.protocols import CollectionLike, CollectionManagerLike
from ..index.store import NewDocument
from ..index.vectors import IndexParams
from ..runtime.registry import LoadedModel
from ..tokenize import TextKind
from .catalogue import Occupation, catalogue_version, entries

log = logging.getLogger(__name__)
BATCH = 64
IN_FLIGHT = 8


async def ensure_rome_collection(
    manager: CollectionManagerLike, model: LoadedModel, occupations: list[Occupation], name: str = "rome", progress: bool = True
) -> CollectionLike:
    version = catalogue_version()
    try:
        existing = manager.get(name)
        same_model = (existing.spec.model, existing.spec.model_version) == (model.name, model.version.version)
        if same_model and existing.store.get_info("catalogue_version") == version and existing.size() > 0:
            return existing
        log.info("collection %s is stale (catalogue or model changed): re-indexing", name)
        await asyncio.to_thread(manager.drop, name)
    except CollectionNotFound:
        pass
    spec = CollectionSpec(name, model.name, model.version.version, model.dim, IndexParams(kind="flat"))
    collection = await asyncio.to_thread(manager.create, spec)
    todo = [entry for occupation in occupations for entry in entries(occupation)]
    bar = tqdm(total=len(todo), desc=f"indexing {name}", unit="entry", disable=not progress)

    async def embed_chunk(chunk):
        result = await model.embed([e.text for e in chunk], TextKind.PASSAGE, truncate=True)
        return [
            NewDocument(e.id, e.text, result.normalized[i], {"code": e.code, "entry": e.kind}, (), e.lexical_text)
            for i, e in enumerate(chunk)
        ]

    try:
        # Several chunks in flight let the batcher sort by length and keep the backend busy.
        for start in range(0, len(todo), BATCH * IN_FLIGHT):
            window = todo[start : start + BATCH * IN_FLIGHT]
            chunks = [window[i : i + BATCH] for i in range(0, len(window), BATCH)]
            for documents in await asyncio.gather(*(embed_chunk(c) for c in chunks)):
                await asyncio.to_thread(collection.upsert, documents)
                bar.update(len(documents))
    finally:
        bar.close()
    collection.store.set_info({"catalogue_version": version})
    await asyncio.to_thread(collection.snapshot)
    log.info("collection %s ready: %d entries for %d occupations", name, collection.size(), len(occupations))
    return collection
