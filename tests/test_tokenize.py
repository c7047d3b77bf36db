"""server/tokenize.py with the real tokenizer.json of the built default model."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from openemploi import tokenize
from openemploi.tokenize import PRECUT_CHARS_PER_TOKEN, TextKind, TextTokenizer, TextTooLongError, TokenizerConfig

BOS, PAD, EOS = 0, 1, 2
LONG_TEXT = "Développeur back-end confirmé, maîtrise de Python et de l'intégration continue. " * 80


@pytest.fixture(scope="module")
def tokenizer(default_version) -> TextTokenizer:
    v = default_version
    return TextTokenizer(v.tokenizer_path, TokenizerConfig(v.max_tokens, v.query_prefix, v.passage_prefix))


@pytest.fixture(scope="module")
def bare(default_version) -> TextTokenizer:
    """Same tokenizer, no prefixes and no practical limit: the raw token sequence."""
    return TextTokenizer(default_version.tokenizer_path, TokenizerConfig(100_000))


def ids(t) -> list[int]:
    return t.ids.tolist()


def test_model_limits_and_prefixes_come_from_the_manifest(tokenizer):
    assert tokenizer.config.max_tokens == 512
    assert tokenizer.prefix(TextKind.QUERY) == "query: "
    assert tokenizer.prefix(TextKind.PASSAGE) == "passage: "


def test_pad_id_is_one(tokenizer):
    assert tokenizer.pad_id == PAD


@pytest.mark.parametrize("kind", list(TextKind))
def test_ids_start_with_bos_and_end_with_eos(tokenizer, kind):
    out = tokenizer.encode(["Boulanger / Boulangère", "Aide-soignant de nuit en EHPAD"], kind)
    assert len(out) == 2
    for t in out:
        assert t.ids.dtype == np.int64
        assert t.ids.ndim == 1
        assert t.ids[0] == BOS and t.ids[-1] == EOS
        assert BOS not in t.ids[1:-1].tolist() and EOS not in t.ids[1:-1].tolist()
        assert not t.truncated
        assert t.original_tokens == len(t.ids)


def test_nfc_and_nfd_inputs_give_the_same_ids(tokenizer):
    texts = ["Boulangère pâtissière à Orléans", "Œnologue, maître de chai — expérience ≥ 5 ans", "Électricien bâtiment"]
    nfc = [unicodedata.normalize("NFC", t) for t in texts]
    nfd = [unicodedata.normalize("NFD", t) for t in texts]
    assert nfc != nfd  # the inputs really differ as strings
    for kind in TextKind:
        assert [ids(t) for t in tokenizer.encode(nfc, kind)] == [ids(t) for t in tokenizer.encode(nfd, kind)]


def test_query_and_passage_prefixes_give_different_ids(tokenizer, bare):
    text = "Boulangère pâtissière"
    query = ids(tokenizer.encode([text], TextKind.QUERY)[0])
    passage = ids(tokenizer.encode([text], TextKind.PASSAGE)[0])
    assert query != passage

    query_word = ids(bare.encode(["query:"], TextKind.PASSAGE)[0])[1:-1]
    passage_word = ids(bare.encode(["passage:"], TextKind.PASSAGE)[0])[1:-1]
    assert query_word and passage_word
    assert query[1 : 1 + len(query_word)] == query_word
    assert passage[1 : 1 + len(passage_word)] == passage_word
    # both end with the same tokens for the text itself
    body = ids(bare.encode([text], TextKind.PASSAGE)[0])[1:-1]
    assert query[-1 - len(body) : -1] == body
    assert passage[-1 - len(body) : -1] == body


def test_long_text_is_truncated_to_exactly_max_tokens(tokenizer, bare):
    full = bare.encode(["passage: " + LONG_TEXT], TextKind.PASSAGE)[0]
    (t,) = tokenizer.encode([LONG_TEXT], TextKind.PASSAGE, truncate=True)
    assert len(full.ids) > 512
    assert len(t.ids) == 512
    assert t.truncated is True
    assert t.original_tokens == len(full.ids) > 512
    assert t.ids[0] == BOS and t.ids[-1] == EOS
    # head truncation: the first 511 tokens are kept as they were
    assert ids(t)[:-1] == ids(full)[:511]


def test_truncation_boundary_at_the_model_limit(tokenizer, bare):
    """A text of exactly 512 tokens (prefix and specials included) is kept whole; 513 is cut."""

    def passage_len(k: int) -> int:
        return len(bare.encode(["passage: " + "x " * k], TextKind.PASSAGE)[0].ids)

    per_word = passage_len(11) - passage_len(10)
    assert per_word == 1
    k = 10 + (512 - passage_len(10))
    assert passage_len(k) == 512 and passage_len(k + 1) == 513

    (t,) = tokenizer.encode(["x " * k], TextKind.PASSAGE, truncate=False)
    assert (len(t.ids), t.truncated, t.original_tokens) == (512, False, 512)

    (t,) = tokenizer.encode(["x " * (k + 1)], TextKind.PASSAGE, truncate=True)
    assert (len(t.ids), t.truncated, t.original_tokens) == (512, True, 513)
    assert t.ids[-1] == EOS
    with pytest.raises(TextTooLongError) as info:
        tokenizer.encode(["x " * (k + 1)], TextKind.PASSAGE, truncate=False)
    assert info.value.length == 513


def test_truncate_false_raises_naming_index_and_length(tokenizer, bare):
    full_len = len(bare.encode(["query: " + LONG_TEXT], TextKind.PASSAGE)[0].ids)
    with pytest.raises(TextTooLongError) as info:
        tokenizer.encode(["court", "aussi court", LONG_TEXT], TextKind.QUERY, truncate=False)
    err = info.value
    assert (err.index, err.length, err.limit) == (2, full_len, 512)
    assert "texts[2]" in str(err)
    assert str(full_len) in str(err)
    assert "512" in str(err)
    assert isinstance(err, ValueError)


def test_truncate_false_accepts_texts_within_the_limit(tokenizer):
    out = tokenizer.encode(["Cariste CACES 3", "Magasinier"], TextKind.PASSAGE, truncate=False)
    assert [t.truncated for t in out] == [False, False]


@pytest.mark.parametrize("kind", list(TextKind))
def test_empty_string_gets_a_valid_sequence(tokenizer, kind):
    (t,) = tokenizer.encode([""], kind)
    assert len(t.ids) >= 3  # <s>, the prefix, </s>
    assert t.ids[0] == BOS and t.ids[-1] == EOS
    assert not t.truncated and t.original_tokens == len(t.ids)


def test_empty_string_without_prefix_is_bos_eos(bare):
    (t,) = bare.encode([""], TextKind.PASSAGE)
    assert ids(t) == [BOS, EOS]


def test_encode_keeps_input_order_and_count(tokenizer, bare):
    texts = ["b", "un texte nettement plus long que les autres", "", "c"]
    out = tokenizer.encode(texts, TextKind.PASSAGE)
    assert [ids(t) for t in out] == [ids(tokenizer.encode([x], TextKind.PASSAGE)[0]) for x in texts]
    assert tokenizer.encode([], TextKind.PASSAGE) == []


class LengthSpy:
    """Stands in for the tokenizers' Tokenizer and records the longest text it was given."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.longest = 0

    def encode_batch(self, texts, **options):
        self.longest = max([self.longest, *map(len, texts)])
        return self._inner.encode_batch(texts, **options)


