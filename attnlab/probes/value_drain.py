"""Value-state drain: how small the first token's value state is next to the other tokens' (Guo et al. 2024,
"Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835).

A sink token that receives most of a dormant head's attention contributes ``A[i,0] * v_0`` to the head's output;
when ``v_0`` is near zero (a *drain*), parking attention there is a no-op, which is what lets a head switch itself
off. Per layer l and value head g, with ``v_j`` the value state of real token j (positions from the first real
token, N real tokens):

    drain(l, g) = ||v_0|| / ( (1/N) * sum_{j=0..N-1} ||v_j|| )

(the mean runs over all real tokens, the sink included; ``docs/methods/attention_sinks.md`` §5), averaged
over prompts. 1 = an ordinary token; well below 1 = a drain. Computed in flight from the value states (capture
site ``"v"``); nothing is kept but two numbers per prompt and head.

**GQA**: value states exist per KV head, not per query head. The result is a ``HeadScores`` over *query* heads in
which query head h carries the score of its KV head ``h // (n_heads // n_kv_heads)`` (Hugging Face's
``repeat_kv`` grouping: consecutive query heads share a KV head); ``per_kv_head("max")`` gives back the KV grid,
which is also stored as ``extra["kv_scores"]``. Without GQA the two coincide.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.errors import AttnlabError
from attnlab.params import Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext


class ValueDrain(Probe):
    """The first real token's value norm over the mean value norm of the prompt's real tokens, per head.

    Parameters
    ----------
    sink_position : int, default=0
        Which token is the candidate sink, counted from the first real token (0 = BOS / the first token).
    """

    name = "value_drain"
    _parameter_constraints = {"sink_position": [Interval(int, 0, None)]}

    def __init__(self, *, sink_position: int = 0):
        self.sink_position = sink_position

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        if m.n_heads % m.n_kv_heads:
            raise AttnlabError(f"{m.name}: {m.n_heads} query heads do not split into {m.n_kv_heads} KV groups")
        self._acc = PerPromptRatio(m.n_layers, m.n_kv_heads)
        capture.on("v", self._on_v)

    def _on_v(self, layer: int, v: torch.Tensor, batch) -> None:
        norms = v.float().norm(dim=-1)  # [b, kv, s]
        s = norms.shape[-1]
        first = batch.first_real.to(norms.device)
        n = batch.lengths.to(norms.device)
        keys = torch.arange(s, device=norms.device)[None, :]
        real = ((keys >= first[:, None]) & (keys < (first + n)[:, None])).float()  # [b, s]
        mean = (norms * real[:, None, :]).sum(-1) / n.clamp(min=1)[:, None].float()  # [b, kv]
        pos = (first + int(self.sink_position)).clamp(max=s - 1)
        sink = norms[torch.arange(norms.shape[0], device=norms.device), :, pos]  # [b, kv]
        has_sink = (int(self.sink_position) < n).float()  # prompts too short have no such token
        self._acc.add(layer, batch.prompt_indices, sink / mean.clamp(min=1e-30) * has_sink[:, None], has_sink)

    def results(self, ctx: ProbeContext):
        m = ctx.model
        kv = self._acc.mean()  # [L, n_kv]
        per_query = np.repeat(kv, m.n_heads // m.n_kv_heads, axis=1)  # query head h -> KV head h // group
        return [
            self.head_scores(
                ctx,
                self.name,
                per_query,
                higher_is="less",
                description=(
                    f"value norm of token {self.sink_position} / mean value norm of the prompt's tokens "
                    "(< 1: a value-state drain; per KV head, shown on its query heads)"
                ),
                extra={"kv_scores": kv},
            )
        ]
