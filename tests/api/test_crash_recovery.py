"""Crash recovery of the real server in a subprocess: SIGKILL mid-upsert or inside a Reembed's switch, and a
truncated index snapshot.

The procedure and its checks live in openemploi.testing.faults (the longer `benchmarks/chaos.py`
run uses them too); here, on one collections folder: 2 SIGKILL/restart cycles, a SIGTERM restart
(whose shutdown snapshot then holds vectors), a SIGKILL cycle with that `index.faiss` truncated
while the server is down (it must be rebuilt from the store), and 3 more SIGKILL cycles that load
the rebuilt snapshot and replay the store on top of it.
After each restart every acknowledged document must come back from Get whole and
be found by Search with its own vector, and the request cut by the kill must be
all or nothing.
"""

from __future__ import annotations

import sys

import pytest
from harness import REPO_ROOT

from openemploi.build.build import BuildOptions, build_model
from openemploi.index.durable import SNAPSHOT_RENAMED, SNAPSHOT_WRITTEN, SWAP_STAGED, SWAP_SWITCHED
from openemploi.testing.faults import FAULT_KILL, FAULT_TRUNCATE, ChaosRun, graceful_cycle, kill_cycle, snapshot_kill_cycle
from openemploi.testing.launcher import ServerProcess, server_env
from openemploi.testing.reembed_faults import SECOND_MODEL, reembed_kill_cycle

SEED = 20260101
PLAN = ("kill", "kill", "sigterm", "truncate", "kill", "kill", "kill")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@pytest.fixture
def chaos_run(default_version, tmp_path):
    run = ChaosRun(tmp_path / "chaos", REPO_ROOT / "models", seed=SEED, log=log)
    try:
        run.setup()
        yield run
    finally:
        run.close()


def test_acknowledged_upserts_survive_sigkill_and_a_truncated_snapshot(chaos_run):
    for step in PLAN:
        if step == "sigterm":
            report = graceful_cycle(chaos_run)
        else:
            report = kill_cycle(chaos_run, truncate_snapshot=step == "truncate")
        assert report.survived, report.describe()
        assert chaos_run.server.alive()
    faults = [r.fault for r in chaos_run.reports]
    assert faults.count(FAULT_KILL) == 5 and faults.count(FAULT_TRUNCATE) == 1
    truncated = next(r for r in chaos_run.reports if r.fault == FAULT_TRUNCATE)
    assert chaos_run.truncated_to > 1000, "the truncated snapshot should have held vectors"
    assert any("snapshot rebuilt from the store" in note for note in truncated.notes), truncated.describe()
    # The kill delays come from the seed (0.2-2 s each): enough upserts were acknowledged to mean something.
    assert len(chaos_run.acknowledged) >= 100, [r.describe() for r in chaos_run.reports]
    assert chaos_run.reports[-1].acknowledged == len(chaos_run.acknowledged)


def test_hnsw_documents_replayed_after_a_sigkill_stay_searchable(default_version, tmp_path):
    """Replayed documents must be searchable in an HNSW index, which cannot remove a vector and
    marks replaced ones instead: the replay after a kill must not hide the documents it adds."""
    run = ChaosRun(tmp_path / "chaos-hnsw", REPO_ROOT / "models", seed=SEED + 1, log=log, index_kind="hnsw")
    try:
        run.setup()
        run.fill(30)
        clean = graceful_cycle(run, duration_s=0.0)  # the shutdown snapshot now holds 600 vectors
        assert clean.survived, f"HNSW before any replay: {clean.describe()}"
        run.fill(3)  # 60 documents only in the store: the next start replays them
        report = kill_cycle(run, duration_s=0.0)  # SIGKILL at once: replay 60 (or 80) documents, ~10% of the index
        replayed = 60 + report.new_acknowledged + report.in_flight_committed
        # A restart rebuilds an HNSW index whose tombstones pass 20% (rebuild.TOMBSTONE_REBUILD_SHARE): a replay that
        # tombstoned what it adds would go unseen past that share, so this one stays under it.
        assert replayed < 0.2 * (len(run.acknowledged) + report.in_flight_committed), f"{replayed} replayed documents"
        assert report.survived, report.describe()
    finally:
        run.close()


def test_a_sigkill_between_the_steps_of_a_shutdown_snapshot_loses_nothing(default_version, tmp_path):
    """The server dies (by its own crash point) inside its shutdown snapshot: after the temp file is
    written, then after the rename but before the folder fsync. Each restart must hold every document."""
    run = ChaosRun(tmp_path / "chaos-snapshot", REPO_ROOT / "models", seed=SEED + 2, log=log)
    try:
        run.setup()
        run.fill(10)
        for step in (SNAPSHOT_WRITTEN, SNAPSHOT_RENAMED):
            report = snapshot_kill_cycle(run, step, duration_s=0.5)
            assert report.survived, report.describe()
            assert report.new_acknowledged > 0
    finally:
        run.close()


def test_a_sigkill_during_a_reembed_swap_leaves_one_whole_generation(default_version, model_repository, tmp_path):
    """The server dies inside a Reembed's switch: with the new generation staged but not pointed at (the
    old model must serve), then with the name switched but the old folder still there (the new one must).
    Either way one generation is left, holding every acknowledged document (reembed_faults.py)."""
    build_model(model_repository, SECOND_MODEL, BuildOptions(progress=False))
    run = ChaosRun(tmp_path / "chaos-reembed", REPO_ROOT / "models", seed=SEED + 3, log=log)
    try:
        run.setup()
        run.fill(3)
        for step in (SWAP_STAGED, SWAP_SWITCHED):
            report = reembed_kill_cycle(run, step)
            assert report.survived, report.describe()
            assert report.acknowledged >= 60 + 236 and report.killed  # the main collection, then 240 minus 4 deletes at least
    finally:
        run.close()


def test_server_helper_reports_the_stderr_of_a_server_that_exits(tmp_path):
    server = ServerProcess(
        tmp_path / "collections", tmp_path / "logs", env={"OPENEMPLOI_BATCHING_MAX_BATCH_SIZE": "0"}, ready_timeout_s=60
    )
    with pytest.raises(RuntimeError, match="max_batch_size") as info:
        server.start()
    assert "before SERVING" in str(info.value)
    assert not server.alive()


def test_server_env_pins_its_settings_and_drops_inherited_ones_unless_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENEMPLOI_PORT", "1")
    monkeypatch.setenv("OPENEMPLOI_ROME_COLLECTION", "true")
    env = server_env(tmp_path)
    assert "OPENEMPLOI_PORT" not in env
    assert env["OPENEMPLOI_ROME_COLLECTION"] == "false" and env["OPENEMPLOI_PROGRESS"] == "false"
    assert env["OPENEMPLOI_COLLECTIONS_DIR"] == str(tmp_path) and env["OPENEMPLOI_LOG_LEVEL"] == "WARNING"
    assert env["OPENEMPLOI_HOST"] == "127.0.0.1"
    kept = server_env(tmp_path, keep_settings=True)  # a benchmark tuned from the shell keeps its settings
    assert kept["OPENEMPLOI_PORT"] == "1" and kept["OPENEMPLOI_ROME_COLLECTION"] == "false"
