"""Loaded model versions: tokenizer + backend + batcher, warmed up, looked up by name.

This is where a built version becomes servable. The API asks the registry for
a model by name (and optionally version) and never touches files or TOML.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from ..backends.base import Encoder
from ..backends.options import BackendConfig
from ..backends.select import open_encoder
from ..batching import BatcherConfig, BatchStats, DeadlineExceededError, DynamicBatcher
from ..tokenize import TextKind, TextTokenizer, TokenizedText, TokenizerConfig, TokenizingStopped
from ..tracing import DISABLED, Tracing
from .repository import ModelNotFound, ModelRepository, ModelVersion

log = logging.getLogger(__name__)

Held = TypeVar("Held")

INLINE_TOKENIZE_CHARS = 256
"""Requests up to this many characters (a query, a label, a keyword list) are tokenised on the
event loop: 20 us for a label, about 0.15 ms at the bound, less than a thread hand-off costs."""


class NonFiniteEmbeddingError(RuntimeError):
    """The backend returned NaN or infinite vectors (e.g. an fp16 overflow): they must reach no client and no collection."""

    def __init__(self, model: str, version: str, indices: list[int]) -> None:
        shown = indices[:10]
        more = f" and {len(indices) - len(shown)} more" if len(indices) > len(shown) else ""
        super().__init__(
            f"model {model}/{version} produced non-finite vectors for texts {shown}{more}; nothing was returned or stored "
            "(a numeric overflow in the backend: report it, or serve the model in fp32)"
        )
        self.indices = indices


@dataclass(frozen=True)
class EmbedResult:
    normalized: np.ndarray  # float32 [n, dim], unit rows
    pooled: np.ndarray  # float32 [n, dim], before normalisation
    tokens: list[TokenizedText]
    tokenize_s: float
    queue_s: float
    inference_s: float
    batches: int


@dataclass
class LoadedModel:
    version: ModelVersion
    tokenizer: TextTokenizer
    encoder: Encoder
    batcher: DynamicBatcher
    tokenizing: Executor | None = None  # where texts are tokenised; None: the event loop's default executor
    report_nonfinite: Callable[[int], None] | None = None  # told how many texts came out non-finite
    users: int = 0  # embed() calls in progress: a version is unloaded only at zero
    holders: int = 0  # collections being created or re-embedded with this version: never unloaded while > 0
    state: str = "current"
    tracing: Tracing = DISABLED  # tokenise, queue and inference spans of traced requests

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def dim(self) -> int:
        return self.version.dim

    async def embed(self, texts: list[str], kind: TextKind, truncate: bool = True, deadline: float | None = None) -> EmbedResult:
        """Tokenise (a long request in a worker thread, so the loop keeps answering), queue on the batcher, refuse non-finite rows."""
        self.users += 1
        try:
            started = time.perf_counter()
            with self.tracing.span("tokenize", model=self.name, texts=len(texts)):
                tokens = await self._tokenize(texts, kind, truncate, deadline)
            tokenize_s = time.perf_counter() - started
            submitted_ns = time.time_ns()
            result = await self.batcher.submit([t.ids for t in tokens], deadline=deadline)
            self.tracing.batch_stages(submitted_ns, result.queue_s, result.inference_s, result.batches)
        finally:
            self.users -= 1
        normalized, pooled = result.outputs
        self._refuse_non_finite(normalized, pooled)
        return EmbedResult(normalized, pooled, tokens, tokenize_s, result.queue_s, result.inference_s, result.batches)

    async def _tokenize(self, texts: list[str], kind: TextKind, truncate: bool, deadline: float | None) -> list[TokenizedText]:
        """The caller gets DEADLINE_EXCEEDED at its deadline; the worker stops at its next chunk.

        A request of at most INLINE_TOKENIZE_CHARS characters is tokenised on the loop itself:
        tens of microseconds, less than the hand-off to a worker thread and back costs.
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceededError(f"model {self.name}: deadline already passed before tokenising")
        if sum(len(text) for text in texts) <= INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(texts, kind, truncate, precut=True)
        stop = threading.Event()
        job = asyncio.get_running_loop().run_in_executor(
            self.tokenizing,
            lambda: self.tokenizer.encode(texts, kind, truncate, precut=True, deadline=deadline, stop=stop),
        )
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(job, timeout)
        except (TimeoutError, TokenizingStopped) as exc:
            raise DeadlineExceededError(f"model {self.name}: deadline passed while tokenising {len(texts)} texts") from exc
        finally:
            stop.set()

    def _refuse_non_finite(self, normalized: np.ndarray, pooled: np.ndarray) -> None:
        finite = np.isfinite(normalized).all(axis=1) & np.isfinite(pooled).all(axis=1)
        if finite.all():
            return
        indices = np.flatnonzero(~finite).tolist()
        log.error("model %s/%s produced non-finite vectors for %d texts", self.name, self.version.version, len(indices))
        if self.report_nonfinite is not None:
            self.report_nonfinite(len(indices))
        raise NonFiniteEmbeddingError(self.name, self.version.version, indices)


