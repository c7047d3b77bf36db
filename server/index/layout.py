"""Where each collection lives on disk: a name that points at its current generation folder.

    <root>/<name>             symlink -> .gen-<n>-<name>  (the pointer; a plain folder for older collections)
    <root>/.gen-<n>-<name>/   a complete collection: store.sqlite and index.faiss
    <root>/.creating-<name>/, .reembed-<name>/   being built; never pointed at

A generation folder only ever appears by renaming a fully built, fsynced staging folder, so every
generation is complete. Switching a collection to another generation (creation, re-embedding) is
one rename of a new symlink over the pointer, then an fsync of the root: a crash leaves the old
generation or the new one under the name, never neither. Start-up keeps what the pointers name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .durable import fsync_dir, fsync_tree

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
GENERATION_PATTERN = re.compile(r"^\.gen-(\d+)-([a-z0-9][a-z0-9_-]{0,62})$")
STAGING_PREFIXES = (".creating-", ".reembed-", ".dropping-", ".link-")
LEGACY_REPLACED_PREFIX = ".replaced-"  # the old collection an older server moved aside mid-swap


def generation_folder(root: Path, number: int, name: str) -> Path:
    return root / f".gen-{number}-{name}"


def is_legacy(root: Path, name: str) -> bool:
    """An older collection: a plain folder under its name rather than a pointer to a generation."""
    path = root / name
    return path.is_dir() and not path.is_symlink()


def current_folder(root: Path, name: str) -> Path:
    """The folder that holds `name` now: the pointer's target, or the legacy folder itself."""
    path = root / name
    return root / os.readlink(path) if path.is_symlink() else path


def next_generation(root: Path, name: str) -> int:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := GENERATION_PATTERN.match(p.name)) and m.group(2) == name]
    return max(numbers, default=0) + 1


def install(root: Path, staged: Path, name: str) -> Path:
    """Make a fully built staging folder a generation of `name` (durably); the pointer is not moved."""
    fsync_tree(staged)
    generation = generation_folder(root, next_generation(root, name), name)
    os.replace(staged, generation)
    fsync_dir(root)
    return generation


def point(root: Path, name: str, generation: Path) -> None:
    """Switch `name` to `generation` with one atomic rename, durable once this returns."""
    link = root / f".link-{name}"
    link.unlink(missing_ok=True)
    link.symlink_to(generation.name)
    os.replace(link, root / name)
    fsync_dir(root)


def unpoint(root: Path, name: str) -> Path | None:
    """Take `name` away durably (a drop); returns the folder to remove, now named by nothing."""
    path = root / name
    if path.is_symlink():
        target = current_folder(root, name)
        path.unlink()
    elif path.is_dir():
        target = root / f".dropping-{name}"
        shutil.rmtree(target, ignore_errors=True)
        os.replace(path, target)
    else:
        return None
    fsync_dir(root)
    return target


def retire(root: Path, folder: Path, name: str) -> Path:
    """Move an older, complete collection folder to generation 0 of `name`, so a pointer can take the name.

    Between this rename and the next `point`, the name is missing: `recover` then adopts the newest generation.
    """
    generation = generation_folder(root, 0, name)
    os.replace(folder, generation)
    fsync_dir(root)
    return generation


@dataclass
class Recovered:
    folders: dict[str, Path] = field(default_factory=dict)  # collection name -> its current folder
    removed: list[str] = field(default_factory=list)


def recover(root: Path) -> Recovered:
    """Bring `root` back to one complete folder per collection after any crash, and say which.

    Staging folders are removed (never pointed at, so never the only copy). A name with a pointer
    keeps its target and loses its other generations; a name left without one (a crash inside a
    first switch away from a legacy folder) adopts its newest generation, which is complete.
    """
    result = Recovered()
    generations: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(STAGING_PREFIXES):
            _remove(path, result)
        elif match := GENERATION_PATTERN.match(path.name):
            generations.setdefault(match.group(2), []).append((int(match.group(1)), path))
        elif NAME_PATTERN.fullmatch(path.name) and path.is_symlink():
            if current_folder(root, path.name).is_dir():
                result.folders[path.name] = current_folder(root, path.name)
            else:  # a drop that removed the generation first
                path.unlink()
                result.removed.append(path.name)
        elif NAME_PATTERN.fullmatch(path.name) and (path / "store.sqlite").is_file():
            result.folders[path.name] = path
    for path in sorted(root.iterdir()):
        name = path.name.removeprefix(LEGACY_REPLACED_PREFIX)
        if path.name.startswith(LEGACY_REPLACED_PREFIX) and path.is_dir():
            if name not in result.folders and name not in generations and (path / "store.sqlite").is_file():
                log.warning("collection %s: recovering the copy an interrupted swap left in %s", name, path.name)
                generations[name] = [(0, retire(root, path, name))]
            else:
                _remove(path, result)
    for name, found in generations.items():
        found.sort()
        if name not in result.folders:
            number, newest = found[-1]
            log.warning("collection %s: no pointer after an interrupted switch; adopting generation %d", name, number)
            point(root, name, newest)
            result.folders[name] = newest
        for _, path in found:
            if path != result.folders[name]:
                _remove(path, result)
    if result.removed:
        fsync_dir(root)
    return result


def _remove(path: Path, result: Recovered) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    result.removed.append(path.name)
