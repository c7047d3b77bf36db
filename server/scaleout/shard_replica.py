"""The CollectionShard deployments, and the gateway's `ShardBackend` to them over Ray Serve.

How the application uses it (app.py, gateway.py):

    shards = [shard_deployment(i, options, config) for i in range(options.shards)]  # CollectionShard0..S-1
    Gateway.bind(..., *shards)  # each arrives in the gateway replica as a DeploymentHandle
    manager = ShardedCollectionManager([RayShardBackend(handle) for handle in handles])  # shards.py

Replica i owns a real CollectionManager on `<collections_dir>/shard-<i>` (shard_service.py): one replica
per shard, since two processes must never write one store (a file lock makes a replacement wait for the
old one to exit). Serve restarts a replica that died; it reopens the same folder, so what it acknowledged
is served again. The folder is read by path on whichever node runs the replica: on a cluster, put
`collections_dir` on storage each node sees at the same path, or keep the shards on one node.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import RayServeException

from .. import kernels
from ..config import ServerConfig
from ..index.collection import ShardUnavailable
from ..logs import configure_logging
from .options import RayOptions
from .shard_service import Reply, ShardService, invoke

SHARD_CPUS = 0.1  # SQLite commits and short FAISS scans: the embedders are the ones that need whole CPUs
CALL_TIMEOUT_S = 90.0  # past the re-embedding fence (shards.FENCE_HOLD_S) a write may wait behind
# What a call meets when its shard's replica, process or node is gone, or Serve cannot reach it in time.
UNREACHABLE = (RayActorError, NodeDiedError, WorkerCrashedError, ObjectLostError, RayServeException, TimeoutError)


class CollectionShard:
    """One shard's replica: every call runs `shard_service.invoke` on a thread of its own."""

    def __init__(self, root: str, index: int, threads: int, log_level: str, log_json: bool) -> None:
        configure_logging(log_level, log_json)
        self._service = ShardService(Path(root) / f"shard-{index}")
        # A thread per call Serve lets in: writes waiting behind a re-embedding fence never starve its own calls.
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="openemploi-shard")
        kernels.warm_up()  # the replica is ready only once a search would not compile them

    async def call(self, method: str, args: tuple[Any, ...]) -> Reply:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, invoke, self._service, method, args)

    def __del__(self) -> None:
        self._threads.shutdown(wait=True)
        self._service.close()


def shard_deployment(index: int, options: RayOptions, config: ServerConfig) -> Any:
    """CollectionShard<index>, bound: pass it to the gateway's bind, where it arrives as a DeploymentHandle."""
    deployment = serve.deployment(  # typed as the decorator it is: applied, it gives the Deployment
        name=f"CollectionShard{index}",
        num_replicas=1,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": SHARD_CPUS},
        graceful_shutdown_timeout_s=config.grace_period_s,
    )(CollectionShard)
    root = str(Path(config.collections_dir).resolve())
    return deployment.bind(root, index, options.max_ongoing_requests + 4, config.log_level, config.log_json)


class RayShardBackend:
    """`shards.ShardBackend` over a CollectionShard handle. Blocking calls, as the servicers' work pool
    runs them; one made on an event loop thread (a bootstrap, a cache miss) waits on a thread of its own,
    since Serve refuses to block a loop."""

    def __init__(self, handle: Any, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self._name = str(handle.deployment_id.name)  # not getattr: a handle answers any name with a method handle
        self._call = handle.call
        self._timeout_s = timeout_s
        self._offload = ThreadPoolExecutor(8, thread_name_prefix="openemploi-shard-call")

    def submit(self, method: str, *args: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _Pending(self, method, self._send(method, args))
        future: Future[Any] = self._offload.submit(lambda: _Pending(self, method, self._send(method, args)).result())
        return future

    def _send(self, method: str, args: tuple[Any, ...]) -> Any:
        try:
            return self._call.remote(method, args)
        except UNREACHABLE as exc:
            raise self.unavailable(method, exc) from exc

    def unavailable(self, method: str, exc: BaseException) -> ShardUnavailable:
        return ShardUnavailable(
            f"{self._name} did not answer {method} ({type(exc).__name__}); retry: what it acknowledged is on its disk, "
            "and an upsert or delete that may have been applied can be sent again"
        )

    def close(self) -> None:
        self._offload.shutdown(wait=False)


class _Pending:
    def __init__(self, backend: RayShardBackend, method: str, response: Any) -> None:
        self._backend, self._method, self._response = backend, method, response

    def result(self) -> Any:
        try:
            reply: Reply = self._response.result(timeout_s=self._backend._timeout_s)
        except UNREACHABLE as exc:
            raise self._backend.unavailable(self._method, exc) from exc
        return reply.unwrap()
