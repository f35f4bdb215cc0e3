"""Streaming heads by distant attention mass (the DuoAttention / StreamingLLM split into full and streaming heads;
criterion as in a public ``ml-explore/mlx-lm`` proposal, see ``docs/methods/retrieval_streaming_heads.md`` §2).

For sink size s and recent window r, query i's visible window is ``W_i = {0..s-1} U {i-r+1..i}`` and

    distant(l, h) = mean over rows i >= s + r of  sum_{j <= i, j not in W_i} A[l,h][i, j]

(positions from each prompt's first real token; per-prompt means, then averaged over prompts). A head with low
distant mass can be served by a sink + recent KV cache: a *streaming* head. ``classify_streaming`` applies the
recommended rule: a head is *full* iff it is in the top ``retrieval_fraction`` by score and its score is at least
``min_distant_ratio``; under GQA the KV group's query heads are aggregated by max first (a KV head stays full if
any of its query heads needs long range).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from attnlab.heads.formats import format_head
from attnlab.params import Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, query_validity


def distant_mass_rows(
    rows: torch.Tensor, rel_q: torch.Tensor, rel_k: torch.Tensor, sink: int, recent: int
) -> torch.Tensor:
    """Distant mass of each row: ``rows [..., c, seq]``, relative query / key positions ``rel_q [c]`` (or
    ``[b, c]``) and ``rel_k [seq]`` (or ``[b, seq]``) -> ``[..., c]`` (mass on keys ``s <= j <= i - r``)."""
    if rel_q.dim() == 1:
        rel_q, rel_k = rel_q[None], rel_k[None]
    distant = (rel_k[:, None, :] >= sink) & (rel_k[:, None, :] <= rel_q[:, :, None] - recent)  # [b, c, seq]
    while distant.dim() < rows.dim():
        distant = distant.unsqueeze(1)
    return (rows * distant).sum(-1)


def classify_streaming(
    scores, *, retrieval_fraction: float = 0.25, min_distant_ratio: float = 0.35, n_kv_heads: int | None = None
) -> np.ndarray:
    """Boolean "full head" mask: top ``retrieval_fraction`` of heads by score AND score >= ``min_distant_ratio``.

    ``scores``: ``HeadScores`` or array ``(n_layers, n_heads)``. With ``n_kv_heads`` (taken from a HeadScores when
    not given) query heads are aggregated per KV head by max and the mask is ``(n_layers, n_kv_heads)``. The top
    fraction is ``round(N * retrieval_fraction)`` heads of the N scored (ties broken by order); NaN is never full.
    """
    if hasattr(scores, "scores"):
        n_kv_heads = n_kv_heads if n_kv_heads is not None else scores.n_kv_heads
        scores = scores.scores
    arr = np.asarray(scores, dtype=np.float64)
    if n_kv_heads is not None and n_kv_heads != arr.shape[1]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            arr = np.nanmax(arr.reshape(arr.shape[0], n_kv_heads, arr.shape[1] // n_kv_heads), axis=-1)
    flat = np.where(np.isnan(arr), -np.inf, arr).ravel()
    k = int(round(np.isfinite(flat).sum() * retrieval_fraction))
    top = np.zeros(flat.shape, dtype=bool)
    top[np.argsort(-flat, kind="stable")[:k]] = True
    return (top & (flat >= min_distant_ratio)).reshape(arr.shape)


class StreamingHeads(Probe):
    """Distant attention mass per query head (low = streaming head) and the full/streaming split per KV head.

    Parameters
    ----------
    sink : int, default=4
        s: initial tokens always kept.
    recent : int, default=64
        r: recent window (the query itself included).
    retrieval_fraction : float, default=0.25
        At most this fraction of (KV) heads is classified full.
    min_distant_ratio : float, default=0.35
        And a full head needs at least this distant mass.
    """

    name = "streaming_heads"
    mergeable = True  # per-prompt sums (attnlab.sweep merges shards exactly)
    _ratios = ("_acc",)
    _parameter_constraints = {
        "sink": [Interval(int, 0, None)],
        "recent": [Interval(int, 1, None)],
        "retrieval_fraction": [Interval(float, 0, 1)],
        "min_distant_ratio": [Interval(float, 0, 1)],
    }

    def __init__(
        self, *, sink: int = 4, recent: int = 64, retrieval_fraction: float = 0.25, min_distant_ratio: float = 0.35
    ):
        self.sink = sink
        self.recent = recent
        self.retrieval_fraction = retrieval_fraction
        self.min_distant_ratio = min_distant_ratio

    def _attach(self, capture, ctx: ProbeContext) -> None:
        self._acc = PerPromptRatio(ctx.model.n_layers, ctx.model.n_heads)
        if ctx.model.causal:  # distant = 1 - sink mass - recent-window mass: exact from the view, no rows
            capture.on("attention", self._on_attention)
        else:  # a bidirectional row also attends ahead: the distant band needs whole rows
            capture.on("rows", self._on_rows)

    def _on_attention(self, layer: int, view, batch) -> None:
        dev = view.q.device
        q_pos = torch.arange(view.shape[2], device=dev)
        valid = query_validity(batch, q_pos, skip_first=self.sink + self.recent)  # [b, T]
        first = batch.first_real.to(dev)[:, None]
        near = view.band_mass(range(self.recent))  # keys i - r + 1 .. i
        if self.sink:
            near = near + view.mass_on(first + torch.arange(self.sink, device=dev)[None, :])
        mass = torch.where(valid[:, None, :], 1.0 - near, torch.zeros_like(near))
        self._acc.add(layer, batch.prompt_indices, mass.sum(-1), valid.float().sum(-1))

    def _on_rows(self, layer: int, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> None:
        first = batch.first_real.to(rows.device)[:, None]
        valid = query_validity(batch, q_pos, skip_first=self.sink + self.recent).float()  # [b, c]
        rel_q = q_pos[None, :].to(rows.device) - first
        rel_k = torch.arange(rows.shape[-1], device=rows.device)[None, :] - first
        mass = distant_mass_rows(rows, rel_q, rel_k, self.sink, self.recent)  # [b, h, c]
        self._acc.add(layer, batch.prompt_indices, (mass * valid[:, None, :]).sum(-1), valid.sum(-1))

    def results(self, ctx: ProbeContext):
        scores = self._acc.mean()
        n_kv = ctx.model.n_kv_heads
        scored = bool(np.isfinite(scores).any())
        full_kv = classify_streaming(
            scores,
            retrieval_fraction=self.retrieval_fraction,
            min_distant_ratio=self.min_distant_ratio,
            n_kv_heads=n_kv,
        )
        summary = {
            "scored": scored,
            "full_kv_heads": {str(l): [int(k) for k in np.flatnonzero(full_kv[l])] for l in range(full_kv.shape[0])},
            "n_full_kv_heads": int(full_kv.sum()),
            "n_kv_heads_total": int(full_kv.size),
            "most_distant_query_heads": [  # the most "full" (least streaming) heads; top() gives the most streaming
                format_head(l, h)
                for l, h in zip(*np.unravel_index(np.argsort(-np.nan_to_num(scores, nan=-1).ravel())[:5], scores.shape))
            ],
        }
        if not scored:
            summary["note"] = f"no prompt longer than sink + recent = {self.sink + self.recent} tokens; nothing scored"
        return [
            self.head_scores(
                ctx,
                self.name,
                scores,
                description=f"attention mass outside sink {self.sink} + recent {self.recent} (low = streaming head)",
                higher_is="less",  # the probe finds streaming heads: the least distant mass ranks first
                extra={"full_kv_heads": full_kv.astype(np.float64)},
                summary=summary,
            )
        ]
