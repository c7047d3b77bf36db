"""`openemploi models finetune BASE --name NEW`: contrastive fine-tuning on the ROME catalogue.

Multiple-negatives ranking loss: each anchor (a title, task, skill, templated sentence or paraphrase,
embedded as a query) must pick its occupation's label (embedded as a passage) among the other labels of the
batch and its hard negatives, the labels of the codes the base model puts nearest to it. The
250k-token embedding matrix stays frozen (most of the weights, and tokens the job vocabulary
never sees), sequences are short, so a few epochs run on two CPU cores in minutes.

The result is a new model of the repository (`models/NEW/model.toml` and `checkpoint/`), then
built through the usual pipeline and fidelity gates. A "no forgetting" gate refuses a model that
lost more than `max_forgetting` top-1 on the French probe's retrieval task; the data hash, the
configuration and the metrics land in the version's manifest.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from ..matching.catalogue import Occupation, load_catalogue
from ..padding import pad_sequences
from ..runtime.repository import MANIFEST, ModelNotBuilt, ModelRepository, ModelVersion
from ..runtime.spec import ModelSpec
from ..tokenize import TextKind, TextTokenizer, TokenizerConfig
from . import fidelity
from .build import BuildError, BuildOptions, build_model, hf_source_folder
from .finetune_data import (
    PARAPHRASES,
    Pair,
    catalogue_pairs,
    epoch_batches,
    load_queries,
    pairs_digest,
    paraphrase_pairs,
    template_pairs,
    without_near_duplicates,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
RECORD = "finetune.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
DEV_SET = Path("benchmarks/data/rome_dev.jsonl")

MODEL_TOML = """# Fine-tuned from {base} (version {base_version}) with `openemploi models finetune`;
# the training data hash, configuration and metrics are in {checkpoint}/{record} and in each
# version's manifest.json ("finetune"). The checkpoint folder is git-ignored: rerun the command.
name = "{name}"
description = "{base} fine-tuned on the ROME catalogue and the team's paraphrases"
architecture = "{architecture}"
dim = {dim}
max_tokens = {max_tokens}
pooling = "{pooling}"
normalize = true
backend = "{backend}"

[prefixes]
query = {query_prefix}
passage = {passage_prefix}

[source]
kind = "hf"
path = "{checkpoint}"

[build]
precisions = {precisions}
int8_mode = "{int8_mode}"
graph_layout = "{graph_layout}"

