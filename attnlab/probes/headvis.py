"""HeadVis's six head metrics, with the definitions Neuronpedia publishes for 37 models (HeadVis: Luger, Kamath
et al., Anthropic 2026, transformer-circuits.pub/2026/headvis; Neuronpedia's ``compute-head-metrics.py``), so that
an attnlab census is comparable number for number with the published grids (``attnlab import headvis``).

For every real query position ``i`` of a sequence of ``L`` tokens (positions counted from its first real token)
and attention ``A = A[l, h]``, summed over all sequences of at least two tokens, then divided (no per-sequence
mean):

    self_attention_score = sum_i A[i, i]                       / sum L
    prev_token_score     = sum_{i >= 1} A[i, i - 1]            / sum (L - 1)
    pattern_entropy      = sum_i -sum_j A[i, j] log A[i, j]    / sum L
    qk_distance          = sum_i sum_j A[i, j] |i - j|         / sum L
    qk_distance_variance = sum_i sum_j A[i, j] |i - j|^2 / sum L  -  qk_distance^2
    induction_score      = sum_i sum_{p < i, tok[p] = tok[i]} A[i, p + 1] [A >= tau]  /  #{i with such a p}

``qk_distance_variance`` is the second moment minus the squared first moment of the distance pooled over all rows
(not a mean of per-row variances), and ``induction_score`` zeroes weights below ``tau`` (0.01) before summing
and divides by the number of query positions that have an earlier occurrence of their token, whatever the
number of earlier occurrences. Sequences of fewer than two tokens are skipped, as in the reference.

Neuronpedia computes these from eager attention in bfloat16 (``attn_implementation="eager"``, sequences of up to
512 tokens, right padding, the tokenizer's own special tokens). attnlab computes them in float32 through the
``"attention"`` capture site: on the eager path from the pattern, on the fused path exactly without a ``T x T``
matrix (``attnlab.lse``): diagonals and induction pairs are single ``q . k`` products against each row's
log-sum-exp, the entropy is ``lse - scale * q . E_A[k]`` and the distance moments ``E_A[j]``, ``E_A[j^2]`` — three
fused attention calls. Differences from the published numbers therefore come from dtype and prompts, not formulas.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.params import Interval
from attnlab.probes.base import NoCapture, Probe, ProbeContext

METRICS = (
    "self_attention_score",
    "prev_token_score",
    "pattern_entropy",
    "qk_distance",
    "qk_distance_variance",
    "induction_score",
)

DESCRIPTIONS = {
    "self_attention_score": "mean attention of a query on itself (HeadVis)",
    "prev_token_score": "mean attention on the previous token (HeadVis)",
    "pattern_entropy": "mean entropy of an attention row, nats (HeadVis)",
    "qk_distance": "mean attention-weighted query-key distance, tokens (HeadVis)",
    "qk_distance_variance": "variance of the attention-weighted query-key distance (HeadVis)",
    "induction_score": "attention on the token after an earlier occurrence of the query's token (HeadVis)",
}


def induction_pairs(ids: torch.Tensor, first: int, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query and key positions (absolute) of the induction pairs of one sequence, and the number of query
    positions that have at least one earlier occurrence of their token.

    A pair is ``(i, p + 1)`` for every earlier ``p < i`` with ``tok[p] == tok[i]`` (``p + 1 <= i`` always).
    """
    b, q, k, n = batch_induction_pairs(ids[None], torch.tensor([first]), torch.tensor([length]))
    return q, k, int(n[0])


def batch_induction_pairs(input_ids: torch.Tensor, first: torch.Tensor, length: torch.Tensor, *, chunk: int = 1024):
    """The induction pairs of every sequence of a batch at once: ``(b, query, key, n_queries[b])``, positions
    absolute, ordered by (sequence, query, key). Sequences of fewer than two tokens have none. Query rows are
    matched ``chunk`` at a time: memory ``chunk x T`` per sequence, never ``T x T``."""
    dev = input_ids.device
    n, t = input_ids.shape
    pos = torch.arange(t, device=dev)
    first, length = first.to(dev), length.to(dev)
    real = (pos[None] >= first[:, None]) & (pos[None] < (first + length)[:, None]) & (length >= 2)[:, None]
    if t <= chunk:  # short sequences: the whole batch in one match (one device sync per batch)
        same = input_ids[:, :, None] == input_ids[:, None, :]  # [b, i, p]
        hit = same & (pos[None, :, None] > pos[None, None, :]) & real[:, :, None] & real[:, None, :]
        bi, qi, pi = torch.nonzero(hit, as_tuple=True)
        return bi, qi, pi + 1, hit.any(-1).sum(-1)
    bs, qs, ps, counts = [], [], [], torch.zeros(n, dtype=torch.long, device=dev)
    for b in range(n):
        for start in range(0, t, chunk):
            rows = slice(start, min(start + chunk, t))
            same = input_ids[b, rows, None] == input_ids[b, None, :]  # [c, p]
            hit = same & (pos[rows, None] > pos[None, :]) & real[b, rows, None] & real[b, None, :]
            qi, pi = torch.nonzero(hit, as_tuple=True)
            bs.append(torch.full_like(qi, b))
            qs.append(qi + start)
            ps.append(pi + 1)
            counts[b] += hit.any(-1).sum()
    return torch.cat(bs), torch.cat(qs), torch.cat(ps), counts


