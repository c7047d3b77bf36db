"""Training data for `models finetune`: (anchor text -> ROME code) pairs, and the leak check.

Anchors come from the catalogue (titles, abbreviations, tasks, skills) and from the team's
paraphrases in the four query styles (`matching/data/rome_paraphrases.jsonl`, written by the team
from the catalogue; the matcher also indexes them as example entries).
The dev set's queries must never be trained on: any anchor that is a near-duplicate of one is
dropped, and `benchmarks/eval_rome.py` re-checks the training texts against the held-out part.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..matching.catalogue import DATA_DIR, EXAMPLES, Occupation
from ..skills.lexical import fold

PARAPHRASES = DATA_DIR / EXAMPLES
STYLES = ("seeker", "offer", "cv", "keywords")
NGRAM = 3
# Two texts are near-duplicates when the Jaccard similarity of their character 3-gram sets
# (accents, case and punctuation folded) is at least this: a reworded or re-punctuated copy
# of a query scores 0.6-1.0, two different sentences about one trade 0.1-0.35.
NEAR_DUPLICATE_JACCARD = 0.5


class AnchorSource(str, Enum):
    TITLE = "title"
    ABBREVIATION = "abbreviation"
    TASK = "task"
    SKILL = "skill"
    TEMPLATE = "template"
    PARAPHRASE = "paraphrase"


@dataclass(frozen=True)
class Pair:
    """One training example: the query-side text and the occupation it names."""

    anchor: str
    code: str
    source: AnchorSource
    style: str = ""


def catalogue_pairs(occupations: Iterable[Occupation]) -> list[Pair]:
    """Titles, abbreviations, tasks and skills of each occupation, pointing at its code."""
    pairs: list[Pair] = []
    for occupation in occupations:
        seen = {occupation.label.casefold()}
        groups = (
            (AnchorSource.TITLE, (*occupation.masculine, *occupation.feminine, *occupation.titles)),
            (AnchorSource.ABBREVIATION, occupation.abbreviations),
            (AnchorSource.TASK, occupation.tasks),
            (AnchorSource.SKILL, occupation.skills),
        )
        for source, texts in groups:
            for text in texts:
                if text.strip() and text.casefold() not in seen:
                    seen.add(text.casefold())
                    pairs.append(Pair(text, occupation.code, source))
    return pairs


# Query-style sentences assembled from an occupation's own titles, tasks (infinitive phrases) and
# skills: the catalogue says what the job is, the templates say it the way the four kinds of users
# do, so the model learns that "je sais <tâche>" or "recherche <métier> H/F pour <tâche>" name a code.
# No template names its occupation in the seeker style: people describe what they do, not a title.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "seeker": (
        "je sais {task} et {task2}",
        "mon travail consiste à {task} et à {task2}",
        "au quotidien je dois {task}, {task2} et {task3}",
        "dans mon dernier emploi il fallait {task} et {task2}",
        "je cherche un poste où je peux {task}",
        "j'ai de l'expérience en {skill} : {task}",
    ),
    "offer": (
        "Nous recherchons un(e) {title} H/F pour {task} et {task2}",
        "Poste de {title} : vous devrez {task}, {task2}. Compétences : {skill}, {skill2}.",
        "Recrute {title} H/F – {skill} exigé(e), CDI temps plein",
        "Vos missions : {task} ; {task2} ; {task3}. Profil : {skill}.",
    ),
    "cv": (
        "{Title} – {task}, {task2}",
        "Expérience : {title} pendant {years} ans ({skill}, {skill2})",
        "{Title} depuis {years} ans : {task}",
        "Compétences : {skill}, {skill2} – {task}",
    ),
    "keywords": (
        "{title} {skill} {skill2}",
        "{skill}, {skill2}, {skill3}",
        "{title} {abbreviation} {skill}",
    ),
}


def _elide(text: str) -> str:
    """French elision the templates need: "de agir" -> "d'agir", "que il" -> "qu'il", "le hôtel" -> "l'hôtel".
    An aspirated h ("le hangar") is elided too: telling it apart needs a word list, and the
    training texts only need to read as French to the model, not to a proof-reader."""
    return re.sub(r"\b(de|que|le|la) (?=[aeiouyhàâéèêëîïôûAEIOUYHÉ])", lambda m: m.group(1)[:-1] + "'", text)


def template_pairs(occupations: Iterable[Occupation], rng: random.Random, per_style: int = 1) -> list[Pair]:
    """`per_style` templated anchors per occupation and style, drawn with `rng` (seeded: same data)."""
    pairs: list[Pair] = []
    for occupation in occupations:
        if not occupation.tasks or not occupation.skills:
            continue
        titles = [*occupation.masculine[:1], *occupation.titles] or [occupation.label]
        for style, templates in TEMPLATES.items():
            for template in rng.sample(templates, min(per_style, len(templates))):
                if "{abbreviation}" in template and not occupation.abbreviations:
                    template = "{title} {skill}"
                tasks = rng.sample(occupation.tasks, len(occupation.tasks))
                skills = rng.sample(occupation.skills, len(occupation.skills))
                title = rng.choice(titles)
                text = template.format(
                    task=tasks[0],
                    task2=tasks[1 % len(tasks)],
                    task3=tasks[2 % len(tasks)],
                    skill=skills[0],
                    skill2=skills[1 % len(skills)],
                    skill3=skills[2 % len(skills)],
                    title=title,
                    Title=title[:1].upper() + title[1:],
                    abbreviation=rng.choice(occupation.abbreviations) if occupation.abbreviations else "",
                    years=rng.randint(2, 15),
                )
                pairs.append(Pair(_elide(text), occupation.code, AnchorSource.TEMPLATE, style))
    return pairs


def paraphrase_pairs(path: Path = PARAPHRASES, codes: set[str] | None = None) -> list[Pair]:
    """The team's training paraphrases; a code outside the catalogue is an error, not a skip."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if codes is not None and record["code"] not in codes:
            raise ValueError(f"{path}:{number}: unknown ROME code {record['code']!r}")
        if record["style"] not in STYLES:
            raise ValueError(f"{path}:{number}: style must be one of {STYLES}, got {record['style']!r}")
        pairs.append(Pair(record["text"], record["code"], AnchorSource.PARAPHRASE, record["style"]))
    return pairs


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    padded = f" {fold(text)} "
    return frozenset(padded[i : i + n] for i in range(max(1, len(padded) - n + 1)))


