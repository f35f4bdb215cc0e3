"""First-token attention sink mass (StreamingLLM: Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks", arXiv 2309.17453).

    sink_mass(l, h) = 1/(N - k) * sum_{i=k..N-1} sum_{j<k} A[l,h][i, j]

Positions count from each prompt's first real token (left padding is skipped), rows i < k are excluded (row 0
trivially puts all its attention on itself), and the per-prompt values are averaged over prompts. ``k = 1`` is the
classic first-token sink; StreamingLLM keeps ``k = 4`` sink tokens.
"""

from __future__ import annotations

import torch

from attnlab.params import Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, query_validity


class FirstTokenSink(Probe):
    """Share of each head's attention that lands on the first ``n_sink_tokens`` real tokens.

    Parameters
    ----------
    n_sink_tokens : int, default=1
        k in the formula: how many initial tokens count as the sink.
    """

    name = "first_token_sink"
    mergeable = True  # per-prompt sums (attnlab.sweep merges shards exactly)
    _ratios = ("_acc",)
    _parameter_constraints = {"n_sink_tokens": [Interval(int, 1, None)]}

    def __init__(self, *, n_sink_tokens: int = 1):
        self.n_sink_tokens = n_sink_tokens

    def _attach(self, capture, ctx: ProbeContext) -> None:
        self._acc = PerPromptRatio(ctx.model.n_layers, ctx.model.n_heads)
        capture.on("attention", self._on_attention)

    def _on_attention(self, layer: int, view, batch) -> None:
        dev = view.q.device
        q_pos = torch.arange(view.shape[2], device=dev)
        valid = query_validity(batch, q_pos, skip_first=self.n_sink_tokens).float()  # [b, T]
        first = batch.first_real.to(dev)[:, None]
        keys = first + torch.arange(self.n_sink_tokens, device=dev)[None, :]  # [b, k] the sink columns
        keys = torch.where(keys < (first + batch.lengths.to(dev)[:, None]), keys, torch.full_like(keys, -1))
        mass = view.mass_on(keys)  # [b, h, T]
        mass = torch.where(valid[:, None, :] > 0, mass, torch.zeros_like(mass))
        self._acc.add(layer, batch.prompt_indices, mass.sum(-1), valid.sum(-1))

    def results(self, ctx: ProbeContext):
        return [
            self.head_scores(
                ctx,
                self.name,
                self._acc.mean(),
                description=f"mean attention on the first {self.n_sink_tokens} real token(s) (StreamingLLM sink mass)",
            )
        ]
