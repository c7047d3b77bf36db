"""Request checks every servicer shares, so one mistake gets one message whichever RPC it reaches.

Every refusal is INVALID_ARGUMENT and names the offending field, in its message and as the
BadRequest field path; a refusal for a limit also names the config key that sets it, so an
operator knows what to raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message

from openemploi.v1 import index_pb2

from ..config import LimitsConfig
from ..index.text import terms
from .errors import invalid

Filters = tuple[tuple[str, tuple[str, ...]], ...]
# A caller's vector is scored as a cosine by inner product, so it must be unit length. float16 rounding
# moves a unit vector's norm by under 5e-4; anything further is not a normalised vector.
UNIT_NORM_TOLERANCE = 1e-3
Parsed = TypeVar("Parsed", bound=Message)


# -- bytes that did not parse ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unparsed:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8), so the RPC can refuse it."""

    reason: str


def request_parser(message_type: type[Message], strings: str) -> Callable[[bytes], Message | Unparsed]:
    """Parse requests ourselves: gRPC would answer a parse error with INTERNAL, the caller's mistake is INVALID_ARGUMENT.

    `strings` names the fields that must be valid UTF-8, for the refusal.
    """

    def parse(data: bytes) -> Message | Unparsed:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # protobuf raises DecodeError (invalid UTF-8, truncated field...)
            return Unparsed(f"request could not be parsed ({exc}); {strings} must be valid UTF-8")

    return parse


def require_parsed(request: Parsed | Unparsed) -> Parsed:
    if isinstance(request, Unparsed):
        raise invalid(request.reason)
    return request


# -- limits --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """A bound a request must stay within, and the config keys behind it, quoted in the refusal."""

    value: int
    keys: str


def search_k(limits: LimitsConfig) -> Limit:
    return Limit(limits.max_k, "limits.max_k")


def occupation_k(limits: LimitsConfig) -> Limit:
    return Limit(
        min(limits.match_max_k, limits.max_k),
        f"MatchOccupation: at most {limits.match_max_k}, limits.match_max_k; limits.max_k",
    )


def text_chars(limits: LimitsConfig) -> Limit:
    return Limit(limits.max_text_chars, "limits.max_text_chars")


def occupation_text_chars(limits: LimitsConfig) -> Limit:
    return Limit(
        min(limits.match_max_text_chars, limits.max_text_chars),
        f"MatchOccupation: at most {limits.match_max_text_chars}, limits.match_max_text_chars; limits.max_text_chars",
    )


def skills_k(limits: LimitsConfig) -> Limit:
    return Limit(min(limits.skills_max_k, limits.max_k), "limits.skills_max_k; limits.max_k")


def skills_text_chars(limits: LimitsConfig) -> Limit:
    return Limit(min(limits.skills_max_text_chars, limits.max_text_chars), "limits.skills_max_text_chars; limits.max_text_chars")


def check_clause_count(field: str, count: int, limits: LimitsConfig) -> None:
    """Clauses are embedded in one batch: bound them, as texts per request are bounded."""
    if count > limits.skills_max_clauses:
        raise invalid(
            f"{field} splits into {count} clauses and phrases, over the limit of {limits.skills_max_clauses} "
            "(limits.skills_max_clauses); send a shorter text",
            field,
        )


# -- checks --------------------------------------------------------------------------------------------------------


def check_text_count(count: int, limits: LimitsConfig) -> None:
    if count == 0:
        raise invalid("texts is empty: send at least one text", "texts")
    limit = limits.max_texts_per_request
    if count > limit:
        raise invalid(
            f"{count} texts in one request, over the limit of {limit} (limits.max_texts_per_request); split the request",
            "texts",
        )


def check_text_chars(field: str, text: str, limit: Limit) -> None:
    if len(text) > limit.value:
        raise invalid(f"{field} has {len(text)} characters, over the limit of {limit.value} ({limit.keys})", field)


