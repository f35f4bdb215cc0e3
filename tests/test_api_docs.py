"""The API reference (``make docs``, ``scripts/api_docs.py``) builds from the docstrings with pdoc, with no warning,
and documents the notebook API on its front page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_cleanly(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is in the dev extra (make setup installs it)")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from api_docs import build
    finally:
        sys.path.pop(0)
    problems = build(tmp_path)
    assert problems == [], problems
    front = (tmp_path / "attnlab.html").read_text()
    for name in ("pattern", "patterns", "compare_patterns", "head_dla", "scan", "load"):
        assert f'id="{name}"' in front, name  # the lazily imported notebook API is documented where users look
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {"attnlab/attention.html", "attnlab/dla.html", "attnlab/heads/inputs.html", "attnlab/cli.html"} <= pages
    assert (
        "Direct logit attribution" in (tmp_path / "attnlab/dla.html").read_text()
        or "direct logit" in (tmp_path / "attnlab/dla.html").read_text().lower()
    )
