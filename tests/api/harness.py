"""A real server on its own event-loop thread, for tests that use blocking stubs."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import shutil
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export import SpanExporter

from openemploi.app import RunningServer, start_server
from openemploi.config import LimitsConfig, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "multilingual-e5-small"
MAX_MESSAGE_BYTES = 256 * 1024


class ServerThread:
    """A server on its own event loop thread, so tests can use plain blocking stubs."""

    def __init__(self, config: ServerConfig, span_exporter: SpanExporter | None = None) -> None:
        self.batch_sizes: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(config, on_batch=self._record, span_exporter=span_exporter))
        self.address = f"127.0.0.1:{self.running.port}"

    def _record(self, model: str, version: str, stats) -> None:
        self.batch_sizes.append(stats.size)

    def call(self, coro, timeout: float = 900.0):  # first start may index the ROME catalogue
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        self.call(self.running.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def make_config(**changes) -> ServerConfig:
    collections_dir = Path(tempfile.mkdtemp(prefix="openemploi-test-"))
    atexit.register(shutil.rmtree, collections_dir, True)
    base = ServerConfig(
        port=0,
        rome_collection=False,
        metrics_port=0,
        http_port=0,
        progress=False,
        collections_dir=collections_dir,
        model_repository=REPO_ROOT / "models",
        default_model=DEFAULT_MODEL,
        models=(DEFAULT_MODEL,),
        limits=LimitsConfig(
            max_texts_per_request=64, max_message_bytes=MAX_MESSAGE_BYTES, max_text_chars=20_000, stream_window=4
        ),
    )
    return dataclasses.replace(base, **changes)


def expect(call, code: grpc.StatusCode) -> str:
    """Run a stub call that must fail with `code`; return the status details."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()
