"""The Gateway deployment's code on real parts, in one process: no Ray cluster.

Two real Embedder replicas (each its own ModelRegistry on the real model) stand behind a stand-in of
Serve's handle that pickles calls, results and failures as Ray does and spreads calls round-robin;
collections are a local CollectionManager (shards=0). Requests arrive as Serve's proxy hands them
over (a RayServegRPCContext), and what the proxy would send back is read off the raw call.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve")

from grpc_health.v1 import health_pb2
from ray.serve.grpc_util import RayServegRPCContext
from test_context import RawContext

from openemploi.api import status_details
from openemploi.build.build import BuildOptions, build_model
from openemploi.config import ServerConfig, load_config
from openemploi.runtime.repository import ModelRepository
from openemploi.scaleout.context import Aborted
from openemploi.scaleout.embedder import EmbedderReplica
from openemploi.scaleout.gateway import GatewayReplica
from openemploi.scaleout.options import RayOptions
from openemploi.security import append_token
from openemploi.v1 import embedding_pb2, index_pb2, models_pb2

pytestmark = [
    pytest.mark.integration,  # loads the real model, twice
    # Serve awaits `async def __del__` itself; the garbage collector's later call only makes a coroutine.
    pytest.mark.filterwarnings("ignore:coroutine '.*__del__' was never awaited:RuntimeWarning"),
]
E5 = "multilingual-e5-small"
MINILM = "all-minilm-l6-v2"


class LocalEmbedder:
    """`embedder.run.remote(...)` as the gateway calls it: round-robin over replicas, everything pickled."""

    def __init__(self, replicas: list[EmbedderReplica]) -> None:
        self.replicas = replicas
        self.calls: list[int] = []
        self._next = itertools.cycle(range(len(replicas)))
        self.run = self

    def remote(self, method: str, *args: Any) -> Awaitable[Any]:
        index = next(self._next)
        self.calls.append(index)
        return self._call(self.replicas[index], method, pickle.dumps(args))

    async def _call(self, replica: EmbedderReplica, method: str, payload: bytes) -> Any:
        try:
            result = await replica.run(method, *pickle.loads(payload))
        except Exception as exc:
            raise pickle.loads(pickle.dumps(exc)) from None
        return pickle.loads(pickle.dumps(result))


async def start(config: ServerConfig, replicas: int = 2) -> tuple[GatewayReplica, LocalEmbedder]:
    embedders = []
    for _ in range(replicas):
        embedder = EmbedderReplica.__new__(EmbedderReplica)
        await embedder.__init__(config)  # what Serve does with an async constructor
        embedders.append(embedder)
    handle = LocalEmbedder(embedders)
    gateway = GatewayReplica.__new__(GatewayReplica)
    await gateway.__init__(config, RayOptions(shards=0), handle)
    return gateway, handle


async def stop(gateway: GatewayReplica, handle: LocalEmbedder) -> None:
    await gateway.__del__()
    for embedder in handle.replicas:
        await embedder.__del__()


def make_config(tmp_path: Path, repository: ModelRepository, **overrides: Any) -> ServerConfig:
    values = {
        "model_repository": str(repository.root),
        "collections_dir": str(tmp_path / "collections"),
        "rome_collection": False,
        "skills_collection": False,
        "metrics": False,
        "http": False,
        "log_json": False,
        "progress": False,
        **overrides,
    }
    return load_config(env={}, overrides=values)


class Answer:
    """What the proxy sends back for one unary call: the message, or the status with its trailers."""

    def __init__(self, response: Any, raw: RawContext) -> None:
        self.response = response
        self.code = raw.sent_code or grpc.StatusCode.OK
        self.details = raw.sent_details
        self.trailers = dict(raw.sent_trailers)

    def rich(self) -> status_details.ErrorDetails:
        return status_details.decode(self.trailers["grpc-status-details-bin"])


async def unary(gateway: GatewayReplica, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()) -> Answer:
    raw = RawContext(metadata)
    context = RayServegRPCContext(raw)
    response = await getattr(gateway, method)(request, context)
    context._set_on_grpc_context(raw)  # the proxy, with the returned message
    return Answer(response, raw)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_embed_and_refusals_answer_as_one_process(tmp_path: Path, model_repository: ModelRepository, default_version) -> None:
    async def scenario() -> None:
        gateway, handle = await start(make_config(tmp_path, model_repository))
        try:
            await gateway.wait_ready()
            ok = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["Boulanger"]), (("x-request-id", "c-1"),))
            assert ok.code == grpc.StatusCode.OK
            assert (ok.response.dim, ok.response.model_version) == (384, default_version.version)
            assert ok.trailers["x-request-id"] == "c-1"
            assert int(ok.trailers["x-openemploi-batches"]) >= 1

            empty = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(), (("x-request-id", "c-2"),))
            assert (empty.code, empty.details) == (grpc.StatusCode.INVALID_ARGUMENT, "texts is empty: send at least one text")
            assert empty.trailers["x-request-id"] == "c-2"
            assert empty.rich().field == "texts"

            long = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["ok", "mot " * 900], truncate=False))
            assert long.code == grpc.StatusCode.INVALID_ARGUMENT  # TextTooLongError, raised in a replica
            assert (long.rich().reason, long.rich().field) == ("TEXT_TOO_LONG", "texts[1]")

            unknown = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["x"], model="nope"))
            assert unknown.code == grpc.StatusCode.NOT_FOUND
            assert unknown.details == f"model 'nope' is not loaded (loaded: ['{E5}'])"
            assert unknown.rich().resource is not None and unknown.rich().resource.name == "nope"

            health = await unary(gateway, "Check", health_pb2.HealthCheckRequest())
            assert health.response.status == health_pb2.HealthCheckResponse.SERVING
            assert (await unary(gateway, "Check", health_pb2.HealthCheckRequest(service="x"))).code == grpc.StatusCode.NOT_FOUND
            watch = gateway.Watch(health_pb2.HealthCheckRequest(), RayServegRPCContext(RawContext()))
            assert (await anext(watch)).status == health_pb2.HealthCheckResponse.SERVING
            await watch.aclose()  # the caller leaves: the servicer's Watch task is cancelled
            assert set(handle.calls) == {0, 1}  # both replicas served
        finally:
            await stop(gateway, handle)

    run(scenario)


def test_embed_stream_answers_bad_items_in_band_and_stops_at_its_limit(
    tmp_path: Path, model_repository: ModelRepository, default_version
) -> None:
    async def scenario() -> None:
        gateway, handle = await start(make_config(tmp_path, model_repository, **{"limits.max_stream_requests": 3}), 1)

        async def requests() -> AsyncIterator[embedding_pb2.EmbedRequest]:
            for texts in (["un"], [], ["deux"], ["trois"]):
                yield embedding_pb2.EmbedRequest(texts=texts)

        raw = RawContext()
        seen = []
        try:
            await gateway.wait_ready()
            with pytest.raises(Aborted) as aborted:
                async for item in gateway.EmbedStream(requests(), RayServegRPCContext(raw)):
                    seen.append((item.sequence, item.code, item.response.dim))
            assert seen == [(0, 0, 384), (1, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0), (2, 0, 384)]
            assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limits.max_stream_requests" in aborted.value.details
        finally:
            await stop(gateway, handle)

    run(scenario)


def test_tokens_are_checked_from_the_metadata_before_the_servicer(tmp_path: Path, model_repository: ModelRepository) -> None:
    tokens = tmp_path / "tokens.toml"
    reader = append_token(tokens, "reader", ["search", "embed"])

    async def scenario() -> None:
        gateway, handle = await start(make_config(tmp_path, model_repository, **{"security.tokens_file": str(tokens)}), 1)
        try:
            await gateway.wait_ready()
            missing = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["x"]), (("x-request-id", "t-1"),))
            assert missing.code == grpc.StatusCode.UNAUTHENTICATED
            assert (missing.trailers["x-request-id"], missing.rich().reason) == ("t-1", "MISSING_TOKEN")
            auth = (("authorization", f"Bearer {reader}"),)
            denied = await unary(gateway, "LoadModel", models_pb2.LoadModelRequest(name=E5), auth)
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED
            assert denied.details == "token 'reader' lacks scope 'admin', needed for /openemploi.v1.ModelService/LoadModel"
            allowed = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["x"]), auth)
            assert allowed.code == grpc.StatusCode.OK
            probe = await unary(gateway, "Check", health_pb2.HealthCheckRequest())  # health stays open
            assert probe.response.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await stop(gateway, handle)

    run(scenario)


def test_model_service_acts_on_every_replica(tmp_path: Path, model_repository: ModelRepository, default_version) -> None:
    minilm = build_model(model_repository, MINILM, BuildOptions(progress=False))  # reused when built

    async def scenario() -> None:
        gateway, handle = await start(make_config(tmp_path, model_repository))
        try:
            await gateway.wait_ready()
            loaded = await unary(gateway, "LoadModel", models_pb2.LoadModelRequest(name=MINILM))
            assert loaded.response.model.current_version == minilm.version
            for i in range(4):  # each replica meets the new plan on its next call
                answer = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=[f"texte {i}"], model=MINILM))
                assert answer.response.model == MINILM
            for replica in handle.replicas:
                assert f"{MINILM}/{minilm.version}" in replica._registry.loaded()

            default = await unary(gateway, "SetDefault", models_pb2.SetDefaultRequest(name=MINILM))
            assert default.response.previous == E5
            refused = await unary(gateway, "UnloadModel", models_pb2.UnloadModelRequest(name=MINILM))
            assert (refused.code, refused.details) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{MINILM} is the default model; SetDefault to another model first",
            )
            await unary(gateway, "SetDefault", models_pb2.SetDefaultRequest(name=E5))
            created = await unary(gateway, "CreateCollection", index_pb2.CreateCollectionRequest(name="offres", model=E5))
            assert created.code == grpc.StatusCode.OK
            unloaded = await unary(gateway, "UnloadModel", models_pb2.UnloadModelRequest(name=MINILM))
            assert list(unloaded.response.unloaded) == [minilm.version]
            for _ in range(2):
                gone = await unary(gateway, "Embed", embedding_pb2.EmbedRequest(texts=["x"], model=MINILM))
                assert gone.code == grpc.StatusCode.NOT_FOUND
            pinned = await unary(gateway, "SetDefault", models_pb2.SetDefaultRequest(name=MINILM))
            assert pinned.code == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0)
            for replica in handle.replicas:
                await replica.follow(gateway.registry.plan)
                assert all(m.name == E5 or m.state == "draining" for m in replica._registry.models())
            listed = await unary(gateway, "ListModels", models_pb2.ListModelsRequest())
            states = {m.name: [v.state for v in m.versions] for m in listed.response.models}
            assert states[E5] == ["current"] and listed.response.default_model == E5
        finally:
            await stop(gateway, handle)

    run(scenario)


def test_the_http_api_answers_from_the_gateways_servicers(
    tmp_path: Path, model_repository: ModelRepository, default_version
) -> None:
    """What Serve's HTTP proxy hands the gateway (http.py's app): the gRPC answers, the same token checks."""
    tokens = tmp_path / "tokens.toml"
    embedder = append_token(tokens, "embedder", ["embed"])

    async def scenario() -> None:
        gateway, handle = await start(make_config(tmp_path, model_repository, **{"security.tokens_file": str(tokens)}), 1)
        transport = httpx.ASGITransport(app=gateway.__serve_build_asgi_app__())
        auth = {"authorization": f"Bearer {embedder}"}
        try:
            await gateway.wait_ready()
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
                health = await http.get("/health")
                assert (health.status_code, health.json()) == (200, {"status": "SERVING"})
                body = {"input": ["Boulanger", "je fais le pain"], "model": E5, "encoding_format": "float"}
                embedded = await http.post("/v1/embeddings", json=body, headers=auth)
                assert embedded.status_code == 200, embedded.text
                grpc_answer = await unary(
                    gateway,
                    "Embed",
                    embedding_pb2.EmbedRequest(texts=body["input"], kind=embedding_pb2.PASSAGE),
                    (("authorization", f"Bearer {embedder}"),),
                )
                np.testing.assert_array_equal(
                    np.array([item["embedding"] for item in embedded.json()["data"]], dtype=np.float32),
                    np.array([list(e.values) for e in grpc_answer.response.embeddings], dtype=np.float32),
                )
                unknown = await http.post("/v1/embeddings", json={**body, "model": "nope"}, headers=auth)
                assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
                missing = await http.post("/v1/embeddings", json=body)
                assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_token")
                search = {"collection": "offres", "text": "pain", "k": 1}
                denied = await http.post("/openemploi.v1.IndexService/Search", json=search, headers=auth)
                assert denied.status_code == 403
                assert denied.json()["error"]["message"] == (
                    "token 'embedder' lacks scope 'search', needed for /openemploi.v1.IndexService/Search"
                )
                transcoded = await http.post("/openemploi.v1.EmbeddingService/Embed", json={"texts": ["x"]}, headers=auth)
                assert (transcoded.status_code, transcoded.json()["dim"]) == (200, 384)
        finally:
            await stop(gateway, handle)

    run(scenario)
