"""Shared fixtures: the real default model, built once (make test builds it before pytest)."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.modelrepo.repository import ModelNotBuilt, ModelRepository, ModelVersion

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
        from server.modelrepo.build import BuildOptions, build_model

        return build_model(model_repository, DEFAULT_MODEL, BuildOptions(progress=False))
