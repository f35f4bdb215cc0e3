"""Callbacks, one module per view. Each module has plain functions (unit-testable without a browser) and
``register(app, state)`` that wires them to the page; nothing is registered at import time."""

from attnlab.apps.callbacks import (
    ablation,
    census,
    explore,
    headmap,
    interventions,
    pattern,
    runs,
    shell,
    tokens,
    vision,
)

MODULES = (shell, runs, headmap, census, pattern, tokens, vision, interventions, ablation, explore)


def register_all(app, state) -> None:
    for module in MODULES:
        module.register(app, state)
