"""Build the API reference (HTML) from attnlab's docstrings with pdoc: ``make docs`` (writes ``build/api/``).

Every public module is documented (``attnlab.models.training`` included: the organisms' training scripts are part
of the reproducible record), and the package's lazily imported names (``attnlab.load``, ``attnlab.scan``, ...)
are resolved first so the front page lists the notebook API. ``tests/test_api_docs.py`` builds it on every
``make test`` and fails on any pdoc warning (a docstring or signature pdoc cannot read, a name that does not
resolve).

    python scripts/api_docs.py [OUT]      # default build/api
"""

from __future__ import annotations

import pkgutil
import sys
import warnings
from pathlib import Path


def public_modules() -> list[str]:
    """``attnlab`` and its submodules, leaving out private ones (a ``_`` name part)."""
    import attnlab

    names = ["attnlab"]
    for info in pkgutil.walk_packages(attnlab.__path__, prefix="attnlab."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def specs() -> list[str]:
    """The module specs to hand pdoc: ``attnlab`` and every module that pdoc's own walk would skip because its
    parent package defines ``__all__`` without it (pdoc walks the rest itself; naming them twice is an error)."""
    import importlib

    out = []
    for name in public_modules():
        parent = name.rpartition(".")[0]
        if not parent:
            out.append(name)
            continue
        listed = getattr(importlib.import_module(parent), "__all__", None)
        if listed is not None and name.rpartition(".")[2] not in listed:
            out.append(name)
    return out


# pdoc cannot evaluate a string annotation inside a NamedTuple's generated constructor (its globals are a synthetic
# namespace, e.g. ``Scene.objects: tuple[SceneObject, ...]``): the page is still written, with the annotation as text.
COSMETIC = ("Error parsing type annotation",)


def build(out: str | Path) -> list[str]:
    """Write the reference into ``out``; returns pdoc's warnings that matter (empty when every page built and
    every documented name resolved)."""
    import importlib

    import pdoc

    import attnlab

    for name in public_modules():  # resolve lazily imported names, so pdoc documents what __all__ promises
        module = importlib.import_module(name)
        for member in getattr(module, "__all__", ()):
            getattr(module, member)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.render.configure(docformat="numpy", footer_text=f"attnlab {attnlab.__version__}")
        pdoc.pdoc(*specs(), output_directory=Path(out))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return [m for m in messages if not m.startswith(COSMETIC)]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/api")
    problems = build(out)
    for p in problems:
        print(f"api docs: warning: {p}", file=sys.stderr)
    print(f"API reference: {out / 'index.html'} ({len(list(out.rglob('*.html')))} pages)")
    sys.exit(1 if problems else 0)