[gates]
reference_cosine_min = {reference_cosine_min}
int8_cosine_min = {int8_cosine_min}
top1_agreement_min = {top1_agreement_min}
"""


class FinetuneError(RuntimeError):
    """Fine-tuning could not produce a model worth building; the message says why."""


class TrainPrecision(str, Enum):
    """What the training steps' matrix products run in; the weights and the optimiser stay fp32.

    AUTO is bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: about twice the
    steps per second on this VM) and fp32 elsewhere, where emulated bf16 would be slower.
    """

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


def cpu_has_native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: TrainPrecision) -> TrainPrecision:
    if precision is TrainPrecision.AUTO:
        return TrainPrecision.BF16 if cpu_has_native_bf16() else TrainPrecision.FP32
    return precision


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 2  # chosen on the dev set's tuning part with trainable_layers (README, "Fine-tuning")
    batch_size: int = 32
    max_seq_length: int = 48  # job titles, tasks and queries fit; longer texts are cut
    trainable_layers: int = 6  # top transformer layers trained; the rest (and the embeddings) stay frozen
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = 100.0  # cosine -> logit multiplier: E5's own temperature (0.01); at 20 int8 fidelity fell (README)
    hard_negatives: int = 1  # labels of nearest wrong codes added per anchor (0: in-batch only)
    hard_negative_pool: int = 8  # nearest wrong codes (by the base model) they are drawn from
    per_code: int = 1  # catalogue anchors drawn per code each epoch
    paraphrase_repeats: int = 1  # times each team paraphrase is seen per epoch (8,337 of them: once keeps it under 20 min)
    templates_per_style: int = 1  # templated query-style anchors per code and style (0: none)
    template_repeats: int = 1  # times each templated anchor is seen per epoch
    seed: int = 17
    threads: int = 2
    max_steps: int = 0  # 0: every batch of every epoch; tests use a handful
    max_codes: int = 0  # 0: the whole catalogue; tests use a slice
    max_forgetting: float = 0.02  # largest probe top-1 loss vs the base model (no-forgetting gate)
    precision: TrainPrecision = TrainPrecision.AUTO


@dataclass(frozen=True)
class FinetuneOptions:
    force: bool = False
    progress: bool = True
    exclude: Path | None = DEV_SET  # queries no training text may be a near-duplicate of
    paraphrases: Path = PARAPHRASES
    build: bool = True


def base_checkpoint(repo: ModelRepository, name: str) -> tuple[ModelSpec, Path, str]:
    """The base model's HF checkpoint: its latest built version's, else its declared source folder."""
    spec = repo.spec(name)
    try:
        version = repo.latest(name)
        return spec, version.checkpoint_path, version.version
    except ModelNotBuilt:
        if spec.source.kind != "hf":
            raise FinetuneError(f"model {name!r} has no built version: run `openemploi models build {name}` first") from None
        return spec, hf_source_folder(spec), "source"


def training_pairs(occupations: list[Occupation], config: FinetuneConfig, options: FinetuneOptions) -> tuple[list[Pair], dict]:
    codes = {o.code for o in occupations}
    pairs = catalogue_pairs(occupations) + [p for p in paraphrase_pairs(options.paraphrases) if p.code in codes]
    if config.templates_per_style:
        pairs += template_pairs(occupations, random.Random(config.seed), config.templates_per_style)
    excluded: list[str] = []
    if options.exclude is not None:
        if not options.exclude.is_file():
            raise FinetuneError(f"{options.exclude}: no such dev set to exclude (pass exclude=None to train without the check)")
        excluded = [q["query"] for q in load_queries(options.exclude)]
    pairs, dropped = without_near_duplicates(pairs, excluded)
    stats = {
        "pairs": len(pairs),
        "codes": len({p.code for p in pairs}),
        "by_source": {s: sum(p.source.value == s for p in pairs) for s in sorted({p.source.value for p in pairs})},
        "sha256": pairs_digest(pairs),
        "excluded_against": str(options.exclude) if options.exclude else None,
        "dropped_near_duplicates": len(dropped),
    }
    return pairs, stats


class _Encoder:
    """Tokenise with the serving tokenizer (same prefixes, NFC, truncation) and mean-pool in torch."""

    def __init__(self, checkpoint: Path, spec: ModelSpec, max_seq_length: int) -> None:
        from .export import load_torch_encoder

        self.model = load_torch_encoder(checkpoint, spec.pooling)
        self.tokenizer = TextTokenizer(
            checkpoint / "tokenizer.json", TokenizerConfig(max_seq_length, spec.query_prefix, spec.passage_prefix)
        )

    def forward(self, texts: list[str], kind: TextKind):
        import torch

        tokens = self.tokenizer.encode(texts, kind, truncate=True)
        ids, mask = pad_sequences([t.ids for t in tokens], self.tokenizer.pad_id)
        return self.model(torch.from_numpy(ids), torch.from_numpy(mask))[0]

    def embed(self, texts: list[str], kind: TextKind, batch_size: int = 128) -> np.ndarray:
        import torch

        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), 0), dtype=np.float32)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunks.append(self.forward([texts[i] for i in order[start : start + batch_size]], kind).numpy())
        if chunks:
            out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
            out[order] = np.concatenate(chunks)
        return out


def nearest_wrong_codes(encoder: _Encoder, occupations: list[Occupation], pool: int) -> dict[str, list[str]]:
    """For each code, the `pool` codes whose labels the base model puts nearest to its label."""
    if pool <= 0:
        return {}
    labels = encoder.embed([o.label for o in occupations], TextKind.PASSAGE)
    similarity = labels @ labels.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :pool]
    return {o.code: [occupations[j].code for j in row] for o, row in zip(occupations, nearest)}


def probe_retrieval(encoder: _Encoder) -> dict[str, float]:
    """Top-1 and MRR@10 on the French probe's retrieval task (217 queries over 201 passages)."""
    probe = fidelity.Probe.load()
    queries = encoder.embed(probe.queries, TextKind.QUERY)
    passages = encoder.embed(probe.passages, TextKind.PASSAGE)
    ranks = np.argsort(-(queries @ passages.T), axis=1)[:, :10]
    expected = np.asarray(probe.expected)
    hits = ranks == expected[:, None]
    mrr = float(np.mean(np.where(hits.any(axis=1), 1.0 / (hits.argmax(axis=1) + 1), 0.0)))
    return {"top1": float(np.mean(ranks[:, 0] == expected)), "mrr10": mrr}


