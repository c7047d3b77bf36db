"""OpenAI-compatible routes: POST /v1/embeddings and GET /v1/models.

`input` is embedded as a passage unless `input_type` (our extension) says "query": the gRPC
default too, and what a RAG framework's indexing side needs. Vectors are the gRPC Embed ones,
float32, unit length; `encoding_format: "base64"` sends each as little-endian float32 bytes.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from openemploi.v1 import embedding_pb2, models_pb2

from .calls import invoke, read_json, request_id
from .errors import HttpError, bad_request, render
from .services import HttpServices

EMBED = "/openemploi.v1.EmbeddingService/Embed"
LIST_MODELS = "/openemploi.v1.ModelService/ListModels"
INPUT_TYPES: Mapping[str, int] = MappingProxyType({"passage": embedding_pb2.PASSAGE, "query": embedding_pb2.QUERY})
ENCODINGS = ("float", "base64")
PARAM_NAMES = MappingProxyType({"texts": "input"})  # our field names in errors, as the caller named them


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and value and all(isinstance(item, (int, list)) for item in value):
        raise bad_request(
            "input holds token ids: this server tokenises itself, send the texts (a string or a list of strings)", "input"
        )
    raise bad_request("input must be a string or a list of strings", "input")


def _embed_request(body: Any) -> tuple[embedding_pb2.EmbedRequest, str]:
    """The gRPC request for an OpenAI body, and the encoding the answer wants."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object with at least 'input' and 'model'", None)
    if "input" not in body:
        raise bad_request("input is missing: the text, or a list of texts, to embed", "input")
    if body.get("dimensions") is not None:
        raise bad_request(
            "dimensions is not supported: each model's vectors come at their full size (see GET /v1/models); "
            "leave dimensions out",
            "dimensions",
        )
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise bad_request("model must be a string: one of GET /v1/models", "model")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    input_type = body.get("input_type") or "passage"
    if input_type not in INPUT_TYPES:
        raise bad_request(f"input_type must be 'query' or 'passage', got {input_type!r}", "input_type")
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise bad_request("truncate must be true or false", "truncate")
    request = embedding_pb2.EmbedRequest(
        texts=_texts(body["input"]),
        model=model,
        kind=INPUT_TYPES[input_type],  # type: ignore[arg-type]
        truncate=truncate,
        encoding=embedding_pb2.RAW_FLOAT32,
    )
    return request, encoding


async def embeddings(services: HttpServices, request: Request) -> Response:
    rid = request_id(request)
    try:
        message, encoding = _embed_request(await read_json(request, services.limits.max_message_bytes))
        response, context = await invoke(services, request, EMBED, message, rid)
    except HttpError as exc:
        exc.headers.setdefault("x-request-id", rid)
        return render(exc, PARAM_NAMES)
    vectors = np.frombuffer(response.raw_float32, dtype="<f4").reshape(len(message.texts), response.dim)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(row.tobytes()).decode("ascii") if encoding == "base64" else row.tolist(),
        }
        for i, row in enumerate(vectors)
    ]
    usage = {"prompt_tokens": response.total_tokens, "total_tokens": response.total_tokens}
    body = {"object": "list", "data": data, "model": response.model, "usage": usage}
    return JSONResponse(body, headers=context.headers())


def _created(built_at: str) -> int:
    try:
        return int(datetime.datetime.fromisoformat(built_at).timestamp())
    except ValueError:
        return 0


async def models(services: HttpServices, request: Request) -> Response:
    """The loaded models, as OpenAI lists them; `id` is what `model` takes."""
    rid = request_id(request)
    try:
        response, context = await invoke(services, request, LIST_MODELS, models_pb2.ListModelsRequest(), rid)
    except HttpError as exc:
        exc.headers.setdefault("x-request-id", rid)
        return render(exc)
    data = []
    for model in response.models:
        if not model.current_version:
            continue
        current = next((v for v in model.versions if v.version == model.current_version), None)
        created = _created(current.built_at) if current is not None else 0
        data.append({"id": model.name, "object": "model", "created": created, "owned_by": "openemploi"})
    return JSONResponse({"object": "list", "data": data}, headers=context.headers())
