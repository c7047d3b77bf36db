"""Accent folding and term extraction shared by the lexical side and match explanations."""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"[0-9a-z]+")

# Function words that carry no occupation meaning; kept out of lexical queries.
STOPWORDS = frozenset(
    [
        "a",
        "au",
        "aux",
        "avec",
        "ce",
        "ces",
        "dans",
        "de",
        "des",
        "du",
        "elle",
        "en",
        "et",
        "eux",
        "il",
        "je",
        "j",
        "l",
        "la",
        "le",
        "les",
        "leur",
        "lui",
        "ma",
        "mais",
        "me",
        "mes",
        "moi",
        "mon",
        "ne",
        "nos",
        "notre",
        "nous",
        "on",
        "ou",
        "par",
        "pas",
        "pour",
        "qu",
        "que",
        "qui",
        "sa",
        "se",
        "ses",
        "son",
        "sur",
        "ta",
        "te",
        "tes",
        "toi",
        "ton",
        "tu",
        "un",
        "une",
        "vos",
        "votre",
        "vous",
        "c",
        "d",
        "m",
        "n",
        "s",
        "t",
        "y",
        "est",
        "suis",
        "fais",
        "fait",
        "faire",
        "h",
        "f",
        "hf",
        "cdi",
        "cdd",
    ]
)


def fold(text: str) -> str:
    """Lower-case and strip accents: 'Boulangère' -> 'boulangere', 'œuvre' -> 'oeuvre'."""
    text = text.replace("œ", "oe").replace("Œ", "oe").replace("æ", "ae").replace("Æ", "ae")
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def terms(text: str, drop_stopwords: bool = True) -> list[str]:
    """Folded word tokens in order, without duplicates."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(fold(text)):
        if drop_stopwords and (word in STOPWORDS or (len(word) == 1 and not word.isdigit())):
            continue
        seen.setdefault(word, None)
    return list(seen)


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression: any of the terms, each as a quoted prefix-free token."""
    return " OR ".join(f'"{t}"' for t in terms(text))


# Bump when `lexical_form` changes: a store indexed with another version has its lexical side rebuilt at open.
LEXICAL_FORM_VERSION = "1"


def lexical_form(text: str) -> str:
    """What the lexical index stores: the folded words of `text`, exactly as queries fold theirs.

    FTS5 folds on its own (it keeps 'œ', 'ß' and ligatures, splits on either apostrophe): indexing
    the words `terms` produces is what lets 'manœuvre' or 'main-d’œuvre' match their queries.
    """
    return " ".join(_WORD.findall(fold(text)))


def fold_skill(skill: str) -> str:
    return " ".join(_WORD.findall(fold(skill)))
