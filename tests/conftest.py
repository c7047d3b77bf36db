"""Shared fixtures: the real default model, built once (make test builds it before pytest)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from openemploi.runtime.repository import ModelNotBuilt, ModelRepository, ModelVersion

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "multilingual-e5-small"


@pytest.fixture(scope="session")
def model_repository() -> ModelRepository:
    return ModelRepository(REPO_ROOT / "models")


@pytest.fixture(scope="session")
def default_version(model_repository: ModelRepository) -> ModelVersion:
    try:
        return model_repository.latest(DEFAULT_MODEL)
    except ModelNotBuilt:
        from openemploi.build.build import BuildOptions, build_model

        return build_model(model_repository, DEFAULT_MODEL, BuildOptions(progress=False))


CATALOGUES = Path(os.environ.get("OPENEMPLOI_TEST_CATALOGUES", REPO_ROOT / ".cache" / "test-catalogues"))


@pytest.fixture(scope="session")
def catalogues(default_version: ModelVersion) -> Path:
    """`rome` and `esco_skills`, indexed once for every test that needs a catalogue (minutes on 2 cores).

    Kept across sessions in a git-ignored folder: `openemploi index-catalogues` re-indexes only when the
    data or the model version changed, as a production start does. A lock lets one session build it.
    Tests never serve this folder itself: they take a `catalogue_copy`.
    """
    CATALOGUES.mkdir(parents=True, exist_ok=True)
    with open(CATALOGUES.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEMPLOI_")}
        env.update(
            OPENEMPLOI_COLLECTIONS_DIR=str(CATALOGUES),
            OPENEMPLOI_ROME_COLLECTION="true",
            OPENEMPLOI_SKILLS_COLLECTION="true",
            OPENEMPLOI_PROGRESS="false",
            OPENEMPLOI_DEFAULT_MODEL=default_version.name,
            OPENEMPLOI_MODELS=default_version.name,
        )
        command = [
            sys.executable,
            "-P",
            "-m",
            "openemploi.cli",
            "index-catalogues",
            "--model-repository",
            str(REPO_ROOT / "models"),
        ]
        subprocess.run(command, env=env, cwd=REPO_ROOT, check=True, timeout=3600)
    return CATALOGUES


@pytest.fixture(scope="session")
def catalogue_copy(catalogues: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A fresh collections folder holding the indexed catalogues, for one server to own and write to."""

    def copy() -> Path:
        target = tmp_path_factory.mktemp("catalogues") / "collections"
        shutil.copytree(catalogues, target, symlinks=True)
        return target

    return copy


INTEGRATION_FOLDERS = ("api", "build")
MODEL_FIXTURES = {"default_version", "model_repository", "catalogues", "catalogue_copy"}
SLOW_MODULES = {
    "test_add_build.py",
    "test_crash_recovery.py",
    "test_storage_full.py",
    "test_fuzz.py",
    "test_model_swap.py",
    "test_failed_model_load.py",
    "test_reembed.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers by what a test needs, so `make test-fast` stays a unit loop without marking each test by hand.

    integration: a real server, the built model, or the installed commands; slow: minutes each.
    """
    for item in items:
        path = Path(str(item.path)).resolve().relative_to(REPO_ROOT / "tests")
        needs_model = bool(MODEL_FIXTURES & set(getattr(item, "fixturenames", ())))
        if path.parts[0] in INTEGRATION_FOLDERS or needs_model or path.name == "test_install.py":
            item.add_marker(pytest.mark.integration)
        if path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The repo root on sys.path puts its `kernels/` folder in place of the `kernels` distribution
    transformers imports: tests would then test a tree no user runs. `make test` uses `python -P`."""
    shadowing = [entry for entry in sys.path if Path(entry or ".").resolve() == REPO_ROOT]
    if shadowing:
        raise pytest.UsageError(
            "the repository root is on sys.path (run `python -P -m pytest`, and never add the root to sys.path "
            "in a test or a benchmark): its kernels/ folder shadows the installed `kernels` distribution"
        )
