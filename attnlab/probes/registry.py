"""Probe registry: names the CLI and ``attnlab.scan`` accept, groups of probes that run together, and building a
probe by name with parameters (``build("massive_activations", {"ratio_threshold": 10.0})``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnlab import params as params_lib
from attnlab.errors import AttnlabError, InvalidParameterError
from attnlab.probes.act_sinks import ActSinks
from attnlab.probes.domain_sink import DomainSink
from attnlab.probes.duplicate_token import DuplicateTokenHeads
from attnlab.probes.first_token_sink import FirstTokenSink
from attnlab.probes.headvis import HeadVisMetrics
from attnlab.probes.image_centric_heads import ImageCentricHeads
from attnlab.probes.induction import InductionHeads
from attnlab.probes.massive_activations import MassiveActivations
from attnlab.probes.max_attention_logit import MaxAttentionLogit
from attnlab.probes.preplan_anchor import PreplanAnchor
from attnlab.probes.previous_token import PreviousTokenHeads
from attnlab.probes.razor_echo import RazorEchoInduction
from attnlab.probes.residual_norms import ResidualNorms
from attnlab.probes.retrieval_heads import RetrievalHeads
from attnlab.probes.streaming_heads import StreamingHeads
from attnlab.probes.value_drain import ValueDrain
from attnlab.probes.vision_aware_heads import VisionAwareHeads

PROBES = {
    cls.name: cls
    for cls in (FirstTokenSink, ActSinks, MassiveActivations, PreviousTokenHeads, DuplicateTokenHeads, InductionHeads)
}
PROBES.update({cls.name: cls for cls in (RetrievalHeads, StreamingHeads, RazorEchoInduction)})
PROBES[PreplanAnchor.name] = PreplanAnchor
PROBES[HeadVisMetrics.name] = HeadVisMetrics
PROBES[MaxAttentionLogit.name] = MaxAttentionLogit
PROBES.update({cls.name: cls for cls in (VisionAwareHeads, ImageCentricHeads)})
PROBES.update({cls.name: cls for cls in (DomainSink, ValueDrain, ResidualNorms)})

GROUPS = {
    "sinks": ("first_token_sink", "act_sinks", "massive_activations"),
    "induction": ("previous_token", "duplicate_token", "induction"),
    "retrieval": ("retrieval_heads",),
    "streaming": ("streaming_heads", "razor_echo_induction"),
    "vision": ("vision_aware_heads", "image_centric_heads"),
    # extreme tokens (Guo et al. 2024); domain_sink needs a domain, e.g. --dataset bigram-backcopy
    "extremes": ("domain_sink", "value_drain", "residual_norms"),
}


def expand(names: str | list[str]) -> list[str]:
    """``"sinks,induction"`` -> the probe names, groups expanded, duplicates removed, order kept."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out: list[str] = []
    for raw in names:
        n = raw.strip()
        if not n:
            continue
        members = GROUPS.get(n, (n,))
        for m in members:
            if m not in PROBES:
                raise AttnlabError(f"unknown probe {m!r}; available: {', '.join(sorted(set(PROBES) | set(GROUPS)))}")
            if m not in out:
                out.append(m)
    if not out:
        raise AttnlabError("no probes given")
    return out


def param_defaults(name: str) -> dict[str, Any]:
    """Probe ``name``'s constructor parameters -> their defaults (``inspect.Parameter.empty`` where none); the
    names ``build`` accepts."""
    return PROBES[name]._param_defaults()


def build(name: str, params: Mapping[str, Any] | None = None):
    """Probe ``name`` made with ``params`` and its parameters checked (``_parameter_constraints``); an unknown probe
    or parameter, or a value the constraints refuse, is a one-line ``AttnlabError`` (what depends on the model or
    the prompts is checked when the probe attaches)."""
    if name not in PROBES:
        raise AttnlabError(f"unknown probe {name!r}; available: {', '.join(sorted(PROBES))}")
    params = dict(params or {})
    allowed = param_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise AttnlabError(f"{name} has no parameter {', '.join(map(repr, unknown))}; parameters: {', '.join(allowed)}")
    probe = PROBES[name](**params)
    try:
        probe._validate_params()  # the parameter contract, checked at the edge: before any model is loaded
    except (TypeError, ValueError) as e:
        raise refused(name, e) from None
    return probe


def refused(name: str, e: Exception) -> AttnlabError:
    """A probe's refusal of a parameter value (raised by its constructor or ``attach``) as a one-line error that
    names the probe once."""
    if isinstance(e, InvalidParameterError) and e.parameter is not None:
        return AttnlabError(f"{name}: {e.parameter} must be {e.allowed}, got {e.value!r}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return AttnlabError(first if first.startswith(f"{name}:") else f"{name}: {first}")


def changed_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a probe's recorded ``params`` that differ from its constructor's defaults (what a user set),
    in order; none for a name this registry does not know (an imported result: its defaults are unknown)."""
    if name not in PROBES:
        return {}
    return params_lib.changed_params("probe", name, params)
