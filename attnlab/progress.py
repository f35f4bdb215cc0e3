"""Progress bars with an ETA for long work (tqdm), behind one switch: ``attnlab COMMAND --quiet`` turns them all off.

Every loop that can take more than a few seconds (capture batches, ablations, organism evaluations, intervention
fits and measurements) draws its bar through ``bar``; ``set_enabled(False)`` (or ``with quiet():``) silences them.
Bars go to stderr and are removed when they finish, so printed results stay readable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

_ENABLED = [True]
_SET_HF_ENV = [False]  # whether set_enabled(False) set HF_HUB_DISABLE_PROGRESS_BARS


def enabled() -> bool:
    """Whether progress bars are drawn."""
    return _ENABLED[0]


def set_enabled(flag: bool) -> None:
    """Turn every attnlab progress bar on or off (the CLI's ``--quiet`` calls ``set_enabled(False)``); off also
    silences Hugging Face's bars (transformers' weight loading, hub downloads)."""
    import os
    import sys

    _ENABLED[0] = bool(flag)
    if not flag and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        _SET_HF_ENV[0] = True
    elif flag and _SET_HF_ENV[0]:  # undo only what we set (a user's own setting stays)
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        _SET_HF_ENV[0] = False
    if not flag or "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # the training scripts run without transformers' extras
            return
        import warnings

        with warnings.catch_warnings():  # the hub warns when an env var it read at import keeps its bars off
            warnings.simplefilter("ignore", UserWarning)
            (hf_logging.enable_progress_bar if flag else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def quiet(flag: bool = True) -> Iterator[None]:
    """No progress bars inside the block (when ``flag``); the previous setting is restored on exit."""
    before = _ENABLED[0]
    _ENABLED[0] = before and not flag
    try:
        yield
    finally:
        _ENABLED[0] = before


def bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    disable: bool = False,
) -> Any:
    """A tqdm bar (elapsed time, rate and ETA) over ``iterable`` or of ``total`` steps; a silent one when bars are
    off or ``disable``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=disable or not enabled())


__all__ = ["bar", "enabled", "quiet", "set_enabled"]
