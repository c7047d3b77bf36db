"""A stand-in for grpc.aio.ServicerContext, so an HTTP route can call a servicer method as gRPC does.

The servicers read metadata, the deadline and set trailers through it; `abort` raises
`Aborted`, which carries the status and its AIP-193 details to the HTTP error mapping.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import NoReturn

import grpc

from .. import status_details
from ..errors import ErrorDetails, Status

Metadata = tuple[tuple[str, str | bytes], ...]


class Aborted(Exception):
    """A servicer ended the call with a status other than OK."""

    def __init__(self, status: Status, details: ErrorDetails, trailing: Metadata) -> None:
        super().__init__(status.message)
        self.status = status
        self.details = details
        self.trailing = trailing


class HttpContext:
    """One HTTP request as a servicer sees it: headers as invocation metadata, an optional deadline."""

    def __init__(self, headers: Iterable[tuple[str, str]], timeout_s: float | None = None) -> None:
        self._metadata = tuple((key.lower(), value) for key, value in headers)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.trailing: Metadata = ()

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self.trailing = tuple(metadata)

    def headers(self) -> dict[str, str]:
        """The trailers a response header can carry (request id, timings): not the binary ones."""
        return {key: value for key, value in self.trailing if isinstance(value, str)}

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> NoReturn:
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        rich = next((v for k, v in self.trailing if k == status_details.DETAILS_KEY and isinstance(v, bytes)), None)
        parsed = status_details.decode(rich) if rich is not None else ErrorDetails(code.name)
        raise Aborted(Status(code, details), parsed, self.trailing)
