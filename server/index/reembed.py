"""Re-embed a collection with another model in the background, then switch atomically.

Searches keep using the old index until the new one has every document; writes that land
meanwhile are copied over (the last, small delta under the old collection's write lock), so
no acknowledged change is lost and a search never mixes vectors of two models.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .collection import Collection, CollectionManager, CollectionReplaced, CollectionSpec, InvalidQuery
from .protocols import CollectionLike, Collections, EmbedTexts
from .store import NewDocument

log = logging.getLogger(__name__)

BATCH = 256
FINAL_DELTA = 512  # copy under the write lock once fewer changes than this remain


def _next_rows(old: Collection, after: int) -> list:
    rows = old.store.live_after(after, BATCH)
    missing = [d.id for d, _ in rows if not d.text.strip()]
    if missing:
        raise InvalidQuery(f"documents {missing[:5]} have no text to re-embed (they were upserted as vectors)")
    return rows


def _documents(rows: list, vectors: np.ndarray) -> list[NewDocument]:
    return [NewDocument(d.id, d.text, vectors[i], d.metadata, tuple(d.skills), lexical) for i, (d, lexical) in enumerate(rows)]


async def _copy_since(old: Collection, new: Collection, after: int, embed: EmbedTexts, bar: tqdm) -> int:
    """Copy live documents changed after sequence `after`; returns the sequence reached.

    That is at least the store's last sequence when the copy began: the changes after the last live
    row copied may all be deletes, which have no row to copy but are covered (see _drop_deleted).
    """
    reached = await asyncio.to_thread(old.store.last_seq)
    while rows := await asyncio.to_thread(_next_rows, old, after):
        vectors = await embed([d.text for d, _ in rows])
        await asyncio.to_thread(new.upsert, _documents(rows, vectors))
        after = rows[-1][0].seq
        bar.update(len(rows))
    return max(after, reached)


def _drop_deleted(old: Collection, new: Collection) -> int:
    gone = sorted(new.store.live_ids() - old.store.live_ids())
    return new.delete(gone) if gone else 0


async def reembed_collection(
    manager: Collections, name: str, model: str, model_version: str, dim: int, embed: EmbedTexts, progress: bool = True
) -> CollectionLike:
    if not isinstance(manager, CollectionManager):  # sharded (scaleout): each shard's part, switched together
        return await manager.reembed(name, model, model_version, dim, embed, progress)
    old = manager.get(name)
    staging = manager.root / f".reembed-{name}"
    spec = CollectionSpec(name, model, model_version, dim, old.spec.params)
    await asyncio.to_thread(_remove, staging)
    new = await asyncio.to_thread(Collection.create, staging, spec, manager.gpus)
    bar = tqdm(total=old.size(), desc=f"re-embedding {name}", unit="doc", disable=not progress)
    try:
        seen = await _copy_since(old, new, 0, embed, bar)
        while old.store.last_seq() - seen > FINAL_DELTA:  # catch up with writes made meanwhile
            seen = await _copy_since(old, new, seen, embed, bar)
        await asyncio.to_thread(new.rebuilds.stop)  # the switched generation reopens and rebuilds if it must
        loop = asyncio.get_running_loop()

        def final_phase() -> tuple[Collection, int]:
            """In one thread, holding the old collection's write lock: writers wait, searches go on.

            A drop (or a drop and re-create) that got in first closed `old`: the switch is refused then.
            """
            after = seen
            with old._write_lock:
                if old.closed:
                    raise CollectionReplaced(f"collection {name!r} was dropped or replaced during the re-embedding")
                while rows := _next_rows(old, after):
                    vectors = asyncio.run_coroutine_threadsafe(embed([d.text for d, _ in rows]), loop).result()
                    new.upsert(_documents(rows, vectors))
                    after = rows[-1][0].seq
                    bar.update(len(rows))
                _drop_deleted(old, new)
                new.snapshot()
                documents = new.size()  # counted before the switch: a drop may close the new one right after it
                new.store.close()
                return manager.replace(name, staging, old), documents

        switched, documents = await asyncio.to_thread(final_phase)
    except BaseException:
        bar.close()
        await asyncio.to_thread(new.rebuilds.stop)
        await asyncio.to_thread(_remove, staging)
        raise
    bar.close()
    log.info("collection %s re-embedded with %s/%s (%d documents)", name, model, model_version, documents)
    return switched


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
