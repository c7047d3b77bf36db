"""The shared request checks without a server: each refusal names its field and, for a limit, its config key."""

from __future__ import annotations

import grpc
import pytest

from openemploi.api.errors import RequestError
from openemploi.api.validation import (
    Unparsed,
    cap_query_terms,
    check_ids,
    check_text_chars,
    check_text_count,
    check_unit_vector,
    check_upsert_documents,
    occupation_k,
    occupation_text_chars,
    parse_filters,
    request_parser,
    require_parsed,
    resolve_k,
    resolve_weight,
    search_k,
    text_chars,
)
from openemploi.config import LimitsConfig
from openemploi.index.text import terms
from openemploi.v1 import embedding_pb2, index_pb2

LIMITS = LimitsConfig(
    max_texts_per_request=3, max_text_chars=10, max_k=50, max_ids_per_request=2, max_upsert_documents=2,
    match_max_k=20, match_max_text_chars=8,
)  # fmt: skip


def refusal(check, *args, **kwargs) -> str:
    """Run a check that must refuse; return its message."""
    with pytest.raises(RequestError) as info:
        check(*args, **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_bytes_that_are_not_utf8_become_a_refusal_naming_the_strings():
    parse = request_parser(embedding_pb2.EmbedRequest, "texts")
    parsed = parse(b"\x0a\x03\xff\xfe\xfd")  # field 1 (texts), 3 bytes that are not UTF-8
    assert isinstance(parsed, Unparsed)
    message = refusal(require_parsed, parsed)
    assert message.startswith("request could not be parsed (") and message.endswith("; texts must be valid UTF-8")
    request = parse(embedding_pb2.EmbedRequest(texts=["Pâtissière"]).SerializeToString())
    assert list(request.texts) == ["Pâtissière"]
    require_parsed(request)


def test_text_count():
    assert refusal(check_text_count, 0, LIMITS) == "texts is empty: send at least one text"
    assert refusal(check_text_count, 4, LIMITS) == (
        "4 texts in one request, over the limit of 3 (limits.max_texts_per_request); split the request"
    )
    check_text_count(3, LIMITS)


def test_text_chars_count_characters_not_bytes():
    check_text_chars("text", "é" * 10, text_chars(LIMITS))
    assert refusal(check_text_chars, "texts[1]", "é" * 11, text_chars(LIMITS)) == (
        "texts[1] has 11 characters, over the limit of 10 (limits.max_text_chars)"
    )


def test_match_occupation_text_limit_is_the_smaller_of_its_own_and_the_general_one():
    assert occupation_text_chars(LIMITS).value == 8
    assert occupation_text_chars(LimitsConfig(max_text_chars=5, match_max_text_chars=8)).value == 5
    message = refusal(check_text_chars, "text", "x" * 9, occupation_text_chars(LIMITS))
    assert "over the limit of 8" in message
    assert "limits.match_max_text_chars" in message and "limits.max_text_chars" in message


def test_k_defaults_bounds_and_the_key_that_sets_it():
    assert resolve_k(7, search_k(LIMITS)) == 7
    assert resolve_k(0, search_k(LIMITS), default=10) == 10
    assert refusal(resolve_k, 0, search_k(LIMITS)) == "k must be between 1 and 50 (limits.max_k), got 0"
    assert refusal(resolve_k, -4, search_k(LIMITS), default=10) == "k must be between 1 and 50 (limits.max_k), got -4"
    assert refusal(resolve_k, 51, search_k(LIMITS)) == "k must be between 1 and 50 (limits.max_k), got 51"


def test_match_occupation_k_names_both_keys():
    assert occupation_k(LIMITS).value == 20
    assert occupation_k(LimitsConfig(max_k=10)).value == 10
    assert resolve_k(0, occupation_k(LIMITS), default=5) == 5
    message = refusal(resolve_k, 21, occupation_k(LIMITS), default=5)
    assert message == "k must be between 1 and 20 (MatchOccupation: at most 20, limits.match_max_k; limits.max_k), got 21"


def test_weights_are_within_zero_and_one():
    assert resolve_weight("dense_weight", 0.0, 0.7) == 0.7
    assert resolve_weight("dense_weight", 1.0, 0.7) == 1.0
    for bad in (-0.5, 1.5, float("nan")):
        assert refusal(resolve_weight, "skill_weight", bad, 0.3).startswith("skill_weight must be within [0, 1], got ")


def test_ids():
    check_ids([], LIMITS, required=False)
    assert refusal(check_ids, [], LIMITS, required=True) == "ids is empty"
    assert refusal(check_ids, ["a", "b", "c"], LIMITS, required=False) == (
        "3 ids, over the limit of 2 (limits.max_ids_per_request)"
    )


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([], "documents is empty"),
        ([index_pb2.Document(id=f"d{i}", text="x") for i in range(3)], "(limits.max_upsert_documents); split it"),
        ([index_pb2.Document(text="sans id")], "documents[0] has no id"),
        ([index_pb2.Document(id="d", text="a"), index_pb2.Document(id="d", text="b")], "documents[1]: id 'd' appears twice"),
        ([index_pb2.Document(id="vide", text="  ")], "documents[0] ('vide') needs a text or a vector"),
        ([index_pb2.Document(id="long", text="x" * 11)], "documents[0].text has 11 characters"),
    ],
    ids=["empty", "too-many", "no-id", "twice", "no-text-or-vector", "too-long"],
)
def test_upsert_documents(documents, message):
    assert message in refusal(check_upsert_documents, documents, LIMITS)


