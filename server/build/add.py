"""`openemploi models add PATH --name NAME`: declare a local Hugging Face checkpoint folder.

Reads what the folder says about itself (config.json, sentence-transformers pooling and
max_seq_length) and writes `models/NAME/model.toml`; `build` does the rest. Only
safetensors weights are accepted unless the caller allows pickle explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.spec import SpecError, load_spec

TEMPLATE = """# Added with `openemploi models add {path}`; edit and rebuild as needed.
name = "{name}"
description = "{description}"
architecture = "{architecture}"
dim = {dim}
max_tokens = {max_tokens}
pooling = "{pooling}"
normalize = true

[prefixes]
query = {query_prefix}
passage = {passage_prefix}

[source]
kind = "hf"
path = "{path}"
allow_pickle = {allow_pickle}

[build]
precisions = ["int8", "fp16"]
int8_mode = "static"
# auto: a packed graph (linear layers on real tokens only) for BERT, RoBERTa and XLM-R, else padded
graph_layout = "auto"
"""


@dataclass(frozen=True)
class AddOptions:
    name: str
    pooling: str = ""  # empty: read it from 1_Pooling/config.json, else mean
    query_prefix: str = ""
    passage_prefix: str = ""
    allow_pickle: bool = False
    force: bool = False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: unreadable ({exc})") from exc


def describe_checkpoint(folder: Path, options: AddOptions) -> dict:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise SpecError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    if not list(folder.glob("*.safetensors")):
        if list(folder.glob("*.bin")) and not options.allow_pickle:
            raise SpecError(f"{folder}: weights are pickle .bin files only; convert them to safetensors or pass --allow-pickle")
        if not list(folder.glob("*.bin")):
            raise SpecError(f"{folder}: no model weights (*.safetensors)")
    if not (folder / "tokenizer.json").is_file():
        raise SpecError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
    config = _read_json(folder / "config.json")
    dim = config.get("hidden_size") or config.get("d_model") or config.get("dim")
    if not isinstance(dim, int):
        raise SpecError(f"{folder}/config.json: no hidden_size")
    max_tokens = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("xlm-roberta", "roberta", "camembert"):
        max_tokens -= 2  # positions start after the padding index
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = min(max_tokens, int(_read_json(st_config).get("max_seq_length", max_tokens)))
    pooling = options.pooling
    if not pooling:
        pooling_config = folder / "1_Pooling" / "config.json"
        pooling = "mean"
        if pooling_config.is_file() and _read_json(pooling_config).get("pooling_mode_cls_token"):
            pooling = "cls"
    return {
        "name": options.name,
        "description": f"{config.get('_name_or_path') or folder.name} ({config.get('model_type', 'unknown')})",
        "architecture": config.get("model_type", "bert"),
        "dim": dim,
        "max_tokens": min(max_tokens, 512),
        "pooling": pooling,
        "query_prefix": json.dumps(options.query_prefix, ensure_ascii=False),
        "passage_prefix": json.dumps(options.passage_prefix, ensure_ascii=False),
        "path": str(folder),
        "allow_pickle": "true" if options.allow_pickle else "false",
    }


def add_model(repository_root: Path, folder: Path, options: AddOptions) -> Path:
    target = repository_root / options.name
    if (target / "model.toml").exists() and not options.force:
        raise SpecError(f"model {options.name!r} already exists in {repository_root}; use --force to replace its model.toml")
    values = describe_checkpoint(folder, options)
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.toml").write_text(TEMPLATE.format(**values), encoding="utf-8")
    load_spec(target)  # what we wrote must load
    return target
