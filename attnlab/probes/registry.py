"""Probe registry: names the CLI and ``attnlab.scan`` accept, and groups of probes that run together."""

from __future__ import annotations

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
                from attnlab.errors import AttnlabError

                raise AttnlabError(f"unknown probe {m!r}; available: {', '.join(sorted(set(PROBES) | set(GROUPS)))}")
            if m not in out:
                out.append(m)
    if not out:
        from attnlab.errors import AttnlabError

        raise AttnlabError("no probes given")
    return out
