"""A real multi-node Ray cluster on this machine: a head and worker nodes started with `ray start`.

    with LocalRayCluster(workers=2) as cluster:
        subprocess.run([..., "--ray-address", cluster.address], env=cluster.env())
        cluster.kill_worker(1)      # SIGKILL that node's raylet and every process it started
        cluster.restart_worker(1)   # the same node (resources label) joins again, as a new Ray node

Each node is one `ray start --block` in its own session, so that its processes (GCS and monitors on the
head, raylet, agents, and the workers the raylet forks, which Ray puts in groups of their own) are known
by parentage, never by name: `ray stop` would stop every Ray on the machine, other clusters included.
Every port is free-picked (Ray's defaults, 8265, 10001, 52365, collide between clusters on one host),
workers take OS-assigned ports, and nodes start one after another: two nodes starting at once in one
session folder pick the same socket names. Each node carries a resource named after it (`worker1`: 1),
so that work can be pinned to a node and a test knows what a kill takes down.

Ray replaces a loopback `--node-ip-address` with the host's routable address (every node still runs
here); clients may use `address` either way. Token authentication is on, with a token of this cluster's
own: the nodes and any driver started with `env()` share it, and no `~/.ray/auth_token` is read.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .launcher import HOST, free_port

ROOT_PREFIX = "oe-ray-"  # /tmp/oe-ray-XXXX: each cluster's folder (token, node logs, Ray's temp dir)
CLUSTER_MARK = "OPENEMPLOI_RAY_CLUSTER"  # in every node's `ray start` environment: `<owner pid>:<folder>`
STARTED_LINE = "Ray runtime started"  # `ray start` prints it once its node is registered with the GCS
START_ATTEMPTS = 3
KILL_WAIT_S = 10.0
STATUS_POLL_S = 2.0
NODE_LINE = re.compile(r"^\s+(\d+) node_[0-9a-f]+\s*$")  # `ray status`: " 1 node_<id>" under Active: or Idle:


@dataclass(frozen=True)
class NodeLimits:
    """What each node offers Ray: small, so that a head and two workers fit 2 cores and a few GiB."""

    num_cpus: int = 1
    memory_bytes: int = 2 * 2**30  # Ray's logical `memory` resource: what replicas may reserve
    object_store_bytes: int = 100 * 2**20  # plasma, in /dev/shm; Ray's floor is 75 MiB


@dataclass
class RayNode:
    """One `ray start --block` and what it started; `label` is both its name and its custom resource."""

    label: str
    head: bool
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_resources: dict[str, float] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The `ray start` process and all its descendants (raylet, agents, Ray workers), now."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def process_titles(self) -> list[str]:
        """What runs on this node, as Ray titles its workers (`ray::ServeReplica:openemploi:Embedder`)."""
        titles = []
        for process in self.processes():
            try:
                titles.append(" ".join(process.cmdline()).strip() or process.name())
            except psutil.Error:
                continue
        return titles

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalRayCluster:
    """A head and `workers` worker nodes of a real Ray cluster on this host; a context manager.

    `stop()` (also at interpreter exit) leaves no process behind: every node's process tree, then any
    process still holding a file of this cluster's folder (a Ray worker orphaned by a killed raylet).
    """

    def __init__(
        self,
        workers: int = 2,
        limits: NodeLimits | None = None,
        ready_timeout_s: float = 120.0,
        log_dir: Path | None = None,
        keep_files: bool = False,
    ) -> None:
        self.limits = limits or NodeLimits()
        self.keep_files = keep_files  # Ray's logs (under `temp_dir`) outlive stop(), to read after a failure
        self.ready_timeout_s = ready_timeout_s
        # Short: Ray's unix socket paths live below it (sun_path is 108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir="/tmp"))
        self.log_dir = Path(log_dir) if log_dir is not None else self.root / "nodes"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.port = 0
        self.head = RayNode("head", True, self.log_dir / "head.log")
        self.workers = [RayNode(f"worker{i}", False, self.log_dir / f"worker{i}.log") for i in range(1, workers + 1)]
        self._stopped = False
        atexit.register(self.stop)

    @property
    def address(self) -> str:
        """The GCS address a node or a driver joins (`ray start --address`, `ray.init(address=...)`)."""
        return f"{HOST}:{self.port}"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def variables(self) -> dict[str, str]:
        """What a driver of this cluster needs in its environment: the auth token, and no other address."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_AUTH_TOKEN": "",  # read before the path: a shell's token for another cluster must not win
            "RAY_ADDRESS": "",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (this environment by default) with `variables()`: for a driver such as `openemploi serve --ray`."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k != CLUSTER_MARK}
        env.update(self.variables())
        return env

    def start(self) -> LocalRayCluster:
        """Head first, then each worker once the previous node has registered with the GCS."""
        reap_orphans()
        try:
            self._start_node(self.head)
            for worker in self.workers:
                self._start_node(worker)
        except BaseException:
            self.stop()
            raise
        return self

    def worker(self, index: int) -> RayNode:
        """Worker `index`, counted from 1 as its label (`worker1`)."""
        return self.workers[index - 1]

    def kill_worker(self, index: int) -> list[str]:
        """SIGKILL worker `index` whole, as a machine that loses power; returns what ran on it (titles)."""
        node = self.worker(index)
        titles = node.process_titles()
        self._kill_node(node)
        return titles

    def restart_worker(self, index: int) -> None:
        """Start worker `index` again (a new Ray node with the same label); kills what is left of it first."""
        node = self.worker(index)
        self._kill_node(node)
        self._start_node(node)

    def alive_nodes(self) -> int:
        """Nodes the GCS counts alive (`ray status`: its Active and Idle lists). A killed node stays in them
        until the GCS's health checks give up on it (seconds), which is when Serve replaces its replicas."""
        status = subprocess.run(
            [self._ray(), "status", "--address", self.address], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if status.returncode != 0:
            raise RuntimeError(f"ray status failed: {status.stderr[-2000:]}")
        return count_alive_nodes(status.stdout)

    def wait_alive_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Until the GCS counts `count` nodes alive; TimeoutError past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{alive} Ray nodes alive after {timeout_s:.0f}s, not {count}")
            time.sleep(STATUS_POLL_S)

    def stop(self) -> None:
        """Kill every node and whatever this cluster started, then remove its folder. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for node in reversed([self.head, *self.workers]):
            self._kill_node(node)
        self._kill_leftovers()
        if not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _ray() -> str:
        """The `ray` command of this interpreter's environment."""
        ray = Path(sys.executable).with_name("ray")
        return str(ray) if ray.exists() else shutil.which("ray") or "ray"

    def _command(self, node: RayNode) -> list[str]:
        command = [
            self._ray(),
            "start",
            "--block",
            "--node-ip-address",
            HOST,
            "--num-cpus",
            str(self.limits.num_cpus),
            "--memory",
            str(self.limits.memory_bytes),
            "--object-store-memory",
            str(self.limits.object_store_bytes),
            "--resources",
            json.dumps({node.label: 1, **node.extra_resources}),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
        ]
        if node.head:
            command += [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard=false",
                "--dashboard-port",
                str(free_port()),
                "--ray-client-server-port",
                str(free_port()),
            ]
        else:
            # One log monitor per machine is enough: the head's reads every node's log folder.
            command += ["--address", self.address, "--include-log-monitor", "false"]
        return command

    def _node_env(self, node: RayNode) -> dict[str, str]:
        env = self.env()
        env[CLUSTER_MARK] = f"{os.getpid()}:{self.root}"
        return env

    def _start_node(self, node: RayNode) -> None:
        """`ray start --block` in a new session; waits for its node to register. Retries a failed start."""
        for attempt in range(1, START_ATTEMPTS + 1):
            node.starts += 1
            if node.head:  # a port that was free a moment ago may not be any more
                self.port = free_port()
            with open(node.log_path, "ab") as log:
                log.write(f"\n--- start {node.starts} ---\n".encode())
                log.flush()
                offset = log.tell()
                node.process = subprocess.Popen(
                    self._command(node),
                    env=self._node_env(node),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_started(node, offset):
                return
            self._kill_node(node)
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"ray node {node.label} did not start ({attempt} attempts); its log:\n{node.log_tail()}")

    def _wait_started(self, node: RayNode, offset: int) -> bool:
        deadline = time.monotonic() + self.ready_timeout_s
        assert node.process is not None
        while time.monotonic() < deadline:
            with open(node.log_path, "rb") as log:
                log.seek(offset)
                if STARTED_LINE.encode() in log.read():
                    return True
            if node.process.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def _kill_node(self, node: RayNode) -> None:
        """SIGSTOP the node's processes first, so its raylet forks no worker between the listing and the kill."""
        processes = node.processes()
        for process in processes:
            _signal(process, signal.SIGSTOP)
        processes = node.processes() or processes
        for process in processes:
            _signal(process, signal.SIGKILL)
        psutil.wait_procs(processes, timeout=KILL_WAIT_S)
        if node.process is not None:
            node.process.wait(timeout=KILL_WAIT_S)

    def _kill_leftovers(self) -> None:
        """Processes outside any node's tree that still hold this cluster's files: orphaned Ray workers."""
        spared = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
        leftovers = [process for process in psutil.process_iter() if process.pid not in spared and _holds(process, self.root)]
        for process in leftovers:
            _signal(process, signal.SIGKILL)
        psutil.wait_procs(leftovers, timeout=KILL_WAIT_S)


def count_alive_nodes(status: str) -> int:
    """The nodes `ray status` lists under Active: and Idle: (" 1 node_<id>" lines)."""
    count, section = 0, ""
    for line in status.splitlines():
        if not line.startswith(" "):
            section = line.strip()
        elif section in ("Active:", "Idle:") and (match := NODE_LINE.match(line)):
            count += int(match.group(1))
    return count


def reap_orphans() -> list[int]:
    """Kill the nodes of clusters whose owner died without `stop()` (a SIGKILLed test run); returns their pids.

    Each node's `ray start` and raylet carry CLUSTER_MARK in their environment (Ray workers retitle
    themselves and lose it, but they are the raylet's children).
    """
    doomed: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            mark = process.environ().get(CLUSTER_MARK)
        except psutil.Error:
            continue
        if not mark:
            continue
        owner, _, folder = mark.partition(":")
        if owner.isdigit() and psutil.pid_exists(int(owner)):
            continue
        try:
            for member in [process, *process.children(recursive=True)]:
                doomed[member.pid] = member
        except psutil.Error:
            continue
        if Path(folder).name.startswith(ROOT_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)
    for process in doomed.values():
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(list(doomed.values()), timeout=KILL_WAIT_S)
    return sorted(doomed)


def _signal(process: psutil.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except psutil.Error:
        pass


def _holds(process: psutil.Process, folder: Path) -> bool:
    """Whether `process` has a file open below `folder` (its log files, for a Ray worker) or works there."""
    prefix = f"{folder}{os.sep}"
    try:
        paths = [opened.path for opened in process.open_files()]
        paths.append(process.cwd())
    except psutil.Error:
        return False
    return any(path.startswith(prefix) for path in paths)
