"""The gateway's adapter from Ray Serve's gRPC context to our RPC wrapper, and what crosses to replicas.

No cluster: Ray's own `RayServegRPCContext` over a recording stand-in of grpc's server context, which
is what Serve's proxy builds it from and copies it back onto (`_set_on_grpc_context`).
"""

from __future__ import annotations

import asyncio
import pickle

import grpc
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from ray.serve.exceptions import gRPCStatusError
from ray.serve.grpc_util import RayServegRPCContext

from openemploi.api import rpc, status_details
from openemploi.api.errors import details_for, invalid, status_for
from openemploi.batching.errors import DeadlineExceededError, OverloadedError
from openemploi.runtime.registry import EmbedResult, NonFiniteEmbeddingError
from openemploi.runtime.repository import ModelNotBuilt, ModelNotFound
from openemploi.scaleout.context import Aborted, ServeContext
from openemploi.scaleout.remote_models import (
    ModelPlan,
    RemoteError,
    RemoteRegistry,
    ReplicaFailure,
    WireEmbedding,
    portable,
)
from openemploi.tokenize import TextTooLongError, TokenizedText
from openemploi.v1 import embedding_pb2


class RawContext:
    """What Serve's proxy reads a call from and writes the replica's answer to (grpc's _ServicerContext)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.sent_code: grpc.StatusCode | None = None
        self.sent_details = ""
        self.sent_trailers: list[tuple[str, object]] = []

    def auth_context(self) -> dict:
        return {}

    def code(self) -> grpc.StatusCode | None:
        return self.sent_code

    def details(self) -> str:
        return self.sent_details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def trailing_metadata(self) -> list:
        return []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.sent_code = code

    def set_details(self, details: str) -> None:
        self.sent_details = details

    def set_trailing_metadata(self, metadata: list) -> None:
        self.sent_trailers = list(metadata)

    def set_compression(self, compression: object) -> None:
        pass


class Servicer:
    """Two RPCs written as every servicer of ours is: one answers, one refuses."""

    @rpc.unary
    async def Good(self, request: embedding_pb2.EmbedRequest, call: rpc.Call) -> embedding_pb2.EmbedResponse:
        call.extra_trailing_metadata.append(("x-openemploi-batches", "1"))
        return embedding_pb2.EmbedResponse(dim=3)

    @rpc.unary
    async def Bad(self, request: embedding_pb2.EmbedRequest, call: rpc.Call) -> embedding_pb2.EmbedResponse:
        raise invalid("texts is empty: send at least one text", field="texts")


def serve_call(metadata: tuple[tuple[str, str], ...] = ()) -> tuple[RayServegRPCContext, ServeContext, RawContext]:
    raw = RawContext(metadata)
    ray_context = RayServegRPCContext(raw)
    ray_context.set_trailing_metadata([("request_id", "serve-id")])  # what Serve's proxy adds to every call
    return ray_context, ServeContext(ray_context), raw


def test_a_refusal_reaches_the_caller_with_its_status_details_and_request_id() -> None:
    ray_context, context, raw = serve_call((("x-request-id", "caller-42"),))
    with pytest.raises(Aborted):
        asyncio.run(Servicer().Bad(embedding_pb2.EmbedRequest(), context))
    ray_context._set_on_grpc_context(raw)  # the proxy, once the gateway returned its empty message
    assert raw.sent_code == grpc.StatusCode.INVALID_ARGUMENT
    assert raw.sent_details == "texts is empty: send at least one text"
    trailers = dict(raw.sent_trailers)
    assert trailers["x-request-id"] == "caller-42"
    assert trailers["request_id"] == "serve-id"
    details = status_details.decode(trailers["grpc-status-details-bin"])
    assert (details.reason, details.field) == ("INVALID_ARGUMENT", "texts")


def test_a_success_sends_the_request_id_and_the_bodys_trailers() -> None:
    ray_context, context, raw = serve_call()
    response = asyncio.run(Servicer().Good(embedding_pb2.EmbedRequest(texts=["a"]), context))
    ray_context._set_on_grpc_context(raw)
    assert response.dim == 3
    assert raw.sent_code is None  # grpc's default: OK
    trailers = dict(raw.sent_trailers)
    assert len(trailers["x-request-id"]) == 32  # a fresh id when the caller sent none
    assert trailers["x-openemploi-batches"] == "1"


def test_the_caller_deadline_is_unknown_to_the_gateway() -> None:
    _, context, _ = serve_call((("x-request-id", "r" * 500),))
    call = rpc.Call.begin("Embed", context)  # type: ignore[arg-type]
    assert call.deadline is None
    assert call.request_id == "r" * rpc.MAX_REQUEST_ID_CHARS


def test_an_abort_survives_the_trip_to_the_proxy() -> None:
    """Serve pickles a stream's failure (wrapped in gRPCStatusError) back to the proxy: it must rebuild."""
    aborted = Aborted(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
    wrapped = pickle.loads(pickle.dumps(gRPCStatusError(aborted, aborted.code, aborted.details)))
    assert wrapped.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(wrapped.original_exception, Aborted)
    assert wrapped.original_exception.details == "missing bearer token"


DOMAIN_ERRORS: list[Exception] = [
    TextTooLongError(3, 700, 512),
    OverloadedError("queue too long", estimated_wait_s=2.5, limit_s=1.0),
    DeadlineExceededError("deadline passed while tokenising 4 texts"),
    NonFiniteEmbeddingError("m", "v1", [0, 2]),
    ModelNotFound("model 'x' is not loaded (loaded: [])", "x"),
    ModelNotBuilt("model 'y' has no built version", "y"),
    ValueError("a bug of ours"),
]


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=lambda e: type(e).__name__)
def test_a_replica_failure_gets_the_status_it_gets_in_one_process(error: Exception) -> None:
    travelled = pickle.loads(pickle.dumps(portable(error)))
    local = travelled.local() if isinstance(travelled, ReplicaFailure) else travelled
    assert status_for(local) == status_for(error)
    assert details_for(local) == details_for(error)
    assert str(local) == str(error)  # LoadModel quotes it in its FAILED_PRECONDITION message
    if isinstance(error, (ModelNotFound, ModelNotBuilt)):
        assert type(local) is type(error)  # ModelServicer.LoadModel branches on these types
        assert local.resource_name == error.resource_name
    elif isinstance(travelled, ReplicaFailure):
        assert isinstance(local, RemoteError)