def _ranking_loss(anchors, candidates, anchor_codes: list[str], candidate_codes: list[str], scale: float):
    """Cross-entropy of each anchor over all candidates; its own positive is candidate i, and
    candidates of its own code other than that (a duplicate label) are masked, not negatives."""
    import torch

    scores = scale * anchors @ candidates.T
    same = torch.tensor([[a == c for c in candidate_codes] for a in anchor_codes])
    same.fill_diagonal_(False)
    scores = scores.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(anchor_codes)))


def _frozen_modules(encoder, trainable_layers: int) -> list:
    layers = encoder.encoder.layer
    return [encoder.embeddings, *layers[: max(0, len(layers) - trainable_layers)]]


def _freeze(encoder, trainable_layers: int) -> None:
    """Freeze the embeddings (the 250k-token matrix) and all but the top `trainable_layers` layers:
    autograd then stops below them, so a step costs a forward pass plus a short backward one."""
    for module in _frozen_modules(encoder, trainable_layers):
        module.requires_grad_(False)


def _train_mode(encoder, trainable_layers: int) -> None:
    """Dropout in the trained layers only: the frozen ones run as the fixed feature extractor they
    are. Dropout masks took 47% of a step's CPU (torch's profiler), two thirds of them in frozen
    layers, where they shaped no weight."""
    encoder.train()
    for module in _frozen_modules(encoder, trainable_layers):
        module.eval()


