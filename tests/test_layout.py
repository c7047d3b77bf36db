"""The shape of the package that reviews keep asking for, checked rather than described."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("server", "kernels")
MAX_MODULE_LINES = 520  # "about 500": split a module when it takes on a second job, before it reaches this


def package_modules() -> list[Path]:
    return sorted(path for folder in PACKAGE_FOLDERS for path in (REPO_ROOT / folder).rglob("*.py"))


def test_no_module_over_the_size_limit() -> None:
    too_long = {
        str(path.relative_to(REPO_ROOT)): lines
        for path in package_modules()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"split these modules (one job each, at most {MAX_MODULE_LINES} lines): {too_long}"


def test_every_test_folder_is_collected() -> None:
    """A tests/ folder that pytest's norecursedirs matches (its default list has "build") never runs."""
    import fnmatch
    import tomllib

    options = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    patterns = options.get("norecursedirs")
    assert patterns is not None, "set norecursedirs: pytest's default skips folders named build and dist"
    folders = [p for p in (REPO_ROOT / "tests").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    skipped = sorted(str(f.relative_to(REPO_ROOT)) for f in folders if any(fnmatch.fnmatch(f.name, pat) for pat in patterns))
    assert not skipped, f"pytest would never collect {skipped}"
