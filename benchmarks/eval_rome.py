"""Evaluate free-text -> ROME occupation matching on the team's dev set, per part and per style.

The dev set (benchmarks/data/rome_dev.jsonl) is split in two stable halves (`split`): `tune`,
the only part anything is fitted on (the matcher's fusion weights, `--fit-fusion`), and
`heldout`, reported and never fitted on. For each model and precision it reports top-1, top-5
and MRR@10 of lexical only, dense only, hybrid with the hand-set fusion and hybrid with the
fitted one, on both parts and by style; with `--fit-fusion`, also the fit's 5-fold out-of-fold
scores within the tuning part, beside the unfitted fusions (is the grid fitting noise?). The `rome` collection is built for each model and
precision exactly as the server builds it, in benchmarks/.cache/ (reused while the catalogue
and the model version are unchanged).

    .venv/bin/python benchmarks/eval_rome.py [--models multilingual-e5-small,e5-small-rome]
        [--precisions int8] [--fit-fusion] [--promote e5-small-rome] [--out PATH]

Promotion (`--promote NAME`, which `make finetune` passes): a fine-tuned model becomes the
server's default only if it beats its base model on the held-out part (hybrid, int8: top-1, then
top-5, then MRR). The decision is written to var/promoted.toml (`default_model`, `models`), which
`make serve` passes as `--config`; a model that does not win is not promoted, and a promotion of
it from an earlier run is withdrawn.

Leak checks: the team's example queries that the `rome` collection indexes (`example` entries,
the same texts fine-tuning trains on) are checked against the held-out queries for every model
(the catalogue's own titles are not: a query naming a job is meant to meet its title); and for a
fine-tuned model (its manifest has a `finetune` record) the training pairs are
regenerated, their hash compared with the manifest's, and every training text is checked against
the held-out queries: none may be a near-duplicate (character 3-gram Jaccard >= 0.5 after folding
accents, case and punctuation; see openemploi/build/finetune_data.py).

Stress test: the example queries and the dev set were written by the same team, so some examples
share much of a dev query's wording (character 3-gram Jaccard 0.35 at the median for the closest
example of the right code, below the 0.5 that counts as a near-duplicate). The held-out part is
also scored with every example of Jaccard >= 0.3 to its query left out, as if never written
(`heldout_without_close_examples`): what the examples give when none says it the query's way.

Targets (held-out, hybrid, int8, CPU): top-1 >= 0.80, top-5 >= 0.95, every style top-1 >= 0.65.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import socket
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from openemploi.backends.options import BackendConfig
from openemploi.batching import BatcherConfig
from openemploi.build.finetune import FinetuneConfig, FinetuneOptions, training_pairs
from openemploi.build.finetune_data import NEAR_DUPLICATE_JACCARD, NearDuplicateIndex, load_queries
from openemploi.index.collection import CollectionManager
from openemploi.matching import fusion as fusion_fit
from openemploi.matching.bootstrap import ensure_rome_collection
from openemploi.matching.catalogue import entries, load_catalogue
from openemploi.matching.fusion import FUSION_FILE, EntryKind, Fusion, FusionTable
from openemploi.matching.matcher import OccupationMatcher
from openemploi.runtime.registry import ModelRegistry
from openemploi.runtime.repository import ModelRepository
from openemploi.tokenize import TextKind

REPO = Path(__file__).resolve().parents[1]
PROMOTED = REPO / "var" / "promoted.toml"
DEV_SET = REPO / "benchmarks" / "data" / "rome_dev.jsonl"
PARTS = ("tune", "heldout")
STYLES = ("seeker", "offer", "cv", "keywords")
TARGET = {"top1": 0.80, "top5": 0.95, "style_top1": 0.65}


def scores_for(ranked: list[list[str]], expected: list[str]) -> dict[str, float]:
    top1 = sum(r[:1] == [e] for r, e in zip(ranked, expected)) / len(expected)
    top5 = sum(e in r[:5] for r, e in zip(ranked, expected)) / len(expected)
    mrr = sum(1.0 / (r[:10].index(e) + 1) if e in r[:10] else 0.0 for r, e in zip(ranked, expected)) / len(expected)
    return {"top1": round(top1, 4), "top5": round(top5, 4), "mrr": round(mrr, 4)}


CV_FOLDS = 5  # --fit-fusion also cross-validates the fit within the tuning part
CLOSE_EXAMPLE_JACCARD = 0.3  # the stress test's cut: examples this close to a held-out query are left out


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items()}


def leak_check(repo: ModelRepository, model: str, dev: list[dict]) -> dict | None:
    """None for a model that was not fine-tuned; else what its training data shares with the held-out part."""
    version = repo.latest(model)
    record = version.manifest.get("finetune")
    if record is None:
        return None
    known = set(FinetuneConfig.__dataclass_fields__)
    config = FinetuneConfig(**{k: v for k, v in record["config"].items() if k in known})
    occupations = load_catalogue()
    if config.max_codes:
        occupations = occupations[: config.max_codes]
    pairs, data = training_pairs(occupations, config, FinetuneOptions(exclude=DEV_SET))
    heldout = [d["query"] for d in dev if d["split"] == "heldout"]
    duplicates = NearDuplicateIndex(heldout).duplicates(p.anchor for p in pairs)
    return {
        "training_texts": len({p.anchor for p in pairs}),
        "heldout_queries": len(heldout),
        "threshold_jaccard_3gram": NEAR_DUPLICATE_JACCARD,
        "near_duplicates": [{"text": d.text, "query": d.query, "jaccard": round(d.similarity, 3)} for d in duplicates],
        "same_data_as_manifest": data["sha256"] == record["data"]["sha256"],
    }


def by_style_scores(candidates: list, expected: list[str], styles: list[str], fusion: Fusion) -> dict[str, dict[str, float]]:
    def of(style: str) -> list[int]:
        return [i for i, s in enumerate(styles) if s == style]

    return {
        style: _rounded(fusion_fit.evaluate([candidates[i] for i in of(style)], [expected[i] for i in of(style)], fusion))
        for style in STYLES
    }


def index_leak_check(occupations: list, dev: list[dict]) -> dict:
    """What the example queries the `rome` collection indexes share with the held-out part."""
    heldout = [d["query"] for d in dev if d["split"] == "heldout"]
    texts = [e.text for occupation in occupations for e in entries(occupation) if e.kind == EntryKind.EXAMPLE.value]
    duplicates = NearDuplicateIndex(heldout).duplicates(texts)
    return {
        "indexed_examples": len(texts),
        "heldout_queries": len(heldout),
        "threshold_jaccard_3gram": NEAR_DUPLICATE_JACCARD,
        "near_duplicates": [{"text": d.text, "query": d.query, "jaccard": round(d.similarity, 3)} for d in duplicates],
    }


def without_close_examples(matcher, occupations: list, dev: list[dict], queries, vectors, fusion: Fusion) -> dict:
    """Held-out scores with each query's close example entries (Jaccard >= CLOSE_EXAMPLE_JACCARD) left out."""
    ids_by_text: dict[str, list[str]] = {}
    for e in (e for o in occupations for e in entries(o) if e.kind == EntryKind.EXAMPLE.value):
        ids_by_text.setdefault(e.text, []).append(e.id)
    close = NearDuplicateIndex(list(ids_by_text), threshold=CLOSE_EXAMPLE_JACCARD)
    rows = [i for i, d in enumerate(dev) if d["split"] == "heldout"]
    left_out = [frozenset(id_ for d in close.near(queries[i]) for id_ in ids_by_text[d.query]) for i in rows]
    candidates = [matcher.candidates(queries[i], vectors[i], without) for i, without in zip(rows, left_out)]
    expected = [dev[i]["code"] for i in rows]
    by_style = by_style_scores(candidates, expected, [dev[i]["style"] for i in rows], fusion)
    return {
        "jaccard_3gram": CLOSE_EXAMPLE_JACCARD,
        "examples_left_out_per_query": round(sum(map(len, left_out)) / len(rows), 2),
        "hybrid": _rounded(fusion_fit.evaluate(candidates, expected, fusion)),
        "hybrid_by_style": by_style,
    }


