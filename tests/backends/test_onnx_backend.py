"""server/backends/onnx.py on the built default model (CPU-only machine)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnxruntime as ort
import pytest

from openemploi.backends.base import BackendKind, ExecutionProvider, Precision
from openemploi.backends.onnx import OnnxEncoder, split_rows
from openemploi.backends.options import BackendConfig
from openemploi.backends.select import Capabilities, open_encoder
from openemploi.padding import pad_sequences
from openemploi.tokenize import TextKind, TextTokenizer, TokenizerConfig

HAS_CUDA = ExecutionProvider.CUDA in ort.get_available_providers()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="this test describes a machine without the CUDA provider")

SHORT = "Boulanger / Boulangère"
TEXTS = [
    SHORT,
    "Aide-soignant de nuit en EHPAD, diplôme d'État exigé, horaires en 12 heures, week-ends alternés.",
    "Développeur web back-end Python, cinq ans d'expérience, télétravail partiel, CDI à Lyon. " * 6,
    "Cariste CACES 1, 3 et 5",
]


def open_onnx(version, config: BackendConfig, graphs=None) -> OnnxEncoder:
    """The onnx backend as the server opens it, optionally with only some of the version's graphs."""
    caps = Capabilities.probe(version, config)
    if graphs is not None:
        caps = dataclasses.replace(caps, graphs={Precision(p): path for p, path in caps.graphs.items() if p in graphs})
    encoder = open_encoder(version, BackendKind.ONNX, config, caps=caps)
    assert isinstance(encoder, OnnxEncoder)
    return encoder


@pytest.fixture(scope="module")
def tokenizer(default_version) -> TextTokenizer:
    v = default_version
    return TextTokenizer(v.tokenizer_path, TokenizerConfig(v.max_tokens, v.query_prefix, v.passage_prefix))


@pytest.fixture(scope="module")
def encoder(default_version) -> OnnxEncoder:
    enc = open_onnx(default_version, BackendConfig())
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def fp32_encoder(default_version) -> OnnxEncoder:
    enc = open_onnx(default_version, BackendConfig(cpu_precision="fp32"))
    yield enc
    enc.close()


def batch(tokenizer, texts, kind=TextKind.PASSAGE):
    return pad_sequences([t.ids for t in tokenizer.encode(texts, kind)], tokenizer.pad_id)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(axis=-1)


# --------------------------------------------------------------------------- what opens (the choice itself: test_select.py)


@cpu_only
def test_default_config_opens_cpu_int8_without_cuda(encoder):
    info = encoder.info
    assert (info.backend, info.device, info.precision, info.dim) == ("onnx", "cpu", "int8", 384)
    assert "no cuda" in info.detail.lower()


def test_device_cpu_is_reported_as_asked(default_version):
    enc = open_onnx(default_version, BackendConfig(device="cpu"))
    assert (enc.info.device, enc.info.precision) == ("cpu", "int8")
    assert "device=cpu" in enc.info.detail


def test_auto_precision_falls_back_to_fp32_when_no_int8_graph_was_built(default_version):
    encoder = open_onnx(default_version, BackendConfig(device="cpu"), graphs={"fp32"})
    assert encoder.info.precision == "fp32" and "no int8 graph" in encoder.info.detail


def test_cpu_length_buckets_are_told_after_the_reason(default_version):
    encoder = open_onnx(default_version, BackendConfig(device="cpu", cpu_length_buckets=True, cpu_parallel_runs=1))
    assert encoder.info.detail == "backend = onnx, device=cpu asked; length buckets [16, 32, 64, 128, 256, 512]"


def test_cpu_parallel_runs_are_told_with_their_threads(default_version):
    encoder = open_onnx(default_version, BackendConfig(device="cpu", cpu_parallel_runs=3))
    assert encoder.info.detail.endswith("; 3 parallel runs of 1 thread(s)")
    encoder.close()


