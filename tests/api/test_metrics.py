"""Prometheus metrics scraped over HTTP after real gRPC traffic."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import pytest
from harness import ServerThread, make_config
from prometheus_client.parser import text_string_to_metric_families

from openemploi.metrics import Metrics
from openemploi.v1 import embedding_pb2 as pb
from openemploi.v1 import embedding_pb2_grpc as pb_grpc
from openemploi.v1 import index_pb2 as ipb
from openemploi.v1 import index_pb2_grpc as ipb_grpc


@pytest.fixture(scope="module")
def server(default_version, tmp_path_factory):
    running = ServerThread(make_config(collections_dir=tmp_path_factory.mktemp("metrics-collections")))
    yield running
    running.stop()


def scrape(server) -> dict[str, list]:
    port = server.running.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_requests_batches_rejections_and_gauges_are_exported(server, default_version):
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for i in range(3):
            stub.Embed(pb.EmbedRequest(texts=[f"Plombier {i}", "Électricienne"]), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(), timeout=30)
        index = ipb_grpc.IndexServiceStub(channel)
        index.CreateCollection(ipb.CreateCollectionRequest(name="mesures"), timeout=30)
        index.Upsert(ipb.UpsertRequest(collection="mesures", documents=[ipb.Document(id="a", text="Serveuse")]), timeout=30)
    samples = scrape(server)
    assert value(samples, "openemploi_requests_total", rpc="Embed", code="OK") == 3
    assert value(samples, "openemploi_requests_total", rpc="Embed", code="INVALID_ARGUMENT") == 1
    assert value(samples, "openemploi_rejected_requests_total", rpc="Embed", reason="invalid_argument") == 1
    assert value(samples, "openemploi_request_duration_seconds_count", rpc="Embed") == 4
    model = "multilingual-e5-small"
    assert value(samples, "openemploi_batch_size_count", model=model) >= 3
    assert value(samples, "openemploi_batch_size_sum", model=model) >= 7  # 6 texts + 1 upserted document
    assert value(samples, "openemploi_inference_seconds_count", model=model, version=default_version.version) >= 3
    assert value(samples, "openemploi_batch_padding_ratio_count", model=model) >= 3
    assert (
        value(samples, "openemploi_model_loaded", model=model, version=default_version.version, device="cpu", precision="int8")
        == 1
    )
    assert value(samples, "openemploi_queue_depth", model=model) == 0
    assert value(samples, "openemploi_collection_documents", collection="mesures") == 1


def test_process_and_gc_metrics_are_in_the_servers_own_registry(server):
    samples = scrape(server)
    assert value(samples, "process_resident_memory_bytes") > 50e6  # the loaded model alone is more
    assert value(samples, "process_open_fds") >= 3
    assert value(samples, "process_cpu_seconds_total") > 0
    assert {s.labels["generation"] for s in samples["python_gc_objects_collected_total"]} == {"0", "1", "2"}
    assert value(samples, "python_info") == 1


def test_metrics_listen_only_on_metrics_host():
    metrics = Metrics()
    port = metrics.serve("127.0.0.2", 0)  # another loopback address: reachable there, not on 127.0.0.1
    try:
        assert b"process_open_fds" in urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        metrics.close()


def test_background_index_rebuilds_are_counted_per_collection(server):
    """An AUTO collection past its flat_max switches kind in the background: the scrape shows it done."""
    with grpc.insecure_channel(server.address) as channel:
        index = ipb_grpc.IndexServiceStub(channel)
        spec = ipb.IndexSpec(kind=ipb.INDEX_KIND_AUTO, flat_max=8)
        index.CreateCollection(ipb.CreateCollectionRequest(name="bascule", index=spec), timeout=30)
        documents = [ipb.Document(id=f"d{i}", text=f"Aide-soignante de nuit {i}") for i in range(12)]
        index.Upsert(ipb.UpsertRequest(collection="bascule", documents=documents), timeout=60)
    collection = server.running.collections.get("bascule")
    assert collection.rebuilds.join(60)
    samples = scrape(server)
    assert value(samples, "openemploi_index_rebuilds_total", collection="bascule", outcome="completed") == 1
    assert value(samples, "openemploi_index_rebuilds_total", collection="bascule", outcome="failed") == 0
    assert value(samples, "openemploi_index_rebuild_running", collection="bascule") == 0
    assert collection.index.kind != "flat"


def test_a_collection_dropped_mid_scrape_is_skipped(tmp_path):
    """The scrape and the pins list names, then opens each: a drop in between must not fail them."""
    from openemploi.app import live_collections
    from openemploi.index.collection import CollectionManager, CollectionSpec

    manager = CollectionManager(tmp_path)
    try:
        manager.create(CollectionSpec("reste", "m", "v1", 4))
        manager.create(CollectionSpec("partie", "m", "v1", 4))
        names = manager.names()
        manager.drop("partie")

        class ListedBeforeTheDrop:
            def names(self) -> list[str]:
                return names

            def get(self, name: str):
                return manager.get(name)

        assert [c.spec.name for c in live_collections(ListedBeforeTheDrop())] == ["reste"]
    finally:
        manager.close()
