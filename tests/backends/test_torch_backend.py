"""server/backends/torch_backend.py on the real default model, on the CPU (fp32): the same
vectors as the ONNX fp32 graph, CLS pooling, and length buckets that change nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from openemploi.backends.base import BackendKind, Choice, Device, Precision
from openemploi.backends.onnx import DeviceBinding
from openemploi.backends.options import BackendConfig
from openemploi.backends.select import open_encoder
from openemploi.backends.torch_backend import TorchEncoder
from openemploi.build.fidelity import Probe
from openemploi.padding import pad_sequences, widen
from openemploi.tokenize import TextKind, TextTokenizer, TokenizerConfig

pytest.importorskip("transformers")

UNBUCKETED = BackendConfig(device="cpu", length_buckets=())
BUCKETED_CPU = BackendConfig(device="cpu", cpu_length_buckets=True)
ONNX_FP32 = BackendConfig(device="cpu", cpu_precision="fp32")


def cpu_choice(checkpoint) -> Choice:
    """torch on the CPU for a bare checkpoint folder (no built version to plan from)."""
    return Choice(BackendKind.TORCH, Device.CPU, Precision.FP32, checkpoint, "test: a bare checkpoint")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(axis=-1)


@pytest.fixture(scope="module")
def tokenizer(default_version) -> TextTokenizer:
    v = default_version
    return TextTokenizer(v.tokenizer_path, TokenizerConfig(v.max_tokens, v.query_prefix, v.passage_prefix))


@pytest.fixture(scope="module")
def batches(tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """48 probe texts spread over the length range (5 to 512 tokens), in mixed-length batches of 16."""
    tokens = tokenizer.encode(Probe.load().texts, TextKind.PASSAGE)
    by_length = sorted(range(len(tokens)), key=lambda i: len(tokens[i].ids))
    picked = [by_length[i] for i in np.linspace(0, len(by_length) - 1, 48).round().astype(int)]
    np.random.default_rng(0).shuffle(picked)
    return [pad_sequences([tokens[i].ids for i in picked[s : s + 16]], tokenizer.pad_id) for s in range(0, 48, 16)]


@pytest.fixture(scope="module")
def onnx_fp32(default_version):
    encoder = open_encoder(default_version, BackendKind.ONNX, ONNX_FP32)
    yield encoder
    encoder.close()


@pytest.fixture(scope="module")
def torch_encoder(default_version, tokenizer):
    encoder = open_encoder(default_version, BackendKind.TORCH, UNBUCKETED, pad_id=tokenizer.pad_id)
    yield encoder
    encoder.close()


def run(encoder, batches) -> tuple[np.ndarray, np.ndarray]:
    outputs = [encoder.encode(ids, mask) for ids, mask in batches]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def test_info_says_torch_cpu_fp32(torch_encoder, default_version):
    info = torch_encoder.info
    assert (info.backend, info.device, info.precision, info.dim) == ("torch", "cpu", "fp32", default_version.dim)
    assert "sdpa" in info.detail


def test_torch_fp32_matches_onnx_fp32_on_mixed_length_probe_texts(torch_encoder, onnx_fp32, batches):
    assert max(ids.shape[1] for ids, _ in batches) == 512  # the longest probe text, truncated, is in
    ours, ours_pooled = run(torch_encoder, batches)
    theirs, theirs_pooled = run(onnx_fp32, batches)
    assert ours.dtype == ours_pooled.dtype == np.float32 and ours.shape == (48, 384)
    assert cosine(ours, theirs).min() >= 0.9999
    assert cosine(ours_pooled, theirs_pooled).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours_pooled, axis=1), np.linalg.norm(theirs_pooled, axis=1), rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours_pooled / np.linalg.norm(ours_pooled, axis=1, keepdims=True), ours, atol=1e-5)


def test_torch_vector_does_not_depend_on_batch_neighbours(torch_encoder, batches):
    ids, mask = batches[0]
    together, _ = torch_encoder.encode(ids, mask)
    width = int(mask[3].sum())
    alone, _ = torch_encoder.encode(ids[3:4, :width], mask[3:4, :width])
    assert cosine(alone[0], together[3]) >= 0.99999


def test_length_buckets_do_not_change_torch_vectors(default_version, tokenizer, torch_encoder, batches):
    bucketed = open_encoder(default_version, BackendKind.TORCH, BUCKETED_CPU, pad_id=tokenizer.pad_id)
    try:
        assert "length buckets" in bucketed.info.detail
        short = [(ids[:, :40], mask[:, :40]) for ids, mask in batches]  # widths 40 -> bucket 64: real padding
        plain, plain_pooled = run(torch_encoder, short)
        padded, padded_pooled = run(bucketed, short)
    finally:
        bucketed.close()
    assert cosine(plain, padded).min() >= 0.99999
    assert cosine(plain_pooled, padded_pooled).min() >= 0.99999


def test_length_buckets_do_not_change_onnx_vectors(default_version, tokenizer, onnx_fp32, batches):
    config = dataclasses.replace(ONNX_FP32, cpu_length_buckets=True)
    bucketed = open_encoder(default_version, BackendKind.ONNX, config, pad_id=tokenizer.pad_id)
    short = [(ids[:, :40], mask[:, :40]) for ids, mask in batches]
    plain, plain_pooled = run(onnx_fp32, short)
    padded, padded_pooled = run(bucketed, short)
    bucketed.close()
    assert "length buckets [16, 32, 64, 128, 256, 512]" in bucketed.info.detail
    assert cosine(plain, padded).min() >= 0.99999
    assert cosine(plain_pooled, padded_pooled).min() >= 0.99999


def test_io_binding_gives_the_session_run_outputs_and_reuses_buffers(onnx_fp32, batches):
    """DeviceBinding is the CUDA path's runner; on "cpu" it runs here, on the same session."""
    binding = DeviceBinding(onnx_fp32._session, Device.CPU, 0, max_shapes=2)
    ids, mask = batches[1]
    expected, expected_pooled = onnx_fp32.encode(ids, mask)
    for _ in range(2):  # the second call reuses the buffers of the first
        got, got_pooled = binding.run(ids, mask)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        np.testing.assert_allclose(got_pooled, expected_pooled, atol=1e-5)
    other_ids, other_mask = widen(ids[:3, :20], mask[:3, :20], 32)
    got, _ = binding.run(other_ids, other_mask)
    np.testing.assert_allclose(got, onnx_fp32.encode(other_ids, other_mask)[0], atol=1e-6)
    assert len(binding._buffers) == 2  # bounded: the oldest shape's buffers went


