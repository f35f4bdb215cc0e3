"""The method notes in docs/methods/ are what the package's docstrings and README point to: every pointer resolves
(page, and section number where one is named), every page is pointed to, links between pages resolve, and nothing
in the package, README or docs points to the method specifications outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods"
POINTER = re.compile(r"(docs/methods/[\w./-]+\.md)`{0,2}(?:\s*§(\d+)(?:-(\d+))?)?")
MD_LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")
OUTSIDE = "shared/" + "methods"  # split so this file never matches its own check


def _sources() -> list[Path]:
    """Package modules and markdown, the README and the docs: the files whose pointers must resolve."""
    files = [p for p in (ROOT / "attnlab").rglob("*") if p.suffix in (".py", ".md") and p.is_file()]
    return sorted(files + [ROOT / "README.md"] + list((ROOT / "docs").rglob("*.md")))


def _pointers() -> list[tuple[Path, str, int | None, int | None]]:
    out = []
    for path in _sources():
        for m in POINTER.finditer(path.read_text(encoding="utf-8", errors="replace")):
            lo = int(m.group(2)) if m.group(2) else None
            hi = int(m.group(3)) if m.group(3) else lo
            out.append((path, m.group(1), lo, hi))
    return out


def _sections(page: Path) -> set[int]:
    return {int(n) for n in re.findall(r"^## (\d+)\.", page.read_text(encoding="utf-8"), flags=re.MULTILINE)}


def test_every_pointer_names_an_existing_page_and_section():
    pointers = _pointers()
    assert pointers, "the package should point to its method notes"
    missing, bad_sections = [], []
    for path, target, lo, hi in pointers:
        page = ROOT / target
        where = f"{path.relative_to(ROOT)} -> {target}"
        if not page.is_file():
            missing.append(where)
        elif lo is not None:
            absent = sorted(set(range(lo, hi + 1)) - _sections(page))
            if absent:
                bad_sections.append(f"{where} §{absent}")
    assert not missing, f"pointers to missing pages: {missing}"
    assert not bad_sections, f"pointers to missing sections: {bad_sections}"


def test_every_method_page_is_pointed_to_by_the_package():
    pointed = {target for path, target, _, _ in _pointers() if (ROOT / "attnlab") in path.parents}
    pages = {f"docs/methods/{p.name}" for p in METHODS.glob("*.md") if p.name != "README.md"}
    assert pages, "no method pages"
    assert pages <= pointed, f"pages no module points to: {sorted(pages - pointed)}"


@pytest.mark.parametrize("page", sorted(p.name for p in METHODS.glob("*.md")))
def test_links_between_pages_resolve(page):
    text = (METHODS / page).read_text(encoding="utf-8")
    broken = [t for t in MD_LINK.findall(text) if not (METHODS / t).resolve().is_file()]
    assert not broken, f"{page}: broken links {broken}"


def test_index_lists_every_page():
    index = (METHODS / "README.md").read_text(encoding="utf-8")
    listed = set(MD_LINK.findall(index))
    pages = {p.name for p in METHODS.glob("*.md") if p.name != "README.md"}
    assert pages == listed, f"index and pages differ: {sorted(pages ^ listed)}"


def test_nothing_points_outside_the_repository():
    offenders = [
        str(p.relative_to(ROOT)) for p in _sources() if OUTSIDE in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"files pointing to {OUTSIDE}, which a clone does not have: {offenders}"
