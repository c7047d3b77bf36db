"""What both clients share: channel credentials and options, per-call metadata, and one call's tries.

The blocking and the asyncio client differ only in how they wait; everything they decide is here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import REQUEST_ID_KEY, OpenEmploiError
from .retry import NO_RETRY, RetryPolicy

DEFAULT_TIMEOUT_S = 30.0  # every call has a deadline unless the caller passes timeout=None
DEFAULT_CHUNK_SIZE = 1024  # texts per Embed request: the server's default limits.max_texts_per_request
# Replies are bounded by the server's own limits; the gRPC default (4 MiB) would refuse 1024 vectors of 1024 floats.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
USER_AGENT = "openemploi-client"


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the server; `client_cert` with `client_key` for mTLS. Bytes are PEM."""

    root_certs: bytes | None = None  # CA bundle to trust; None: the system's roots
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None  # the name to check in the server's certificate, when it differs from the address

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both (mTLS) or neither")

    @classmethod
    def from_files(
        cls,
        root_certs: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(root_certs), read(client_cert), read(client_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certs, self.client_key, self.client_cert)


Tls = TlsConfig | bool | None


def channel_options(tls: Tls) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.primary_user_agent", USER_AGENT),
    ]
    if isinstance(tls, TlsConfig) and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def credentials(tls: Tls) -> grpc.ChannelCredentials | None:
    """None for a plaintext channel; True means TLS with the system's roots."""
    if tls is None or tls is False:
        return None
    return TlsConfig().credentials() if tls is True else tls.credentials()


def call_metadata(token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    auth = (("authorization", f"Bearer {token}"),) if token else ()
    return (*auth, (REQUEST_ID_KEY, request_id))


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return chunk_size


class Deadline:
    """When a client method must be done by, chunks and retries included; None: never."""

    def __init__(self, timeout_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = None if timeout_s is None else clock() + timeout_s

    def remaining(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - self._clock())


class Attempts:
    """The tries of one RPC: the request id every try sends (so the server's logs group them) and the waits between."""

    def __init__(self, policy: RetryPolicy, idempotent: bool, deadline: Deadline, rand: Callable[[], float]) -> None:
        self.policy = policy if idempotent else NO_RETRY
        self.deadline = deadline
        self.request_id = uuid.uuid4().hex
        self.failures = 0
        self._rand = rand

    def next_delay(self, error: OpenEmploiError) -> float | None:
        """Seconds to wait before trying again after `error`, or None to raise it."""
        self.failures += 1
        return self.policy.next_delay(error.code, self.failures, error.retry_delay, self.deadline.remaining(), self._rand())
