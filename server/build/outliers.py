"""Outlier channels of a matmul computed apart in fp32, so that static int8 keeps a tight range.

BERT-family encoders carry "massive activations": a few hidden channels hold values tens of times
larger than all others. On multilingual-e5-small's FFN down-projections (the build's calibration
set), one input channel reaches 12 to 70 in 7 of the 12 layers where every other channel stays
under 7, and output columns 15, 35, 60 and 351 reach up to 342 where the median column stays near
1. One int8 scale per tensor stretched over those leaves a handful of levels for the rest: quantised
as is, the worst probe text fell to cosine 0.947. So those matmuls stayed fp32, and they were a
quarter of the int8 graph's time (ONNX Runtime's profiler on the skills latency ad).

The split (LLM.int8()'s mixed precision, with frozen ranges): for Y = X W,
- outlier output columns C: X W[:, C] runs in fp32 (|C| columns of work) and a one-hot [|C|, out]
  matmul puts it back in place; the int8 W has those columns zeroed, so its output range is tight;
- outlier input channels R: the int8 path takes X clipped to the other channels' range, and the
  outliers' excess, X[:, R] - clip(X[:, R]), runs through W[R, :] in fp32.
Y = int8(clip(X) W') + excess W'[R, :] + (X W[:, C]) onehot(C): exact in fp32 by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTLIER_FACTOR = 2.0
"""A channel is an outlier when its largest |value| on the calibration set exceeds this many times
the median of the `REFERENCE_CHANNELS` largest: e5-small's outliers stand 5-60x above it, its
ordinary extremes within 1.7x."""
REFERENCE_CHANNELS = 32
RECIPE = f"split-outliers-x{OUTLIER_FACTOR:g}-of-top{REFERENCE_CHANNELS}"  # part of a version's recipe (build.py)


@dataclass(frozen=True)
class MatMulSplit:
    node: str
    input_channels: list[int]
    output_columns: list[int]


@dataclass
class Decomposition:
    """The rewritten graph and what the quantiser must leave fp32."""

    path: Path  # the fp32 graph with the outlier paths added
    fp32_nodes: list[str] = field(default_factory=list)  # the outlier paths: never quantised
    splits: list[MatMulSplit] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, list[int]]]:
        return {s.node: {"input_channels": s.input_channels, "output_columns": s.output_columns} for s in self.splits}


def outlier_channels(magnitude: np.ndarray, factor: float = OUTLIER_FACTOR) -> np.ndarray:
    """Indices of the channels whose largest |value| stands out (see OUTLIER_FACTOR)."""
    reference = float(np.median(np.sort(magnitude)[-REFERENCE_CHANNELS:]))
    return np.flatnonzero(magnitude > factor * reference)


def channel_ranges(
    model, tensors: Sequence[str], calibration: Sequence[dict[str, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per last-axis channel (min, max) of `tensors` over the calibration batches (fp32 graph)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    del probe
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for batch in calibration:
        for name, value in zip(tensors, session.run(list(tensors), batch)):
            rows = value.reshape(-1, value.shape[-1])
            low[name] = np.minimum(low[name], rows.min(0)) if name in low else rows.min(0)
            high[name] = np.maximum(high[name], rows.max(0)) if name in high else rows.max(0)
    return {name: (low[name], high[name]) for name in tensors}


def decompose(
    fp32_path: Path,
    matmuls: Sequence[str],
    calibration: Sequence[dict[str, np.ndarray]],
    out_path: Path,
) -> Decomposition:
    """`fp32_path` with the outlier channels of `matmuls` (MatMul nodes with a constant [in, out]
    weight) split off, written to `out_path`. The quantiser calibrates the rewritten graph like any
    other: the int8 path's input is clipped and its weight has no outlier columns, so its ranges are
    tight without overrides."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    wanted = set(matmuls)
    nodes = [n for n in graph.node if n.name in wanted]
    ranges = channel_ranges(model, sorted({t for n in nodes for t in (n.input[0], n.output[0])}), calibration)
    weights = {init.name: init for init in graph.initializer}
    result = Decomposition(out_path)
    for node in nodes:
        x, y = node.input[0], node.output[0]
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        columns = outlier_channels(_magnitude(ranges[y]))
        rows = outlier_channels(_magnitude(ranges[x]))
        if columns.size == 0 and rows.size == 0:
            continue
        before, added, terms = [], [], []
        if columns.size:
            added += _column_path(graph, node.name, x, w, columns)
            terms.append(added[-1].output[0])
            w[:, columns] = 0.0  # the int8 path's share: its output range no longer spans the outliers
        if rows.size:
            low, high = ranges[x]
            keep = np.setdiff1d(np.arange(low.size), rows)
            limits = (np.float32(min(low[keep].min(), 0.0)), np.float32(max(high[keep].max(), 0.0)))
            clip, excess = _row_path(graph, node.name, x, w, rows, limits)
            before.append(clip)
            node.input[0] = clip.output[0]
            added += excess
            terms.append(added[-1].output[0])
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        node.output[0] = f"{node.name}/in_range"
        added += _sum(node.name, node.output[0], terms, y)
        position = list(graph.node).index(node)
        for offset, new in enumerate([*before, node, *added]):
            if new is not node:
                graph.node.insert(position + offset, new)
        result.fp32_nodes += [n.name for n in [*before, *added]]
        result.splits.append(MatMulSplit(node.name, rows.tolist(), columns.tolist()))
    onnx.save(model, str(out_path))
    return result


