"""Python client for openemploi: typed results, numpy vectors, retries and deadlines by default.

Needs only the public protos (`openemploi.v1`), grpcio, grpcio-status and numpy, never the server's code:

    from openemploi.client import Client, TextKind

    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["Boulanger"], kind=TextKind.QUERY)  # numpy float32, 1 x dim
"""

from .aio import AsyncClient
from .connection import DEFAULT_TIMEOUT_S, TlsConfig
from .convert import MalformedResponse
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OpenEmploiError,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ResourceInfo,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .retry import RetryPolicy
from .sync import Client
from .types import (
    CollectionInfo,
    Document,
    Embeddings,
    ExtractedSkill,
    Fusion,
    GetResult,
    IndexKind,
    IndexSpec,
    ModelInfo,
    ModelVersionInfo,
    Needs,
    Occupation,
    OccupationMatch,
    OccupationSkill,
    ProfileMatch,
    SearchHit,
    TextKind,
    Transition,
    UpsertResult,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "CollectionInfo",
    "DataLoss",
    "DeadlineExceeded",
    "Document",
    "Embeddings",
    "ExtractedSkill",
    "FailedPrecondition",
    "FieldViolation",
    "Fusion",
    "GetResult",
    "IndexKind",
    "IndexSpec",
    "Internal",
    "InvalidArgument",
    "MalformedResponse",
    "ModelInfo",
    "ModelVersionInfo",
    "Needs",
    "NotFound",
    "Occupation",
    "OccupationMatch",
    "OccupationSkill",
    "OpenEmploiError",
    "OutOfRange",
    "PermissionDenied",
    "ProfileMatch",
    "ResourceExhausted",
    "ResourceInfo",
    "RetryPolicy",
    "SearchHit",
    "TextKind",
    "TlsConfig",
    "Transition",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UpsertResult",
]
