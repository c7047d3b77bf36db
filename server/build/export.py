"""Export a Hugging Face encoder to ONNX with pooling inside the graph, then quantise.

Pooling and normalisation live in the graph so every backend returns finished
sentence vectors and no Python post-processing sits on the hot path. The graph
has two outputs: `embedding` (L2-normalised) and `pooled` (before
normalisation), so a request can ask for either without a second model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import ExecutionProvider
from ..runtime.spec import GraphLayout
from .build import BuildError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("embedding", "pooled")
OPSET = 17


def load_torch_encoder(checkpoint: Path, pooling: str):
    """The fp32 torch reference: encoder plus the same pooling as the ONNX graph."""
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "pooler newly initialised" report: we never use the pooler
    config = AutoConfig.from_pretrained(checkpoint)
    kwargs: dict[str, Any] = {"attn_implementation": "eager"}
    if config.model_type == "bert":
        kwargs["add_pooling_layer"] = False
    encoder = AutoModel.from_pretrained(checkpoint, dtype=torch.float32, **kwargs)
    encoder.eval()
    return PooledEncoder(encoder, pooling).eval()


def layout_module(model, layout: GraphLayout) -> tuple[Any, GraphLayout]:
    """The module to export for ``layout`` over ``model``'s weights, and the layout it has.

    AUTO packs when the encoder's architecture allows it; PACKED on one that does not is a
    BuildError rather than a silent padded graph.
    """
    from .packed import PACKABLE_MODEL_TYPES, PackedEncoder, packable

    if layout is GraphLayout.PADDED:
        return model, GraphLayout.PADDED
    if packable(model.encoder):
        return PackedEncoder(model.encoder, model.pooling), GraphLayout.PACKED
    if layout is GraphLayout.PACKED:
        kind = getattr(model.encoder.config, "model_type", "?")
        raise BuildError(
            f"graph_layout = packed needs one of {sorted(PACKABLE_MODEL_TYPES)} with absolute positions, got {kind!r}"
        )
    return model, GraphLayout.PADDED


def _pooled_encoder_class():
    import torch

    class _PooledEncoder(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module, pooling: str) -> None:
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            norm = pooled.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
            return pooled / norm, pooled

    return _PooledEncoder


def PooledEncoder(encoder, pooling: str):
    return _pooled_encoder_class()(encoder, pooling)


def export_onnx(model, out_path: Path, vocab_size: int) -> Path:
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(5, min(vocab_size, 1000), (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            str(out_path),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
                "pooled": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return out_path


def sensitive_matmuls(fp32_path: Path) -> list[str]:
    """The FFN down-projections: the MatMuls whose constant weight narrows (more inputs than outputs).

    Their activations carry BERT's massive channels (outliers.py): one uint8 range per tensor
    cannot span them. Static int8 splits those channels off; dynamic int8 leaves these matmuls
    fp32 (worst probe text 0.988 quantised, 0.993 fp32), about a sixth of the encoder's matmul FLOPs. Found by
    weight shape, not node name, so the rule holds for the padded and the packed layout alike
    (BERT's other linears are square or widen).
    """
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and len(shapes.get(node.input[1], ())) == 2
        and shapes[node.input[1]][0] > shapes[node.input[1]][1]
    ]


def quantise_int8(
    fp32_path: Path, out_path: Path, mode: str = "static", calibration: list[dict[str, np.ndarray]] | None = None
) -> dict[str, dict[str, list[int]]]:
    """int8 weights with per-output-channel scales (per-tensor loses too much on E5) at `out_path`;
    returns the outlier channels the static mode computes apart in fp32 (see outliers.py).

    mode "static" (default): activation ranges are calibrated once on French
    probe batches and frozen in the graph. Each text's vector then does not
    depend on which other texts share its batch (dynamic quantisation computes
    one activation scale per batch tensor, so batching moved vectors by up to
    0.0024 in cosine on the probe), and no range is computed per call. The FFN
    down-projections, whose massive activations a frozen range cannot span,
    run in int8 with their few outlier channels split off in fp32.
    mode "dynamic": onnxruntime's quantize_dynamic, for checkpoints whose
    activations calibrate badly; vectors then depend slightly on the batch, and
    the down-projections stay fp32.
    Only matmuls with a constant weight are quantised (never attention scores).
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from .outliers import decompose

    common = dict(per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    if mode == "dynamic":
        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            nodes_to_exclude=sensitive_matmuls(fp32_path),
            extra_options={"MatMulConstBOnly": True},
            **common,
        )
        return {}
    if mode != "static":
        raise ValueError(f"unknown int8 mode {mode!r} (static or dynamic)")
    if not calibration:
        raise ValueError("static int8 quantisation needs calibration batches")

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            assert calibration is not None  # checked above
            self._batches = iter(calibration)

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantise-") as scratch:
        split = decompose(fp32_path, sensitive_matmuls(fp32_path), calibration, Path(scratch) / "split.fp32.onnx")
        quantize_static(
            str(split.path),
            str(out_path),
            _Batches(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=split.fp32_nodes,
            extra_options={"MatMulConstBOnly": True},
            **common,
        )
    return split.summary()


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """fp16 weights and activations for the CUDA provider; inputs stay int64 ids."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    # LayerNorm reductions and the final norm stay fp32 to avoid fp16 overflow.
    half = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=["LayerNormalization", "ReduceL2", "ReduceSumSquare", "Pow", "ReduceMean", "Sqrt", "Div"],
    )
    onnx.save(half, str(out_path))
    return out_path


def run_onnx(path: Path, ids: np.ndarray, mask: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=[ExecutionProvider.CPU.value])
    embedding, pooled = session.run(list(OUTPUT_NAMES), {"input_ids": ids, "attention_mask": mask})
    return embedding, pooled
