"""First-token sink mass split by a query-position predicate: the *active-dormant* view of a head (Guo et al. 2024,
"Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835;
see ``docs/methods/attention_sinks.md`` §5).

A head can be a sink on some inputs and not on others: on the Bigram-Backcopy task the copy head is *dormant* at
ordinary positions (its attention parked on the first token) and *active* at trigger positions (it attends to the
previous token). The StreamingLLM sink mass averaged over all rows (``first_token_sink``) mixes the two; this
probe keeps them apart. With D the query rows selected by the predicate (per prompt, rows i >= k only):

    sink_in(l, h)  = mean_{i in D}      sum_{j<k} A[l,h][i, j]
    sink_out(l, h) = mean_{i not in D}  sum_{j<k} A[l,h][i, j]
    gap(l, h)      = sink_out - sink_in          (> 0: dormant outside D, active inside)

Positions count from each prompt's first real token (left padding skipped); per-prompt values are averaged over
prompts, and a prompt with no row in D (or none outside it) is left out of that mean. The predicate, in this order:

- ``tokens``: the rows whose *query token* is one of these ids (e.g. the BB triggers);
- ``where``: a callable ``input_ids [batch, seq] -> bool [batch, seq]`` on the padded batch (pad positions are
  ignored whatever it returns);
- otherwise each prompt's metadata ``meta[meta_key]``: positions relative to the prompt's first token
  (``attnlab scan --dataset bigram-backcopy`` lists the trigger positions there).

Computed in flight from the sink column(s) (capture site ``"attention"``: on the fused path from q, k and each
row's log-sum-exp, exactly, without a ``seq x seq`` matrix); no pattern is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnlab.errors import AttnlabError
from attnlab.params import CALLABLE, INTEGERS, STRING, Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, query_validity


class DomainSink(Probe):
    """First-token attention mass inside and outside a set of query positions, per head.

    Parameters
    ----------
    tokens : sequence of int or None, default=None
        Query rows whose token id is in this set form the domain.
    where : callable or None, default=None
        ``input_ids -> bool mask`` of the domain's query rows (used when ``tokens`` is None).
    meta_key : str, default="domain_positions"
        Per-prompt metadata key listing the domain's positions (used when ``tokens`` and ``where`` are None).
    label : str or None, default=None
        Name of the domain in the result names (``domain_sink_<label>``, ``domain_sink_not_<label>``,
        ``domain_sink_gap_<label>``); None: the prompts' ``meta["domain_label"]``, else ``"domain"``.
    n_sink_tokens : int, default=1
        k: how many initial tokens count as the sink.
    """

    name = "domain_sink"
    _parameter_constraints = {
        "tokens": [INTEGERS, None],
        "where": [CALLABLE, None],  # input_ids -> bool mask
        "meta_key": [STRING],
        "label": [STRING, None],
        "n_sink_tokens": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        *,
        tokens: Sequence[int] | None = None,
        where: Callable[[torch.Tensor], torch.Tensor] | None = None,
        meta_key: str = "domain_positions",
        label: str | None = None,
        n_sink_tokens: int = 1,
    ):
        self.tokens = tokens
        self.where = where
        self.meta_key = meta_key
        self.label = label
        self.n_sink_tokens = n_sink_tokens

    def record_params(self) -> dict:
        """Parameters, with a callable ``where`` named rather than stored (results are JSON)."""
        out = super().record_params()
        if callable(self.where):
            out["where"] = f"<callable {getattr(self.where, '__qualname__', type(self.where).__name__)}>"
        if self.tokens is not None:
            out["tokens"] = [int(t) for t in self.tokens]
        return out

    def _attach(self, capture, ctx: ProbeContext) -> None:
        if self.tokens is None and self.where is None:
            if not ctx.meta or any(self.meta_key not in (m or {}) for m in ctx.meta):
                raise AttnlabError(
                    f"domain_sink needs a domain: tokens=[ids], where=callable, or prompts whose metadata lists "
                    f"{self.meta_key!r} (e.g. --dataset bigram-backcopy)"
                )
        self._meta = ctx.meta
        self._in = PerPromptRatio(ctx.model.n_layers, ctx.model.n_heads)
        self._out = PerPromptRatio(ctx.model.n_layers, ctx.model.n_heads)
        self._mask_of: tuple[object, torch.Tensor] | None = None
        capture.on("attention", self._on_attention)

    def domain_mask(self, batch) -> torch.Tensor:
        """``[batch, seq]`` bool: query rows in the domain (real tokens only)."""
        ids = batch.input_ids
        if self.tokens is not None:
            mask = torch.isin(ids, torch.as_tensor([int(t) for t in self.tokens], device=ids.device))
        elif self.where is not None:
            mask = torch.as_tensor(self.where(ids), device=ids.device).bool()
            if mask.shape != ids.shape:
                raise ValueError(
                    f"domain_sink: where() returned shape {tuple(mask.shape)}, expected {tuple(ids.shape)}"
                )
        else:
            mask = torch.zeros_like(ids, dtype=torch.bool)
            first = batch.first_real.tolist()
            for b, p in enumerate(batch.prompt_indices):
                pos = [first[b] + int(i) for i in self._meta[p][self.meta_key] if 0 <= int(i) < ids.shape[1] - first[b]]
                mask[b, pos] = True
        return mask & batch.attention_mask.to(ids.device).bool()

    def _on_attention(self, layer: int, view, batch) -> None:
        # once per batch, not per layer; the batch itself is kept (an id() could be reused by the next batch)
        if self._mask_of is None or self._mask_of[0] is not batch:
            self._mask_of = (batch, self.domain_mask(batch))
        dev = view.q.device
        q_pos = torch.arange(view.shape[2], device=dev)
        dom = self._mask_of[1].to(dev)  # [b, T]
        valid = query_validity(batch, q_pos, skip_first=self.n_sink_tokens)
        first = batch.first_real.to(dev)[:, None]
        keys = first + torch.arange(int(self.n_sink_tokens), device=dev)[None, :]  # [b, k] the sink columns
        keys = torch.where(keys < (first + batch.lengths.to(dev)[:, None]), keys, torch.full_like(keys, -1))
        mass = view.mass_on(keys)  # [b, h, T]
        for acc, sel in ((self._in, valid & dom), (self._out, valid & ~dom)):
            w = sel.float()
            acc.add(layer, batch.prompt_indices, (mass * w[:, None, :]).sum(-1), w.sum(-1))

    def results(self, ctx: ProbeContext):
        label = self.label or next((m.get("domain_label") for m in ctx.meta if m and m.get("domain_label")), "domain")
        inside, outside = self._in.mean(), self._out.mean()
        k = self.n_sink_tokens
        return [
            self.head_scores(
                ctx,
                f"domain_sink_{label}",
                inside,
                description=f"mean attention on the first {k} token(s) from {label} positions",
            ),
            self.head_scores(
                ctx,
                f"domain_sink_not_{label}",
                outside,
                description=f"mean attention on the first {k} token(s) from positions other than {label}",
            ),
            self.head_scores(
                ctx,
                f"domain_sink_gap_{label}",
                outside - inside,
                description=(
                    f"first-token mass off {label} minus on {label} positions (> 0: dormant off {label}, active on it)"
                ),
            ),
        ]