class HeadVisMetrics(Probe):
    """The six HeadVis head metrics (Neuronpedia's definitions), from attention rows in one pass.

    Parameters
    ----------
    induction_threshold : float, default=0.01
        Induction weights below this are zeroed before summing (Neuronpedia's default; 0 disables).
    """

    name = "headvis"
    mergeable = True  # sums and counts (attnlab.sweep merges shards exactly, in float64)
    _parameter_constraints = {"induction_threshold": [Interval(float, 0, 1, closed="left")]}

    def __init__(self, *, induction_threshold: float = 0.01):
        self.induction_threshold = induction_threshold

    _KEYS = ("self", "ent", "d1", "d2", "prev", "ind")  # the per-head sums, in the order of the accumulator

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        self._shape = (m.n_layers, m.n_heads)
        self._acc: torch.Tensor | None = None  # [6, L, H] float64 sums on the rows' device, to the CPU at the end
        self._counts = {"rows": 0, "prev": 0, "ind": 0}
        self._rows: tuple | None = None  # the current batch's row masks and induction pairs (the view is per layer)
        capture.on("attention", self._on_attention)

    @property
    def _sums(self) -> dict[str, torch.Tensor]:
        return {} if self._acc is None else dict(zip(self._KEYS, self._acc.unbind(0), strict=True))

    def _batch_rows(self, batch, t: int, dev) -> tuple:
        """Once per batch: the real query rows, those with a previous token, and the induction pairs."""
        first, length = batch.first_real.to(dev), batch.lengths.to(dev)
        rel = torch.arange(t, device=dev)[None, :] - first[:, None]  # [b, T] position in its sequence
        real_q = (rel >= 0) & (rel < length[:, None]) & (length >= 2)[:, None]
        has_prev = real_q & (rel >= 1)
        pb, pq, pk, n_ind = batch_induction_pairs(batch.input_ids.to(dev), first, length)
        self._counts["rows"] += int(real_q.sum())  # row counts are per sequence, not per layer
        self._counts["prev"] += int(has_prev.sum())
        self._counts["ind"] += int(n_ind.sum())
        return batch, real_q, has_prev, pb, pq, pk

    def _on_attention(self, layer: int, view, batch) -> None:
        if self._rows is None or self._rows[0] is not batch:
            self._rows = self._batch_rows(batch, view.shape[2], view.q.device)
        _, real_q, has_prev, pb, pq, pk = self._rows
        d1, d2 = view.distance_moments()
        rows = torch.stack([view.diagonal(0), view.entropy(), d1, d2])  # [4, b, H, T], summed over real rows
        sums = torch.where(real_q[None, :, None, :], rows, 0.0).sum((1, 3))
        prev = torch.where(has_prev[:, None, :], view.diagonal(1), 0.0).sum((0, 2))
        w = view.pairs(pb, pq, pk)  # induction: [pairs, H]
        if self.induction_threshold > 0:
            w = w.masked_fill(w < self.induction_threshold, 0.0)
        if self._acc is None:
            self._acc = torch.zeros(len(self._KEYS), *self._shape, dtype=torch.float64, device=view.q.device)
        self._acc[:, layer] += torch.cat([sums, prev[None], w.sum(0)[None]]).double()  # in _KEYS order

    def grids(self) -> dict[str, np.ndarray]:
        """The six metric grids ``[n_layers, n_heads]`` (NaN where the denominator is zero)."""
        c = self._counts
        zero = np.zeros(self._shape)
        sums = {
            k: self._sums[k].cpu().numpy() if k in self._sums else zero
            for k in ("self", "prev", "ent", "d1", "d2", "ind")
        }

        def div(x, n):
            return x / n if n > 0 else np.full_like(x, np.nan)

        d1 = div(sums["d1"], c["rows"])
        return {
            "self_attention_score": div(sums["self"], c["rows"]),
            "prev_token_score": div(sums["prev"], c["prev"]),
            "pattern_entropy": div(sums["ent"], c["rows"]),
            "qk_distance": d1,
            "qk_distance_variance": div(sums["d2"], c["rows"]) - d1**2,
            "induction_score": div(sums["ind"], c["ind"]),
        }

    def partial(self):
        return {
            "arrays": {f"sum.{k}": v.double().cpu().numpy() for k, v in self._sums.items()},
            "meta": {"counts": dict(self._counts)},
        }

    @classmethod
    def merge_partials(cls, parts):
        arrays: dict[str, np.ndarray] = {}
        for part in parts:  # float64 sums added in prompt order
            for k, v in part["arrays"].items():
                arrays[k] = arrays[k] + v if k in arrays else np.array(v, dtype=np.float64)
        counts = {k: sum(int(p["meta"]["counts"][k]) for p in parts) for k in ("rows", "prev", "ind")}
        return {"arrays": arrays, "meta": {"counts": counts}}

    def restore(self, ctx, partial):
        self.attach(NoCapture(), ctx)
        arrays = partial["arrays"]
        zero = np.zeros(self._shape)
        self._acc = torch.from_numpy(
            np.stack([np.asarray(arrays.get(f"sum.{k}", zero), np.float64) for k in self._KEYS])
        )
        self._counts = {k: int(v) for k, v in partial["meta"]["counts"].items()}

    def results(self, ctx: ProbeContext):
        counts = dict(self._counts)
        return [
            self.head_scores(ctx, name, grid, description=DESCRIPTIONS[name], summary={"counts": counts})
            for name, grid in self.grids().items()
        ]
