"""One parameter contract for probes and interventions, in the manner of scikit-learn's estimators.

- The constructor only stores: each ``__init__`` argument is kept under its own name, unconverted and unchecked.
- ``_parameter_constraints`` (a class attribute) maps each parameter to the values it allows: a list of
  constraints, any one of which a value may satisfy (``Interval``, ``Options``, ``HEADS``, ``BOOLEAN``, None, ...).
- ``_validate_params()`` checks the stored values against that table when the object is used (``fit``, ``attach``,
  ``apply``), in one place; a violation raises ``InvalidParameterError`` (an ``AttnlabError``, so the CLI reports
  it as a user error with exit 2; also a ``ValueError`` and ``TypeError``) naming the class, the parameter, the
  allowed values and the value received.
- ``get_params()`` reads the parameter names from the ``__init__`` signature; ``__repr__`` shows them.

Parameters are not set after construction: a variant with other values is a new object.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from attnlab.errors import InvalidParameterError


class Interval:
    """Finite numbers of a kind (``int``: integers, ``float``: any real number) in a range; booleans, NaN and
    infinities are refused.

    ``left`` / ``right`` may be None (unbounded); ``closed`` is ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.
    """

    def __init__(self, kind: type, left: float | None, right: float | None, *, closed: str = "both"):
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def accepts(self, value: Any) -> bool:
        number = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            return False
        if self.left is not None and (
            value < self.left or (value == self.left and self.closed in ("right", "neither"))
        ):
            return False
        return self.right is None or not (
            value > self.right or (value == self.right and self.closed in ("left", "neither"))
        )

    def __str__(self) -> str:
        lo = "[" if self.closed in ("both", "left") else "("
        hi = "]" if self.closed in ("both", "right") else ")"
        if self.left is None and self.right is None:
            span = ""
        elif self.right is None:
            span = f"{'>=' if lo == '[' else '>'} {self.left}"
        elif self.left is None:
            span = f"{'<=' if hi == ']' else '<'} {self.right}"
        else:
            span = f"in {lo}{self.left}, {self.right}{hi}"
        if self.kind is int:  # the range first: "n must be >= 1 (an integer)"
            return f"{span} (an integer)" if span else "an integer"
        return f"a finite number {span}".rstrip()


class Options:
    """One of a fixed set of values (e.g. the names of a mode)."""

    def __init__(self, values: Iterable[Any]):
        self.values = tuple(values)

    def accepts(self, value: Any) -> bool:
        try:
            return value in self.values
        except TypeError:  # an unhashable or incomparable value
            return False

    def __str__(self) -> str:
        words = [repr(v) for v in self.values]
        if len(words) <= 2:
            return " or ".join(words)  # "'fixed' or 'alpha_over_n'"
        return "one of " + ", ".join(words)


class InstanceOf:
    """An instance of a type (or of one of several), described in words."""

    def __init__(self, kinds: type | tuple[type, ...], description: str):
        self.kinds, self.description = kinds, description

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.kinds)

    def __str__(self) -> str:
        return self.description


class _Heads:
    """A sequence of ``(layer, head)`` integer pairs (checked against a model's grid at fit time)."""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return False
        try:
            pairs = list(value)
            return all(len(p) == 2 and all(_is_int(x) for x in p) for p in pairs)
        except TypeError:
            return False

    def __str__(self) -> str:
        return "a sequence of (layer, head) pairs"


class _Integers:
    """A sequence of integers (e.g. layer indices)."""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return False
        try:
            return all(_is_int(x) for x in value)
        except TypeError:
            return False

    def __str__(self) -> str:
        return "a sequence of integers"


class _Callable:
    def accepts(self, value: Any) -> bool:
        return callable(value)

    def __str__(self) -> str:
        return "a callable"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


HEADS = _Heads()
INTEGERS = _Integers()
BOOLEAN = InstanceOf(bool, "True or False")
STRING = InstanceOf(str, "a string")
CALLABLE = _Callable()
DICT = InstanceOf(dict, "a dict")


def _describe(constraint: Any) -> str:
    return "None" if constraint is None else str(constraint)


def _satisfies(value: Any, constraint: Any) -> bool:
    return value is None if constraint is None else constraint.accepts(value)


def validate_params(constraints: dict[str, Sequence[Any]], params: dict[str, Any], owner: str) -> None:
    """Raise ``InvalidParameterError`` for the first parameter whose value meets none of its constraints.

    Parameters missing from ``constraints`` are not checked.
    """
    for name, value in params.items():
        allowed = constraints.get(name)
        if allowed is None or any(_satisfies(value, c) for c in allowed):
            continue
        wanted = " or ".join(_describe(c) for c in allowed)
        raise InvalidParameterError(
            f"{owner} parameter {name} must be {wanted}, got {value!r}", parameter=name, allowed=wanted, value=value
        )


class Parameterized:
    """Base of objects configured by keyword parameters: ``get_params``, ``_validate_params``, a short repr.

    A subclass with a ``family`` (e.g. ``"probe"``) and its own ``name`` is known by that pair once its module is
    imported (``param_defaults``, ``changed_params``), so lower layers (figure titles) can tell which recorded
    parameters differ from a class's defaults without importing the layer that defines it.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}
    family: ClassVar[str] = ""
    _by_name: ClassVar[dict[tuple[str, str], type]] = {}  # (family, name) -> class: a table of classes, not state

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if cls.family and isinstance(name, str) and name:
            Parameterized._by_name[(cls.family, name)] = cls

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        """The parameters and their defaults (``inspect.Parameter.empty`` where none)."""
        sig = inspect.signature(cls.__init__)
        return {name: sig.parameters[name].default for name in cls._param_names()}

    @classmethod
    def _param_names(cls) -> list[str]:
        """The parameters: the ``__init__`` arguments (no ``*args`` / ``**kwargs``)."""
        sig = inspect.signature(cls.__init__)
        return [
            name
            for name, p in sig.parameters.items()
            if name != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """The parameters and their values, as given to ``__init__``."""
        return {name: getattr(self, name) for name in self._param_names()}

    def _validate_params(self) -> None:
        """Check every parameter against ``_parameter_constraints`` (raises ``InvalidParameterError``)."""
        validate_params(self._parameter_constraints, self.get_params(), type(self).__name__)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def param_defaults(family: str, name: str) -> dict[str, Any] | None:
    """Parameters -> defaults of the class of ``family`` called ``name``; None when no such class is imported."""
    cls = Parameterized._by_name.get((family, name))
    return None if cls is None else cls._param_defaults()


def changed_params(family: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The entries of recorded ``params`` that differ from the defaults of ``family``/``name``, in order; none for
    a class that is not known (e.g. an imported result's probe)."""
    defaults = param_defaults(family, name)
    if defaults is None:
        return {}
    return {k: v for k, v in params.items() if k in defaults and defaults[k] != v}


__all__ = [
    "BOOLEAN",
    "CALLABLE",
    "DICT",
    "HEADS",
    "INTEGERS",
    "STRING",
    "InstanceOf",
    "Interval",
    "Options",
    "Parameterized",
    "changed_params",
    "param_defaults",
    "validate_params",
]
