"""The head catalog: typed, saved results of probes (``HeadScores``, ``TokenScores``) and run directories.

Names load on first use, so ``attnlab.heads.io`` (atomic writes, used by the training scripts) imports without
pandas.
"""

from __future__ import annotations

from attnlab.lazy import lazy_exports

_LAZY = {
    "HeadScores": "attnlab.heads.results",
    "TokenScores": "attnlab.heads.results",
    "load_result": "attnlab.heads.results",
    "Run": "attnlab.heads.runs",
    "format_head": "attnlab.heads.formats",
    "parse_head": "attnlab.heads.formats",
}

__getattr__ = lazy_exports("attnlab.heads", _LAZY)


__all__ = list(_LAZY)
