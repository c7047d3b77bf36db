"""Re-embedding against deletes, drops, shutdown and crashes: it ends, it never deadlocks, it never loses a copy.

The embedder is a fake (a vector drawn from the text's hash) whose calls are the hook: a test drops,
recreates or shuts down from inside it, at a known phase of the re-embedding.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from openemploi.index.collection import CollectionManager, CollectionReplaced, CollectionSpec
from openemploi.index.reembed import reembed_collection
from openemploi.index.store import NewDocument

DIM = 16
GUARD_S = 60  # only a hang hits this: the tests wait on events, not on time


def vector_of(text: str, salt: str = "") -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def docs(prefix: str, n: int) -> list[NewDocument]:
    return [NewDocument(f"{prefix}{i}", f"offre {prefix}{i}", vector_of(f"offre {prefix}{i}")) for i in range(n)]


async def new_model(texts: list[str]) -> np.ndarray:
    return np.stack([vector_of(t, "m2") for t in texts])


def reembed(manager: CollectionManager, embed=new_model, name: str = "offres"):
    return asyncio.run(asyncio.wait_for(reembed_collection(manager, name, "m2", "v2", DIM, embed, progress=False), GUARD_S))


def test_reembed_ends_when_the_newest_changes_are_all_deletes(tmp_path):
    manager = CollectionManager(tmp_path)
    collection = manager.create(CollectionSpec("offres", "m1", "v1", DIM))
    collection.upsert(docs("d", 601))
    collection.delete([f"d{i}" for i in range(600)])  # 600 deletes after the last live row
    switched = reembed(manager)
    assert switched.spec.model_version == "v2" and switched.size() == 1
    manager.close()


def test_a_drop_and_recreate_during_reembed_is_refused_and_keeps_the_new_collection(tmp_path):
    manager = CollectionManager(tmp_path)
    manager.create(CollectionSpec("offres", "m1", "v1", DIM)).upsert(docs("d", 20))
    recreated = []

    async def embed(texts: list[str]) -> np.ndarray:
        if not recreated:
            manager.drop("offres")
            fresh = manager.create(CollectionSpec("offres", "m1", "v1", DIM))
            fresh.upsert(docs("fresh", 3))
            recreated.append(fresh)
        return await new_model(texts)

    with pytest.raises(CollectionReplaced):
        reembed(manager, embed)
    current = manager.get("offres")
    assert current is recreated[0] and current.spec.model_version == "v1"
    assert sorted(current.get([f"fresh{i}" for i in range(3)])) == ["fresh0", "fresh1", "fresh2"]
    manager.close()
    again = CollectionManager(tmp_path)
    assert again.get("offres").size() == 3
    again.close()


class ObservedLock:
    """A lock that reports when the thread named `who` holds it, and runs `on_first_hold` the first time it is held."""

    def __init__(self, inner, who: str, acquired: threading.Event, on_first_hold=None) -> None:
        self.inner, self.who, self.acquired, self.on_first_hold = inner, who, acquired, on_first_hold

    def __enter__(self):
        self.inner.acquire()
        if threading.current_thread().name == self.who:
            self.acquired.set()
        elif self.on_first_hold is not None:
            hook, self.on_first_hold = self.on_first_hold, None
            hook()
        return self

    def __exit__(self, *exc) -> None:
        self.inner.release()


def race_in_final_phase(manager: CollectionManager, action, who: str):
    """Re-embed; once its final phase holds the write lock, `action` starts and takes the manager's lock first."""
    collection = manager.get("offres")
    collection.upsert(docs("d", 45))
    in_manager_lock = threading.Event()
    racer = threading.Thread(target=action, name=who, daemon=True)

    def start_racer() -> None:  # in the final phase, write lock held: the racer gets the manager's lock first
        racer.start()
        assert in_manager_lock.wait(GUARD_S)

    manager._lock = ObservedLock(manager._lock, who, in_manager_lock)  # type: ignore[assignment]
    collection._write_lock = ObservedLock(collection._write_lock, who, threading.Event(), start_racer)  # type: ignore[assignment]
    try:
        result = reembed(manager)
    except CollectionReplaced as exc:
        result = exc
    racer.join(GUARD_S)
    assert racer.ident is not None, "the final phase never took the write lock"
    assert not racer.is_alive(), f"{who} deadlocked with the re-embedding"
    return result


