"""The ESCO v1 skills shipped in `data/` (see data/PROVENANCE.md), with a usable preferred label each,
and the team's French label and wordings for each (ESCO's own French labels are not available here).

The source column `description` runs the preferred label, the alternative labels and the
definition together with no separator. The definition is the first capitalised sentence (names
such as "English" or "Java" inside labels excepted); the preferred label is cut from the label
run by `preferred_label` (heuristics below).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SKILLS_FILE = "esco_skills.csv.gz"
FRENCH_FILE = "esco_skills_fr.tsv.gz"  # uri, label, alternatives, usage (" | " between items)
SKILL_URI_PREFIX = "http://data.europa.eu/esco/skill/"

# A definition starts at a capitalised word (then lower case) that is not the first word: labels are
# lower case but for a few proper nouns, and a label run never starts a definition.
_DEFINITION_START = re.compile(r"(?<=\s)[A-Z][a-z'’-]*\b")
# Words and the punctuation between them: a capitalised word right after a lower-case one is mid-sentence.
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'’-]*|[.!?;:,()]")
PROPER_NOUN_MIN = 2  # mid-sentence capitalised occurrences for a word to be a name (one could be a typo)
# A label never ends on a function word, and the next label never starts with a connective.
_NOT_LAST = frozenset(
    ["of", "the", "a", "an", "and", "or", "in", "for", "to", "with", "on", "at", "by", "from", "into", "your", "their", "its"]
)
_NOT_FIRST = frozenset({"of", "and", "or", "to"})
MAX_LABEL_WORDS = 10
LENGTH_PENALTY = 0.6  # per word of the label: the preferred label is the shortest plausible one
VARIANT_BONUS = 0.5  # the next label restarts with the same verb or stem ("inspect cargo inspecting cargo")
REPEAT_BONUS = 1.0  # per word of the label after its first that recurs, in order, in a later label
# A word that opens at least this many label runs is a verb or a head ("use", "plan", "design", "ICT")
# that needs its object: never a label alone, and a short run it opens with no variant is one label.
HEAD_RUNS = 10
HEAD_RUN_WORDS = 4


@dataclass(frozen=True)
class Skill:
    uri: str
    label: str  # preferred label, derived (English)
    labels: str  # preferred and alternative labels, as one run of text
    definition: str
    label_fr: str = ""  # the team's French label ("conduire un chariot élévateur")
    alternatives_fr: tuple[str, ...] = ()  # other French wordings of the same skill ("utiliser un chariot élévateur")
    # How people say it: in the first person, as a CV or an ad writes it, and the job title whose core it
    # is, if any ("je conduis des chariots élévateurs", "conduite de chariots élévateurs", "cariste").
    usage_fr: tuple[str, ...] = ()

    @property
    def french(self) -> str:
        """The French label, wordings and usage as one text: what is embedded for matching French words.
        The English label stands in where a skill has no French one (a data file from elsewhere)."""
        return ", ".join((self.label_fr, *self.alternatives_fr, *self.usage_fr)) if self.label_fr else self.label


@dataclass(frozen=True)
class LabelStats:
    """How often a word starts or ends a label run, against how often it appears in one at all.

    Every run's first word starts the preferred label and its last word ends the last alternative
    label, so both are observed over all 13,939 skills without any label list.
    """

    first: Counter[str]
    last: Counter[str]
    anywhere: Counter[str]

    @classmethod
    def of(cls, runs: list[list[str]]) -> LabelStats:
        return cls(
            Counter(r[0] for r in runs if r),
            Counter(r[-1] for r in runs if r),
            Counter(w for r in runs for w in r),
        )

    def starts(self, word: str) -> float:
        return math.log((self.first[word] + 0.5) / (self.anywhere[word] + 1))

    def ends(self, word: str) -> float:
        return math.log((self.last[word] + 0.5) / (self.anywhere[word] + 1))


def proper_nouns(descriptions: Iterable[str]) -> frozenset[str]:
    """Capitalised words that are names ("English", "Java", "Pilates"), which labels hold too.

    A name is written capitalised after a lower-case word ("speak English") more often than in
    lower case; a definition's first verb ("Perform", "Compose") is capitalised only where it opens
    a sentence. Cut at the name, "interact verbally in English ..." would be labelled "interact":
    378 of the 13,939 preferred labels depend on this, mostly languages, software and methods.
    """
    lower: Counter[str] = Counter()
    capitalised: Counter[str] = Counter()
    for description in descriptions:
        tokens = _TOKEN.findall(description)
        first = True  # the first mid-sentence capital may open the definition: not evidence of a name
        for before, word in itertools.pairwise(tokens):
            if word.islower():
                lower[word] += 1
            elif word[0].isupper() and word[1:].islower() and before.islower():
                capitalised[word] += 0 if first else 1
                first = False
    return frozenset(w for w, n in capitalised.items() if n >= PROPER_NOUN_MIN and n > lower[w.lower()])


def split_description(description: str, names: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(label run, definition): the definition starts at the first capitalised word after the first word
    that is not one of `names` (see proper_nouns)."""
    starts = list(_DEFINITION_START.finditer(description))
    # A definition that opens with a name ("European and national legal framework ...") has no other start.
    match = next((m for m in starts if m.group(0) not in names), starts[0] if starts else None)
    if match is None:
        return description.strip(), ""
    return description[: match.start()].strip(), description[match.start() :].strip()