PRECUT_TEXTS = {
    "prose": LONG_TEXT * 5,
    "lines": "Préparateur de commandes, Lyon\n" * 2000,
    "no-whitespace": "x" * 40_000,
    "accents": "é" * 40_000,
    "cjk": "招聘仓库叉车司机，需持证上岗，两班倒。" * 2000,
    "nfd": unicodedata.normalize("NFD", "Électricienne bâtiment, habilitée ") * 1500,
    "whitespace-runs-the-normalizer-collapses": " " * 30_000 + "mot " * 2000,
}


@pytest.mark.parametrize("name", list(PRECUT_TEXTS))
def test_precut_tokenises_a_bounded_head_and_keeps_the_ids_of_the_whole_text(default_version, bare, name):
    """With truncate=true the tokenizer never sees a whole huge text, yet the kept ids are exactly those of the whole text."""
    text = PRECUT_TEXTS[name]
    v = default_version
    tokenizer = TextTokenizer(v.tokenizer_path, TokenizerConfig(v.max_tokens, v.query_prefix, v.passage_prefix))
    spy = LengthSpy(tokenizer._tokenizer)
    tokenizer._tokenizer = spy
    (t,) = tokenizer.encode([text], TextKind.PASSAGE, truncate=True, precut=True)
    full = ids(bare.encode(["passage: " + text], TextKind.PASSAGE)[0])
    assert len(full) > 512
    assert ids(t) == [*full[:511], EOS]
    assert t.truncated and 512 < t.original_tokens <= len(full)
    assert spy.longest < len(text)
    if name != "whitespace-runs-the-normalizer-collapses":  # that one needs wider cuts, found by doubling
        assert spy.longest <= len("passage: ") + 512 * PRECUT_CHARS_PER_TOKEN


def test_precut_leaves_short_texts_and_exact_counts_alone(tokenizer):
    texts = ["Boulanger / Boulangère", LONG_TEXT]
    exact = tokenizer.encode(texts, TextKind.QUERY, truncate=True)
    cut = tokenizer.encode(texts, TextKind.QUERY, truncate=True, precut=True)
    assert [ids(t) for t in cut] == [ids(t) for t in exact]
    assert cut[0].original_tokens == exact[0].original_tokens
    assert exact[1].original_tokens > 512  # without precut the count is exact (build fidelity and benchmarks read it)


def test_chunks_keep_order_and_a_too_long_text_is_named_by_its_request_index(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenize, "CHUNK_CHARS", 40)
    texts = [f"texte numéro {i}" for i in range(30)]
    chunked = tokenizer.encode(texts, TextKind.PASSAGE)
    monkeypatch.undo()
    assert [ids(t) for t in chunked] == [ids(t) for t in tokenizer.encode(texts, TextKind.PASSAGE)]
    monkeypatch.setattr(tokenize, "CHUNK_CHARS", 40)
    with pytest.raises(TextTooLongError) as info:
        tokenizer.encode([*texts, LONG_TEXT], TextKind.PASSAGE, truncate=False)
    assert info.value.index == 30
