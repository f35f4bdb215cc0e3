"""Every public name resolves: ``from attnlab import *`` and each subpackage's ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil

import attnlab


def test_star_import_resolves_every_exported_name():
    ns: dict = {}
    exec("from attnlab import *", ns)  # noqa: S102 - the statement under test
    for name in attnlab.__all__:
        assert name in ns, name


def test_every_module_imports_and_its_all_names_exist():
    """Import every module of the package (the bundled checkpoints aside) and check each ``__all__`` entry."""
    failures = []
    for info in pkgutil.walk_packages(attnlab.__path__, "attnlab."):
        if ".bundled" in info.name or info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", ()):
            if not hasattr(mod, name):
                failures.append(f"{info.name}.{name}")
    assert not failures, failures
