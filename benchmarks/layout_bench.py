#!/usr/bin/env python3
"""Graph layout x CPU runs: what a served batch costs, on the same texts, in one process.

    .venv/bin/python benchmarks/layout_bench.py [--out PATH] [--passes 2]

Exports the default model's checkpoint twice through the build's own functions (padded: the
plain Hugging Face forward; packed: `openemploi.build.packed`), quantises both to static int8 on
the same calibration batches, then times every combination, interleaved pass by pass so a noisy
neighbour hits them alike:

* graphs: padded, packed;
* runs: one run on 2 intra-op threads (the old default) vs the batch split by length into 2
  single-threaded runs at once (`cpu_parallel_runs`, the backend's own `OnnxEncoder`);
* batches: the 1,584 ROME labels in arrival order (shuffled, seed 0) in batches of 14 (what the
  server forms at 32 clients) and 32, and length-sorted batches of 32 (the peers "raw" baseline).

Prints texts/s and CPU ms per text for each, and the ratios to padded x 1 run; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import embed_bench
import peers


def build_graphs(folder: Path) -> dict[str, Path]:
    """int8 graphs of the default version's checkpoint, padded and packed, under ``folder``."""
    from openemploi.build import export, fidelity
    from openemploi.runtime.spec import GraphLayout

    version = embed_bench.model_version()
    tokenizer = embed_bench.server_tokenizer(version)
    model = export.load_torch_encoder(version.checkpoint_path, version.manifest["pooling"])
    calibration = fidelity.calibration_batches(tokenizer)
    graphs = {}
    for layout in (GraphLayout.PADDED, GraphLayout.PACKED):
        module, _ = export.layout_module(model, layout)
        fp32 = export.export_onnx(module, folder / f"{layout}.fp32.onnx", vocab_size=1000)
        graphs[str(layout)] = folder / f"{layout}.int8.onnx"
        export.quantise_int8(fp32, graphs[str(layout)], "static", calibration)
    return graphs


def encoder(graph: Path, runs: int, dim: int):
    from openemploi.backends.base import BackendKind, Choice, Device, ExecutionProvider, Precision
    from openemploi.backends.onnx import OnnxEncoder
    from openemploi.backends.options import BackendConfig

    choice = Choice(
        BackendKind.ONNX,
        Device.CPU,
        Precision.INT8,
        graph,
        "layout_bench",
        providers=(ExecutionProvider.CPU,),
        parallel_runs=runs,
    )
    return OnnxEncoder(choice, BackendConfig(cpu_parallel_runs=runs), dim=dim)


def measure(passes: int) -> dict[str, Any]:
    from openemploi.padding import pad_sequences
    from openemploi.tokenize import TextKind

    version = embed_bench.model_version()
    tokenizer = embed_bench.server_tokenizer(version)
    texts = peers.rome_labels(1584)
    ids = [t.ids for t in tokenizer.encode(texts, TextKind.PASSAGE, truncate=True)]
    arrival = list(range(len(ids)))
    random.Random(0).shuffle(arrival)
    by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    workloads = {
        "arrival_b14": [arrival[i : i + 14] for i in range(0, len(arrival), 14)],
        "arrival_b32": [arrival[i : i + 32] for i in range(0, len(arrival), 32)],
        "sorted_b32": [by_length[i : i + 32] for i in range(0, len(by_length), 32)],
    }
    batches = {
        name: [pad_sequences([ids[i] for i in chunk], tokenizer.pad_id) for chunk in chunks] for name, chunks in workloads.items()
    }
    with tempfile.TemporaryDirectory(prefix="layout-bench-") as scratch:
        graphs = build_graphs(Path(scratch))
        encoders = {(layout, runs): encoder(path, runs, version.dim) for layout, path in graphs.items() for runs in (1, 2)}
        rates: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for _ in range(passes):
            for workload, padded in batches.items():
                for (layout, runs), enc in encoders.items():
                    enc.encode(*padded[0])
                    started, cpu_started = time.perf_counter(), time.process_time()
                    for batch in padded:
                        enc.encode(*batch)
                    key = f"{workload}.{layout}.runs{runs}"
                    rates.setdefault(key, []).append(len(ids) / (time.perf_counter() - started))
                    cpu.setdefault(key, []).append((time.process_time() - cpu_started) / len(ids) * 1e3)
        for enc in encoders.values():
            enc.close()
    rows = {}
    for key in rates:
        workload = key.split(".")[0]
        base = max(rates[f"{workload}.padded.runs1"])
        rows[key] = {"texts_per_s": max(rates[key]), "cpu_ms_per_text": min(cpu[key]), "vs_padded_1run": max(rates[key]) / base}
    return {"benchmark": "layout", "model_version": version.version, "passes": passes, "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = measure(args.passes)
    print(f"{'workload.layout.runs':<30} {'texts/s':>9} {'CPU ms/text':>12} {'vs padded x 1 run':>18}")
    for key, row in report["results"].items():
        print(f"{key:<30} {row['texts_per_s']:>9.1f} {row['cpu_ms_per_text']:>12.2f} {row['vs_padded_1run']:>18.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
