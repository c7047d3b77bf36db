"""How the Ray Serve application is laid out: cluster, ports, replicas, shards.

Only what differs from one process lives here; everything a request meets (limits, batching,
backend, security) still comes from `ServerConfig`, so both paths answer alike.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_NAME = "openemploi"  # one Serve application: clients need no `application` metadata


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster ("auto", "ray://h:10001", "127.0.0.1:6379"); None: start a local one
    grpc_port: int = 50051  # Serve's gRPC proxy, on every interface of each proxy node; 0 picks a free port
    proxy_every_node: bool = False  # a proxy on each node with replicas (one port per host); False: the head's only
    http_port: int = 0  # Serve's HTTP proxy, the HTTP API when config.http (the CLI: config.http_port); 0: a free port
    embed_replicas: int = 1  # Embedder replicas at start, and the autoscaler's floor
    max_embed_replicas: int = 0  # the autoscaler's ceiling; 0: no autoscaling, embed_replicas fixed
    target_ongoing_requests: float = 4.0  # queue depth per Embedder replica the autoscaler aims at
    num_gpus_per_replica: float = 0.0  # GPUs per Embedder replica (1: one replica per GPU); 0: CPU
    num_cpus_per_replica: float = 0.5  # Ray's logical CPUs per Embedder replica (its threads: config.backend)
    shards: int = 2  # CollectionShard deployments; 0: collections stay in the gateway replica (one host)
    max_ongoing_requests: int = 64  # per replica, for every deployment: beyond, Serve queues in the caller
    gateway_resources: tuple[tuple[str, float], ...] = ()  # Ray resources the gateway needs, e.g. (("head", 1),) to pin it
    embed_retries: int = 1  # an embedding whose replica died is retried this often on another (it is idempotent)
    local_num_cpus: int = 2  # the local cluster's CPUs (when `address` is None)
    local_object_store_bytes: int = 200 * 2**20  # the local cluster's object store (when `address` is None)
    local_temp_dir: str | None = None  # the local cluster's session files (short path: Unix socket names); None: Ray's
    ready_timeout_s: float = 900.0  # deploy() waits this long for SERVING (first start indexes the catalogues)

    def __post_init__(self) -> None:
        if self.shards < 0:
            raise ValueError(f"ray option shards must be 0 (collections in the gateway) or more, got {self.shards}")
        for name in ("embed_replicas", "max_ongoing_requests", "local_num_cpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"ray option {name} must be at least 1, got {getattr(self, name)}")
        if self.max_embed_replicas and self.max_embed_replicas < self.embed_replicas:
            raise ValueError(
                f"max_embed_replicas ({self.max_embed_replicas}) must be 0 (no autoscaling) or at least "
                f"embed_replicas ({self.embed_replicas})"
            )
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"ray option {name} must be a TCP port, got {getattr(self, name)}")
        if self.num_gpus_per_replica < 0 or self.num_cpus_per_replica < 0 or self.embed_retries < 0:
            raise ValueError("num_gpus_per_replica, num_cpus_per_replica and embed_retries cannot be negative")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be positive, got {self.target_ongoing_requests}")