def jaccard(a: str, b: str) -> float:
    left, right = ngrams(a), ngrams(b)
    return len(left & right) / len(left | right) if left | right else 1.0


@dataclass(frozen=True)
class NearDuplicate:
    text: str
    query: str
    similarity: float


class NearDuplicateIndex:
    """Finds, for many texts, the most similar of a fixed set of queries (3-gram inverted index)."""

    def __init__(self, queries: Sequence[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> None:
        self.queries = list(queries)
        self.threshold = threshold
        self._grams = [ngrams(q) for q in self.queries]
        self._postings: dict[str, list[int]] = defaultdict(list)
        for index, grams in enumerate(self._grams):
            for gram in grams:
                self._postings[gram].append(index)

    def _similar(self, text: str) -> list[NearDuplicate]:
        """Every query sharing a 3-gram with `text`, with its Jaccard similarity, in query order."""
        grams = ngrams(text)
        shared = Counter(i for gram in grams for i in self._postings.get(gram, ()))
        return [
            NearDuplicate(text, self.queries[i], common / (len(grams) + len(self._grams[i]) - common))
            for i, common in sorted(shared.items())
        ]

    def closest(self, text: str) -> NearDuplicate | None:
        return max(self._similar(text), key=lambda d: d.similarity, default=None)

    def near(self, text: str) -> list[NearDuplicate]:
        """Every query at least `threshold` similar to `text`."""
        return [d for d in self._similar(text) if d.similarity >= self.threshold]

    def duplicates(self, texts: Iterable[str]) -> list[NearDuplicate]:
        found = []
        for text in dict.fromkeys(texts):
            match = self.closest(text)
            if match is not None and match.similarity >= self.threshold:
                found.append(match)
        return found


def without_near_duplicates(pairs: Sequence[Pair], queries: Sequence[str]) -> tuple[list[Pair], list[NearDuplicate]]:
    """Drop every pair whose anchor is a near-duplicate of one of `queries`."""
    index = NearDuplicateIndex(queries)
    dropped = {d.text: d for d in index.duplicates(p.anchor for p in pairs)}
    return [p for p in pairs if p.anchor not in dropped], list(dropped.values())


def pairs_digest(pairs: Iterable[Pair]) -> str:
    """sha256 of the training pairs, order-independent: the manifest's record of the data."""
    lines = sorted(f"{p.code}\t{p.source.value}\t{p.style}\t{p.anchor}" for p in pairs)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_queries(path: Path) -> list[dict]:
    """A dev-set file: one {"query", "code", "style", "split"} object per line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def epoch_batches(
    pairs: Sequence[Pair],
    batch_size: int,
    rng: random.Random,
    per_code: int,
    paraphrase_repeats: int,
    template_repeats: int = 1,
) -> list[list[Pair]]:
    """One epoch: up to `per_code` catalogue anchors per code, every paraphrase `paraphrase_repeats`
    times and every templated sentence `template_repeats` times, shuffled into batches in which no
    code appears twice (in-batch negatives stay negative)."""
    by_code: dict[str, list[Pair]] = defaultdict(list)
    chosen: list[Pair] = []
    for pair in pairs:
        if pair.source is AnchorSource.PARAPHRASE:
            chosen.extend([pair] * paraphrase_repeats)
        elif pair.source is AnchorSource.TEMPLATE:
            chosen.extend([pair] * template_repeats)
        else:
            by_code[pair.code].append(pair)
    for code in sorted(by_code):
        candidates = by_code[code]
        chosen.extend(rng.sample(candidates, min(per_code, len(candidates))))
    rng.shuffle(chosen)
    queue = deque(chosen)
    batches: list[list[Pair]] = []
    while queue:
        batch: list[Pair] = []
        codes: set[str] = set()
        deferred: list[Pair] = []
        while queue and len(batch) < batch_size:
            pair = queue.popleft()
            if pair.code in codes:
                deferred.append(pair)
            else:
                batch.append(pair)
                codes.add(pair.code)
        queue.extendleft(reversed(deferred))
        if len(batch) < 2:  # what is left names one code only: nothing to contrast it with
            break
        batches.append(batch)
    return batches