def warm_up(model: LoadedModel) -> None:
    """Run the shapes the server will see first so the first request is not slow."""
    tokenizer = model.tokenizer
    for texts in (["Bonjour"], ["Conducteur / Conductrice de travaux " * 200] * 2):
        tokens = tokenizer.encode(texts, TextKind.PASSAGE, truncate=True)
        width = max(len(t.ids) for t in tokens)
        ids = np.full((len(tokens), width), tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, t in enumerate(tokens):
            ids[row, : len(t.ids)] = t.ids
            mask[row, : len(t.ids)] = 1
        vectors, _ = model.encoder.encode(ids, mask)
        if vectors.shape != (len(texts), model.dim) or not np.all(np.isfinite(vectors)):
            raise RuntimeError(f"model {model.name} warm-up produced {vectors.shape} / non-finite vectors")


class ModelInUse(RuntimeError):
    """Unloading this model would break the default model or a collection."""


class ModelHold(Generic[Held]):
    """Keeps one loaded version from being unloaded while work that will bind a collection to it runs.

    Taken in the same step as the lookup (no await between), so a swap either happens before and
    the hold gets the new version, or after and retirement sees the hold: it keeps the version.
    The registry counted the hold when it made it; `release` hands it back once, however often called.
    """

    def __init__(self, model: Held, release: Callable[[Held], None]) -> None:
        self.model = model
        self._release = release
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.model)

    def __enter__(self) -> Held:
        return self.model

    def __exit__(self, *_: object) -> None:
        self.release()


