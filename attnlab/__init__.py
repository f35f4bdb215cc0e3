"""attnlab: find the attention heads and tokens that matter in a transformer, change them, and show the result.

Notebook use::

    import attnlab
    model = attnlab.load("minilm")                       # hub id, local checkpoint dir, or bundled alias
    run = attnlab.scan(model, ["sinks", "induction"], prompts=["The cat sat on the mat."])
    run["first_token_sink"].top(5)                       # pandas DataFrame
    run["first_token_sink"].plot()                       # plotly heatmap

Heavy dependencies (torch, transformer_lens) load lazily, so ``import attnlab`` is cheap and the
training scripts run where TransformerLens is not installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "attnlab.models.loading",
    "LoadedModel": "attnlab.models.loading",
    "scan": "attnlab.probes.scan",
    "PROBES": "attnlab.probes.registry",
    "HeadScores": "attnlab.heads.results",
    "TokenScores": "attnlab.heads.results",
    "Run": "attnlab.heads.runs",
    "AttnlabError": "attnlab.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
