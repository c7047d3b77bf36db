"""Request-path tokenisation with the Rust `tokenizers` library.

Runs before batching so the batcher can budget by real token counts and the
API can reject over-long texts with the exact index and length. Texts are NFC
normalised first so that "é" typed as e + U+0301 and as U+00E9 embed alike.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class TextKind(str, Enum):
    QUERY = "query"
    PASSAGE = "passage"


class TextTooLongError(ValueError):
    """A text exceeds the model's token limit and the caller asked not to truncate."""

    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(f"texts[{index}] has {length} tokens, over the model limit of {limit}; shorten it or set truncate=true")
        self.index = index
        self.length = length
        self.limit = limit


@dataclass(frozen=True)
class TokenizedText:
    ids: np.ndarray  # int64, specials included, at most max_tokens long
    original_tokens: int  # before truncation
    truncated: bool


@dataclass(frozen=True)
class TokenizerConfig:
    max_tokens: int
    query_prefix: str = ""
    passage_prefix: str = ""


class TextTokenizer:
    """Prefix, NFC-normalise and tokenise texts for one model version."""

    def __init__(self, tokenizer_json: Path, config: TokenizerConfig) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.config = config
        self._eos_id = self._last_special_id()

    def _last_special_id(self) -> int:
        probe = self._tokenizer.encode("a")
        mask = probe.special_tokens_mask
        if not mask or not mask[-1]:
            raise ValueError("tokenizer adds no closing special token; cannot truncate safely")
        return probe.ids[-1]

    @property
    def pad_id(self) -> int:
        pad = self._tokenizer.token_to_id("<pad>")
        if pad is None:
            pad = self._tokenizer.token_to_id("[PAD]")
        return int(pad or 0)

    def prefix(self, kind: TextKind) -> str:
        return self.config.query_prefix if kind is TextKind.QUERY else self.config.passage_prefix

    def encode(self, texts: list[str], kind: TextKind, truncate: bool = True) -> list[TokenizedText]:
        prefix = self.prefix(kind)
        prepared = [prefix + unicodedata.normalize("NFC", text) for text in texts]
        encodings = self._tokenizer.encode_batch(prepared, add_special_tokens=True)
        limit = self.config.max_tokens
        out: list[TokenizedText] = []
        for index, encoding in enumerate(encodings):
            ids = encoding.ids
            n = len(ids)
            if n > limit:
                if not truncate:
                    raise TextTooLongError(index, n, limit)
                ids = [*ids[: limit - 1], self._eos_id]
            out.append(TokenizedText(np.asarray(ids, dtype=np.int64), n, n > limit))
        return out
