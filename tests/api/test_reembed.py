"""Re-embedding a collection with another model while it is written to, then switching."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from harness import ServerThread, make_config

from openemploi.build.build import BuildOptions, build_model
from openemploi.v1 import embedding_pb2 as pb
from openemploi.v1 import embedding_pb2_grpc as pb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc

E5 = "multilingual-e5-small"
MINILM = "all-minilm-l6-v2"
JOBS = [
    "boulanger",
    "cariste",
    "infirmière",
    "maçon",
    "comptable",
    "serveuse",
    "plombier",
    "électricienne",
    "chauffeur",
    "vendeuse",
]


@pytest.fixture(scope="module")
def server(default_version, model_repository, tmp_path_factory):
    build_model(model_repository, MINILM, BuildOptions(progress=False))
    running = ServerThread(make_config(collections_dir=tmp_path_factory.mktemp("reembed"), models=(E5, MINILM)))
    yield running
    running.stop()


def test_reembed_switches_models_and_keeps_every_write(server):
    with grpc.insecure_channel(server.address) as channel:
        index = ipb_grpc.IndexServiceStub(channel)
        embed = pb_grpc.EmbeddingServiceStub(channel)
        index.CreateCollection(ipb.CreateCollectionRequest(name="offres", model=E5), timeout=30)
        docs = [ipb.Document(id=f"d{i}", text=f"Offre {i} : {JOBS[i % 10]} à Lyon", metadata={"n": str(i)}) for i in range(300)]
        for start in range(0, 300, 100):
            index.Upsert(ipb.UpsertRequest(collection="offres", documents=docs[start : start + 100]), timeout=120)
        job = index.Reembed.future(ipb.ReembedRequest(collection="offres", model=MINILM), timeout=600)
        # writes while the job runs (or just before / after it: the end state must be the same)
        index.Upsert(
            ipb.UpsertRequest(
                collection="offres",
                documents=[ipb.Document(id=f"new{i}", text=f"Nouvelle offre de {JOBS[i]}") for i in range(10)],
            ),
            timeout=60,
        )
        index.Delete(ipb.DeleteRequest(collection="offres", ids=["d0", "d1", "d2"]), timeout=60)
        index.Upsert(
            ipb.UpsertRequest(collection="offres", documents=[ipb.Document(id="d5", text="Offre 5 remplacée : fleuriste")]),
            timeout=60,
        )
        info = job.result().collection
        assert (info.model, info.size) == (MINILM, 307)
        listed = next(
            c for c in index.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections if c.name == "offres"
        )
        assert listed.model == MINILM and listed.model_version == info.model_version
        got = index.Get(ipb.GetRequest(collection="offres", ids=["d5", "new3", "d0", "d299"], include_vectors=True), timeout=30)
        assert [d.id for d in got.documents] == ["d5", "new3", "d299"] and list(got.missing) == ["d0"]
        assert got.documents[0].text == "Offre 5 remplacée : fleuriste"
        # every stored vector is now MiniLM's embedding of the text
        for doc in got.documents:
            expected = (
                embed.Embed(pb.EmbedRequest(texts=[doc.text], model=MINILM, kind=pb.PASSAGE), timeout=30).embeddings[0].values
            )
            assert float(np.dot(doc.vector, expected)) >= 0.9999
        # text search now embeds the query with MiniLM; a vector claimed to come from e5 is refused
        hits = index.Search(ipb.SearchRequest(collection="offres", text="fleuriste", k=1), timeout=30).hits
        assert hits[0].id == "d5"
        with pytest.raises(grpc.RpcError) as info_err:
            index.Search(
                ipb.SearchRequest(collection="offres", vector=list(got.documents[0].vector), vector_model=E5, k=1), timeout=30
            )
        assert info_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_reembed_refuses_vector_only_documents_and_leaves_the_collection(server):
    with grpc.insecure_channel(server.address) as channel:
        index = ipb_grpc.IndexServiceStub(channel)
        index.CreateCollection(ipb.CreateCollectionRequest(name="vecteurs", model=E5), timeout=30)
        vector = [0.0] * 384
        vector[3] = 1.0
        index.Upsert(ipb.UpsertRequest(collection="vecteurs", documents=[ipb.Document(id="v", vector=vector)]), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            index.Reembed(ipb.ReembedRequest(collection="vecteurs", model=MINILM), timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no text" in info.value.details()
        listed = next(
            c for c in index.ListCollections(ipb.ListCollectionsRequest(), timeout=30).collections if c.name == "vecteurs"
        )
        assert (listed.model, listed.size) == (E5, 1)
        with pytest.raises(grpc.RpcError) as same:
            index.Reembed(ipb.ReembedRequest(collection="vecteurs", model=E5), timeout=30)
        assert same.value.code() == grpc.StatusCode.INVALID_ARGUMENT
