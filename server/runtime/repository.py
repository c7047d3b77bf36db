"""The model repository on disk (Triton's idea): `models/<name>/model.toml`
declares a model, `models/<name>/<version>/manifest.json` describes a built,
gate-checked version of it. Only versions whose manifest says `ready` load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .spec import ModelSpec, SpecError, load_spec

MANIFEST = "manifest.json"


class ModelNotFound(LookupError):
    def __init__(self, message: str, resource_name: str = "") -> None:
        super().__init__(message)
        self.resource_name = resource_name  # "name" or "name/version": the API's ResourceInfo


class ModelNotBuilt(LookupError):
    def __init__(self, message: str, resource_name: str = "") -> None:
        super().__init__(message)
        self.resource_name = resource_name


@dataclass(frozen=True)
class ModelVersion:
    """A built version: everything the server needs, read from its manifest."""

    name: str
    version: str
    folder: Path
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["max_tokens"])

    @property
    def query_prefix(self) -> str:
        return self.manifest["prefixes"]["query"]

    @property
    def passage_prefix(self) -> str:
        return self.manifest["prefixes"]["passage"]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.manifest["files"]["tokenizer"]

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / self.manifest["files"]["checkpoint"]

    def graphs(self) -> dict[str, Path]:
        return {precision: self.folder / rel for precision, rel in self.manifest["files"]["onnx"].items()}

    @property
    def built_at(self) -> str:
        return self.manifest.get("built_at", "")


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "model.toml").is_file())

    def _folder(self, name: str) -> Path:
        """The folder of a model named in the repository; a name is never a path ("./m", "../x/m")."""
        if name not in self.names():
            raise ModelNotFound(f"model {name!r} is not in the repository {self.root} (have: {self.names()})", name)
        return self.root / name

    def spec(self, name: str) -> ModelSpec:
        return load_spec(self._folder(name))

    def versions(self, name: str) -> list[ModelVersion]:
        try:
            folder = self._folder(name)
        except ModelNotFound:
            return []
        found = []
        for child in folder.iterdir():
            manifest_path = child / MANIFEST
            if not child.is_dir() or child.name.startswith(".") or not manifest_path.is_file():
                continue
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if manifest.get("status") == "ready":
                found.append(ModelVersion(name, child.name, child, manifest))
        return sorted(found, key=lambda v: v.built_at)

    def latest(self, name: str) -> ModelVersion:
        self.spec(name)
        versions = self.versions(name)
        if not versions:
            raise ModelNotBuilt(f"model {name!r} has no built version; run: openemploi models build {name}", name)
        return versions[-1]

    def version(self, name: str, version: str) -> ModelVersion:
        for candidate in self.versions(name):
            if candidate.version == version:
                return candidate
        raise ModelNotFound(f"model {name!r} has no ready version {version!r}", f"{name}/{version}")


__all__ = ["ModelNotBuilt", "ModelNotFound", "ModelRepository", "ModelVersion", "SpecError"]
