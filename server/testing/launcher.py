"""A real server in a child process, on a free port, with its log in a file.

One implementation for tests, benchmarks (bench, loadtest, overload, fuzz, chaos) and anyone who
wants to check a deployment: start, wait for gRPC health SERVING, SIGTERM (drain) or SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now, so that several servers (and their metrics) can run side by side."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_env(collections_dir: Path, extra: Mapping[str, str] | None = None, keep_settings: bool = False) -> dict[str, str]:
    """This environment, plus settings that let several servers coexist.

    No ROME indexing at start (minutes on a CPU), no progress bars, metrics and HTTP on any free port.
    `extra` overrides any of them. The OPENEMPLOI_* keys of this environment are dropped, so that a
    developer's shell cannot change what a test checks, unless `keep_settings` (a benchmark run
    tuned from the shell, e.g. OPENEMPLOI_BATCHING_MAX_BATCH_SIZE or a tokens file).
    """
    env = {k: v for k, v in os.environ.items() if keep_settings or not k.startswith("OPENEMPLOI_")}
    env.update(
        OPENEMPLOI_ROME_COLLECTION="false",
        OPENEMPLOI_PROGRESS="false",
        OPENEMPLOI_COLLECTIONS_DIR=str(collections_dir),
        OPENEMPLOI_LOG_LEVEL="WARNING",
        OPENEMPLOI_HOST=HOST,
        OPENEMPLOI_METRICS_PORT="0",
        OPENEMPLOI_HTTP_PORT="0",
    )
    env.update(extra or {})
    return env


def wait_serving(
    address: str,
    timeout_s: float,
    process: subprocess.Popen[Any] | None = None,
    describe: str = "",
    on_poll: Callable[[], None] | None = None,
    tls_ca: bytes | None = None,
) -> None:
    """Poll gRPC health until SERVING; fail early, with `describe`, if `process` exits first.

    `on_poll` runs between polls: a first start may index for minutes, and a caller can show progress.
    `tls_ca` (PEM): the server speaks TLS with a certificate this CA signed.
    """
    deadline = time.monotonic() + timeout_s
    credentials = None if tls_ca is None else grpc.ssl_channel_credentials(tls_ca)
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with status {process.returncode} before SERVING{describe}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if on_poll is not None:
                on_poll()
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING after {timeout_s:.0f}s{describe}")


def stop_process(process: subprocess.Popen[Any], grace_s: float = 15.0) -> int:
    """SIGTERM (the server drains and snapshots), SIGKILL if it is still there after `grace_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return int(process.returncode)


class ServerProcess:
    """`openemploi serve` on a fresh free port per start, its stdout and stderr in one log file per start.

    `command` defaults to `python -P -m openemploi.cli serve` with this interpreter (`-P`: the working
    directory stays off sys.path, so a checkout's top-level `kernels/` folder cannot shadow the
    `kernels` distribution transformers imports); `--port` is appended. The HTTP API gets a free
    port too (`http_port`), unless `env` names one. `env` and `keep_settings` go to server_env.
    """

    def __init__(
        self,
        collections_dir: Path,
        log_dir: Path | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        keep_settings: bool = False,
        tls_ca: bytes | None = None,
    ) -> None:
        self.collections_dir = Path(collections_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="openemploi-server-logs-"))
        self.cwd = Path(cwd) if cwd is not None else None
        self.extra_env = dict(env or {})
        self.keep_settings = keep_settings
        self.tls_ca = tls_ca  # PEM CA of a TLS server's certificate, for the health checks
        self.command = list(command) if command else [sys.executable, "-P", "-m", "openemploi.cli", "serve"]
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0
        self.starts = 0
        self.log_path: Path | None = None
        self.ready_s = 0.0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> float:
        """Start and wait for SERVING; return the seconds it took. Raises with the server's log tail."""
        if self.alive():
            raise RuntimeError("server already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self.port = free_port()
        self.http_port = int(self.extra_env.get("OPENEMPLOI_HTTP_PORT") or 0) or free_port()
        self.log_path = self.log_dir / f"server-{self.starts:03d}.log"
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [*self.command, "--port", str(self.port)],
                cwd=self.cwd,
                env=server_env(
                    self.collections_dir, {**self.extra_env, "OPENEMPLOI_HTTP_PORT": str(self.http_port)}, self.keep_settings
                ),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_serving(self.address, self.ready_timeout_s, self.process, tls_ca=self.tls_ca)
        except (RuntimeError, TimeoutError) as exc:
            self.kill()
            raise type(exc)(f"{exc}; its log:\n{self.log_tail(60)}") from None
        self.ready_s = time.monotonic() - t0
        return self.ready_s

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty)"

    def kill(self) -> None:
        """SIGKILL: no drain, no snapshot, no close."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM and wait (graceful drain and snapshot); SIGKILL after `grace_s`."""
        if self.process is None:
            return None
        return stop_process(self.process, grace_s)
