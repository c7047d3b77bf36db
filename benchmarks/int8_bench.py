#!/usr/bin/env python3
"""int8 recipes side by side: fidelity and CPU time, on the default version's own fp32 graph.

    .venv/bin/python benchmarks/int8_bench.py [--out PATH] [--passes 6]

Quantises the built version's `onnx/model.fp32.onnx` two ways on the build's calibration batches:
`fp32-down` (the FFN down-projections left fp32: pipeline 2) and `split-outliers` (every matmul
int8, their outlier channels in fp32: `openemploi.build.outliers`, pipeline 3). Each goes through
the build's int8 gates on the French probe; then CPU time (process time, robust to other tenants)
of three loads, interleaved pass by pass in one process, 2 intra-op threads, no spinning:

* `ad`: the skills latency ad's 33 clauses in the length groups ExtractSkills embeds (ms per ad);
* `labels`: 512 ROME labels as queries in length-sorted batches of 32 (ms per text);
* `single`: 32 ROME labels one per run (ms per run).

Prints ms and the speed-up over `fp32-down`; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import embed_bench
import numpy as np

LOADS = ("ad", "labels", "single")


def quantise(fp32: Path, folder: Path, calibration: list[dict[str, np.ndarray]]) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from openemploi.build import export

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration)

        def get_next(self):
            return next(self._batches, None)

    graphs = {"fp32-down": folder / "fp32-down.onnx", "split-outliers": folder / "split-outliers.onnx"}
    quantize_static(
        str(fp32),
        str(graphs["fp32-down"]),
        Batches(),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        calibrate_method=CalibrationMethod.MinMax,
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=export.sensitive_matmuls(fp32),
        extra_options={"MatMulConstBOnly": True},
    )
    export.quantise_int8(fp32, graphs["split-outliers"], "static", calibration)
    return graphs


def fidelity_of(graphs: dict[str, Path], fp32: Path, tokenizer) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    from openemploi.build import fidelity

    def encoder(path: Path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda ids, mask: session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    probe = fidelity.Probe.load()
    reference = fidelity.embed_probe(encoder(fp32), tokenizer, probe)
    out = {}
    for name, path in graphs.items():
        report = fidelity.FidelityReport()
        fidelity.compare_precision(
            report, "int8", reference, fidelity.embed_probe(encoder(path), tokenizer, probe), probe, 0.99, 0.95
        )
        out[name] = {**{k: round(v, 5) for k, v in report.metrics.items()}, "passed": report.passed}
    return out


def feeds(tokenizer) -> dict[str, list[dict[str, np.ndarray]]]:
    from eval_skills import LATENCY_AD

    from openemploi.matching.catalogue import load_catalogue
    from openemploi.padding import pad_sequences
    from openemploi.skills.split import length_groups, split_clauses
    from openemploi.tokenize import TextKind

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        ids, mask = pad_sequences([t.ids for t in tokenizer.encode(texts, TextKind.QUERY, truncate=True)], tokenizer.pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    clauses = split_clauses(LATENCY_AD.read_text(encoding="utf-8"))
    labels = sorted((o.label for o in load_catalogue()), key=len)[:512]
    return {
        "ad": [batch([clauses[i] for i in group]) for group in length_groups(clauses)],
        "labels": [batch(labels[i : i + 32]) for i in range(0, len(labels), 32)],
        "single": [batch([labels[i]]) for i in range(0, len(labels), 16)],
    }


def cpu_times(graphs: dict[str, Path], loads: dict[str, list[dict[str, np.ndarray]]], passes: int) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    sessions = {}
    for name, path in graphs.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    per = {"ad": 1, "labels": sum(len(f["input_ids"]) for f in loads["labels"]), "single": len(loads["single"])}
    times: dict[str, dict[str, list[float]]] = {name: {load: [] for load in LOADS} for name in graphs}
    for _ in range(passes + 1):  # the first pass warms up
        for name, session in sessions.items():
            for load in LOADS:
                started = time.process_time()
                for feed in loads[load]:
                    session.run(None, feed)
                times[name][load].append((time.process_time() - started) * 1000 / per[load])
    return {name: {load: float(np.median(t[load][1:])) for load in LOADS} for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--passes", type=int, default=6)
    args = parser.parse_args()
    from openemploi.build import fidelity

    version = embed_bench.model_version()
    tokenizer = embed_bench.server_tokenizer(version)
    fp32 = version.folder / version.manifest["files"]["onnx"]["fp32"]
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as scratch:
        graphs = quantise(fp32, Path(scratch), fidelity.calibration_batches(tokenizer))
        gates = fidelity_of(graphs, fp32, tokenizer)
        cpu = cpu_times(graphs, feeds(tokenizer), args.passes)
    base = cpu["fp32-down"]
    result = {"version": version.version, "passes": args.passes, "fidelity": gates, "cpu_ms": cpu}
    for name in graphs:
        speed = "  ".join(f"{load} {cpu[name][load]:.2f} ms ({base[load] / cpu[name][load]:.2f}x)" for load in LOADS)
        print(f"{name:15s} {speed}  gates {gates[name]}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
