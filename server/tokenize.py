"""Request-path tokenisation with the Rust `tokenizers` library.

Runs before batching so the batcher can budget by real token counts and the
API can reject over-long texts with the exact index and length. Texts are NFC
normalised first so that "é" typed as e + U+0301 and as U+00E9 embed alike.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

PRECUT_CHARS_PER_TOKEN = 8
"""A truncated text is tokenised only up to max_tokens x this many characters.

Natural text averages 3-5 characters a token, so the cut lies well past what
truncation keeps; a text whose head does not fill the window (a whitespace run
the normalizer collapses) is tokenised again with a cut twice as far.
"""
CHUNK_CHARS = 256 * 1024
"""Characters per encode_batch call: between calls the deadline is checked, so a late request stops early."""


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


class TokenizingStopped(Exception):
    """The deadline passed, or the caller stopped waiting, before every text was tokenised."""


@dataclass(frozen=True)
class TokenizedText:
    ids: np.ndarray  # int64, specials included, at most max_tokens long
    original_tokens: int  # before truncation; with precut, those of the tokenised head (still > max_tokens)
    truncated: bool


def _cut(text: str, bound: int) -> str:
    """The head of `text` up to `bound` characters, ended at whitespace so no word is split when there is one."""
    if len(text) <= bound:
        return text
    space = max(text.rfind(" ", bound // 2, bound), text.rfind("\n", bound // 2, bound), text.rfind("\t", bound // 2, bound))
    return text[: space if space > 0 else bound]


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

    def encode(
        self,
        texts: list[str],
        kind: TextKind,
        truncate: bool = True,
        *,
        precut: bool = False,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> list[TokenizedText]:
        """Token ids of `texts`, in order, tokenised in chunks of about CHUNK_CHARS characters.

        precut (only with truncate): tokenise a long text's head only, so a huge text costs what
        truncation keeps; `original_tokens` then counts the head. `deadline` (time.monotonic())
        and `stop` are checked before each chunk: TokenizingStopped once either says stop.
        """
        bound = self.config.max_tokens * PRECUT_CHARS_PER_TOKEN if truncate and precut else None
        out: list[TokenizedText] = []
        for start, chunk in _chunks(texts, bound):
            if stop is not None and stop.is_set():
                raise TokenizingStopped(f"the caller stopped waiting after {start} of {len(texts)} texts were tokenised")
            if deadline is not None and time.monotonic() >= deadline:
                raise TokenizingStopped(f"the deadline passed after {start} of {len(texts)} texts were tokenised")
            out.extend(self._encode_chunk(chunk, kind, truncate, bound, start))
        return out

    def _encode_chunk(
        self, texts: list[str], kind: TextKind, truncate: bool, bound: int | None, first_index: int
    ) -> list[TokenizedText]:
        prefix = self.prefix(kind)
        heads = texts if bound is None else [_cut(text, bound) for text in texts]
        ids_by_text = self._ids(prefix, heads)
        if bound is not None:
            for index, text in enumerate(texts):
                head, cut_at = heads[index], bound
                # A cut head that does not exceed the limit might not be what the whole text starts with: cut further.
                while len(head) < len(text) and len(ids_by_text[index]) <= self.config.max_tokens:
                    cut_at *= 2
                    head = _cut(text, cut_at)
                    ids_by_text[index] = self._ids(prefix, [head])[0]
        limit = self.config.max_tokens
        out: list[TokenizedText] = []
        for index, ids in enumerate(ids_by_text):
            n = len(ids)
            if n > limit:
                if not truncate:
                    raise TextTooLongError(first_index + index, n, limit)
                ids = [*ids[: limit - 1], self._eos_id]
            out.append(TokenizedText(np.asarray(ids, dtype=np.int64), n, n > limit))
        return out

    def _ids(self, prefix: str, texts: list[str]) -> list[list[int]]:
        prepared = [prefix + unicodedata.normalize("NFC", text) for text in texts]
        return [encoding.ids for encoding in self._tokenizer.encode_batch(prepared, add_special_tokens=True)]


def _chunks(texts: list[str], bound: int | None) -> Iterator[tuple[int, list[str]]]:
    """Consecutive runs of `texts` of about CHUNK_CHARS characters (counting a cut text as `bound`), with their start index."""
    start, size = 0, 0
    for index, text in enumerate(texts):
        size += len(text) if bound is None else min(len(text), bound)
        if size >= CHUNK_CHARS:
            yield start, texts[start : index + 1]
            start, size = index + 1, 0
    if start < len(texts):
        yield start, texts[start:]
