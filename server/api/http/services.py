"""What the HTTP API shares with gRPC: the servicers, health, the token guard, the limits, the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from grpc_health.v1 import health

from ...config import LimitsConfig
from ...metrics import Metrics
from ...security import AuthInterceptor
from ..rpc import Registered


@dataclass(frozen=True)
class HttpServices:
    services: Mapping[str, Registered]  # as registered on the gRPC server, by full name: "openemploi.v1.MatchService"
    health: health.aio.HealthServicer
    guard: AuthInterceptor | None  # None: no tokens file, every route open
    limits: LimitsConfig
    metrics: Metrics
