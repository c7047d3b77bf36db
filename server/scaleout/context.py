"""Ray Serve's gRPC context seen as the part of `grpc.aio.ServicerContext` our RPC wrapper uses.

How Ray Serve 2.60 answers the client (ray/serve/_private/proxy.py, replica.py, grpc_util.py):
- the proxy copies a replica's context (code, details, trailing metadata) onto the real call only
  together with a response message: on return for unary methods, with each item for streams;
- an exception raised by a deployment method reaches the client as the context's code and details
  (Serve's `gRPCStatusError`) or INTERNAL, and the trailing metadata is dropped.
So `abort` records the status and raises `Aborted`; the gateway answers a unary abort by returning
an empty message with the status set (grpc sends no message with a non-OK status), which keeps
`x-request-id` and `grpc-status-details-bin`. A stream cannot carry trailers past an error: it
re-raises, the client gets the code and message, and `x-request-id` only if an item went out.
The caller's deadline is not forwarded by Serve (its context has no `time_remaining`): a caller
that gives up cancels the call through the proxy instead of being refused early by the batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import Message
from ray.serve.grpc_util import RayServegRPCContext

Metadata = Sequence[tuple[str, str | bytes]]


class Aborted(Exception):
    """The call ended with a status already set on the context (what `context.abort` raises in grpc)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)  # as args: Serve pickles it to the proxy, which rebuilds it from them
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class ServeContext:
    """Adapter over `RayServegRPCContext`: invocation metadata, trailers, abort, and `write` for server streams."""

    def __init__(self, context: RayServegRPCContext) -> None:
        self._context = context
        self.written: asyncio.Queue[Message] = asyncio.Queue()  # what a servicer sent with `write` (health Watch)

    def invocation_metadata(self) -> list[tuple[str, Any]]:
        return list(self._context.invocation_metadata())

    def metadata_value(self, key: str) -> str | None:
        for name, value in self.invocation_metadata():
            if name == key:
                return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
        return None

    def time_remaining(self) -> float | None:
        return None  # Serve 2.60 does not forward the caller's deadline (see the module docstring)

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        # Serve keeps its own `request_id` trailer beside ours; a `-bin` key carries bytes, as in grpc.
        self._context.set_trailing_metadata(cast(list[tuple[str, str]], list(metadata)))

    def trailing_metadata(self) -> list[tuple[str, Any]]:
        return list(self._context.trailing_metadata())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def code(self) -> grpc.StatusCode | None:
        return self._context.code()

    def details(self) -> str | None:
        return self._context.details()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> NoReturn:
        if trailing_metadata:
            self.set_trailing_metadata(trailing_metadata)
        self._context.set_code(code)
        self._context.set_details(details)
        raise Aborted(code, details)

    async def write(self, message: Message) -> None:
        await self.written.put(message)

    def peer(self) -> str:
        return self._context.peer()
