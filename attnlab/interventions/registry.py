"""Interventions the CLI knows by name, and ``k=v`` parameter parsing for them.

``INTERVENTIONS`` maps the ``attnlab intervene --method`` names to classes; more methods join as they land.
``build(method, ["gamma=2", "heads=[[3,0],[3,1]]"])`` makes an unfitted instance: each value is read as JSON
(numbers, booleans ``true``/``false``, ``null``, lists) and kept as a plain string when it is not JSON. Only
names in the class's ``__init__`` signature are accepted; values are validated by ``fit`` (sklearn style).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from attnlab.errors import AttnlabError
from attnlab.interventions.act import ACT
from attnlab.interventions.base import Intervention
from attnlab.interventions.soft_injection import SoftInjection
from attnlab.interventions.softpag_lm import SoftPAGDecoding
from attnlab.interventions.var import VAR
from attnlab.interventions.vhr import VHR
from attnlab.interventions.zerotuning import ZeroTuning

INTERVENTIONS: dict[str, type[Intervention]] = {
    "act": ACT,
    "zerotuning": ZeroTuning,
    "var": VAR,
    "vhr": VHR,
    "soft-injection": SoftInjection,
    "softpag": SoftPAGDecoding,
}


def registry_class(meta: dict[str, Any]) -> type[Intervention] | None:
    """The registry class of a saved intervention's ``intervention.json`` (its ``method``), or None when the method
    is not in the registry or the recorded class is not that method's class."""
    method = meta.get("method") if isinstance(meta, dict) else None
    cls = INTERVENTIONS.get(method) if isinstance(method, str) else None
    if cls is None or meta.get("class") != f"{cls.__module__}.{cls.__qualname__}":
        return None
    return cls


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: value}``; a value is JSON when it parses as JSON, else the raw string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise AttnlabError(f"--param must look like name=value, got {pair!r}")
        if key in out:
            raise AttnlabError(f"--param {key} given twice")
        try:
            out[key] = json.loads(raw, parse_constant=_not_finite(key))
        except json.JSONDecodeError:
            out[key] = raw
        except RecursionError:
            raise AttnlabError(f"--param {key}: the value nests too deeply") from None
        _check_finite(key, out[key])
    return out


def _not_finite(key: str):
    def refuse(constant: str):
        raise AttnlabError(f"--param {key}: {constant} is not a finite number")

    return refuse


def _check_finite(key: str, value: Any) -> None:
    """Refuse nan / inf anywhere in a parameter value, also as a plain string ("nan", "-inf") that float() reads."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return
        if not math.isfinite(number):
            raise AttnlabError(f"--param {key}: {value} is not a finite number")
    elif isinstance(value, float) and not math.isfinite(value):
        raise AttnlabError(f"--param {key}: {value} is not a finite number")
    elif isinstance(value, list):
        for v in value:
            _check_finite(key, v)
    elif isinstance(value, dict):
        for v in value.values():
            _check_finite(key, v)


def build(method: str, pairs: Sequence[str] = ()) -> Intervention:
    """An unfitted intervention of ``method`` with ``k=v`` parameters; one-line AttnlabError on a bad name."""
    if method not in INTERVENTIONS:
        raise AttnlabError(f"unknown method {method!r}; available: {', '.join(INTERVENTIONS)}")
    cls = INTERVENTIONS[method]
    params = parse_params(pairs)
    allowed = cls._param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise AttnlabError(
            f"{method} has no parameter {', '.join(map(repr, unknown))}; parameters: {', '.join(allowed)}"
        )
    return cls(**params)


__all__ = ["INTERVENTIONS", "build", "parse_params", "registry_class"]
