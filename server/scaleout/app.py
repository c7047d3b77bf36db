"""Build the Serve application `openemploi` and run it: on a local single-node Ray, or on a cluster.

    deployment = deploy(RayOptions(grpc_port=0, shards=2), config)  # blocks until health says SERVING
    ...  # clients talk to deployment.grpc_address, as to `openemploi serve`
    deployment.stop()

One application per Ray cluster: Serve has one gRPC proxy port per cluster.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.serve.config import ProxyLocation, gRPCOptions

from .. import security
from ..config import ConfigError, ServerConfig
from .embedder import embedder_deployment
from .gateway import SERVICER_FUNCTIONS, gateway_deployment
from .options import APP_NAME, RayOptions

log = logging.getLogger(__name__)

ROUTE_POLL_S = 0.1
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # listening everywhere: the address to give is the node's


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def shard_deployments(options: RayOptions, config: ServerConfig) -> list[Any]:
    """CollectionShard0..S-1, each with its own durable store under `config.collections_dir`."""
    if not options.shards:
        return []
    from .shard_replica import shard_deployment

    return [shard_deployment(index, options, config) for index in range(options.shards)]


def build_application(options: RayOptions, config: ServerConfig) -> Any:
    """The bound application: Gateway (ingress) over Embedder and the shards."""
    embedder = embedder_deployment(options, config)
    return gateway_deployment(options, config, embedder, shard_deployments(options, config))


@dataclass
class RayDeployment:
    """The running application; `stop()` deletes it, and shuts down the Ray this process started."""

    grpc_address: str
    http_address: str | None
    models: list[str]
    started_ray: bool

    def stop(self) -> None:
        try:
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def connect(options: RayOptions) -> bool:
    """Join the cluster at `options.address`, or start a small local one; True when this process started Ray."""
    if ray.is_initialized():
        return False
    if options.address is not None:
        ray.init(address=options.address, log_to_driver=False)
        return False
    ray.init(
        num_cpus=options.local_num_cpus,
        include_dashboard=False,
        object_store_memory=options.local_object_store_bytes,
        log_to_driver=False,
        _temp_dir=options.local_temp_dir,
    )
    return True


def check_config(config: ServerConfig) -> None:
    """Refuse what the Ray path cannot honour before anything starts, as start_server refuses bad files."""
    if config.security.tls_cert is not None:
        raise ConfigError(
            "security.tls_cert: Ray Serve's proxies serve plaintext gRPC and HTTP here; terminate TLS in front of them "
            "(a load balancer or proxy) and unset the TLS keys for --ray"
        )
    security.interceptors(config.security)  # a bad tokens file fails here, not in a replica
    unserved = (["metrics"] if config.metrics else []) + (["tracing"] if config.tracing.enabled else [])
    if unserved:
        log.warning("not served through Ray Serve (yet): %s; Ray's dashboard and metrics cover the cluster", ", ".join(unserved))


def deploy(options: RayOptions, config: ServerConfig) -> RayDeployment:
    """Start Serve (gRPC proxy on `options.grpc_port`, the HTTP API on `options.http_port` with
    `config.http`) and the application; returns once it is SERVING on both."""
    check_config(config)
    started = connect(options)
    # Serve's proxy always listens for HTTP too: with the HTTP API off, on a free loopback port, unrouted.
    http_host = config.host if config.http else "127.0.0.1"
    try:
        grpc_port = options.grpc_port or free_port()
        http_port = (options.http_port if config.http else 0) or free_port(http_host)
        serve.start(
            proxy_location=ProxyLocation.EveryNode if options.proxy_every_node else ProxyLocation.HeadOnly,
            http_options={"host": http_host, "port": http_port},
            grpc_options=gRPCOptions(
                port=grpc_port, grpc_servicer_functions=list(SERVICER_FUNCTIONS), enable_reflection=config.reflection
            ),
        )
        handle = serve.run(build_application(options, config), name=APP_NAME, route_prefix="/")
        models: list[str] = handle.wait_ready.remote().result(timeout_s=options.ready_timeout_s)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    host = "127.0.0.1" if started else head_ip()
    http_address = f"{host if http_host in WILDCARD_HOSTS else http_host}:{http_port}" if config.http else None
    deployment = RayDeployment(f"{host}:{grpc_port}", http_address, models, started)
    try:
        wait_routed(deployment.grpc_address, options.ready_timeout_s)
        if http_address is not None:
            wait_http_routed(http_address, options.ready_timeout_s)
    except BaseException:
        deployment.stop()
        raise
    log.info(
        "serving through Ray Serve on gRPC port %d%s (models: %s)",
        grpc_port,
        f", HTTP API on http://{http_address}" if http_address else "",
        ", ".join(models),
    )
    return deployment


def head_ip() -> str:
    """The head node's address: its proxy is the one that always runs."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeManagerAddress"])
    return str(ray.util.get_node_ip_address())


def wait_routed(address: str, timeout_s: float) -> None:
    """Until the proxy routes to the application: it learns the route a moment after serve.run returns."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        answer = "no answer"
        while time.monotonic() < deadline:
            try:
                status = check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                answer = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                answer = f"{exc.code().name}: {exc.details()}"
            time.sleep(ROUTE_POLL_S)
    raise TimeoutError(f"Serve's gRPC proxy at {address} does not route to {APP_NAME} ({answer})")


def wait_http_routed(address: str, timeout_s: float) -> None:
    """Until Serve's HTTP proxy reaches the API (/livez): its routes update apart from the gRPC proxy's."""
    deadline = time.monotonic() + timeout_s
    answer = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}/livez", timeout=5) as reply:
                if reply.status == 200:
                    return
                answer = f"HTTP {reply.status}"
        except urllib.error.HTTPError as exc:
            answer = f"HTTP {exc.code}"
        except OSError as exc:
            answer = str(exc)
        time.sleep(ROUTE_POLL_S)
    raise TimeoutError(f"Serve's HTTP proxy at {address} does not route to {APP_NAME} ({answer})")


async def serve_forever(options: RayOptions, config: ServerConfig) -> None:
    """`openemploi serve --ray`: deploy, then stop on SIGTERM/SIGINT."""
    running = await asyncio.to_thread(deploy, options, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested: deleting the Serve application")
    await asyncio.to_thread(running.stop)
