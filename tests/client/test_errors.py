"""Failed calls become one exception per status, with the server's AIP-193 details as fields."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from openemploi.client import Client, FieldViolation, InvalidArgument, NotFound, OpenEmploiError, ResourceInfo, RetryPolicy
from openemploi.client.errors import ERROR_BY_CODE

from .scripted import ScriptedServer, bad_text, status

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_has_its_own_exception_class(code):
    cls = ERROR_BY_CODE[code]
    assert issubclass(cls, OpenEmploiError)
    assert cls.__name__.upper() == code.name.replace("_", "")


# -- the standard details, as any AIP-193 server sends them --------------------------------------------------------


@pytest.fixture(scope="module")
def scripted():
    running = ScriptedServer()
    yield running
    running.stop()


@pytest.fixture
def scripted_client(scripted):
    with Client(scripted.address, retry=NO_RETRY) as client:
        yield client


def test_a_bad_request_names_the_field_and_the_reason(scripted, scripted_client):
    script = scripted.fail_with(bad_text(1))
    with pytest.raises(InvalidArgument) as info:
        scripted_client.embed(["court", "trop long"])
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message == "texts[1] is too long"
    assert error.field_violations == [FieldViolation("texts[1]", "over 512 tokens")]
    assert (error.reason, error.domain, error.metadata) == ("TEXT_TOO_LONG", "openemploi", {"limit": "512"})
    assert error.retry_delay is None and error.resource is None
    assert error.request_id == script.received[0].metadata["x-request-id"]  # the id this client sent
    assert error.request_id in str(error)


def test_not_found_names_the_resource(scripted, scripted_client):
    resource = error_details_pb2.ResourceInfo(
        resource_type="collection", resource_name="offres", description="no such collection"
    )
    scripted.fail_with(status(code_pb2.NOT_FOUND, "collection offres not found", resource))
    with pytest.raises(NotFound) as info:
        scripted_client.create_collection("offres")
    assert info.value.resource == ResourceInfo("collection", "offres", "", "no such collection")
    assert info.value.field_violations == []


def test_a_status_without_details_still_raises_its_class(scripted, scripted_client):
    scripted.fail_with(status(code_pb2.FAILED_PRECONDITION, "no catalogue"))
    with pytest.raises(OpenEmploiError) as info:
        scripted_client.embed("Boulanger")
    assert type(info.value).__name__ == "FailedPrecondition" and info.value.message == "no catalogue"
    assert (info.value.field_violations, info.value.reason, info.value.resource) == ([], "", None)


# -- the live server -----------------------------------------------------------------------------------------------


def test_the_live_server_names_the_text_over_the_token_limit(client):
    with pytest.raises(InvalidArgument) as info:
        client.embed(["Boulanger", "pain " * 2000])
    assert [v.field for v in info.value.field_violations] == ["texts[1]"]
    assert info.value.reason == "TEXT_TOO_LONG"
    assert info.value.request_id


def test_the_live_server_names_the_missing_collection(client):
    name = f"absente-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotFound) as info:
        client.search(name, text="Boulanger")
    assert info.value.resource is not None
    assert (info.value.resource.resource_type, info.value.resource.resource_name) == ("collection", name)
    assert info.value.reason == "COLLECTION_NOT_FOUND"
