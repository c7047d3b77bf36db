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
    EXAMPLE = "example"


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


@dataclass(frozen=True)
class _Stacked:
    """Queries' candidates padded to one array, so a fusion scores every query in one numpy pass."""

    dense: np.ndarray  # [queries, codes, kinds]; -inf in padding
    lexical: np.ndarray  # [queries, codes]
    target: np.ndarray  # [queries]: the expected code's column, -1 where it was not retrieved
    missing_rank: np.ndarray  # [queries]: the rank a query whose code was not retrieved counts

    @classmethod
    def of(
        cls,
        candidates: Sequence[Candidates],
        expected: Sequence[str],
        prune: tuple[float, Sequence[float]] | None = None,
    ) -> _Stacked:
        """With `prune` (a lexical weight, the bonus grid), only the codes that can outscore the
        expected one at that weight under some bonuses of the grid are kept: the others are behind
        it whatever bonuses the fit picks."""
        kept = [_contenders(cand, code, prune) for cand, code in zip(candidates, expected)]
        width = max((len(columns) for columns in kept), default=0) or 1
        dense = np.full((len(candidates), width, len(KINDS)), -np.inf)
        lexical = np.zeros((len(candidates), width))
        target = np.full(len(candidates), -1, dtype=np.int64)
        for row, (cand, code, columns) in enumerate(zip(candidates, expected, kept)):
            dense[row, : len(columns)] = cand.dense[columns]
            lexical[row, : len(columns)] = cand.lexical[columns]
            if code in cand.codes:
                target[row] = columns.index(cand.codes.index(code))
        missing = np.array([max(len(c.codes), 10) for c in candidates], dtype=np.int64)
        return cls(dense, lexical, target, missing)

    def ranks(self, fusion: Fusion) -> np.ndarray:
        """Rank (0 = top) of the expected code for each query; `missing_rank` when it was not retrieved."""
        return self.ranks_for_bonuses(fusion.lexical_weight, np.asarray([fusion.bonus]))[0]

    def ranks_for_bonuses(self, lexical_weight: float, bonuses: np.ndarray) -> np.ndarray:
        """[len(bonuses), queries]: the ranks under each row of bonuses at one lexical weight."""
        scores = (self.dense[None] + bonuses[:, None, None, :]).max(axis=3) + lexical_weight * self.lexical[None]
        rows = np.arange(len(self.target))
        own = scores[:, rows, np.maximum(self.target, 0)][:, :, None]
        columns = np.arange(scores.shape[2])[None, None, :]
        # equal scores: the lower code (an earlier column, codes are sorted) wins
        ahead = (scores > own) | ((scores == own) & (columns < self.target[None, :, None]))
        return np.where(self.target >= 0, ahead.sum(axis=2), self.missing_rank)


def _contenders(cand: Candidates, code: str, prune: tuple[float, Sequence[float]] | None) -> list[int]:
    """The columns of `cand` to keep, in order (the expected code's among them)."""
    if prune is None or code not in cand.codes:
        return list(range(len(cand.codes)))
    weight, bonuses = prune
    target = cand.codes.index(code)
    lowest_bonus = np.array([0.0] + [min(bonuses)] * (len(KINDS) - 1))  # the label's bonus is fixed at 0
    floor = (cand.dense[target] + lowest_bonus).max() + weight * cand.lexical[target]
    ceiling = cand.dense.max(axis=1) + max(0.0, max(bonuses)) + weight * cand.lexical
    return [column for column in range(len(cand.codes)) if column == target or ceiling[column] >= floor]


def _ranks(candidates: Sequence[Candidates], expected: Sequence[str], fusion: Fusion) -> np.ndarray:
    return _Stacked.of(candidates, expected).ranks(fusion)


def evaluate(candidates: Sequence[Candidates], expected: Sequence[str], fusion: Fusion) -> dict[str, float]:
    return _metrics(_ranks(candidates, expected, fusion))


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    top1, top5, mrr = _metric_rows(ranks[None])
    return {"top1": float(top1[0]), "top5": float(top5[0]), "mrr": float(mrr[0])}


def _metric_rows(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1, top-5 and MRR@10 of each row of ranks ([fusions, queries])."""
    reciprocal = np.where(ranks < 10, 1.0 / (ranks + 1), 0.0)
    return (ranks == 0).mean(axis=1), (ranks < 5).mean(axis=1), reciprocal.mean(axis=1)


LEXICAL_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0 .. 1
BONUS_GRID = tuple(round(0.01 * i, 2) for i in range(-5, 6))  # -0.05 .. 0.05, relative to the label entry


def fit(
    candidates: Sequence[Candidates],
    expected: Sequence[str],
    lexical_grid: Sequence[float] = LEXICAL_GRID,
    bonus_grid: Sequence[float] = BONUS_GRID,
) -> tuple[Fusion, dict[str, float]]:
    """Grid search: the best top-1, then MRR; among equals the one closest to the hand-set default.

    Every kind but the label gets a bonus from `bonus_grid` (the label is the reference, at 0)."""
    if not candidates:
        raise ValueError("cannot fit a fusion on no queries")
    bonuses = np.array([(0.0, *combo) for combo in itertools.product(bonus_grid, repeat=len(KINDS) - 1)])
    bonus_distance = np.abs(bonuses).sum(axis=1)
    default = Fusion()
    best: tuple[tuple[float, float, float], Fusion, dict[str, float]] | None = None
    for weight in lexical_grid:
        stacked = _Stacked.of(candidates, expected, (weight, bonus_grid))
        top1, top5, mrr = _metric_rows(stacked.ranks_for_bonuses(weight, bonuses))
        distance = abs(weight - default.lexical_weight) + bonus_distance
        row = int(np.lexsort((distance, -mrr, -top1))[0])  # the best row; the first of equal ones
        key = (float(top1[row]), float(mrr[row]), -float(distance[row]))
        if best is None or key > best[0]:
            metrics = {"top1": float(top1[row]), "top5": float(top5[row]), "mrr": float(mrr[row])}
            best = (key, Fusion(weight, tuple(float(b) for b in bonuses[row])), metrics)
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
