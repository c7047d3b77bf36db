"""server/build/packed.py: the packed graph computes what the padded Hugging Face forward computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from openemploi.build import export
from openemploi.build.build import BuildError
from openemploi.build.packed import PackedEncoder, packable
from openemploi.runtime.spec import GraphLayout


def tiny_encoder(model_type: str = "bert", pooling: str = "mean", seed: int = 0):
    """A random BERT-family encoder (2 layers, width 32) wrapped as the build wraps it."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(seed)
    shape = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if model_type == "xlm-roberta":
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=80, **shape), add_pooling_layer=False)
    else:
        model = BertModel(BertConfig(max_position_embeddings=64, **shape), add_pooling_layer=False)
    return export.PooledEncoder(model.eval(), pooling).eval()


def ragged_batch(lengths: list[int], width: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask for texts of these lengths (pad id 1, as XLM-R's)."""
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(5, 300, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("model_type", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_forward_equals_the_padded_forward(model_type, pooling):
    padded = tiny_encoder(model_type, pooling)
    packed = PackedEncoder(padded.encoder, pooling)
    ids, mask = ragged_batch([3, 17, 9, 17, 2])
    with torch.no_grad():
        expected, packed_out = padded(ids, mask), packed(ids, mask)
    for want, got in zip(expected, packed_out):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_text_does_not_change_with_the_padding_its_batch_brings():
    packed = PackedEncoder(tiny_encoder().encoder, "mean")
    alone_ids, alone_mask = ragged_batch([6], seed=3)
    ids, mask = ragged_batch([6, 40, 11], seed=4)
    ids[0, :6] = alone_ids[0]
    with torch.no_grad():
        alone, together = packed(alone_ids, alone_mask)[0][0], packed(ids, mask)[0][0]
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def test_exported_packed_graph_runs_any_batch_shape(tmp_path):
    """Traced on one shape, the graph must serve others: more rows, longer and unpadded batches."""
    model = tiny_encoder()
    module, layout = export.layout_module(model, GraphLayout.AUTO)
    assert layout is GraphLayout.PACKED
    path = export.export_onnx(module, tmp_path / "packed.onnx", vocab_size=300)
    for lengths in ([4, 30, 12, 1, 30, 7, 22], [5], [9, 9, 9]):
        ids, mask = ragged_batch(lengths, seed=len(lengths))
        embedding, pooled = export.run_onnx(path, ids.numpy(), mask.numpy())
        with torch.no_grad():
            want_embedding, want_pooled = model(ids, mask)
        np.testing.assert_allclose(embedding, want_embedding.numpy(), atol=1e-5)
        np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=1e-4)


def test_layout_choice_follows_the_spec_and_the_architecture():
    model = tiny_encoder()
    assert export.layout_module(model, GraphLayout.PADDED) == (model, GraphLayout.PADDED)
    assert export.layout_module(model, GraphLayout.PACKED)[1] is GraphLayout.PACKED
    model.encoder.config.position_embedding_type = "relative_key"  # attention this module does not re-drive
    assert not packable(model.encoder)
    assert export.layout_module(model, GraphLayout.AUTO) == (model, GraphLayout.PADDED)
    with pytest.raises(BuildError, match="graph_layout = packed"):
        export.layout_module(model, GraphLayout.PACKED)


@pytest.mark.parametrize("layout", [GraphLayout.PADDED, GraphLayout.PACKED])
def test_ffn_down_projections_are_found_in_either_layout(tmp_path, layout):
    """int8 treats exactly these apart: one per layer, the 64 -> 32 weights, never attention's."""
    module, _ = export.layout_module(tiny_encoder(), layout)
    path = export.export_onnx(module, tmp_path / f"{layout}.onnx", vocab_size=300)
    graph = onnx.load(str(path)).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    names = export.sensitive_matmuls(path)
    assert len(names) == 2
    assert all(weights[nodes[name].input[1]] == (64, 32) for name in names)