def test_a_drop_during_the_final_phase_neither_deadlocks_nor_leaves_the_collection(tmp_path):
    manager = CollectionManager(tmp_path)
    manager.create(CollectionSpec("offres", "m1", "v1", DIM))
    race_in_final_phase(manager, lambda: manager.drop("offres"), "dropper")
    assert manager.names() == []
    assert os.listdir(tmp_path) == []
    manager.close()


def test_a_shutdown_during_the_final_phase_neither_deadlocks_nor_loses_the_collection(tmp_path):
    manager = CollectionManager(tmp_path)
    manager.create(CollectionSpec("offres", "m1", "v1", DIM))
    outcome = race_in_final_phase(manager, manager.close, "closer")
    assert isinstance(outcome, CollectionReplaced)
    again = CollectionManager(tmp_path)
    assert again.get("offres").size() == 45 and again.get("offres").spec.model_version == "v1"
    again.close()


class SimulatedCrash(BaseException):
    pass


@pytest.mark.parametrize("crash_after_renames", [1, 2])
def test_a_crash_inside_the_swap_keeps_a_complete_collection(tmp_path, monkeypatch, crash_after_renames):
    manager = CollectionManager(tmp_path)
    manager.create(CollectionSpec("offres", "m1", "v1", DIM)).upsert(docs("d", 30))
    real_replace = os.replace
    renames = []

    async def embed(texts: list[str]) -> np.ndarray:
        vectors = await new_model(texts)

        def replace_then_crash(source, target):
            real_replace(source, target)
            if Path(target).parent == tmp_path:  # a rename of the swap, not of a snapshot inside a collection
                renames.append(target)
                if len(renames) == crash_after_renames:
                    raise SimulatedCrash(str(target))

        monkeypatch.setattr(os, "replace", replace_then_crash)
        return vectors

    with pytest.raises(SimulatedCrash):
        reembed(manager, embed)
    monkeypatch.setattr(os, "replace", real_replace)
    restarted = CollectionManager(tmp_path)  # the crashed manager is abandoned
    collection = restarted.get("offres")
    assert collection.size() == 30 and collection.spec.model_version in ("v1", "v2")
    restarted.close()


def test_start_up_recovers_the_copy_an_older_server_left_mid_swap(tmp_path):
    """An older server renamed the live folder to .replaced-<name>, then died before moving the new one in."""
    manager = CollectionManager(tmp_path / "build")
    manager.create(CollectionSpec("offres", "m1", "v1", DIM)).upsert(docs("d", 12))
    manager.close()
    root = tmp_path / "root"
    root.mkdir()
    os.replace(os.path.realpath(tmp_path / "build" / "offres"), root / ".replaced-offres")
    (root / ".reembed-offres").mkdir()  # the half-made re-embedding
    restarted = CollectionManager(root)
    assert restarted.get("offres").size() == 12
    restarted.close()


CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_reembed_races import DIM, docs, new_model
    from openemploi.index.collection import CollectionManager, CollectionSpec
    from openemploi.index.durable import set_crash_hook
    from openemploi.index.reembed import reembed_collection

    manager = CollectionManager({root!r})
    manager.create(CollectionSpec("offres", "m1", "v1", DIM)).upsert(docs("d", 50))
    set_crash_hook(lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == {step!r} else None)
    asyncio.run(reembed_collection(manager, "offres", "m2", "v2", DIM, new_model, progress=False))
    """
)


@pytest.mark.parametrize(("step", "version"), [("swap-staged", "v1"), ("swap-switched", "v2")])
def test_sigkill_inside_the_swap_restarts_on_one_whole_generation(tmp_path, step, version):
    code = CHILD.format(tests=str(Path(__file__).parent), root=str(tmp_path), step=step)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    restarted = CollectionManager(tmp_path)
    collection = restarted.get("offres")
    assert (collection.size(), collection.spec.model_version) == (50, version)
    assert sorted(os.listdir(tmp_path)) == sorted(["offres", os.readlink(tmp_path / "offres")])
    restarted.close()
