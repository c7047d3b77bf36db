"""A short fuzz of a live server with the real model: every generated or malformed request
gets OK or a documented status (never INTERNAL/UNKNOWN) and the server keeps answering.

The strategies and the driver live in openemploi.testing (`make fuzz` runs 10,000 calls of them)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from harness import MAX_MESSAGE_BYTES, ServerThread, make_config
from hypothesis import HealthCheck, Phase, given, settings

from openemploi.config import LimitsConfig
from openemploi.testing.fuzz import cases, messages
from openemploi.testing.fuzz_driver import Driver, base_documents, make_context, nested
from openemploi.v1 import embedding_pb2, models_pb2

# the harness's limits, with small query and filter caps so the fuzz reaches past them cheaply
LIMITS = LimitsConfig(
    max_texts_per_request=64, max_message_bytes=MAX_MESSAGE_BYTES, max_text_chars=20_000, stream_window=4,
    max_query_terms=32, max_filter_terms=48,
)  # fmt: skip
CTX = make_context("fuzz-base", LIMITS)
EXAMPLES = 300


@pytest.fixture(scope="module")
def driver(default_version, tmp_path_factory):
    server = ServerThread(make_config(collections_dir=tmp_path_factory.mktemp("collections"), limits=LIMITS))
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


def test_the_strategies_reach_past_the_servers_limits():
    """Maximal hybrid queries, maximal filter lists, non-unit vectors and k at the configured limit are drawn."""
    seen: set[str] = set()

    def filter_values(request) -> int:
        return sum(len(f.values) for f in request.filters) + len(request.skills_all) + len(request.skills_any)

    def off_unit(vector) -> bool:
        norm = float(np.linalg.norm(np.asarray(vector, np.float64)))
        return len(vector) == 384 and np.isfinite(norm) and norm > 0.01 and abs(norm - 1.0) > 0.005

    @settings(max_examples=400, derandomize=True, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(search=messages(CTX)["Search"], upsert=messages(CTX)["Upsert"])
    def draw(search, upsert) -> None:
        if search.hybrid and len(search.text.split()) > LIMITS.max_query_terms:
            seen.add("maximal hybrid query")
        if filter_values(search) > LIMITS.max_filter_terms:
            seen.add("maximal filters")
        if search.k in (LIMITS.max_k, LIMITS.max_k + 1):
            seen.add("k at limits.max_k")
        if any(off_unit(d.vector) for d in upsert.documents):
            seen.add("non-unit vector")

    draw()
    assert seen == {"maximal hybrid query", "maximal filters", "k at limits.max_k", "non-unit vector"}
