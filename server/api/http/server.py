"""uvicorn on the running event loop (gRPC's), started and stopped with the server.

Signals stay with the process (serve_forever drains both protocols on SIGTERM), so uvicorn's
own handlers are never installed. TLS uses the gRPC server's certificate and client CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

from ...config import SecurityConfig

START_POLL_S = 0.01


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, security: SecurityConfig) -> None:
        self._config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ssl_certfile=security.tls_cert,
            ssl_keyfile=security.tls_key,
            ssl_ca_certs=security.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if security.tls_client_ca is not None else ssl.CERT_NONE,
        )
        self._host, self._port = host, port
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def tls(self) -> bool:
        return self._config.is_ssl

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Inherited by accepted connections. asyncio only sets it on sockets made with proto=IPPROTO_TCP;
            # without it h11's separate header and body writes wait out the client's delayed ACK (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot listen on {self._host}:{self._port} for HTTP (http_port): {exc.strerror or exc}") from exc
        return sock

    async def start(self) -> int:
        """Listen and serve; returns the bound port. A bad certificate raises here, before anything listens."""
        self._config.load()
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="openemploi-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(START_POLL_S)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish within `grace` seconds, then close connections."""
        if self._task is None:
            return
        self._config.timeout_graceful_shutdown = max(math.ceil(grace), 0)  # uvicorn takes whole seconds
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5.0)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
        self._task = None
