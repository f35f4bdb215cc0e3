"""Head labels: ``"L3H7"`` <-> ``(3, 7)``; also the ``"3-7"`` form used by the Retrieval_Head reference files."""
from __future__ import annotations

import re

_HEAD_RE = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)
_DASH_RE = re.compile(r"^\s*(\d+)-(\d+)\s*$")


def format_head(layer: int, head: int) -> str:
    """``format_head(3, 7) == "L3H7"``."""
    return f"L{int(layer)}H{int(head)}"


def parse_head(label: str) -> tuple[int, int]:
    """Parse ``"L3H7"`` or ``"3-7"`` into ``(3, 7)``."""
    m = _HEAD_RE.match(label) or _DASH_RE.match(label)
    if not m:
        raise ValueError(f"not a head label: {label!r} (expected like 'L3H7' or '3-7')")
    return int(m.group(1)), int(m.group(2))
