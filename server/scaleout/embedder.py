"""The Embedder deployment: each replica owns a real `ModelRegistry` (the project's batcher and backend).

Replicas read the model repository by path (shared storage or the same checkout on every node),
load `config.models` at start, and follow the gateway's `ModelPlan` (see remote_models.py):
a call carrying a newer plan first brings this replica to it. Serve scales the replicas on
queue depth (`target_ongoing_requests`); with GPUs, each replica takes `num_gpus_per_replica`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from ..config import ServerConfig
from ..logs import configure_logging
from ..runtime.registry import ModelInUse, ModelRegistry
from ..runtime.repository import ModelNotBuilt, ModelNotFound, ModelRepository
from ..tokenize import TextKind
from .options import RayOptions
from .remote_models import Key, LoadedInfo, ModelPlan, WireEmbedding, portable

log = logging.getLogger(__name__)


class EmbedderReplica:
    """One replica: embeds for the gateway, runs ModelService operations as the leader, follows plans."""

    async def __init__(self, config: ServerConfig) -> None:  # type: ignore[misc]  # Serve awaits it: no traffic before the models load
        configure_logging(config.log_level, config.log_json)
        self._pinned: set[Key] = set()
        self._registry = ModelRegistry(
            ModelRepository(config.model_repository),
            config.batching,
            config.backend,
            config.default_model,
            pinned=lambda: self._pinned,
            tokenize_threads=config.limits.tokenize_threads,
        )
        self._generation = -1
        self._lock = asyncio.Lock()  # one plan change at a time; embeds do not take it
        for name in dict.fromkeys((config.default_model, *config.models)):
            await self._registry.load(name)

    def snapshot(self, plan: ModelPlan, generation: int | None = None) -> ModelPlan:
        """This replica's state as a plan (the gateway's first, and the one after each operation)."""
        registry = self._registry
        models = [m for m in registry.models() if m.state != "draining"]
        current = tuple(sorted({(m.name, m.version.version) for m in models if registry.current(m.name) is m}))
        return ModelPlan(
            plan.generation + 1 if generation is None else generation,
            registry.default_model,
            current,
            tuple(LoadedInfo(m.name, m.version.version, m.state, m.encoder.info) for m in models),
            plan.pinned,
        )

    async def follow(self, plan: ModelPlan) -> None:
        """Reconcile with a newer plan: load its versions (current ones made current), unload the others."""
        if plan.generation <= self._generation:
            return
        async with self._lock:
            if plan.generation <= self._generation:
                return
            await self._reconcile(plan)

    async def _reconcile(self, plan: ModelPlan) -> None:
        registry = self._registry
        self._pinned = set(plan.pinned)
        current = set(plan.current)
        try:
            for name, version in plan.current:
                await registry.load(name, version)
            for info in plan.loaded:
                if (info.name, info.version) not in current:
                    await registry.load(info.name, info.version, make_current=False)
        except (ModelNotFound, ModelNotBuilt):
            log.exception("this replica cannot follow model plan %d", plan.generation)
        registry.default_model = plan.default_model
        wanted = plan.keys()
        for model in registry.models():
            key = (model.name, model.version.version)
            if key not in wanted and model.state != "draining":
                try:
                    await registry.unload(*key)
                except (ModelInUse, ModelNotFound) as exc:
                    log.warning("model %s/%s stays loaded on this replica: %s", *key, exc)
        self._generation = plan.generation

    async def run(self, method: str, plan: ModelPlan, *args: Any) -> Any:
        """The gateway's one entry point: `method` after following `plan`; failures made portable."""
        try:
            await self.follow(plan)
            if method == "embed":
                return await self._embed(*args)
            if method == "snapshot":
                return self.snapshot(plan, generation=0)
            if method == "operate":
                return await self._operate(plan, *args)
            raise ValueError(f"unknown Embedder method {method!r}")
        except Exception as exc:
            raise portable(exc) from None

    async def _embed(
        self, name: str, version: str, texts: list[str], kind: TextKind, truncate: bool, remaining_s: float | None
    ) -> WireEmbedding:
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        model = self._registry.get(name, version)
        return WireEmbedding.of(await model.embed(texts, kind, truncate, deadline))

    async def _operate(self, plan: ModelPlan, op: str, *args: Any) -> tuple[Any, ModelPlan]:
        async with self._lock:
            self._pinned = set(plan.pinned)
            registry = self._registry
            result: Any
            if op == "load":
                name, version, make_current = args
                model = await registry.load(name, version, make_current)
                result = (model.name, model.version.version)
            elif op == "unload":
                result = await registry.unload(*args)
            else:
                raise ValueError(f"unknown model operation {op!r}")
            after = self.snapshot(plan)
            self._generation = after.generation
            return result, after

    async def __del__(self) -> None:
        await self._registry.close(drain=True)


def embedder_deployment(options: RayOptions, config: ServerConfig) -> Any:
    """The Embedder deployment of `options`: replicas, GPUs, autoscaling on queue depth."""
    actor: dict[str, Any] = {"num_cpus": options.num_cpus_per_replica}
    if options.num_gpus_per_replica:
        actor["num_gpus"] = options.num_gpus_per_replica
    scaling: dict[str, Any]
    if options.max_embed_replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.embed_replicas,
                "initial_replicas": options.embed_replicas,
                "max_replicas": options.max_embed_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": options.embed_replicas}
    deployment = serve.deployment(
        name="Embedder",
        ray_actor_options=actor,
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=config.grace_period_s,
        **scaling,
    )(EmbedderReplica)
    return deployment.bind(config)