def train(
    encoder: _Encoder,
    pairs: list[Pair],
    occupations: list[Occupation],
    negatives: dict[str, list[str]],
    config: FinetuneConfig,
    progress: bool,
) -> dict:
    import torch
    from tqdm import tqdm

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    label = {o.code: o.label for o in occupations}
    model = encoder.model
    _freeze(model.encoder, config.trainable_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    epochs = [
        epoch_batches(pairs, config.batch_size, rng, config.per_code, config.paraphrase_repeats, config.template_repeats)
        for _ in range(config.epochs)
    ]
    total = sum(len(e) for e in epochs)
    if config.max_steps:
        total = min(total, config.max_steps)
    warmup = max(1, int(total * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    losses: list[float] = []
    _train_mode(model.encoder, config.trainable_layers)
    precision = resolve_precision(config.precision)
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    step = 0
    try:
        for batches in epochs:
            for batch in batches:
                if step >= total:
                    break
                codes = [p.code for p in batch]
                candidate_codes = list(codes)
                for pair in batch:
                    pool = [c for c in negatives.get(pair.code, []) if c not in codes]
                    candidate_codes += rng.sample(pool, min(config.hard_negatives, len(pool)))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is TrainPrecision.BF16):
                    anchors = encoder.forward([p.anchor for p in batch], TextKind.QUERY)
                    candidates = encoder.forward([label[c] for c in candidate_codes], TextKind.PASSAGE)
                loss = _ranking_loss(anchors.float(), candidates.float(), codes, candidate_codes, config.scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.item()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    finally:
        bar.close()
    model.eval()
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": step,
        "precision": precision.value,
        "loss_first_tenth": float(np.mean(head)),
        "loss_last_tenth": float(np.mean(tail)),
    }


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _write_model_folder(
    folder: Path, name: str, base: ModelSpec, base_version: str, encoder: _Encoder, base_checkpoint: Path, record: dict
) -> None:
    staging = folder / f".{CHECKPOINT}-staging"
    shutil.rmtree(staging, ignore_errors=True)
    encoder.model.encoder.save_pretrained(staging, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (base_checkpoint / file).is_file():
            shutil.copy(base_checkpoint / file, staging / file)
    (staging / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False))
    shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
    staging.rename(folder / CHECKPOINT)
    (folder / "model.toml").write_text(
        MODEL_TOML.format(
            base=base.name,
            base_version=base_version,
            checkpoint=CHECKPOINT,
            record=RECORD,
            name=name,
            architecture=base.architecture,
            dim=base.dim,
            max_tokens=base.max_tokens,
            pooling=base.pooling,
            backend=base.backend.value,
            query_prefix=_toml_string(base.query_prefix),
            passage_prefix=_toml_string(base.passage_prefix),
            precisions=json.dumps([str(p) for p in base.precisions]),
            int8_mode=base.int8_mode,
            graph_layout=base.graph_layout.value,
            reference_cosine_min=base.gates.reference_cosine_min,
            int8_cosine_min=base.gates.int8_cosine_min,
            top1_agreement_min=base.gates.top1_agreement_min,
        ),
        encoding="utf-8",
    )


def _record_in_manifest(version: ModelVersion, record: dict) -> ModelVersion:
    """Add the fine-tuning record to the built version's manifest (atomic replace)."""
    manifest = dict(version.manifest, finetune=record)
    path = version.folder / MANIFEST
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(temporary, path)
    return ModelVersion(version.name, version.version, version.folder, manifest)


def finetune(
    repo: ModelRepository,
    base_name: str,
    name: str,
    config: FinetuneConfig = FinetuneConfig(),
    options: FinetuneOptions = FinetuneOptions(),
) -> tuple[Path, ModelVersion | None]:
    """Train, gate, write `models/<name>/`, build it; returns the model folder and the built version."""
    import torch

    folder = repo.root / name
    if (folder / "model.toml").exists() and not options.force:
        raise FinetuneError(f"model {name!r} already exists in {repo.root}; use --force to replace it")
    if name == base_name:
        raise FinetuneError("the fine-tuned model needs a name of its own (--name)")
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    spec, checkpoint, base_version = base_checkpoint(repo, base_name)
    occupations = load_catalogue()
    if config.max_codes:
        occupations = occupations[: config.max_codes]
    pairs, data = training_pairs(occupations, config, options)
    encoder = _Encoder(checkpoint, spec, config.max_seq_length)
    probe_before = probe_retrieval(encoder)
    negatives = nearest_wrong_codes(encoder, occupations, config.hard_negative_pool if config.hard_negatives else 0)
    metrics = train(encoder, pairs, occupations, negatives, config, options.progress)
    probe_after = probe_retrieval(encoder)
    train_seconds = time.perf_counter() - started
    forgetting = probe_before["top1"] - probe_after["top1"]
    gate = {
        "name": "probe_top1_forgetting_max",
        "value": forgetting,
        "threshold": config.max_forgetting,
        "passed": forgetting <= config.max_forgetting,
        "before": probe_before,
        "after": probe_after,
    }
    record = {
        "base": {"name": base_name, "version": base_version},
        "config": asdict(config),
        "data": data,
        "metrics": dict(metrics, train_seconds=round(train_seconds, 1)),
        "forgetting_gate": gate,
        "tools": {"torch": torch.__version__},
    }
    log.info("fine-tuned %s on %d pairs over %d codes in %.0f s", name, len(pairs), data["codes"], train_seconds)
    if not gate["passed"]:
        raise FinetuneError(
            f"no-forgetting gate: probe top-1 fell from {probe_before['top1']:.3f} to {probe_after['top1']:.3f} "
            f"(more than {config.max_forgetting}); nothing was written"
        )
    folder.mkdir(parents=True, exist_ok=True)
    _write_model_folder(folder, name, spec, base_version, encoder, checkpoint, record)
    if not options.build:
        return folder, None
    try:
        version = build_model(repo, name, BuildOptions(force=options.force, progress=options.progress))
    except BuildError as exc:
        raise FinetuneError(f"the fine-tuned checkpoint failed its build: {exc}") from exc
    return folder, _record_in_manifest(version, record)
