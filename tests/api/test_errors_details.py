"""AIP-193 details on every refusal: the table's reasons, and what a client reads from a live server."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import ServerThread, make_config

from openemploi.api import rpc, status_details
from openemploi.api.errors import STATUS_BY_ERROR, ErrorDetails, Resource, details_for, invalid, not_found, status_for
from openemploi.api.validation import check_text_count, check_unit_vector, resolve_k, search_k
from openemploi.batching import OverloadedError, QueueFullError
from openemploi.config import LimitsConfig
from openemploi.index.collection import CollectionNotFound
from openemploi.runtime.repository import ModelNotFound
from openemploi.tokenize import TextTooLongError
from openemploi.v1 import embedding_pb2 as epb
from openemploi.v1 import embedding_pb2_grpc as epb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

# --------------------------------------------------------------------------- the table's details


def test_every_row_has_a_stable_upper_snake_reason():
    reasons = [rule.reason for rule in STATUS_BY_ERROR.values()]
    assert all(reason.isupper() and " " not in reason for reason in reasons)
    assert len(set(reasons)) == len(reasons)


def test_an_overload_carries_the_admission_estimate_as_its_retry_delay():
    details = details_for(OverloadedError("estimated queue wait 80 ms exceeds 25 ms", 0.08, 0.025))
    assert details == ErrorDetails("OVERLOADED", retry_after_s=0.08)
    assert details_for(QueueFullError("queue full")).retry_after_s is None  # no estimate: none is made up


def test_not_found_names_the_resource_and_too_long_names_the_text():
    assert details_for(ModelNotFound("no model 'camembert'", "camembert")).resource == Resource("model", "camembert")
    assert details_for(CollectionNotFound("no 'jobs'", "jobs")).resource == Resource("collection", "jobs")
    assert details_for(TextTooLongError(3, 600, 512)).field == "texts[3]"
    assert details_for(not_found("no ROME code 'Z9999'", "rome_code", "Z9999")) == ErrorDetails(
        "ROME_CODE_NOT_FOUND", resource=Resource("rome_code", "Z9999")
    )


def test_an_unknown_error_is_internal_with_nothing_more():
    assert details_for(KeyError("secret")) == ErrorDetails("INTERNAL")


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (lambda limits: check_text_count(0, limits), "texts"),
        (lambda limits: resolve_k(0, search_k(limits)), "k"),
        (lambda limits: check_unit_vector("documents[2].vector", [2.0, 0.0]), "documents[2].vector"),
    ],
)
def test_validation_refusals_carry_their_field_path(check, field):
    with pytest.raises(Exception) as info:
        check(LimitsConfig())
    assert details_for(info.value).field == field


def test_the_rich_status_round_trips_with_the_plain_status():
    error = invalid("texts[1] has 9 characters, over the limit of 4 (limits.max_text_chars)", "texts[1]")
    status, details = status_for(error), details_for(error)
    rich = status_details.rich_status(status, details)
    assert (rich.code, rich.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], status.message)
    assert status_details.decode(rich.SerializeToString()) == details
    retry = ErrorDetails("OVERLOADED", retry_after_s=0.25, resource=Resource("model", "e5"))
    assert status_details.decode(status_details.encode(status, retry)) == retry


# --------------------------------------------------------------------------- from a live server


def unpack(error: grpc.RpcError) -> dict[str, object]:
    """The details of a refusal as a client reads them (grpc_status.rpc_status.from_call), by type name."""
    rich = rpc_status.from_call(error)
    assert rich is not None, "no grpc-status-details-bin trailer"
    assert rich.code == error.code().value[0] and rich.message == error.details()
    found: dict[str, object] = {}
    for packed in rich.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RetryInfo,
        ):
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                found[cls.__name__] = message
    assert found["ErrorInfo"].domain == "openemploi.v1"  # type: ignore[attr-defined]
    return found


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def server(default_version):
    config = make_config()
    running = ServerThread(
        dataclasses.replace(config, limits=dataclasses.replace(config.limits, index_workers=1, max_index_queue=1))
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def test_a_text_over_the_limit_is_a_field_violation(channel):
    stub = epb_grpc.EmbeddingServiceStub(channel)
    error = refused(lambda: stub.Embed(epb.EmbedRequest(texts=["court", "x" * 20_001]), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "texts[1] has 20001 characters" in error.details()
    details = unpack(error)
    assert details["ErrorInfo"].reason == "INVALID_ARGUMENT"
    (violation,) = details["BadRequest"].field_violations
    assert violation.field == "texts[1]" and violation.description == error.details()


def test_a_text_over_the_token_limit_names_its_index(channel):
    stub = epb_grpc.EmbeddingServiceStub(channel)
    error = refused(lambda: stub.Embed(epb.EmbedRequest(texts=["court", "court", "mot " * 1000], truncate=False), timeout=60))
    details = unpack(error)
    assert details["ErrorInfo"].reason == "TEXT_TOO_LONG"
    assert details["BadRequest"].field_violations[0].field == "texts[2]"


def test_an_unknown_model_or_collection_is_a_resource_info(channel):
    embed = epb_grpc.EmbeddingServiceStub(channel)
    model = unpack(refused(lambda: embed.Embed(epb.EmbedRequest(texts=["a"], model="camembert"), timeout=30)))
    assert model["ErrorInfo"].reason == "MODEL_NOT_FOUND"
    assert (model["ResourceInfo"].resource_type, model["ResourceInfo"].resource_name) == ("model", "camembert")
    index = ipb_grpc.IndexServiceStub(channel)
    collection = unpack(refused(lambda: index.Search(ipb.SearchRequest(collection="offres", text="x", k=1), timeout=30)))
    assert collection["ErrorInfo"].reason == "COLLECTION_NOT_FOUND"
    assert (collection["ResourceInfo"].resource_type, collection["ResourceInfo"].resource_name) == ("collection", "offres")


def fill_index_pool(server: ServerThread) -> tuple[threading.Event, list]:
    """Occupy every slot of the server's index pool (1 worker + 1 queued) until the event is set."""
    release = threading.Event()
    pool = server.running.index_pool
    call = rpc.Call("test", "fill", None)
    futures = [asyncio.run_coroutine_threadsafe(pool.run(call, release.wait, 60), server._loop) for _ in range(2)]
    for _ in range(2000):
        if pool.in_flight == 2:
            break
        threading.Event().wait(0.005)
    assert pool.in_flight == 2
    return release, futures


def test_a_full_index_pool_says_when_to_retry(server, channel):
    release, futures = fill_index_pool(server)
    try:
        index = ipb_grpc.IndexServiceStub(channel)
        error = refused(lambda: index.ListCollections(ipb.ListCollectionsRequest(), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry with backoff" in error.details()
        details = unpack(error)
        assert details["ErrorInfo"].reason == "INDEX_POOL_FULL"
        assert details["RetryInfo"].retry_delay.ToNanoseconds() >= rpc.MIN_RETRY_S * 1e9
    finally:
        release.set()
        for future in futures:
            future.result(30)
