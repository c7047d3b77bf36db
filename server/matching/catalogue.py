"""The ROME 4.0 catalogue shipped in `data/`: official labels and NAF sectors
(France Travail open data, see data/PROVENANCE.md) plus what the team wrote: the
enrichment (titles by gender, common titles, abbreviations, tasks, skills) and
example queries in the four styles users write (seeker, offer, CV, keywords).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
REFERENTIAL = "rome4_by_naf_sector.json"
ENRICHED = "rome4_enriched.jsonl"
EXAMPLES = "rome_paraphrases.jsonl"


@dataclass(frozen=True)
class Occupation:
    code: str
    label: str
    masculine: tuple[str, ...] = ()
    feminine: tuple[str, ...] = ()
    titles: tuple[str, ...] = ()
    abbreviations: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()
    sectors: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()  # how users describe this occupation, in their own words


@dataclass(frozen=True)
class Entry:
    """One searchable line of an occupation: its label, one of its titles, its tasks, or an example query."""

    id: str
    text: str
    lexical_text: str
    code: str
    kind: str


def catalogue_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return [data_dir / REFERENTIAL, data_dir / ENRICHED, data_dir / EXAMPLES]


def catalogue_version(data_dir: Path = DATA_DIR) -> str:
    digest = hashlib.sha256()
    for path in catalogue_files(data_dir):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_catalogue(data_dir: Path = DATA_DIR) -> list[Occupation]:
    referential = json.loads((data_dir / REFERENTIAL).read_text(encoding="utf-8"))
    labels: dict[str, str] = {}
    sectors: dict[str, list[str]] = {}
    for sector in referential.values():
        for item in sector["codes_rome"]:
            labels.setdefault(item["code"], item["libelle"])
            sectors.setdefault(item["code"], []).append(sector["libelle"])
    enriched: dict[str, dict] = {}
    path = data_dir / ENRICHED
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                enriched[record["code"]] = record
    examples = load_examples(data_dir / EXAMPLES)
    occupations = []
    for code in sorted(labels):
        extra = enriched.get(code, {})
        occupations.append(
            Occupation(
                code=code,
                label=labels[code],
                masculine=tuple(extra.get("masculine", ())),
                feminine=tuple(extra.get("feminine", ())),
                titles=tuple(extra.get("titles", ())),
                abbreviations=tuple(extra.get("abbreviations", ())),
                tasks=tuple(extra.get("tasks", ())),
                skills=tuple(extra.get("skills", ())),
                sectors=tuple(dict.fromkeys(sectors[code])),
                examples=tuple(examples.get(code, ())),
            )
        )
    return occupations


def load_examples(path: Path) -> dict[str, list[str]]:
    """The example queries by code, in file order, duplicates dropped; none where the file is absent."""
    examples: dict[str, list[str]] = {}
    if not path.is_file():
        return examples
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            texts = examples.setdefault(record["code"], [])
            if record["text"] not in texts:
                texts.append(record["text"])
    return examples


def entries(occupation: Occupation) -> list[Entry]:
    """Several short entries per occupation: a short query matches a title better than a long blurb,
    and a query written like one of the occupation's examples best matches that example."""
    code = occupation.code
    abbreviations = " ".join(occupation.abbreviations)
    out = [Entry(f"{code}:label", occupation.label, f"{occupation.label} {abbreviations}".strip(), code, "label")]
    seen = {occupation.label.casefold()}
    for title in (*occupation.masculine, *occupation.feminine, *occupation.titles):
        if title.casefold() in seen:
            continue
        seen.add(title.casefold())
        out.append(Entry(f"{code}:title:{len(out)}", title, f"{title} {abbreviations}".strip(), code, "title"))
    if occupation.tasks or occupation.skills:
        head = occupation.masculine[0] if occupation.masculine else occupation.label
        text = f"{head} : {' ; '.join(occupation.tasks)}. Compétences : {', '.join(occupation.skills)}."
        out.append(Entry(f"{code}:tasks", text, text, code, "tasks"))
    for number, example in enumerate(occupation.examples):
        out.append(Entry(f"{code}:example:{number}", example, example, code, "example"))
    return out
