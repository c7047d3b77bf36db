"""Durable file-system steps (fsync of files and folders) and the crash points tests stop at.

A rename is durable only once its folder is fsynced; every switch of a snapshot or of a
collection's generation goes through `fsync_dir` before anything relies on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CrashHook = Callable[[str], None]

# Steps between which a crash leaves a distinct state on disk; tests and the chaos run stop there.
SNAPSHOT_WRITTEN = "snapshot-written"  # the new snapshot is in its temp file, fsynced, not renamed
SNAPSHOT_RENAMED = "snapshot-renamed"  # renamed over the old one, folder not yet fsynced
SWAP_STAGED = "swap-staged"  # a re-embedded generation is in place, the name still points at the old one
SWAP_SWITCHED = "swap-switched"  # the name points at the new generation, the old one is not yet removed
CRASH_POINTS = (SNAPSHOT_WRITTEN, SNAPSHOT_RENAMED, SWAP_STAGED, SWAP_SWITCHED)

_crash_hook: CrashHook | None = None


def set_crash_hook(hook: CrashHook | None) -> None:
    """Install (or remove, with None) a callable run at each crash point: test-only, never set when serving."""
    global _crash_hook
    _crash_hook = hook


def crash_point(step: str) -> None:
    if _crash_hook is not None:
        _crash_hook(step)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames, creations and removals of entries in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: Path) -> None:
    """Every file and folder under `path` (a freshly built generation), then `path` itself."""
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))