def test_a_document_with_only_a_vector_is_fine():
    check_upsert_documents([index_pb2.Document(id="v", vector=[0.6, 0.8])], LIMITS)


@pytest.mark.parametrize("vector", [[6.0, 8.0], [0.06, 0.08], [0.0, 0.0], [0.6, 0.802]], ids=["10x", "tenth", "zero", "off"])
def test_a_vector_that_is_not_unit_length_is_refused_not_scored_as_a_cosine(vector):
    message = refusal(check_upsert_documents, [index_pb2.Document(id="v", vector=vector)], LIMITS)
    assert message.startswith("documents[0].vector has norm ") and "unit length (1 ± 0.001)" in message
    assert refusal(check_unit_vector, "vector", vector).startswith("vector has norm ")


def test_a_vector_within_the_tolerance_is_fine_and_nan_is_named():
    check_unit_vector("vector", [0.6, 0.8005])
    assert refusal(check_unit_vector, "vector", [float("nan"), 1.0]) == "vector contains NaN or infinity"


def test_filters():
    filters = [index_pb2.Filter(field="ville", values=["Paris", "Lyon"]), index_pb2.Filter(field="contrat", values=["CDI"])]
    assert parse_filters(filters, LIMITS) == (("ville", ("Paris", "Lyon")), ("contrat", ("CDI",)))
    assert refusal(parse_filters, [index_pb2.Filter(values=["Paris"])], LIMITS) == "a filter has no field"
    assert refusal(parse_filters, [index_pb2.Filter(field="ville")], LIMITS) == "filter on 'ville' has no values"


def test_filter_values_and_filtering_skills_together_stay_under_max_filter_terms():
    limits = LimitsConfig(max_filter_terms=4)
    filters = [index_pb2.Filter(field="ville", values=["Paris", "Lyon"])]
    assert parse_filters(filters, limits, ["python"], ["sql"]) == (("ville", ("Paris", "Lyon")),)
    assert refusal(parse_filters, filters, limits, ["python"], ["sql", "git"]) == (
        "filters and skills hold 5 values, over the limit of 4 (limits.max_filter_terms)"
    )
    assert "(limits.max_filter_terms)" in refusal(parse_filters, [index_pb2.Filter(field="v", values=["x"] * 5)], limits)


def test_a_long_query_keeps_its_first_max_query_terms_distinct_terms():
    text = "Le boulanger, la boulangère et le pâtissier ; boulanger pâtissier de nuit"
    assert cap_query_terms(text, LimitsConfig(max_query_terms=3)) == "boulanger boulangere patissier"
    assert cap_query_terms(text, LimitsConfig(max_query_terms=3)) == cap_query_terms(text * 1000, LimitsConfig(max_query_terms=3))
    assert terms(cap_query_terms(text, LIMITS)) == terms(text)  # under the cap: the same lexical query
