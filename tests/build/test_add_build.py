"""`models add` + `models build` on small real checkpoints written with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from openemploi.backends.base import BackendKind, Precision
from openemploi.backends.options import BackendConfig
from openemploi.backends.select import open_encoder
from openemploi.build.add import AddOptions, add_model
from openemploi.build.build import BuildError, BuildOptions, build_model
from openemploi.padding import pad_sequences
from openemploi.runtime.repository import ModelRepository
from openemploi.runtime.spec import SpecError, load_spec
from openemploi.tokenize import TextKind, TextTokenizer, TokenizerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def tiny_checkpoint(folder: Path, hidden: int = 64, seed: int = 0) -> Path:
    """A random-initialised BERT (odd shape: dim 64, CLS pooling) with the default model's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    default = ModelRepository(REPO_ROOT / "models").latest("multilingual-e5-small")
    vocab = json.loads((default.folder / "hf" / "config.json").read_text())["vocab_size"]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default.folder / "hf" / name, folder / name)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory, default_version) -> Path:
    return tmp_path_factory.mktemp("model-repository")


def test_add_reads_the_checkpoint_and_build_serves_it(repository, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    folder = add_model(repository, checkpoint, AddOptions(name="tiny-cls", query_prefix="query: "))
    spec = load_spec(folder)
    assert (spec.dim, spec.pooling, spec.max_tokens, spec.query_prefix) == (64, "cls", 128, "query: ")
    with pytest.raises(SpecError, match="already exists"):
        add_model(repository, checkpoint, AddOptions(name="tiny-cls"))
    # random weights put many passages at near-equal scores: top-1 agreement is meaningless here
    (folder / "model.toml").write_text((folder / "model.toml").read_text() + "\n[gates]\ntop1_agreement_min = 0.5\n")
    version = build_model(ModelRepository(repository), "tiny-cls", BuildOptions(progress=False))
    assert version.dim == 64 and set(version.graphs()) == {"fp32", "int8"}
    assert version.manifest["fidelity"]["passed"]
    # CLS pooling inside the graph: the vector is the first token's state, normalised
    import torch
    from transformers import AutoModel

    tokenizer = TextTokenizer(
        version.tokenizer_path, TokenizerConfig(version.max_tokens, version.query_prefix, version.passage_prefix)
    )
    tokens = tokenizer.encode(["Boulangère à Lyon"], TextKind.PASSAGE)
    ids, mask = pad_sequences([t.ids for t in tokens], tokenizer.pad_id)
    encoder = open_encoder(version, BackendKind.ONNX, BackendConfig(cpu_precision=Precision.FP32))
    got = encoder.encode(ids, mask)[0][0]
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(checkpoint)(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    cls = hidden[0, 0].numpy()
    np.testing.assert_allclose(got, cls / np.linalg.norm(cls), atol=1e-4)
    # same recipe: a rebuild is a no-op returning the same version
    assert build_model(ModelRepository(repository), "tiny-cls", BuildOptions(progress=False)).version == version.version


def test_a_corrupted_checkpoint_is_refused_with_a_clear_message(repository, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "corrupt")
    add_model(repository, checkpoint, AddOptions(name="tiny-corrupt"))
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception) as info:
        build_model(ModelRepository(repository), "tiny-corrupt", BuildOptions(progress=False))
    assert "safetensors" in str(info.value).lower() or "header" in str(info.value).lower()
    assert ModelRepository(repository).versions("tiny-corrupt") == []
    assert not list((repository / "tiny-corrupt").glob(".building-*"))


def test_pickle_weights_are_refused_unless_allowed(repository, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "pickled")
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(SpecError, match="allow-pickle"):
        add_model(repository, checkpoint, AddOptions(name="tiny-pickle"))


def test_a_checkpoint_that_fails_its_gate_is_not_registered(repository, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "strict", seed=1)
    folder = add_model(repository, checkpoint, AddOptions(name="tiny-strict"))
    text = (folder / "model.toml").read_text() + "\n[gates]\nint8_cosine_min = 0.999999\ntop1_agreement_min = 1.0\n"
    (folder / "model.toml").write_text(text)
    with pytest.raises(BuildError, match="failed its fidelity gates: int8_cosine_min"):
        build_model(ModelRepository(repository), "tiny-strict", BuildOptions(progress=False))
    assert ModelRepository(repository).versions("tiny-strict") == []
    report = json.loads((folder / "last-failed-build.json").read_text())
    assert not report["passed"]


def test_a_full_disk_is_a_build_error_that_leaves_nothing_behind(repository, tmp_path, monkeypatch):
    import errno

    from openemploi.build import export

    checkpoint = tiny_checkpoint(tmp_path / "full")
    add_model(repository, checkpoint, AddOptions(name="tiny-full"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "quantise_int8", disk_full)
    with pytest.raises(BuildError, match="disk filled up.*GiB free"):
        build_model(ModelRepository(repository), "tiny-full", BuildOptions(progress=False))
    assert ModelRepository(repository).versions("tiny-full") == []
    assert not list((repository / "tiny-full").glob(".building-*"))
