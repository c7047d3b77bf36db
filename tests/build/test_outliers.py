"""server/build/outliers.py: outlier channels split off in fp32 keep static int8 close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from openemploi.build import export
from openemploi.build.outliers import decompose, outlier_channels

WIDE, NARROW = 64, 16
OUTLIER_INPUT, OUTLIER_COLUMN = 5, 3


def down_projection(path: Path, seed: int = 0) -> None:
    """A graph like an FFN down-projection: Y = X W with W [64, 16], whose column 3 is large."""
    weight = np.random.default_rng(seed).normal(0, 0.2, (WIDE, NARROW)).astype(np.float32)
    weight[:, OUTLIER_COLUMN] *= 40.0
    weight[OUTLIER_INPUT] *= 0.1  # as in trained encoders, the weights a massive activation meets are small
    save_matmul(path, weight)


def save_matmul(path: Path, weight: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="down")],
        "down",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", WIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", NARROW])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def activations(rows: int, seed: int) -> np.ndarray:
    """GELU-like inputs: mostly within [-0.2, 3], one channel an order of magnitude larger."""
    x = np.abs(np.random.default_rng(seed).normal(0, 1.0, (rows, WIDE))).astype(np.float32) - 0.1
    x[:, OUTLIER_INPUT] *= 25.0
    return x


def run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def test_outliers_are_the_channels_far_above_the_largest_others():
    magnitude = np.linspace(1.0, 3.0, 100)
    magnitude[[7, 42]] = [9.0, 40.0]
    assert outlier_channels(magnitude).tolist() == [7, 42]
    assert outlier_channels(np.linspace(1.0, 3.0, 100)).size == 0  # a smooth tail has none


def test_the_split_graph_computes_the_same_in_fp32(tmp_path):
    down_projection(tmp_path / "fp32.onnx")
    calibration = [{"x": activations(32, seed)} for seed in range(4)]
    split = decompose(tmp_path / "fp32.onnx", ["down"], calibration, tmp_path / "split.onnx")
    assert split.summary() == {"down": {"input_channels": [OUTLIER_INPUT], "output_columns": [OUTLIER_COLUMN]}}
    x = activations(50, seed=9)
    x[0, OUTLIER_INPUT] = 500.0  # far past anything calibrated: the fp32 path takes it whole
    np.testing.assert_allclose(run(tmp_path / "split.onnx", x), run(tmp_path / "fp32.onnx", x), rtol=1e-5, atol=1e-3)


def test_static_int8_with_the_split_stays_close_to_fp32(tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    down_projection(fp32)
    assert export.sensitive_matmuls(fp32) == ["down"]
    calibration = [{"x": activations(32, seed)} for seed in range(4)]
    summary = export.quantise_int8(fp32, tmp_path / "int8.onnx", "static", calibration)
    assert summary["down"]["input_channels"] == [OUTLIER_INPUT]

    x = activations(200, seed=11)
    want = run(fp32, x)
    error = np.abs(run(tmp_path / "int8.onnx", x) - want)
    ordinary = [c for c in range(NARROW) if c != OUTLIER_COLUMN]
    scale = np.abs(want[:, ordinary]).mean()
    # The ordinary columns keep int8 precision (a few % of their size), the outlier one is exact.
    assert error[:, ordinary].mean() < 0.03 * scale
    assert error[:, OUTLIER_COLUMN].max() < 1e-3 * np.abs(want[:, OUTLIER_COLUMN]).max()


def test_a_matmul_without_outliers_is_left_as_it_is(tmp_path):
    save_matmul(tmp_path / "fp32.onnx", np.random.default_rng(3).normal(0, 0.2, (WIDE, NARROW)).astype(np.float32))
    smooth = [{"x": np.abs(np.random.default_rng(seed).normal(0, 1.0, (32, WIDE))).astype(np.float32)} for seed in range(4)]
    split = decompose(tmp_path / "fp32.onnx", ["down"], smooth, tmp_path / "split.onnx")
    assert split.summary() == {} and split.fp32_nodes == []
    assert [n.op_type for n in onnx.load(str(tmp_path / "split.onnx")).graph.node] == ["MatMul"]
