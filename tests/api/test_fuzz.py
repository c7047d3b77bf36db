"""A short fuzz of a live server with the real model: every generated or malformed request
gets OK or a documented status (never INTERNAL/UNKNOWN) and the server keeps answering.

The strategies and the driver live in openemploi.testing (`make fuzz` runs 10,000 calls of them)."""

from __future__ import annotations

import grpc
import pytest
from harness import ServerThread, make_config
from hypothesis import HealthCheck, given, settings

from openemploi.testing.fuzz import cases
from openemploi.testing.fuzz_driver import Driver, base_documents, make_context, nested
from openemploi.v1 import embedding_pb2, models_pb2

CTX = make_context("fuzz-base")
EXAMPLES = 300


@pytest.fixture(scope="module")
def driver(default_version, tmp_path_factory):
    server = ServerThread(make_config(collections_dir=tmp_path_factory.mktemp("collections")))
    driver = Driver(server.address)
    driver.prepare(CTX, base_documents(CTX))
    yield driver
    driver.close()
    server.stop()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=cases(CTX))
def test_every_answer_is_a_documented_status(driver, case):
    driver.send(case)  # raises fuzz_driver.Violation (shrunk by hypothesis) on INTERNAL, UNKNOWN, ...
    assert not driver.report.dead, driver.report.dead


def test_server_still_answers_the_same_after_the_fuzz(driver):
    """Runs after the property above (file order): same vector for a known text, health SERVING."""
    assert driver.report.tried >= EXAMPLES // 2, "the fuzz above did not run"
    driver.finish()
    assert driver.report.final_check.startswith("ok"), driver.report.final_check
    seen = {code for _, code in driver.report.counts}
    # the fuzz reached the work, not only the validation: some calls succeeded, some were refused
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= seen, driver.report.table()
    assert not driver.report.bad, driver.report.table()


def test_invalid_utf8_in_a_nested_string_is_invalid_argument(driver):
    """Bytes no client library would send: invalid UTF-8 in documents[0].metadata key."""
    payload = nested((1,), CTX.base.encode()) + nested((2, 4, 1), b"ville\xff")
    with pytest.raises(grpc.RpcError) as info:
        driver.calls["Upsert"](payload, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "UTF-8" in info.value.details()


@pytest.mark.parametrize("alias", ["./multilingual-e5-small", "multilingual-e5-small/", "../models/multilingual-e5-small"])
def test_load_model_refuses_a_path_that_names_a_model_folder(driver, alias):
    """A name that is a path would load another copy of a model (memory) or a folder outside the
    repository: only the repository's own model names load."""
    with pytest.raises(grpc.RpcError) as info:
        driver.calls["LoadModel"](models_pb2.LoadModelRequest(name=alias).SerializeToString(), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # nothing was loaded under that name
        driver.calls["Embed"](embedding_pb2.EmbedRequest(texts=["Boulanger"], model=alias).SerializeToString(), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