def resolve_k(requested: int, limit: Limit, default: int = 0) -> int:
    """The k to use: `requested`, or `default` where the proto's 0 means "not set" (0 stays invalid without one)."""
    k = requested or default
    if not 1 <= k <= limit.value:
        raise invalid(f"k must be between 1 and {limit.value} ({limit.keys}), got {requested}", "k")
    return k


def resolve_weight(field: str, requested: float, default: float) -> float:
    """A blend weight in [0, 1]: `requested`, or `default` where the proto's 0 means "not set"."""
    weight = requested or default
    if not 0.0 <= weight <= 1.0:
        raise invalid(f"{field} must be within [0, 1], got {requested}", field)
    return weight


def check_ids(ids: Sequence[str], limits: LimitsConfig, required: bool) -> None:
    if required and not ids:
        raise invalid("ids is empty", "ids")
    limit = limits.max_ids_per_request
    if len(ids) > limit:
        raise invalid(f"{len(ids)} ids, over the limit of {limit} (limits.max_ids_per_request)", "ids")


def check_upsert_documents(documents: Sequence[index_pb2.Document], limits: LimitsConfig) -> None:
    """Refuse the whole upsert before any embedding: ids present and unique, a text or a vector each."""
    if not documents:
        raise invalid("documents is empty", "documents")
    limit = limits.max_upsert_documents
    if len(documents) > limit:
        raise invalid(
            f"{len(documents)} documents in one upsert, over the limit of {limit} (limits.max_upsert_documents); split it",
            "documents",
        )
    seen: set[str] = set()
    for i, doc in enumerate(documents):
        if not doc.id:
            raise invalid(f"documents[{i}] has no id", f"documents[{i}].id")
        if doc.id in seen:
            raise invalid(f"documents[{i}]: id {doc.id!r} appears twice in this upsert", f"documents[{i}].id")
        seen.add(doc.id)
        if not doc.vector and not doc.text.strip():
            raise invalid(f"documents[{i}] ({doc.id!r}) needs a text or a vector", f"documents[{i}].text")
        check_text_chars(f"documents[{i}].text", doc.text, text_chars(limits))
        if doc.vector:
            check_unit_vector(f"documents[{i}].vector", doc.vector)


def check_unit_vector(field: str, values: Sequence[float]) -> None:
    """Refuse rather than normalise: a vector off unit length is a client bug (wrong model output, raw
    scores) that normalising would hide, and stored as is it would score its norm times a cosine."""
    norm = float(np.linalg.norm(np.asarray(values, dtype=np.float64)))
    if not np.isfinite(norm):
        raise invalid(f"{field} contains NaN or infinity", field)
    if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
        raise invalid(
            f"{field} has norm {norm:.6g}; vectors must have unit length (1 ± {UNIT_NORM_TOLERANCE:g}): divide it by its norm",
            field,
        )


def parse_filters(filters: Iterable[index_pb2.Filter], limits: LimitsConfig, *skill_lists: Sequence[str]) -> Filters:
    """The metadata filters, with the filtering skill lists counted against limits.max_filter_terms.

    Each value is one SQL condition: some 1,000 would overflow SQLite's expression tree.
    """
    parsed = []
    for i, f in enumerate(filters):
        if not f.field:
            raise invalid("a filter has no field", f"filters[{i}].field")
        if not f.values:
            raise invalid(f"filter on {f.field!r} has no values", f"filters[{i}].values")
        parsed.append((f.field, tuple(f.values)))
    count = sum(len(values) for _, values in parsed) + sum(len(skills) for skills in skill_lists)
    limit = limits.max_filter_terms
    if count > limit:
        raise invalid(f"filters and skills hold {count} values, over the limit of {limit} (limits.max_filter_terms)", "filters")
    return tuple(parsed)


def cap_query_terms(text: str, limits: LimitsConfig) -> str:
    """The lexical side of a query: its first limits.max_query_terms distinct terms, the rest dropped.

    Truncated, not refused, as the dense side truncates a long query to the model's window: a pasted
    CV still searches, without OR-ing thousands of FTS terms. Terms re-parse to themselves.
    """
    return " ".join(terms(text)[: limits.max_query_terms])
