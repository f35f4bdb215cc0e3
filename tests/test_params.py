"""The parameter contract (attnlab.params), checked on every registered probe and intervention and on the ablation
and DiT-guidance classes: constructors only store; every parameter has a constraint its default meets; a bad value
is refused when the object is used, with an error naming the class, the parameter and the value; get_params reads
the __init__ signature. Also: saved interventions load only registry classes, and the CLI tells user errors
(exit 2) from bugs (exit 1)."""

from __future__ import annotations

import json
import sys

import pytest

from attnlab.ablation.head_ablation import HeadAblation
from attnlab.cli import main
from attnlab.errors import AttnlabError, InvalidParameterError
from attnlab.interventions.base import Intervention
from attnlab.interventions.headhunter import HeadHunter
from attnlab.interventions.registry import INTERVENTIONS
from attnlab.interventions.softpag import SoftPAG
from attnlab.interventions.zerotuning import ZeroTuning
from attnlab.params import Interval, Options, validate_params
from attnlab.probes.registry import PROBES

CLASSES = [*PROBES.values(), *INTERVENTIONS.values(), HeadAblation, SoftPAG, HeadHunter]
IDS = [c.__name__ for c in CLASSES]


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_constructor_only_stores_and_every_parameter_has_a_constraint(cls):
    obj = cls()
    params = cls._param_names()
    public = {k for k in vars(obj) if not k.startswith("_")}
    assert public == set(params)  # nothing but the parameters, under their own names
    assert set(cls._parameter_constraints) == set(params)
    obj._validate_params()  # the defaults are allowed
    again = cls(**obj.get_params())
    assert again.get_params() == obj.get_params()
    assert repr(obj).startswith(f"{cls.__name__}(")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_bad_value_is_stored_then_refused_by_name(cls):
    bad = object()  # meets no constraint: not a number, option, sequence, callable, bool, string or None
    for name in cls._param_names():
        obj = cls(**{name: bad})  # the constructor does not check
        assert getattr(obj, name) is bad
        with pytest.raises(InvalidParameterError, match=rf"^{cls.__name__} parameter {name} must be .*, got <object"):
            obj._validate_params()


def test_errors_are_user_errors_and_value_errors():
    err = InvalidParameterError("x")
    assert isinstance(err, AttnlabError) and isinstance(err, ValueError) and isinstance(err, TypeError)


def test_constraints_describe_what_they_allow():
    constraints = {"p": [Interval(float, 0, 1)], "mode": [Options(("a", "b")), None], "k": [Interval(int, 1, None)]}
    validate_params(constraints, {"p": 0.5, "mode": None, "k": 3}, "X")
    with pytest.raises(InvalidParameterError, match=r"X parameter p must be a finite number in \[0, 1\], got 1.5"):
        validate_params(constraints, {"p": 1.5}, "X")
    with pytest.raises(InvalidParameterError, match=r"p must be a finite number in \[0, 1\], got nan"):
        validate_params(constraints, {"p": float("nan")}, "X")  # NaN compares false with every bound
    with pytest.raises(InvalidParameterError, match=r"mode must be 'a' or 'b' or None, got 'c'"):
        validate_params(constraints, {"mode": "c"}, "X")
    with pytest.raises(InvalidParameterError, match=r"k must be >= 1 \(an integer\), got 2.0"):
        validate_params(constraints, {"k": 2.0}, "X")  # an integer parameter refuses a float
    with pytest.raises(InvalidParameterError, match=r"k must be >= 1 \(an integer\), got True"):
        validate_params(constraints, {"k": True}, "X")  # and a boolean

    with pytest.raises(InvalidParameterError, match=r"m must be one of 'a', 'b', 'c', got 'd'"):
        validate_params({"m": [Options(("a", "b", "c"))]}, {"m": "d"}, "X")


def test_the_registry_refuses_a_probe_parameter_when_it_builds_it_in_the_probes_words():
    """``probes.registry.build`` checks the constraints before any model is loaded; the message names the probe,
    the parameter, what it allows and what it got."""
    from attnlab.params import changed_params
    from attnlab.probes.registry import build

    with pytest.raises(AttnlabError, match=r"^act_sinks: threshold_mode must be 'fixed' or 'alpha_over_n', got 'x'$"):
        build("act_sinks", {"threshold_mode": "x"})
    with pytest.raises(AttnlabError, match=r"^first_token_sink: n_sink_tokens must be >= 1 \(an integer\), got 0$"):
        build("first_token_sink", {"n_sink_tokens": 0})
    ok = build("massive_activations", {"ratio_threshold": 10.0})
    assert changed_params("probe", ok.name, ok.get_params()) == {"ratio_threshold": 10.0}
    assert changed_params("probe", "no_such_probe", {"x": 1}) == {}


def test_use_validates_before_touching_the_model_or_the_data():
    """fit / attach check the parameters first: no model is needed to be told a value is bad."""
    with pytest.raises(InvalidParameterError, match="ZeroTuning parameter form"):
        ZeroTuning(gamma=1.0, form="nope").fit(None)
    with pytest.raises(InvalidParameterError, match="HeadAblation parameter mode"):
        HeadAblation(mode="nope").fit(None)
    with pytest.raises(InvalidParameterError, match="FirstTokenSink parameter n_sink_tokens"):
        PROBES["first_token_sink"](n_sink_tokens=0).attach(None, None)


def test_load_refuses_classes_outside_the_registry_and_imports_nothing(tmp_path):
    meta = {"class": "attnlab_never_imported_module.Evil", "method": "act", "params": {}, "fitted": {}, "arrays": []}
    (tmp_path / "intervention.json").write_text(json.dumps(meta))
    with pytest.raises(AttnlabError, match="not a registered intervention"):
        Intervention.load(tmp_path)
    assert "attnlab_never_imported_module" not in sys.modules
    meta.update({"class": "os.system", "method": "os"})
    (tmp_path / "intervention.json").write_text(json.dumps(meta))
    with pytest.raises(AttnlabError, match="not a registered intervention"):
        Intervention.load(tmp_path)


def test_cli_reports_a_bug_as_an_internal_error_not_a_user_error(monkeypatch, capsys):
    """A ValueError that is not an AttnlabError is a bug: exit 1 with one 'internal error' line, not exit 2."""

    def broken():
        raise ValueError("boom")

    monkeypatch.setattr("attnlab.cli.list_models", broken)
    assert main(["models"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnlab: internal error: ValueError: boom") and len(err.splitlines()) == 1