async def evaluate(model_name: str, precision: str, dev: list[dict], fit: bool) -> dict:
    repo = ModelRepository(REPO / "models")
    backend = BackendConfig(device="cpu", cpu_precision=precision)
    registry = ModelRegistry(repo, BatcherConfig(), backend, model_name)
    model = await registry.load(model_name)
    occupations = load_catalogue()
    manager = CollectionManager(REPO / "benchmarks" / ".cache" / f"rome-{model_name}-{precision}")
    started = time.perf_counter()
    collection = await ensure_rome_collection(manager, model, occupations, progress=True)
    index_s = time.perf_counter() - started
    table = FusionTable.load()
    matcher = OccupationMatcher(lambda: collection, occupations, table)
    queries = [d["query"] for d in dev]
    vectors = (await model.embed(queries, TextKind.QUERY, truncate=True)).normalized
    started = time.perf_counter()
    candidates = [matcher.candidates(q, v) for q, v in zip(queries, vectors)]
    ms_per_query = (time.perf_counter() - started) * 1e3 / len(dev)
    ranked = {
        mode: [[m.occupation.code for m in matcher.match(q, v, 10, mode)] for q, v in zip(queries, vectors)]
        for mode in ("lexical", "dense")
    }
    expected = [d["code"] for d in dev]
    tune = [i for i, d in enumerate(dev) if d["split"] == "tune"]
    fitted_fusion = table.for_model(model_name)
    fit_report = None
    if fit:
        tune_candidates, tune_expected = [candidates[i] for i in tune], [expected[i] for i in tune]
        fitted_fusion, tune_metrics = fusion_fit.fit(tune_candidates, tune_expected)
        fit_report = {"fusion": fitted_fusion.to_dict(), "tune": _rounded(tune_metrics), "model_version": model.version.version}
        # Within the tuning part only: does fitting beat the unfitted fusions on queries it did not see?
        cv = fusion_fit.cross_validate(tune_candidates, tune_expected, folds=CV_FOLDS)
        fit_report["cv"] = {name: _rounded(metrics) for name, metrics in cv.items()}
    fusions = {"hybrid-handset": Fusion(), "hybrid": fitted_fusion}
    report: dict = {"model": model_name, "version": model.version.version, "precision": precision}
    report["index_seconds"] = round(index_s, 1)
    report["ms_per_query"] = round(ms_per_query, 2)
    report["fusion"] = fitted_fusion.to_dict()
    report["fit"] = fit_report
    for part in (*PARTS, "all"):
        rows = [i for i, d in enumerate(dev) if part == "all" or d["split"] == part]
        part_report: dict = {}
        for mode in ("lexical", "dense"):
            part_report[mode] = scores_for([ranked[mode][i] for i in rows], [expected[i] for i in rows])
        for mode, fusion in fusions.items():
            part_report[mode] = _rounded(fusion_fit.evaluate([candidates[i] for i in rows], [expected[i] for i in rows], fusion))
        part_report["hybrid_by_style"] = by_style_scores(
            [candidates[i] for i in rows], [expected[i] for i in rows], [dev[i]["style"] for i in rows], fusions["hybrid"]
        )
        report[part] = part_report
    report["heldout_without_close_examples"] = without_close_examples(
        matcher, occupations, dev, queries, vectors, fusions["hybrid"]
    )
    report["leak_check"] = leak_check(repo, model_name, dev)
    report["index_leak_check"] = index_leak_check(occupations, dev)
    manager.close()
    await registry.close()
    return report


