"""`models finetune` on a tiny real checkpoint: it trains, gates, writes a model folder that builds."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from openemploi.build import finetune as finetune_module
from openemploi.build.add import AddOptions, add_model
from openemploi.build.finetune import (
    CHECKPOINT,
    RECORD,
    FinetuneConfig,
    FinetuneError,
    FinetuneOptions,
    TrainPrecision,
    finetune,
    resolve_precision,
)
from openemploi.build.finetune_data import pairs_digest
from openemploi.runtime.repository import ModelRepository
from openemploi.runtime.spec import load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_SET = REPO_ROOT / "benchmarks" / "data" / "rome_dev.jsonl"
TINY = FinetuneConfig(
    epochs=1,
    batch_size=8,
    max_seq_length=32,
    trainable_layers=1,
    max_steps=3,
    max_codes=40,
    hard_negative_pool=3,
    threads=1,
    max_forgetting=1.0,  # random weights: the probe is noise, so the gate is checked on its own below
)


def tiny_checkpoint(folder: Path, default_checkpoint: Path) -> Path:
    """A random-initialised 2-layer BERT (dim 64) with the default model's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    vocab = json.loads((default_checkpoint / "config.json").read_text())["vocab_size"]
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_checkpoint / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory, default_version) -> ModelRepository:
    root = tmp_path_factory.mktemp("finetune-repository")
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), default_version.checkpoint_path)
    folder = add_model(root, checkpoint, AddOptions(name="tiny", query_prefix="query: ", passage_prefix="passage: "))
    # random weights put many probe passages at near-equal scores: top-1 agreement means little here
    (folder / "model.toml").write_text((folder / "model.toml").read_text() + "\n[gates]\ntop1_agreement_min = 0.5\n")
    return ModelRepository(root)


def _weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_finetune_trains_records_and_builds_a_new_model(repository):
    folder, version = finetune(repository, "tiny", "tiny-rome", TINY, FinetuneOptions(progress=False, exclude=DEV_SET))
    assert version is not None and version.manifest["fidelity"]["passed"]  # the usual gates, on the new checkpoint
    spec = load_spec(folder)
    assert (spec.source.kind, spec.source.path, spec.query_prefix, spec.dim) == ("hf", CHECKPOINT, "query: ", 64)
    record = version.manifest["finetune"]
    assert record == json.loads((folder / CHECKPOINT / RECORD).read_text())
    assert record["base"]["name"] == "tiny" and record["config"]["seed"] == TINY.seed
    assert record["metrics"]["steps"] == 3 and record["data"]["codes"] == 40
    assert record["config"]["precision"] == "auto"
    assert record["metrics"]["precision"] == resolve_precision(TrainPrecision.AUTO).value  # what "auto" ran in
    assert record["forgetting_gate"]["passed"] and record["forgetting_gate"]["threshold"] == 1.0
    assert len(record["data"]["sha256"]) == 64 and record["data"]["excluded_against"] == str(DEV_SET)
    base = _weights(
        repository.spec("tiny").folder.parent / "tiny" / ".." / ".." / Path(load_spec(repository.root / "tiny").source.path)
    )
    tuned = _weights(folder / CHECKPOINT)
    embedding = "embeddings.word_embeddings.weight"
    assert (tuned[embedding] == base[embedding]).all()  # the 250k-token matrix is frozen
    top = "encoder.layer.1.attention.self.query.weight"
    bottom = "encoder.layer.0.attention.self.query.weight"
    assert not (tuned[top] == base[top]).all()  # the top layer trained
    assert (tuned[bottom] == base[bottom]).all()  # trainable_layers=1: the one below did not
    assert version.name in repository.names() and repository.latest("tiny-rome").version == version.version
    with pytest.raises(FinetuneError, match="already exists"):
        finetune(repository, "tiny", "tiny-rome", TINY, FinetuneOptions(progress=False, exclude=DEV_SET))


@pytest.mark.slow
def test_same_seed_same_weights_and_data_hash(repository):
    options = FinetuneOptions(progress=False, exclude=DEV_SET, build=False)
    first, _ = finetune(repository, "tiny", "tiny-a", TINY, options)
    second, _ = finetune(repository, "tiny", "tiny-b", TINY, options)
    digest = [hashlib.sha256((f / CHECKPOINT / "model.safetensors").read_bytes()).hexdigest() for f in (first, second)]
    assert digest[0] == digest[1]
    records = [json.loads((f / CHECKPOINT / RECORD).read_text()) for f in (first, second)]
    assert records[0]["data"] == records[1]["data"]


def test_the_no_forgetting_gate_refuses_and_writes_nothing(repository):
    strict = replace(TINY, max_steps=1, max_forgetting=-1.0)  # would need a top-1 gain of 1.0
    with pytest.raises(FinetuneError, match="no-forgetting gate"):
        finetune(repository, "tiny", "tiny-forgot", strict, FinetuneOptions(progress=False, exclude=DEV_SET))
    assert not (repository.root / "tiny-forgot").exists()


def test_training_data_hash_matches_the_pairs_and_leaves_out_the_dev_set(repository):
    from openemploi.build.finetune import training_pairs
    from openemploi.build.finetune_data import NearDuplicateIndex, load_queries
    from openemploi.matching.catalogue import load_catalogue

    pairs, data = training_pairs(load_catalogue(), FinetuneConfig(), FinetuneOptions(exclude=DEV_SET))
    assert data["sha256"] == pairs_digest(pairs) and data["pairs"] == len(pairs) > 10000
    assert data["by_source"]["template"] > 6000  # one per code and style, bar near-duplicates of dev queries
    assert NearDuplicateIndex([q["query"] for q in load_queries(DEV_SET)]).duplicates(p.anchor for p in pairs) == []
    with pytest.raises(FinetuneError, match="no such dev set"):
        training_pairs(load_catalogue(), FinetuneConfig(), FinetuneOptions(exclude=DEV_SET.with_name("absent.jsonl")))


def test_frozen_layers_run_without_dropout_and_trained_ones_with_it(tmp_path, default_version):
    """Training mode leaves the frozen layers deterministic: their dropout would only add noise
    (and a third of a step's CPU) to features no gradient reaches."""
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_checkpoint(tmp_path, default_version.checkpoint_path))
    finetune_module._freeze(model, trainable_layers=1)
    finetune_module._train_mode(model, trainable_layers=1)
    ids = torch.tensor([[0, 1000, 2000, 3000, 2]])
    first, second = (model(ids, output_hidden_states=True).hidden_states for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # embeddings, frozen layer 0
    assert not torch.equal(first[2], second[2])  # layer 1 trains, with dropout
    assert all(not p.requires_grad for p in model.embeddings.parameters())
    assert all(p.requires_grad for p in model.encoder.layer[1].parameters())


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    for native, expected in ((True, TrainPrecision.BF16), (False, TrainPrecision.FP32)):
        monkeypatch.setattr(finetune_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision(TrainPrecision.AUTO) is expected
        assert resolve_precision(TrainPrecision.FP32) is TrainPrecision.FP32  # an explicit choice stands
        assert resolve_precision(TrainPrecision.BF16) is TrainPrecision.BF16


def test_the_cli_offers_the_precisions_by_name():
    import argparse

    from openemploi.build.finetune_cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "base", "--name", "new", "--precision", "fp32"])
    assert args.precision is TrainPrecision.FP32
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "base", "--name", "new", "--precision", "fp16"])