def test_split_rows_groups_by_length_with_balanced_tokens():
    lengths = np.array([5, 40, 7, 12, 40, 3, 9, 30])
    groups = split_rows(lengths, 3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # every row exactly once
    assert len(groups) == 3
    for shorter, longer in itertools.pairwise(groups):
        assert lengths[shorter].max() <= lengths[longer].min()  # by length: each group pads little
    assert max(lengths[g].sum() for g in groups) <= 2 * lengths.sum() / 3  # no group holds most of the work
    assert len(split_rows(np.array([8, 8]), 4)) == 2  # never an empty group
    assert [g.tolist() for g in split_rows(np.array([4, 2, 9]), 1)] == [[1, 0, 2]]


def test_unknown_device_is_rejected():
    """'gpu' (a typo for cuda) must fail loudly, not silently serve on the CPU."""
    with pytest.raises(ValueError, match="device"):
        BackendConfig(device="gpu")


# --------------------------------------------------------------------------- outputs


def test_outputs_are_unit_norm_float32_rows(encoder, tokenizer):
    ids, mask = batch(tokenizer, TEXTS)
    embedding, pooled = encoder.encode(ids, mask)
    assert embedding.dtype == np.float32 and pooled.dtype == np.float32
    assert embedding.shape == pooled.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)
    assert np.isfinite(embedding).all()


def test_single_text_batch(encoder, tokenizer):
    embedding, _ = encoder.encode(*batch(tokenizer, [SHORT]))
    assert embedding.shape == (1, 384)


def test_vector_does_not_depend_on_batch_neighbours_or_padding(encoder, tokenizer):
    alone, _ = encoder.encode(*batch(tokenizer, [SHORT]))
    ids, mask = batch(tokenizer, TEXTS)
    assert mask[0].sum() < ids.shape[1]  # SHORT really is padded in the batch
    together, _ = encoder.encode(ids, mask)
    assert cosine(alone[0], together[0]) >= 0.9999
    # and in another position with other neighbours
    reordered, _ = encoder.encode(*batch(tokenizer, [TEXTS[2], TEXTS[3], SHORT]))
    assert cosine(alone[0], reordered[2]) >= 0.9999


@pytest.mark.parametrize("runs", [2, 3])
def test_parallel_runs_return_the_rows_of_one_run_in_order(default_version, tokenizer, runs):
    """A batch split across runs answers every row in its place, with the vector of a single run."""
    single = open_onnx(default_version, BackendConfig(cpu_parallel_runs=1))
    split = open_onnx(default_version, BackendConfig(cpu_parallel_runs=runs))
    ids, mask = batch(tokenizer, TEXTS + [text.upper() for text in TEXTS])
    try:
        want_embedding, want_pooled = single.encode(ids, mask)
        embedding, pooled = split.encode(ids, mask)
    finally:
        single.close()
        split.close()
    assert embedding.shape == want_embedding.shape and pooled.shape == want_pooled.shape
    assert np.all(cosine(embedding, want_embedding) >= 0.9999)
    np.testing.assert_allclose(pooled, want_pooled, rtol=1e-3, atol=1e-3)


def test_pooled_is_unnormalised_mean_and_normalising_gives_the_embedding(encoder, tokenizer):
    embedding, pooled = encoder.encode(*batch(tokenizer, TEXTS))
    norms = np.linalg.norm(pooled, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.01)
    np.testing.assert_allclose(pooled / norms[:, None], embedding, atol=1e-5)


def test_fp32_precision_works_and_agrees_with_int8(encoder, fp32_encoder, tokenizer):
    assert (fp32_encoder.info.device, fp32_encoder.info.precision) == ("cpu", "fp32")
    ids, mask = batch(tokenizer, TEXTS)
    int8, _ = encoder.encode(ids, mask)
    fp32, _ = fp32_encoder.encode(ids, mask)
    np.testing.assert_allclose(np.linalg.norm(fp32, axis=1), 1.0, atol=1e-5)
    assert np.all(cosine(int8, fp32) >= 0.99)
    assert not np.array_equal(int8, fp32)


def test_embeddings_rank_the_matching_passage_first(encoder, tokenizer):
    passages = [
        "Boulanger : fabrication du pain et des viennoiseries, pétrissage, façonnage et cuisson au four.",
        "Développeur informatique : conception et programmation d'applications web et de bases de données.",
        "Chauffeur poids lourd : transport de marchandises sur longue distance, permis C et CE.",
    ]
    queries = ["je fais du pain la nuit", "coder des sites internet en Python", "conduire un camion"]
    p, _ = encoder.encode(*batch(tokenizer, passages, TextKind.PASSAGE))
    q, _ = encoder.encode(*batch(tokenizer, queries, TextKind.QUERY))
    assert np.argmax(q @ p.T, axis=1).tolist() == [0, 1, 2]