def write_fusion(runs: list[dict]) -> None:
    """Store the fusion fitted on the tuning part for each model evaluated (int8 run first)."""
    data = json.loads(FUSION_FILE.read_text(encoding="utf-8")) if FUSION_FILE.is_file() else {}
    data.setdefault("default", Fusion().to_dict())
    models = data.setdefault("models", {})
    for run in sorted(runs, key=lambda r: r["precision"] == "int8"):  # the int8 fit, when there is one, wins
        if run["fit"]:
            models[run["model"]] = dict(
                run["fit"]["fusion"],
                fitted_on={"split": "tune", "precision": run["precision"], "version": run["version"], "tune": run["fit"]["tune"]},
            )
    FUSION_FILE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Promotion:
    model: str
    base: str
    promoted: bool
    reason: str


def promotion(runs: list[dict], model: str, base: str) -> Promotion:
    """Does `model` beat `base` on the held-out part (hybrid, int8; top-1, then top-5, then MRR)?"""
    by_name = {run["model"]: run for run in runs if run["precision"] == "int8"}
    missing = [name for name in (model, base) if name not in by_name]
    if missing:
        return Promotion(model, base, False, f"no int8 run of {', '.join(missing)}: evaluate both with --models {base},{model}")
    scores = {name: by_name[name]["heldout"]["hybrid"] for name in (model, base)}
    keys = {name: (s["top1"], s["top5"], s["mrr"]) for name, s in scores.items()}
    shown = {name: "top-1 {:.3f}, top-5 {:.3f}, MRR {:.3f}".format(*key) for name, key in keys.items()}
    verdict = "beats" if keys[model] > keys[base] else "does not beat"
    return Promotion(
        model, base, keys[model] > keys[base], f"{model} ({shown[model]}) {verdict} {base} ({shown[base]}) on the held-out part"
    )


