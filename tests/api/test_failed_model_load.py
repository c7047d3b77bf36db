"""A LoadModel that fails (truncated graph, graph gone, failed warm-up) frees what it built.

gRPC keeps an aborted call's exception alive, and with it the frames of the failed load, which hold
the new version's tokenizer and ONNX session (~250 MB): unless the load drops them, every failed
LoadModel keeps that much.
"""

from __future__ import annotations

import gc

import grpc
import pytest
from harness import REPO_ROOT, ServerThread, make_config

from openemploi.testing.faults import linked_model_repository
from openemploi.testing.model_faults import BROKEN_KINDS, make_version
from openemploi.tokenize import TextTokenizer
from openemploi.v1 import embedding_pb2 as pb
from openemploi.v1 import embedding_pb2_grpc as pb_grpc
from openemploi.v1 import models_pb2 as mpb
from openemploi.v1 import models_pb2_grpc as mpb_grpc

E5 = "multilingual-e5-small"


def tokenizers_alive() -> int:
    gc.collect()
    return sum(isinstance(o, TextTokenizer) for o in gc.get_objects())


def test_failed_loads_keep_serving_and_free_what_they_built(default_version, tmp_path):
    repo = linked_model_repository(tmp_path / "models", REPO_ROOT / "models")
    folder = repo / E5
    broken = [make_version(folder / default_version.version, folder / f"broken-{k}", k) for k in BROKEN_KINDS]
    running = ServerThread(make_config(collections_dir=tmp_path / "collections", model_repository=repo))
    try:
        with grpc.insecure_channel(running.address) as channel:
            admin = mpb_grpc.ModelServiceStub(channel)
            embed = pb_grpc.EmbeddingServiceStub(channel)
            before = tokenizers_alive()
            for version in broken:
                with pytest.raises(grpc.RpcError) as info:
                    admin.LoadModel(mpb.LoadModelRequest(name=E5, version=version), timeout=300)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
                assert "serving version is unchanged" in info.value.details()
                reply = embed.Embed(pb.EmbedRequest(texts=["Boulanger / Boulangère"]), timeout=60)
                assert (reply.model, reply.model_version) == (E5, default_version.version)
            assert tokenizers_alive() == before  # nothing of the three failed loads is still held
            info = next(m for m in admin.ListModels(mpb.ListModelsRequest(), timeout=30).models if m.name == E5)
            states = {v.version: v.state for v in info.versions}
            assert info.current_version == default_version.version
            assert all(states[v] == "built" for v in broken), states
    finally:
        running.stop()