def test_an_embedding_crosses_without_its_token_ids() -> None:
    vectors = np.eye(2, 4, dtype=np.float32)
    tokens = [TokenizedText(np.arange(5), 5, False), TokenizedText(np.arange(512), 900, True)]
    result = EmbedResult(vectors, vectors * 2, tokens, 0.1, 0.2, 0.3, 1)
    back = pickle.loads(pickle.dumps(WireEmbedding.of(result))).result()
    assert [len(t.ids) for t in back.tokens] == [5, 512]
    assert [(t.original_tokens, t.truncated) for t in back.tokens] == [(5, False), (900, True)]
    np.testing.assert_array_equal(back.pooled, vectors * 2)
    assert (back.tokenize_s, back.queue_s, back.inference_s, back.batches) == (0.1, 0.2, 0.3, 1)


def test_an_unknown_model_is_refused_as_the_local_registry_refuses_it(model_repository) -> None:
    from openemploi.backends.options import BackendConfig
    from openemploi.batching import BatcherConfig
    from openemploi.runtime.registry import ModelRegistry

    async def unreachable(*_: object) -> object:
        raise AssertionError("lookups never leave the gateway")

    remote = RemoteRegistry(model_repository, unreachable, plan=ModelPlan(0, "multilingual-e5-small", (), ()))
    local = ModelRegistry(model_repository, BatcherConfig(), BackendConfig(), "multilingual-e5-small")
    for args in (("nope",), ("nope", "v1"), ()):
        with pytest.raises(ModelNotFound) as remote_error:
            remote.get(*args)
        with pytest.raises(ModelNotFound) as local_error:
            local.get(*args)
        assert str(remote_error.value) == str(local_error.value)
        assert remote_error.value.resource_name == local_error.value.resource_name
    with pytest.raises(ModelNotFound) as remote_error:
        remote.set_default("nope")
    with pytest.raises(ModelNotFound) as local_error:
        local.set_default("nope")
    assert str(remote_error.value) == str(local_error.value)
