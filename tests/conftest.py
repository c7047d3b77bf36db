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
from hypothesis import settings

from openemploi.runtime.repository import ModelNotBuilt, ModelRepository, ModelVersion

# Tests never depend on timing: hypothesis's default 200 ms deadline per example fails draws on a busy
# machine (a cold run indexes the catalogues beside the tests), whatever the behaviour under test.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

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
CATALOGUE_FIXTURE = "catalogues"


class CatalogueBuild:
    """`openemploi index-catalogues` into CATALOGUES, as a production start indexes: `rome` and `esco_skills`.

    Kept across sessions in a git-ignored folder, so it re-indexes only when the data or the model
    version changed. A cold build takes minutes on 2 cores, so the session starts it in the
    background, niced, as soon as collection shows a test will need it, and runs the tests that do
    not need it meanwhile (they are ordered first). A lock lets one session build at a time.
    """

    def __init__(self, model: str) -> None:
        self.log = CATALOGUES.with_suffix(".log")
        CATALOGUES.mkdir(parents=True, exist_ok=True)
        self._lock = open(CATALOGUES.with_suffix(".lock"), "w")  # noqa: SIM115 (held until wait or stop)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENEMPLOI_")}
        env.update(
            OPENEMPLOI_COLLECTIONS_DIR=str(CATALOGUES),
            OPENEMPLOI_ROME_COLLECTION="true",
            OPENEMPLOI_SKILLS_COLLECTION="true",
            OPENEMPLOI_PROGRESS="false",
            OPENEMPLOI_DEFAULT_MODEL=model,
            OPENEMPLOI_MODELS=model,
        )
        command = ["nice", "-n", "10", sys.executable, "-P", "-m", "openemploi.cli", "index-catalogues"]
        command += ["--model-repository", str(REPO_ROOT / "models")]
        with open(self.log, "w") as log:
            self._process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float = 3600) -> Path:
        try:
            code = self._process.wait(timeout=timeout_s)
        finally:
            self.stop()
        if code != 0:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"index-catalogues exited with {code}; the end of {self.log}:\n{tail}")
        return CATALOGUES

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=60)
        self._lock.close()


CATALOGUE_BUILD = pytest.StashKey[CatalogueBuild]()


@pytest.fixture(scope="session")
def catalogues(default_version: ModelVersion, request: pytest.FixtureRequest) -> Path:
    """`rome` and `esco_skills`, indexed once for every test that needs a catalogue (CatalogueBuild).

    Tests never serve this folder itself: they take a `catalogue_copy`.
    """
    stash = request.config.stash
    build = stash[CATALOGUE_BUILD] if CATALOGUE_BUILD in stash else CatalogueBuild(default_version.name)
    stash[CATALOGUE_BUILD] = build
    return build.wait()


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
    waits = {item.path for item in items if _needs_catalogues(item)}
    items.sort(key=lambda item: item.path in waits)  # stable: whole modules move, their fixtures set up once


def _needs_catalogues(item: pytest.Item) -> bool:
    return CATALOGUE_FIXTURE in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Refuses a repo root on sys.path, then starts the catalogues' build when a selected test needs them.

    The repo root on sys.path puts its `kernels/` folder in place of the `kernels` distribution
    transformers imports: tests would then test a tree no user runs. `make test` uses `python -P`.
    """
    shadowing = [entry for entry in sys.path if Path(entry or ".").resolve() == REPO_ROOT]
    if shadowing:
        raise pytest.UsageError(
            "the repository root is on sys.path (run `python -P -m pytest`, and never add the root to sys.path "
            "in a test or a benchmark): its kernels/ folder shadows the installed `kernels` distribution"
        )
    if any(_needs_catalogues(item) for item in session.items) and not session.config.option.collectonly:
        try:
            ModelRepository(REPO_ROOT / "models").latest(DEFAULT_MODEL)
        except ModelNotBuilt:
            return  # the `default_version` fixture builds it first; `catalogues` then builds in the foreground
        session.config.stash[CATALOGUE_BUILD] = CatalogueBuild(DEFAULT_MODEL)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if CATALOGUE_BUILD in session.config.stash:
        session.config.stash[CATALOGUE_BUILD].stop()