class ModelRegistry:
    """Loaded versions by (name, version), the current version of each name, and the default name.

    Swaps are atomic for new traffic: `get` reads one dict entry, and nothing awaits between a
    caller's `get` and its `embed`, so once `load` switches `current`, no new request reaches the
    old version; it is unloaded when its in-flight calls reach zero, unless a collection pins it
    or a `hold` keeps it (a collection being created or re-embedded with it).
    """

    DRAIN_POLL_S = 0.05

    def __init__(
        self,
        repository: ModelRepository,
        batching: BatcherConfig,
        backend: BackendConfig,
        default_model: str,
        on_batch=None,
        pinned: Callable[[], set[tuple[str, str]]] | None = None,
        tokenize_threads: int = 2,
        on_nonfinite: Callable[[str, str, int], None] | None = None,
        tracing: Tracing = DISABLED,
    ) -> None:
        self.repository = repository
        self._batching = batching
        self._backend = backend
        self.default_model = default_model
        self._on_batch = on_batch
        self._pinned = pinned or (lambda: set())
        self._on_nonfinite = on_nonfinite
        self._tracing = tracing
        # Shared by every version, so a burst of huge requests cannot take more cores than this from inference.
        self._tokenizing = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="tokenize")
        self._current: dict[str, LoadedModel] = {}
        self._all: dict[tuple[str, str], LoadedModel] = {}
        self._retiring: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    async def load(self, name: str, version: str = "", make_current: bool = True) -> LoadedModel:
        """Load (or reuse) a version, warm it up, then make it current; the old current drains.

        make_current=False only loads it beside the current version (for collections pinned to it).
        """
        async with self._lock:
            built = self.repository.version(name, version) if version else self.repository.latest(name)
            model = self._all.get((name, built.version))
            if model is None:
                loop = asyncio.get_running_loop()
                try:
                    model = await loop.run_in_executor(None, self._open, built)
                except Exception as exc:
                    # Its traceback's frames hold the half-built tokenizer and ONNX session (~250 MB here),
                    # and gRPC keeps an aborted call's exception alive: each failed LoadModel leaked them.
                    traceback.clear_frames(exc.__traceback__)
                    raise
                await model.batcher.start()
                self._all[(name, built.version)] = model
            previous = self._current.get(name)
            if not make_current and previous is not None and previous is not model:
                model.state = "serving"
                return model
            model.state = "current"
            self._current[name] = model  # the switch: new traffic goes to `model` from here on
            if previous is not None and previous is not model:
                self._retire(previous)
            log.info(
                "model ready: %s version %s on %s %s (%s)",
                name,
                built.version,
                model.encoder.info.device,
                model.encoder.info.precision,
                model.encoder.info.detail,
            )
            return model

    def hold(self, name: str = "", version: str = "") -> ModelHold[LoadedModel]:
        """`get`, and keep that version loaded until the hold is released (a context manager)."""
        model = self.get(name, version)
        model.holders += 1
        return ModelHold(model, self._release)

    def _release(self, model: LoadedModel) -> None:
        model.holders -= 1
        key = (model.name, model.version.version)
        swapped_out = self._all.get(key) is model and self._current.get(model.name) is not model
        if model.holders == 0 and swapped_out and model.state != "draining":
            self._retire(model)  # unload it now unless a collection pins it

    def _kept(self, model: LoadedModel) -> bool:
        """Whether a version that is no longer current must stay loaded; says why in the log."""
        key = (model.name, model.version.version)
        if model.holders:
            log.info("model %s/%s stays loaded: a collection is being created or re-embedded with it", *key)
            return True
        if key in self._pinned():
            log.info("model %s/%s stays loaded: a collection holds its vectors", *key)
            return True
        return False

    def _retire(self, model: LoadedModel) -> None:
        if self._kept(model):
            model.state = "serving"
            return
        self._start_draining(model)

    def _start_draining(self, model: LoadedModel) -> None:
        model.state = "draining"
        task = asyncio.get_running_loop().create_task(self._drain_and_close(model))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_and_close(self, model: LoadedModel) -> None:
        while model.users or model.batcher.in_flight:
            await asyncio.sleep(self.DRAIN_POLL_S)
        key = (model.name, model.version.version)
        if self._all.get(key) is model and self._current.get(model.name) is not model:
            if self._kept(model):  # held or pinned while it drained
                model.state = "serving"
                return
            del self._all[key]
            await model.batcher.stop(drain=True)
            model.encoder.close()
            log.info("model %s/%s unloaded after draining", *key)

    async def unload(self, name: str, version: str = "") -> list[str]:
        async with self._lock:
            targets = [m for (n, v), m in self._all.items() if n == name and (not version or v == version)]
            if not targets:
                raise ModelNotFound(
                    f"model {name!r}{' version ' + repr(version) if version else ''} is not loaded",
                    f"{name}/{version}" if version else name,
                )
            pinned = self._pinned()
            for model in targets:
                key = (model.name, model.version.version)
                if name == self.default_model and self._current.get(name) is model:
                    raise ModelInUse(f"{name} is the default model; SetDefault to another model first")
                if key in pinned:
                    raise ModelInUse(f"collections hold vectors of {key[0]}/{key[1]}; drop or re-embed them first")
                if model.holders:
                    raise ModelInUse(f"a collection is being created or re-embedded with {key[0]}/{key[1]}; retry when done")
            for model in targets:
                if self._current.get(name) is model:
                    del self._current[name]
                self._start_draining(model)
            return [m.version.version for m in targets]

    def set_default(self, name: str) -> str:
        if name not in self._current:
            raise ModelNotFound(f"model {name!r} is not loaded; LoadModel it first (loaded: {sorted(self._current)})", name)
        previous, self.default_model = self.default_model, name
        return previous

    def current(self, name: str) -> LoadedModel | None:
        return self._current.get(name)

    def _open(self, built: ModelVersion) -> LoadedModel:
        tokenizer = TextTokenizer(
            built.tokenizer_path, TokenizerConfig(built.max_tokens, built.query_prefix, built.passage_prefix)
        )
        encoder = open_encoder(
            built,
            self.repository.spec(built.name).backend,
            self._backend,
            max_batch=self._batching.max_batch_size,
            pad_id=tokenizer.pad_id,
        )
        config = dataclasses.replace(
            self._batching,
            pad_token_id=tokenizer.pad_id,
            max_batch_tokens=max(self._batching.max_batch_tokens, built.max_tokens),
        )
        batcher = DynamicBatcher(encoder.encode, config, name=f"{built.name}/{built.version}", on_batch=self._stats(built))
        model = LoadedModel(
            built, tokenizer, encoder, batcher, self._tokenizing, self._nonfinite_reporter(built), tracing=self._tracing
        )
        warm_up(model)
        return model

    def _nonfinite_reporter(self, built: ModelVersion) -> Callable[[int], None] | None:
        callback = self._on_nonfinite
        if callback is None:
            return None
        return lambda texts: callback(built.name, built.version, texts)

    def _stats(self, built: ModelVersion):
        if self._on_batch is None:
            return None
        callback = self._on_batch

        def on_batch(stats: BatchStats) -> None:
            callback(built.name, built.version, stats)

        return on_batch

    def get(self, name: str = "", version: str = "") -> LoadedModel:
        name = name or self.default_model
        if version:
            model = self._all.get((name, version))
            if model is None:
                raise ModelNotFound(
                    f"model {name!r} version {version!r} is not loaded (loaded: {self.loaded()})", f"{name}/{version}"
                )
            return model
        model = self._current.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded (loaded: {sorted(self._current)})", name)
        return model

    def models(self) -> list[LoadedModel]:
        return list(self._all.values())

    def loaded(self) -> list[str]:
        return sorted(f"{n}/{v}" for n, v in self._all)

    async def close(self, drain: bool = True) -> None:
        for task in list(self._retiring):
            task.cancel()
        for model in list(self._all.values()):
            await model.batcher.stop(drain=drain)
            model.encoder.close()
        self._all.clear()
        self._current.clear()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