# --------------------------------------------------------------------------- CLS pooling


@pytest.fixture(scope="module")
def cls_checkpoint(model_repository, tmp_path_factory):
    """all-MiniLM-L6-v2's checkpoint when it is built here, else a tiny random BERT saved to disk."""
    try:
        return model_repository.latest("all-minilm-l6-v2").checkpoint_path
    except LookupError:
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        folder = tmp_path_factory.mktemp("tiny-bert")
        BertModel(config).save_pretrained(folder)
        return folder


def test_cls_pooling_matches_the_export_reference(cls_checkpoint):
    import torch

    from openemploi.build.export import load_torch_encoder

    encoder = TorchEncoder(cpu_choice(cls_checkpoint), UNBUCKETED, pooling="cls")
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 999, (4, 24), dtype=np.int64)  # valid ids in both vocabularies
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 3:] = 0
    normalized, pooled = encoder.encode(ids, mask)
    mean_normalized, _ = TorchEncoder(cpu_choice(cls_checkpoint), UNBUCKETED).encode(ids, mask)
    reference = load_torch_encoder(cls_checkpoint, "cls")
    with torch.no_grad():
        ref_normalized, ref_pooled = (t.numpy() for t in reference(torch.from_numpy(ids), torch.from_numpy(mask)))
    assert cosine(normalized, ref_normalized).min() >= 0.9999
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-3, atol=1e-4)
    assert cosine(normalized, mean_normalized).max() < 0.9999  # it really is a different pooling
    encoder.close()
