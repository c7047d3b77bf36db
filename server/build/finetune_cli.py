"""`openemploi models finetune BASE --name NEW [...]`: flags and the run (torch is imported only here, late)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from enum import Enum
from pathlib import Path

from .finetune_data import PARAPHRASES

DEFAULT_EXCLUDE = "benchmarks/data/rome_dev.jsonl"


def add_parser(subcommands) -> argparse.ArgumentParser:
    from .finetune import FinetuneConfig

    defaults = FinetuneConfig()
    command = subcommands.add_parser("finetune", help="fine-tune a model on the ROME catalogue, then build it")
    command.add_argument("base", help="model of the repository to start from (e.g. multilingual-e5-small)")
    command.add_argument("--name", required=True, help="the new model's name (models/NAME/)")
    for field in fields(FinetuneConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        choices = [member.value for member in type(default)] if isinstance(default, Enum) else None
        command.add_argument(flag, type=type(default), default=default, choices=choices)
    command.add_argument(
        "--exclude", default=DEFAULT_EXCLUDE, help="dev set whose queries no training text may be a near-duplicate of"
    )
    command.add_argument("--paraphrases", default=str(PARAPHRASES))
    command.add_argument("--no-build", action="store_true", help="write the model folder, do not build it")
    command.add_argument("--force", action="store_true", help="replace an existing model of that name")
    command.add_argument("--no-progress", action="store_true")
    return command


def run(args: argparse.Namespace) -> int:
    from ..runtime.repository import ModelNotFound, ModelRepository
    from .finetune import FinetuneConfig, FinetuneError, FinetuneOptions, finetune

    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    options = FinetuneOptions(
        force=args.force,
        progress=not args.no_progress,
        exclude=Path(args.exclude) if args.exclude else None,
        paraphrases=Path(args.paraphrases),
        build=not args.no_build,
    )
    started, cpu = time.perf_counter(), time.process_time()
    try:
        folder, version = finetune(ModelRepository(Path(args.model_repository)), args.base, args.name, config, options)
    except (FinetuneError, ModelNotFound) as exc:
        print(f"openemploi: finetune failed: {exc}", file=sys.stderr)
        return 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    record = json.loads((folder / "checkpoint" / "finetune.json").read_text())
    print(f"{args.name}: {folder} in {wall:.0f} s ({cpu:.0f} s of CPU), version {version.version if version else '(not built)'}")
    print(json.dumps({k: record[k] for k in ("data", "metrics", "forgetting_gate")}, indent=1))
    return 0