def _magnitude(low_high: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return np.maximum(np.abs(low_high[0]), np.abs(low_high[1]))


def _column_path(graph, name: str, x: str, w: np.ndarray, columns: np.ndarray) -> list:
    """X W[:, C] in fp32, placed back in its columns by a one-hot matmul."""
    from onnx import helper, numpy_helper

    place = np.zeros((columns.size, w.shape[1]), np.float32)
    place[np.arange(columns.size), columns] = 1.0
    prefix = f"{name}/outlier_columns"
    graph.initializer.extend(
        [numpy_helper.from_array(w[:, columns].copy(), f"{prefix}_w"), numpy_helper.from_array(place, f"{prefix}_place")]
    )
    return [
        helper.make_node("MatMul", [x, f"{prefix}_w"], [f"{prefix}_y"], name=prefix),
        helper.make_node("MatMul", [f"{prefix}_y", f"{prefix}_place"], [f"{prefix}_out"], name=f"{prefix}_place"),
    ]


def _row_path(graph, name: str, x: str, w: np.ndarray, rows: np.ndarray, limits: tuple[np.float32, np.float32]):
    """clip(X), the int8 path's input (the clip is free: int8 saturates there anyway), and the
    excess (X[:, R] - clip(X[:, R])) W[R, :] in fp32."""
    from onnx import helper, numpy_helper

    prefix = f"{name}/outlier_rows"
    graph.initializer.extend(
        [
            numpy_helper.from_array(rows.astype(np.int64), f"{prefix}_index"),
            numpy_helper.from_array(np.array(limits[0], np.float32), f"{prefix}_min"),
            numpy_helper.from_array(np.array(limits[1], np.float32), f"{prefix}_max"),
            numpy_helper.from_array(w[rows].copy(), f"{prefix}_w"),
        ]
    )
    clip = helper.make_node("Clip", [x, f"{prefix}_min", f"{prefix}_max"], [f"{name}/in_range_input"], name=f"{prefix}_clip_all")
    excess = [
        helper.make_node("Gather", [x, f"{prefix}_index"], [f"{prefix}_x"], axis=-1, name=prefix),
        helper.make_node("Clip", [f"{prefix}_x", f"{prefix}_min", f"{prefix}_max"], [f"{prefix}_clipped"], name=f"{prefix}_clip"),
        helper.make_node("Sub", [f"{prefix}_x", f"{prefix}_clipped"], [f"{prefix}_excess"], name=f"{prefix}_excess"),
        helper.make_node("MatMul", [f"{prefix}_excess", f"{prefix}_w"], [f"{prefix}_out"], name=f"{prefix}_matmul"),
    ]
    return clip, excess


def _sum(name: str, first: str, terms: list[str], out: str) -> list:
    from onnx import helper

    nodes, total = [], first
    for i, term in enumerate(terms):
        target = out if i == len(terms) - 1 else f"{name}/outlier_sum{i}"
        nodes.append(helper.make_node("Add", [total, term], [target], name=f"{name}/outlier_add{i}"))
        total = target
    return nodes