def write_promotion(decision: Promotion, versions: dict[str, str], path: Path = PROMOTED) -> None:
    """Promote: write the server config that makes the model the default. Otherwise withdraw an
    earlier promotion of the same model (another model's stays)."""
    if not decision.promoted:
        if path.is_file() and tomllib.loads(path.read_text(encoding="utf-8")).get("default_model") == decision.model:
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Written by benchmarks/eval_rome.py --promote on {dt.date.today()}: {decision.reason}.\n"
        f"# {decision.model} version {versions.get(decision.model, '?')}. `make serve` reads this file; delete it to go back.\n"
        f"default_model = {json.dumps(decision.model)}\n"
        f"models = [{json.dumps(decision.model)}, {json.dumps(decision.base)}]\n",
        encoding="utf-8",
    )


def print_report(runs: list[dict]) -> bool:
    passed_all = True
    print(f"\n{'model':<24} {'prec':<5} {'part':<8} {'mode':<15} {'top-1':>6} {'top-5':>6} {'MRR':>6}")
    for run in runs:
        for part in (*PARTS, "all"):
            for mode in ("lexical", "dense", "hybrid-handset", "hybrid"):
                r = run[part][mode]
                print(
                    f"{run['model']:<24} {run['precision']:<5} {part:<8} {mode:<15} {r['top1']:>6.3f} {r['top5']:>6.3f} {r['mrr']:>6.3f}"
                )
            styles = ", ".join(f"{s} {v['top1']:.2f}/{v['top5']:.2f}" for s, v in run[part]["hybrid_by_style"].items())
            print(f"{'':<24} {'':<5} {part:<8} by style (top-1/top-5): {styles}")
        held = run["heldout"]
        passed = (
            held["hybrid"]["top1"] >= TARGET["top1"]
            and held["hybrid"]["top5"] >= TARGET["top5"]
            and all(v["top1"] >= TARGET["style_top1"] for v in held["hybrid_by_style"].values())
        )
        indexed = run["index_leak_check"]
        passed &= not indexed["near_duplicates"]
        passed_all &= passed or run["precision"] != "int8"
        print(
            f"{run['model']} {run['precision']}: fusion {run['fusion']}; {run['ms_per_query']} ms/query; "
            f"held-out target (top-1 >= {TARGET['top1']}, top-5 >= {TARGET['top5']}, every style >= {TARGET['style_top1']}): "
            f"{'PASS' if passed else 'MISS'}"
        )
        if run["fit"] and "cv" in run["fit"]:
            cv = ", ".join(f"{name} {m['top1']:.3f}/{m['top5']:.3f}" for name, m in run["fit"]["cv"].items())
            print(f"tuning part, {CV_FOLDS}-fold out-of-fold top-1/top-5: {cv}")
        stress = run["heldout_without_close_examples"]
        styles = ", ".join(f"{s} {v['top1']:.2f}" for s, v in stress["hybrid_by_style"].items())
        print(
            f"held-out, examples of Jaccard >= {stress['jaccard_3gram']} to the query left out "
            f"({stress['examples_left_out_per_query']} per query): hybrid top-1/top-5 "
            f"{stress['hybrid']['top1']:.3f}/{stress['hybrid']['top5']:.3f}; top-1 by style: {styles}"
        )
        print(
            f"index leak check: {indexed['indexed_examples']} indexed example queries vs {indexed['heldout_queries']} held-out queries: "
            f"{len(indexed['near_duplicates'])} near-duplicates"
        )
        for item in indexed["near_duplicates"][:10]:
            print(f"  {item['jaccard']:.2f}  {item['text']!r} ~ {item['query']!r}")
        leak = run["leak_check"]
        if leak is not None:
            print(
                f"leak check: {leak['training_texts']} training texts vs {leak['heldout_queries']} held-out queries, "
                f"3-gram Jaccard >= {leak['threshold_jaccard_3gram']}: {len(leak['near_duplicates'])} near-duplicates; "
                f"training data {'matches' if leak['same_data_as_manifest'] else 'DIFFERS FROM'} the manifest's hash"
            )
            for item in leak["near_duplicates"][:10]:
                print(f"  {item['jaccard']:.2f}  {item['text']!r} ~ {item['query']!r}")
    return passed_all


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="multilingual-e5-small", help="comma-separated models of models/")
    parser.add_argument("--precisions", default="int8")
    parser.add_argument("--fit-fusion", action="store_true", help="fit each model's fusion on the tuning part, store it")
    parser.add_argument("--promote", metavar="MODEL", help="make this fine-tuned model the default if it beats its base")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.promote and args.promote not in args.models.split(","):
        parser.error(f"--promote {args.promote}: add it to --models")
    dev = load_queries(DEV_SET)
    runs = [
        asyncio.run(evaluate(model, precision, dev, args.fit_fusion))
        for model in args.models.split(",")
        for precision in args.precisions.split(",")
    ]
    if args.fit_fusion:
        write_fusion(runs)
        print(f"wrote {FUSION_FILE.relative_to(REPO) if FUSION_FILE.is_relative_to(REPO) else FUSION_FILE}")
    counts = {part: sum(d["split"] == part for d in dev) for part in PARTS}
    print(f"\nROME dev set: {len(dev)} queries ({DEV_SET.relative_to(REPO)}), {counts}")
    passed = print_report(runs)
    out = args.out or REPO / "benchmarks" / "results" / f"rome-eval-{dt.date.today()}-{socket.gethostname()}.json"
    payload = {
        "date": str(dt.date.today()),
        "machine": platform.platform(),
        "queries": len(dev),
        "runs": runs,
        "target_passed": passed,
    }
    if args.promote:
        record = ModelRepository(REPO / "models").latest(args.promote).manifest.get("finetune")
        if record is None:
            parser.error(f"--promote {args.promote}: not a fine-tuned model (its manifest has no finetune record)")
        decision = promotion(runs, args.promote, record["base"]["name"])
        write_promotion(decision, {run["model"]: run["version"] for run in runs})
        payload["promotion"] = {
            "model": decision.model,
            "base": decision.base,
            "promoted": decision.promoted,
            "reason": decision.reason,
        }
        where = PROMOTED.relative_to(REPO)
        print(f"promotion: {decision.reason}: " + (f"default model now (wrote {where})" if decision.promoted else "not promoted"))
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
