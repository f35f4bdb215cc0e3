"""attnlab: find the attention heads and tokens that matter in a transformer, change them, and show the result.

Notebook use::

    import attnlab
    model = attnlab.load("minilm")                       # hub id, local checkpoint dir, or bundled alias
    run = attnlab.scan(model, ["sinks", "induction"], prompts=["The cat sat on the mat."])
    run["first_token_sink"].top(5)                       # pandas DataFrame
    run["first_token_sink"].plot()                       # plotly heatmap
    attnlab.pattern(model, "The cat sat on the mat.", "L1H3")        # one head's attention
    attnlab.patterns(model, "The cat sat on the mat.", layer=1)      # all heads of a layer, as a grid
    attnlab.compare_patterns(model, "A prompt.", "Another prompt.", heads=["L1H3"])
    attnlab.head_dla(lm, "The Eiffel Tower is in", "Paris")         # each head's direct effect on a logit

In a Jupyter kernel the first use of ``attnlab`` makes plotly figures self-contained (``attnlab.notebook``), so an
exported notebook (``jupyter nbconvert --to html``) shows them.

Heavy dependencies (torch, transformer_lens) load lazily, so ``import attnlab`` is cheap and the
training scripts run where TransformerLens is not installed.
"""

from __future__ import annotations

from attnlab.lazy import lazy_exports

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
    "pattern": "attnlab.attention",
    "patterns": "attnlab.attention",
    "compare_patterns": "attnlab.attention",
    "AttentionPatterns": "attnlab.attention",
    "PatternComparison": "attnlab.attention",
    "head_dla": "attnlab.dla",
    "HeadDLA": "attnlab.dla",
}


def _notebook_setup() -> None:
    from attnlab.notebook import setup_once

    setup_once()  # in a Jupyter kernel: figures that survive a static export (cheap after the first call)


__getattr__ = lazy_exports("attnlab", _LAZY, on_first_use=_notebook_setup)


__all__ = ["__version__", *_LAZY]
