"""What the API and the domain use of a collection and of its manager, as Protocols.

Two implementations meet them: the local `Collection`/`CollectionManager` of the single process, and the
collections sharded across Ray Serve replicas (`openemploi.scaleout.shards`), which the same servicers,
bootstraps and matchers drive unchanged. Only what those callers touch is here: a new use of a
collection goes here first, so both sides keep answering it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np

from .collection import CollectionManager, CollectionSpec
from .search import SearchQuery, SearchResult
from .store import NewDocument, StoredDocument

EmbedTexts = Callable[[list[str]], Coroutine[Any, Any, np.ndarray]]


class StoreInfo(Protocol):
    """The store's key/value side: catalogue versions, maps, and the last committed sequence."""

    def get_info(self, key: str, default: str = "") -> str: ...

    def set_info(self, values: dict[str, str]) -> None: ...

    def last_seq(self) -> int: ...


class IndexInfo(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def device(self) -> str: ...


class CollectionLike(Protocol):
    @property
    def spec(self) -> CollectionSpec: ...

    @property
    def store(self) -> StoreInfo: ...

    @property
    def index(self) -> IndexInfo: ...

    def size(self) -> int: ...

    def upsert(self, documents: Sequence[NewDocument]) -> int: ...

    def delete(self, ids: Sequence[str]) -> int: ...

    def get(self, ids: Sequence[str], include_vectors: bool = False) -> dict[str, StoredDocument]: ...

    def search(self, query: SearchQuery) -> SearchResult: ...

    def snapshot(self) -> None: ...


class CollectionManagerLike(Protocol):
    def create(self, spec: CollectionSpec) -> CollectionLike: ...

    def get(self, name: str) -> CollectionLike: ...

    def names(self) -> list[str]: ...

    def drop(self, name: str) -> None: ...


class SelfReembedding(CollectionManagerLike, Protocol):
    """A manager that re-embeds its collections itself (sharded: each shard's part, switched together)."""

    async def reembed(
        self, name: str, model: str, model_version: str, dim: int, embed: EmbedTexts, progress: bool = True
    ) -> CollectionLike: ...


Collections: TypeAlias = CollectionManager | SelfReembedding
