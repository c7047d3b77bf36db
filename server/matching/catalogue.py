"""The ROME 4.0 catalogue shipped in `data/`: official labels and NAF sectors
(France Travail open data, see data/PROVENANCE.md) plus the enrichment the
team wrote (titles by gender, common titles, abbreviations, tasks, skills).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
REFERENTIAL = "rome4_by_naf_sector.json"
ENRICHED = "rome4_enriched.jsonl"


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


@dataclass(frozen=True)
class Entry:
    """One searchable line of an occupation: its label, one of its titles, or its tasks."""

    id: str
    text: str
    lexical_text: str
    code: str
    kind: str


def catalogue_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return [data_dir / REFERENTIAL, data_dir / ENRICHED]


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
            )
        )
    return occupations


def entries(occupation: Occupation) -> list[Entry]:
    """Several short entries per occupation: a short query matches a title better than a long blurb."""
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
    return out
