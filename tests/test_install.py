"""The installed product, as a new user meets it: the console script run from outside the repo.

A dependency once shipped a top-level `kernels` package that shadowed ours, and the server could
not import from its console script while the in-repo tests stayed green; these tests run what a
user runs, from a directory where nothing of the repo is importable by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from openemploi.testing.launcher import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "multilingual-e5-small"


def console_script() -> Path:
    script = Path(sys.executable).with_name("openemploi")
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    return script


def run_outside(tmp_path: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_console_script_help_from_outside_the_repo(tmp_path: Path) -> None:
    result = run_outside(tmp_path, str(console_script()), "--help")
    assert result.returncode == 0, result.stderr
    for command in ("serve", "models", "embed", "tokens"):
        assert command in result.stdout


def test_only_openemploi_is_importable_from_outside_the_repo(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json\n"
        "found = {name: (importlib.util.find_spec(name).origin if importlib.util.find_spec(name) else None)\n"
        "         for name in ('server', 'kernels', 'openemploi', 'openemploi.kernels', 'openemploi.v1')}\n"
        "import transformers.activations, openemploi.cli, openemploi.kernels\n"
        "print(json.dumps(found))\n"
    )
    result = run_outside(tmp_path, sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["server"] is None
    assert found["kernels"] is None or not Path(found["kernels"]).resolve().is_relative_to(REPO_ROOT / "kernels")
    for name in ("openemploi", "openemploi.kernels", "openemploi.v1"):
        assert found[name] is not None and Path(found[name]).resolve().is_relative_to(REPO_ROOT)


def test_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO_ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("openemploi-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"openemploi"}
    for expected in (
        "openemploi/cli.py",
        "openemploi/kernels/fusion.py",
        "openemploi/v1/embedding_pb2.py",
        "openemploi/build/probe/fr_probe.json",
        "openemploi/matching/data/PROVENANCE.md",
    ):
        assert expected in names


def test_models_build_from_outside_the_repo_reuses_the_built_version(tmp_path: Path) -> None:
    """The build tools import (torch, transformers beside Hugging Face's own `kernels`) and find the
    version `make model` built: same version, manifest untouched."""
    from openemploi.runtime.repository import MANIFEST, ModelRepository

    version = ModelRepository(REPO_ROOT / "models").latest(DEFAULT_MODEL)
    manifest = version.folder / MANIFEST
    before = manifest.stat().st_mtime_ns
    result = run_outside(
        tmp_path,
        str(console_script()),
        "models",
        "--model-repository",
        str(REPO_ROOT / "models"),
        "build",
        DEFAULT_MODEL,
        "--no-progress",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert f"version {version.version} ready" in result.stdout
    assert manifest.stat().st_mtime_ns == before


def test_serve_from_outside_the_repo_reaches_serving(tmp_path: Path) -> None:
    server = ServerProcess(
        collections_dir=tmp_path / "collections",
        cwd=tmp_path,
        env={"OPENEMPLOI_MODEL_REPOSITORY": str(REPO_ROOT / "models"), "OPENEMPLOI_METRICS_PORT": str(free_port())},
        command=[str(console_script()), "serve"],
    )
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.stop() == 0, server.log_tail()
