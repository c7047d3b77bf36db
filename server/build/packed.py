"""A BERT-family encoder whose exported graph computes real tokens only (the "packed" layout).

A padded batch costs as much as if every text had the batch's longest length: on the CPU the
linear layers (about 90 % of the work for short texts) multiply padding rows like real ones.
Served traffic is not length-sorted, so a batch of ROME labels (11 tokens on average) carried
about 20 padded tokens per text, and ran 1.8x slower than the same texts in length-sorted
batches (benchmarks/README.md, "Packed graphs"). This module gathers the real tokens of a batch
into one [1, T, H] matrix for every linear layer, LayerNorm and the FFN, and scatters them back
to [batch, length] only for the attention scores, which are per-text anyway. Vectors are the
same as the padded graph's (fp32: cosine >= 0.99999 on the French probe, checked by the build's
fidelity gates against the unmodified Hugging Face forward), and a text's vector no longer
depends on how much padding its batch neighbours bring.

The graph's inputs and outputs are unchanged (`input_ids`, `attention_mask` -> `embedding`,
`pooled`), so backends, buckets and IO binding do not know which layout they run.
"""

from __future__ import annotations

import math
from typing import Any

PACKABLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})
"""Hugging Face model types whose layers this module re-drives (same BertLayer structure)."""


def packable(encoder) -> bool:
    """Whether ``encoder`` (a transformers model) has the layer structure this module drives."""
    config = getattr(encoder, "config", None)
    if getattr(config, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute" or getattr(config, "is_decoder", False):
        return False  # relative positions and causal masks live inside the attention this module replaces
    layers = getattr(getattr(encoder, "encoder", None), "layer", None) or ()
    return len(layers) > 0 and all(
        hasattr(layer, "attention") and hasattr(layer.attention, "self") and hasattr(layer, "intermediate") for layer in layers
    )


def _packed_encoder_class():
    import torch

    class _PackedEncoder(torch.nn.Module):
        def __init__(self, encoder: Any, pooling: str) -> None:
            super().__init__()
            self.encoder: Any = encoder  # a transformers BertModel-like module (see packable)
            self.pooling = pooling
            self.heads: int = encoder.config.num_attention_heads
            self.head_dim: int = encoder.config.hidden_size // self.heads

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
            batch, length = input_ids.shape
            hidden = self.encoder.embeddings(input_ids=input_ids)
            width = hidden.shape[-1]
            flat = attention_mask.reshape(-1)
            real = torch.nonzero(flat).squeeze(1)  # [T]: positions of the real tokens in [batch * length]
            # The packed row of each position; a padding position points at some real row: its
            # keys are masked out of every softmax and its query's output is never gathered back.
            slot = (torch.cumsum(flat, 0) - 1).clamp(min=0)
            x = hidden.reshape(-1, width).index_select(0, real).unsqueeze(0)  # [1, T, H]: MatMul, not Gemm
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            scale = 1.0 / math.sqrt(self.head_dim)

            def per_text(packed: torch.Tensor) -> torch.Tensor:
                """[1, T, H] -> [batch, heads, length, head_dim] for the attention scores."""
                rows = packed[0].index_select(0, slot).reshape(batch, length, self.heads, self.head_dim)
                return rows.transpose(1, 2)

            for layer in self.encoder.encoder.layer:
                attention = layer.attention.self
                query, key, value = per_text(attention.query(x)), per_text(attention.key(x)), per_text(attention.value(x))
                probs = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * scale + bias, dim=-1)
                context = torch.matmul(probs, value).transpose(1, 2).reshape(-1, width).index_select(0, real).unsqueeze(0)
                attended = layer.attention.output(context, x)
                x = layer.output(layer.intermediate(attended), attended)
            if self.pooling == "cls":
                pooled = x[0].index_select(0, slot.reshape(batch, length)[:, 0])
            else:
                mask = attention_mask.unsqueeze(-1).to(x.dtype)
                padded = x[0].index_select(0, slot).reshape(batch, length, width) * mask
                pooled = padded.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            norm = pooled.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)
            return pooled / norm, pooled

    return _PackedEncoder


def PackedEncoder(encoder, pooling: str):
    """The packed twin of ``export.PooledEncoder`` over the same (shared) weights."""
    return _packed_encoder_class()(encoder, pooling).eval()
