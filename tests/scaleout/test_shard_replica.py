"""The CollectionShard deployments on a real local Ray Serve, reached through RayShardBackend.

One Ray instance for the module (2 CPUs, a small object store, no proxies: the calls go through
deployment handles, as the gateway's do). A replica killed with a call in flight fails that call with
ShardUnavailable; Serve starts a new replica on the same folder, which serves every acknowledged write.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from openemploi.config import ServerConfig
from openemploi.index.collection import CollectionManager, CollectionSpec, ShardUnavailable
from openemploi.index.search import SearchQuery
from openemploi.index.store import NewDocument
from openemploi.index.vectors import IndexParams

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from openemploi.scaleout.options import RayOptions  # noqa: E402
from openemploi.scaleout.shard_replica import RayShardBackend, shard_deployment  # noqa: E402
from openemploi.scaleout.shards import FENCE_HOLD_S, ShardedCollectionManager, route  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DIM = 16
RECOVERY_GUARD = 400  # calls while Serve restarts the replica: only a replica that never comes back hits this


@pytest.fixture(scope="module")
def shard_handles(tmp_path_factory):
    temp = Path(tempfile.mkdtemp(prefix="r2ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        _temp_dir=str(temp),
        log_to_driver=False,
    )
    serve.start(proxy_location="Disabled")
    config = ServerConfig(collections_dir=tmp_path_factory.mktemp("collections"), log_json=False)
    options = RayOptions(shards=2)
    handles = [serve.run(shard_deployment(i, options, config), name=f"shard{i}", route_prefix=None) for i in range(2)]
    yield handles, config.collections_dir
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def spec(name: str) -> CollectionSpec:
    return CollectionSpec(name, "m1", "v1", DIM, IndexParams(kind="flat"))


def view(result):
    return [(h.document.id, h.score, h.dense_rank) for h in result.hits]


def test_a_sharded_collection_on_serve_answers_as_one_collection(shard_handles, tmp_path):
    handles, _ = shard_handles
    manager = ShardedCollectionManager([RayShardBackend(h) for h in handles])
    reference = CollectionManager(tmp_path / "single")
    rng = np.random.default_rng(1)
    vectors = unit(rng, 400)
    documents = [
        NewDocument(f"doc-{i:04d}", f"offre {i} plombier" if i % 4 == 0 else f"offre {i}", vectors[i]) for i in range(400)
    ]
    sharded, single = manager.create(spec("equal")), reference.create(spec("equal"))
    sharded.upsert(documents)
    single.upsert(documents)
    for k in (1, 10, 300):
        query = SearchQuery(vector=unit(rng)[0], k=k)
        assert view(sharded.search(query)) == view(single.search(query))
    hybrid = sharded.search(SearchQuery(vector=unit(rng)[0], k=10, text="plombier", hybrid=True))
    assert len(hybrid.hits) == 10 and any(h.lexical_rank for h in hybrid.hits)
    assert manager.names() == ["equal"] and sharded.size() == 400
    manager.drop("equal")
    assert manager.names() == []
    reference.close()


def replica_actor(deployment: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and f"#{deployment}#" in actor["name"]:
            return ray.get_actor(actor["name"], namespace="serve")
    raise LookupError(f"no replica of {deployment}")


def test_a_killed_replica_fails_its_call_cleanly_and_comes_back_with_every_acknowledged_write(shard_handles):
    handles, root = shard_handles
    manager = ShardedCollectionManager([RayShardBackend(h, timeout_s=60) for h in handles])
    collection = manager.create(spec("durable"))
    rng = np.random.default_rng(2)
    vectors = unit(rng, 200)
    documents = [NewDocument(f"doc-{i:04d}", f"offre {i}", vectors[i]) for i in range(200)]
    collection.upsert(documents)  # acknowledged
    query = SearchQuery(vector=vectors[7], k=5)
    before = view(collection.search(query))

    # Hold a write in flight on shard 1: a re-embedding fence makes it wait inside the replica.
    ref = collection.ref
    manager.call(1, "reembed_begin", ref, "m2", "v2", DIM)
    manager.call(1, "reembed_fence", ref, FENCE_HOLD_S)
    late = next(NewDocument(f"late-{i}", "offre tardive", vectors[0]) for i in range(100) if route(f"late-{i}", 2) == 1)
    pending = manager.backends[1].submit("upsert", ref, [late])
    pending._response._to_object_ref_sync()  # assigned to the replica: the kill meets it in flight
    ray.kill(replica_actor("CollectionShard1"), no_restart=True)
    with pytest.raises(ShardUnavailable, match="CollectionShard1 did not answer upsert"):
        pending.result()

    for _ in range(RECOVERY_GUARD):  # Serve replaces the replica; calls meanwhile fail as unavailable or wait
        try:
            size = manager.get("durable").size()
            break
        except ShardUnavailable:
            continue
    else:
        pytest.fail("CollectionShard1 did not come back")
    assert size == 200  # every acknowledged write, none of the one that failed
    assert view(manager.get("durable").search(query)) == before
    assert manager.get("durable").get([late.id]) == {}
    assert not (root / "shard-1" / ".reembed-durable").exists()  # the dead job's staging went at the restart
    manager.drop("durable")
