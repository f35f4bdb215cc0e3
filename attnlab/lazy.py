"""Names a package exports but imports only when first used, so importing the package stays cheap."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    package: str, table: dict[str, str], *, on_first_use: Callable[[], None] | None = None
) -> Callable[[str], object]:
    """A module-level ``__getattr__`` for ``package``: ``table`` maps each exported name to the module defining it.

    A name is resolved once: its value is stored in the package's namespace, so later lookups (and documentation
    tools) find it directly. ``on_first_use`` (if given) runs before each lazy resolution.
    """

    def __getattr__(name: str):
        if name in table:
            if on_first_use is not None:
                on_first_use()
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
