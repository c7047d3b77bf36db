"""How MatchOccupation turns an occupation's dense and lexical evidence into one score.

score = max over the occupation's entries of (cosine + bonus[entry kind]) + lexical_weight * bm25 / best bm25

The weights are fitted per model on the tuning part of the dev set (`benchmarks/eval_rome.py
--fit-fusion`, a grid search for top-1 then MRR) and stored in `data/fusion.json`; a model
with no fitted weights gets the hand-set default (lexical 0.35, no entry bonus).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

FUSION_FILE = Path(__file__).parent / "data" / "fusion.json"


class EntryKind(str, Enum):
    """The kinds of catalogue entry (`catalogue.entries`), in a fixed column order."""

    LABEL = "label"
    TITLE = "title"
    TASKS = "tasks"


KINDS = tuple(EntryKind)


@dataclass(frozen=True)
class Fusion:
    lexical_weight: float = 0.35
    bonus: tuple[float, ...] = (0.0,) * len(KINDS)  # per EntryKind, in KINDS order

    def score(self, dense_by_kind: Sequence[float], lexical_share: float) -> float:
        """dense_by_kind: the best cosine of each entry kind (-inf where the code has none retrieved)."""
        return max(d + b for d, b in zip(dense_by_kind, self.bonus)) + self.lexical_weight * lexical_share

    def to_dict(self) -> dict:
        return {"lexical_weight": self.lexical_weight, "entry_bonus": {k.value: b for k, b in zip(KINDS, self.bonus)}}

    @classmethod
    def from_dict(cls, data: dict) -> Fusion:
        bonus = data.get("entry_bonus", {})
        unknown = set(bonus) - {k.value for k in KINDS}
        if unknown:
            raise ValueError(f"fusion entry_bonus: unknown entry kinds {sorted(unknown)}")
        return cls(float(data["lexical_weight"]), tuple(float(bonus.get(k.value, 0.0)) for k in KINDS))


@dataclass(frozen=True)
class FusionTable:
    """Fitted weights by model name; `default` for any other model."""

    default: Fusion = Fusion()
    by_model: dict[str, Fusion] = field(default_factory=dict)

    def for_model(self, model: str) -> Fusion:
        return self.by_model.get(model, self.default)

    @classmethod
    def load(cls, path: Path = FUSION_FILE) -> FusionTable:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        models = {name: Fusion.from_dict(entry) for name, entry in data.get("models", {}).items()}
        return cls(Fusion.from_dict(data["default"]) if "default" in data else Fusion(), models)


@dataclass(frozen=True)
class Candidates:
    """One query's evidence, a row per retrieved code: best cosine per entry kind, bm25 share."""

    codes: tuple[str, ...]  # sorted, so ties resolve as the matcher resolves them (lowest code first)
    dense: np.ndarray  # [codes, len(KINDS)], -inf where a kind was not retrieved
    lexical: np.ndarray  # [codes], bm25 / best bm25 of the query, in [0, 1]


def _ranks(candidates: Sequence[Candidates], expected: Sequence[str], fusion: Fusion) -> np.ndarray:
    """Rank (0 = top) of the expected code for each query; len(codes) when it was not retrieved."""
    bonus = np.asarray(fusion.bonus)
    ranks = np.empty(len(candidates), dtype=np.int64)
    for i, (cand, code) in enumerate(zip(candidates, expected)):
        if code not in cand.codes:
            ranks[i] = max(len(cand.codes), 10)
            continue
        scores = (cand.dense + bonus).max(axis=1) + fusion.lexical_weight * cand.lexical
        target = cand.codes.index(code)
        ahead = scores > scores[target]
        ahead[:target] |= scores[:target] == scores[target]  # equal scores: the lower code wins
        ranks[i] = int(ahead.sum())
    return ranks


def evaluate(candidates: Sequence[Candidates], expected: Sequence[str], fusion: Fusion) -> dict[str, float]:
    return _metrics(_ranks(candidates, expected, fusion))


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    return {
        "top1": float(np.mean(ranks == 0)),
        "top5": float(np.mean(ranks < 5)),
        "mrr": float(np.mean(np.where(ranks < 10, 1.0 / (ranks + 1), 0.0))),
    }


LEXICAL_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0 .. 1
BONUS_GRID = tuple(round(0.01 * i, 2) for i in range(-5, 6))  # -0.05 .. 0.05, relative to the label entry


def fit(
    candidates: Sequence[Candidates],
    expected: Sequence[str],
    lexical_grid: Sequence[float] = LEXICAL_GRID,
    bonus_grid: Sequence[float] = BONUS_GRID,
) -> tuple[Fusion, dict[str, float]]:
    """Grid search: the best top-1, then MRR; among equals the one closest to the hand-set default."""
    if not candidates:
        raise ValueError("cannot fit a fusion on no queries")
    best: tuple[tuple[float, float, float], Fusion, dict[str, float]] | None = None
    default = Fusion()
    for weight, title, tasks in itertools.product(lexical_grid, bonus_grid, bonus_grid):
        fusion = Fusion(weight, (0.0, title, tasks))
        metrics = evaluate(candidates, expected, fusion)
        distance = abs(weight - default.lexical_weight) + abs(title) + abs(tasks)
        key = (metrics["top1"], metrics["mrr"], -distance)
        if best is None or key > best[0]:
            best = (key, fusion, metrics)
    assert best is not None
    return best[1], best[2]


def cross_validate(
    candidates: Sequence[Candidates], expected: Sequence[str], folds: int = 5, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Out-of-fold metrics of `fit` on these queries, beside two fusions fitted on nothing.

    Each fold is scored by a fusion fitted on the other folds, so "fitted" estimates what fitting
    on all the queries gives on queries it never saw; "handset" (the default) and "dense" (no
    lexical share, no entry bonus) need no fitting and are scored on every query. If "fitted"
    does not beat them out of fold, the grid is fitting the tuning queries' noise.
    """
    count = len(candidates)
    if count < folds:
        raise ValueError(f"cannot cross-validate {count} queries in {folds} folds")
    order = np.random.default_rng(seed).permutation(count)
    ranks = np.empty(count, dtype=np.int64)
    for fold in np.array_split(order, folds):
        held = set(fold.tolist())
        rest = [i for i in range(count) if i not in held]
        fusion, _ = fit([candidates[i] for i in rest], [expected[i] for i in rest])
        ranks[fold] = _ranks([candidates[i] for i in fold], [expected[i] for i in fold], fusion)
    out = {"fitted": _metrics(ranks)}
    for name, fusion in (("handset", Fusion()), ("dense", Fusion(0.0))):
        out[name] = _metrics(_ranks(candidates, expected, fusion))
    return out
