"""The French words a clause shares with each skill's French wordings: the lexical half of extraction's score.

e5 ranks skills by meaning, and among the hundred closest to a clause several are near in meaning
but not the one stated ("conduire un chariot" against "conduire un camion"): the words the clause
actually uses decide between them, as BM25 does beside dense retrieval in hybrid search. A skill's
terms come from its French label, wordings and usage (esco.Skill.french); a term counts by its idf
over all skills, so "chariot" weighs more than "gérer".

Terms are lower-cased, accent-folded words with French stop words dropped, cut to their first
STEM_CHARS characters: a crude stemmer that joins "conduite", "conduire" and "conduis", and
"élévateur" and "élévateurs" (6 or 7 characters scored within 0.01 on the dev set's tuning part).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STEM_CHARS = 5
_WORD = re.compile(r"[0-9a-z]+")
# fmt: off
STOP_WORDS = frozenset({
    "a", "au", "aux", "avec", "avoir", "ce", "ces", "cette", "dans", "de", "des", "du", "elle", "en", "est", "et",
    "etre", "il", "je", "la", "le", "les", "leur", "leurs", "nous", "ou", "par", "pour", "qu", "que", "qui", "sa",
    "se", "ses", "son", "sont", "sur", "tous", "tout", "un", "une", "vous",
})  # accent-folded, as terms() compares them
# fmt: on


def fold(text: str) -> str:
    """Lower case, no accents, ligatures spelt out ("main-d'œuvre" -> "main d oeuvre"), one space between
    alphanumeric runs: how French is typed with or without its accents compares equal."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_WORD.findall(bare.replace("œ", "oe").replace("æ", "ae")))


def terms(text: str) -> frozenset[str]:
    """`text`'s content words, folded and cut to STEM_CHARS characters."""
    return frozenset(word[:STEM_CHARS] for word in fold(text).split() if len(word) > 1 and word not in STOP_WORDS)


@dataclass(frozen=True)
class LexicalIndex:
    """Each skill's terms and their idf over all skills."""

    skill_terms: list[frozenset[str]]
    idf: dict[str, float]
    totals: np.ndarray  # [skills]: the idf summed over each skill's terms

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        skill_terms = [terms(text) for text in texts]
        counts = Counter(term for found in skill_terms for term in found)
        idf = {term: math.log(len(texts) / count) for term, count in counts.items()}
        totals = np.fromiter((sum(idf[t] for t in found) for found in skill_terms), np.float32, len(texts))
        return cls(skill_terms, idf, totals)

    def coverage(self, clauses: Sequence[str], candidates: np.ndarray) -> np.ndarray:
        """[candidates]: the largest share of each candidate's terms (idf-weighted) that one clause holds, in [0, 1].

        As two small products over the clauses' own vocabulary: [candidates, terms] idf weights by
        [terms, clauses] presence, then the best clause per candidate.
        """
        clause_terms = [terms(clause) for clause in clauses]
        vocabulary = {term: j for j, term in enumerate(sorted(frozenset().union(*clause_terms)))}
        weights = np.zeros((len(candidates), len(vocabulary)), np.float32)
        for row, skill in enumerate(candidates):
            for term in self.skill_terms[skill]:
                column = vocabulary.get(term)
                if column is not None:
                    weights[row, column] = self.idf[term]
        present = np.zeros((len(vocabulary), len(clauses)), np.float32)
        for column, found in enumerate(clause_terms):
            present[[vocabulary[term] for term in found], column] = 1.0
        held = (weights @ present).max(axis=1, initial=0.0)
        totals = self.totals[candidates]
        return np.divide(held, totals, out=np.zeros_like(held), where=totals > 0)