def preferred_label(words: list[str], stats: LabelStats) -> str:
    """The first label of a run: the cut where the words around it most often end and start labels.

    Score of a cut before word i: how typical words[i-1] is as a last word and words[i] as a first
    word, minus LENGTH_PENALTY per word, plus VARIANT_BONUS when words[i] repeats the first word's
    stem and REPEAT_BONUS per word when the label's words after its verb recur in a later label
    ("develop patient treatment strategies developing patient treatment strategies"). Runs of one
    or two words are one label, and so are runs of up to HEAD_RUN_WORDS opened by a head word with
    no variant of it later ("implement corporate governance", not "implement"). Tuned on 40 random
    skills read by hand (exact for 36); exact for 16 of 20 others read afterwards (the misses keep
    one variant too many or cut a label short; the whole run stays in `labels` for matching). The
    head-word rule changes 248 labels and none of those 60: of 30 of them read by hand, 23 are now
    exact and 7 longer but still partial ("maintain plan"), none worse than the cut ("plan", "use").
    """
    head = bool(words) and stats.first[words[0]] >= HEAD_RUNS
    if len(words) <= 2 or (head and len(words) <= HEAD_RUN_WORDS and not _has_variant(words)):
        return " ".join(words)
    best, cut = -math.inf, len(words)
    for i in range(1, min(len(words), MAX_LABEL_WORDS)):
        if words[i - 1] in _NOT_LAST or words[i] in _NOT_FIRST or (i == 1 and head and not _has_variant(words[:2])):
            continue
        score = stats.starts(words[i]) + stats.ends(words[i - 1]) - LENGTH_PENALTY * i
        if words[i][:4] == words[0][:4]:
            score += VARIANT_BONUS
        if i >= 2 and _recurs(words[1:i], words[i:]):
            score += REPEAT_BONUS * (i - 1)
        if score > best:
            best, cut = score, i
    return " ".join(words[:cut])


def _has_variant(words: list[str]) -> bool:
    """A later word repeats the first word's stem: the run holds a second label ("write Sanskrit write Sanskrit")."""
    return any(w[:4] == words[0][:4] for w in words[1:])


def _recurs(tail: list[str], rest: list[str]) -> bool:
    n = len(tail)
    return any(rest[j : j + n] == tail for j in range(len(rest) - n + 1))


def skills_version(data_dir: Path = DATA_DIR) -> str:
    """Both files: new French wordings re-index as new ESCO data does."""
    digest = hashlib.sha256((data_dir / SKILLS_FILE).read_bytes())
    french = data_dir / FRENCH_FILE
    if french.is_file():
        digest.update(french.read_bytes())
    return digest.hexdigest()[:16]


def read_rows(data_dir: Path = DATA_DIR) -> list[tuple[str, str]]:
    raw = gzip.decompress((data_dir / SKILLS_FILE).read_bytes()).decode("utf-8")
    return [(row["id"], row["description"]) for row in csv.DictReader(io.StringIO(raw, newline=""))]


def read_french(data_dir: Path = DATA_DIR) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """{uri: (French label, alternatives, usage)}; empty when the folder has no French file. A file
    without the usage column (ESCO's own French labels, say) reads with empty usage."""
    path = data_dir / FRENCH_FILE
    if not path.is_file():
        return {}
    raw = gzip.decompress(path.read_bytes()).decode("utf-8")
    french: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
    for row in csv.DictReader(io.StringIO(raw, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE):
        french[row["uri"]] = (row["label"].strip(), _items(row.get("alternatives")), _items(row.get("usage")))
    return french


def _items(cell: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (cell or "").split("|") if item.strip())


def load_skills(data_dir: Path = DATA_DIR) -> list[Skill]:
    rows = read_rows(data_dir)
    french = read_french(data_dir)
    names = proper_nouns(description for _, description in rows)
    parts = [split_description(description, names) for _, description in rows]
    runs = [labels.split() for labels, _ in parts]
    stats = LabelStats.of(runs)
    return [
        Skill(
            uri,
            preferred_label(words, stats) or definition[:60],
            labels or definition[:200],
            definition,
            *french.get(uri, ("", (), ())),
        )
        for (uri, _), (labels, definition), words in zip(rows, parts, runs)
    ]
