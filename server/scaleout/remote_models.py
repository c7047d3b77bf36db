"""The gateway's stand-in for `ModelRegistry`/`LoadedModel`, backed by the Embedder replicas.

Model state (what is loaded, which version is current, the default, the pinned versions) is a
`ModelPlan` the gateway owns and numbers. A ModelService call runs on one replica's real registry
(the leader for that call), so its errors and messages are the single-process ones; the replica's
resulting state becomes the next plan. Every call to a replica carries the current plan, and a
replica behind it reconciles (loads, swaps, unloads) before serving: every replica, including
ones the autoscaler starts later, acts on each LoadModel/UnloadModel/SetDefault.
Serve's `user_config` + `reconfigure()` was the alternative: changing it means redeploying the
application from inside a request (imperative deploys restart replicas whose version is not
pinned), and a failed reconfigure marks the replica unhealthy instead of answering the RPC.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np

from ..api.errors import RequestError, Resource, details_for, status_for
from ..backends.base import EncoderInfo
from ..runtime.registry import EmbedResult, ModelHold, ModelInUse
from ..runtime.repository import ModelNotBuilt, ModelNotFound, ModelRepository, ModelVersion
from ..tokenize import TextKind, TokenizedText

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model name, version)


@dataclass(frozen=True)
class LoadedInfo:
    """One loaded version as a replica reports it (ModelService's ListModels shows these)."""

    name: str
    version: str
    state: str
    encoder: EncoderInfo


@dataclass(frozen=True)
class ModelPlan:
    """What every Embedder replica serves: numbered, so a replica knows when it is behind."""

    generation: int
    default_model: str
    current: tuple[Key, ...]  # the version new traffic of each name goes to
    loaded: tuple[LoadedInfo, ...]  # every version kept loaded, current ones included
    pinned: frozenset[Key] = frozenset()  # versions holding collections' vectors or held by indexing

    def keys(self) -> set[Key]:
        return {(i.name, i.version) for i in self.loaded}


@dataclass(frozen=True)
class WireEmbedding:
    """An `EmbedResult` without the token ids, which only their counts leave the replica for."""

    normalized: np.ndarray
    pooled: np.ndarray
    token_counts: tuple[int, ...]
    original_tokens: tuple[int, ...]
    truncated: tuple[bool, ...]
    tokenize_s: float
    queue_s: float
    inference_s: float
    batches: int

    @classmethod
    def of(cls, result: EmbedResult) -> WireEmbedding:
        tokens = result.tokens
        return cls(
            result.normalized,
            result.pooled,
            tuple(len(t.ids) for t in tokens),
            tuple(t.original_tokens for t in tokens),
            tuple(t.truncated for t in tokens),
            result.tokenize_s,
            result.queue_s,
            result.inference_s,
            result.batches,
        )

    def result(self) -> EmbedResult:
        tokens = [
            TokenizedText(np.empty(count, np.int64), original, cut)
            for count, original, cut in zip(self.token_counts, self.original_tokens, self.truncated, strict=True)
        ]
        return EmbedResult(self.normalized, self.pooled, tokens, self.tokenize_s, self.queue_s, self.inference_s, self.batches)


class ReplicaFailure(Exception):
    """A replica's failure in a form that survives pickling: its status, details and text, as computed there.

    Domain errors with their own constructor arguments (TextTooLongError, QueueFullError...) do not
    unpickle, so the replica answers with what the gateway's RPC wrapper would have made of them.
    """

    def __init__(self, kind: str, code: str, message: str, text: str, details: dict[str, Any]) -> None:
        super().__init__(kind, code, message, text, details)
        self.kind, self.code, self.message, self.text, self.details = kind, code, message, text, details

    @classmethod
    def of(cls, exc: Exception) -> ReplicaFailure:
        status, details = status_for(exc), details_for(exc)
        resource = details.resource
        return cls(
            type(exc).__name__,
            status.code.name,
            status.message,
            str(exc),
            {
                "reason": details.reason,
                "field": details.field,
                "resource": (resource.type, resource.name) if resource else None,
                "retry_after_s": details.retry_after_s,
                "resource_name": getattr(exc, "resource_name", ""),
            },
        )

    def local(self) -> Exception:
        """The exception the servicer would have seen in one process: same type where a servicer branches on it."""
        if self.kind in ("ModelNotFound", "ModelNotBuilt"):
            cls = ModelNotFound if self.kind == "ModelNotFound" else ModelNotBuilt
            return cls(self.text, self.details["resource_name"])
        if self.kind == "ModelInUse":
            return ModelInUse(self.text)
        resource = self.details["resource"]
        return RemoteError(
            grpc.StatusCode[self.code],
            self.message,
            self.text,
            reason=self.details["reason"],
            field=self.details["field"],
            resource=Resource(*resource) if resource else None,
            retry_after_s=self.details["retry_after_s"],
        )


class RemoteError(RequestError):
    """A replica's failure re-raised in the gateway: its status as the replica computed it; str() its own text."""

    def __init__(self, code: grpc.StatusCode, message: str, text: str, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.text = text

    def __str__(self) -> str:
        return self.text


def portable(exc: Exception) -> Exception:
    """What a replica raises for `exc`: itself when it survives pickling, else a ReplicaFailure."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:
        return ReplicaFailure.of(exc)
    if type(copy) is not type(exc) or str(copy) != str(exc) or isinstance(exc, (ModelNotFound, ModelNotBuilt)):
        return ReplicaFailure.of(exc)
    return exc


def unwrap(exc: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapping (RayTaskError keeps it as `cause`)."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 8:
        exc = exc.cause  # type: ignore[attr-defined]
        seen += 1
    return exc


class RemoteEncoder:
    """`LoadedModel.encoder` as ModelService reads it: only `info`."""

    def __init__(self, info: EncoderInfo) -> None:
        self.info = info

    def close(self) -> None:
        pass


# Calls an Embedder method on one replica: (method name, *args) -> result; raises the replica's exception.
ReplicaCall = Callable[..., Any]


class RemoteModel:
    """A loaded version served by the Embedder replicas; `embed` is the only call that leaves the gateway."""

    def __init__(self, registry: RemoteRegistry, version: ModelVersion, info: LoadedInfo) -> None:
        self.version = version
        self.encoder = RemoteEncoder(info.encoder)
        self.state = info.state
        self._registry = registry

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def dim(self) -> int:
        return self.version.dim

    async def embed(self, texts: list[str], kind: TextKind, truncate: bool = True, deadline: float | None = None) -> EmbedResult:
        # Monotonic clocks differ between hosts: the replica gets the time left, not our deadline.
        remaining = None if deadline is None else deadline - time.monotonic()
        wire: WireEmbedding = await self._registry.call(
            "embed", self.name, self.version.version, list(texts), kind, truncate, remaining, retry=True
        )
        return wire.result()


@dataclass
class RemoteRegistry:
    """The parts of `ModelRegistry` the servicers and the catalogue bootstrap use, over the Embedder deployment.

    `call(method, *args)` reaches one replica, the plan prepended; the replica's failures come back
    as the exceptions the servicers expect. `pinned` returns the collections' model versions.
    """

    repository: ModelRepository
    replica_call: ReplicaCall
    pinned: Callable[[], set[Key]] = field(default=lambda: set())
    retries: int = 1
    retryable: tuple[type[BaseException], ...] = ()  # a dead or unreachable replica: try another
    plan: ModelPlan = field(default_factory=lambda: ModelPlan(-1, "", (), ()))
    held: Counter[Key] = field(default_factory=Counter)
    _models: dict[Key, RemoteModel] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _retiring: set[asyncio.Task] = field(default_factory=set)

    async def call(self, method: str, *args: Any, retry: bool = False) -> Any:
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return await self.replica_call(method, self.plan, *args)
            except Exception as exc:
                inner = unwrap(exc)
                if isinstance(inner, ReplicaFailure):
                    raise inner.local() from None
                if isinstance(exc, self.retryable) or isinstance(inner, self.retryable):
                    if attempt + 1 < attempts:
                        log.warning("embedding replica lost (%s); retrying on another", type(exc).__name__)
                        continue
                    raise RequestError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"no embedding replica answered ({type(exc).__name__}); retry with backoff",
                        reason="REPLICA_UNAVAILABLE",
                    ) from None
                if inner is not exc and isinstance(inner, Exception):
                    raise inner from None
                raise
        raise AssertionError("unreachable")

    async def start(self) -> None:
        """Take the state the replicas started with (config.models) as plan 0."""
        self.publish(await self.call("snapshot"))

    def publish(self, plan: ModelPlan) -> None:
        self.plan = plan
        known = {(i.name, i.version): i for i in plan.loaded}
        for key in list(self._models):
            if key not in known:
                del self._models[key]
        for key, info in known.items():
            model = self._models.get(key)
            if model is None:
                self._models[key] = RemoteModel(self, self.repository.version(*key), info)
            else:  # keep the object: callers compare models by identity (one batch for one version)
                model.state, model.encoder = info.state, RemoteEncoder(info.encoder)

    @property
    def default_model(self) -> str:
        return self.plan.default_model

    def _current(self) -> dict[str, RemoteModel]:
        return {name: self._models[(name, version)] for name, version in self.plan.current}

    def get(self, name: str = "", version: str = "") -> RemoteModel:
        name = name or self.default_model
        if version:
            model = self._models.get((name, version))
            if model is None:
                raise ModelNotFound(
                    f"model {name!r} version {version!r} is not loaded (loaded: {self.loaded()})", f"{name}/{version}"
                )
            return model
        current = self._current()
        found = current.get(name)
        if found is None:
            raise ModelNotFound(f"model {name!r} is not loaded (loaded: {sorted(current)})", name)
        return found

    def current(self, name: str) -> RemoteModel | None:
        return self._current().get(name)

    def models(self) -> list[RemoteModel]:
        return list(self._models.values())

    def loaded(self) -> list[str]:
        return sorted(f"{n}/{v}" for n, v in self._models)

    def hold(self, name: str = "", version: str = "") -> ModelHold[RemoteModel]:
        """While held, every replica keeps the version loaded (it is in the plan's pins)."""
        model = self.get(name, version)
        self.held[(model.name, model.version.version)] += 1
        return ModelHold(model, self.release)

    def release(self, model: RemoteModel) -> None:
        key = (model.name, model.version.version)
        self.held[key] -= 1
        if self.held[key] > 0:
            return
        del self.held[key]
        if self.current(model.name) is not model and key in self._models:
            task = asyncio.get_running_loop().create_task(self._retire(key))  # swapped out while held: unload it now
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, key: Key) -> None:
        if key in await asyncio.to_thread(self.pinned):
            return  # a collection holds its vectors
        try:
            await self.unload(*key)
        except (ModelInUse, ModelNotFound, RequestError) as exc:
            log.info("model %s/%s stays loaded: %s", *key, exc)

    async def _operate(self, op: str, *args: Any) -> Any:
        """Run `op` on one replica's registry under the current pins; its resulting state is the next plan."""
        pinned = await asyncio.to_thread(self.pinned)  # may ask the shards: off the event loop
        async with self._lock:
            self.plan = replace(self.plan, pinned=frozenset(pinned) | frozenset(self.held))
            result, plan = await self.call("operate", op, *args)
            self.publish(plan)
            return result

    async def load(self, name: str, version: str = "", make_current: bool = True) -> RemoteModel:
        loaded = await self._operate("load", name, version, make_current)
        return self._models[loaded]

    async def unload(self, name: str, version: str = "") -> list[str]:
        result: list[str] = await self._operate("unload", name, version)
        return result

    def set_default(self, name: str) -> str:
        current = self._current()
        if name not in current:
            raise ModelNotFound(f"model {name!r} is not loaded; LoadModel it first (loaded: {sorted(current)})", name)
        previous = self.default_model
        self.plan = replace(self.plan, generation=self.plan.generation + 1, default_model=name)
        return previous
