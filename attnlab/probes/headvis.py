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
512 tokens, right padding, the tokenizer's own special tokens). attnlab computes them in float32 from attention
rows in query chunks (``"rows"`` capture site: exact on the eager and the fused path) — no ``T x T`` matrix per
layer is kept. Differences from the published numbers therefore come from dtype and prompts, not the formulas.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.probes.base import Probe, ProbeContext

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
    tok = ids[first : first + length]
    same = tok[:, None] == tok[None, :]  # [i, p]
    earlier = torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device), diagonal=-1)
    qi, pi = torch.nonzero(same & earlier, as_tuple=True)
    n_queries = int((same & earlier).any(1).sum())
    return qi + first, pi + 1 + first, n_queries


class HeadVisMetrics(Probe):
    """The six HeadVis head metrics (Neuronpedia's definitions), from attention rows in one pass.

    Parameters
    ----------
    induction_threshold : float, default=0.01
        Induction weights below this are zeroed before summing (Neuronpedia's default; 0 disables).
    """

    name = "headvis"

    def __init__(self, *, induction_threshold: float = 0.01):
        self.induction_threshold = induction_threshold

    def attach(self, capture, ctx: ProbeContext) -> None:
        if not 0.0 <= float(self.induction_threshold) < 1.0:
            raise ValueError(f"induction_threshold must be in [0, 1), got {self.induction_threshold!r}")
        m = ctx.model
        self._sums = {k: np.zeros((m.n_layers, m.n_heads)) for k in ("self", "prev", "ent", "d1", "d2", "ind")}
        self._counts = {"rows": 0, "prev": 0, "ind": 0}
        capture.on("rows", self._on_rows)

    def _on_rows(self, layer: int, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> None:
        dev = rows.device
        first = batch.first_real.to(dev)
        length = batch.lengths.to(dev)
        ok_seq = length >= 2
        rel = q_pos[None, :] - first[:, None]  # [b, c] query position within its sequence
        real_q = (rel >= 0) & (rel < length[:, None]) & ok_seq[:, None]
        rq = real_q[:, None, :].float()  # [b, 1, c]
        cols = torch.arange(rows.shape[-1], device=dev)
        diag = rows.gather(-1, q_pos[None, None, :, None].expand(rows.shape[0], rows.shape[1], -1, 1))[..., 0]
        prev_idx = (q_pos - 1).clamp(min=0)
        prev = rows.gather(-1, prev_idx[None, None, :, None].expand(rows.shape[0], rows.shape[1], -1, 1))[..., 0]
        has_prev = (real_q & (rel >= 1))[:, None, :].float()
        ent = -(rows * torch.log(rows.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
        dist = (q_pos[:, None] - cols[None, :]).abs().float()  # [c, s]
        d1 = (rows * dist).sum(-1)
        d2 = (rows * dist.square()).sum(-1)
        add = lambda key, x, w: self._sums[key].__setitem__(  # noqa: E731
            layer, self._sums[key][layer] + (x * w).sum((0, 2)).double().cpu().numpy()
        )
        add("self", diag, rq)
        add("prev", prev, has_prev)
        add("ent", ent, rq)
        add("d1", d1, rq)
        add("d2", d2, rq)
        # induction pairs whose query falls in this chunk
        lo, hi = int(q_pos.min()), int(q_pos.max())
        contiguous = hi - lo + 1 == len(q_pos)
        for b in range(rows.shape[0]):
            if not bool(ok_seq[b]):
                continue
            qi, ki, n_q = induction_pairs(batch.input_ids[b].to(dev), int(first[b]), int(length[b]))
            sel = (qi >= lo) & (qi <= hi)
            if contiguous:
                ci = qi[sel] - lo
            else:
                pos = {int(p): c for c, p in enumerate(q_pos.tolist())}
                keep = torch.tensor([int(x) in pos for x in qi.tolist()], dtype=torch.bool, device=dev)
                sel = sel & keep
                ci = torch.tensor([pos[int(x)] for x in qi[sel].tolist()], dtype=torch.long, device=dev)
            w = rows[b][:, ci, ki[sel]]  # [H, pairs]
            if self.induction_threshold > 0:
                w = w.masked_fill(w < self.induction_threshold, 0.0)
            self._sums["ind"][layer] += w.sum(-1).double().cpu().numpy()
        if layer == 0:
            # counts are per sequence, not per layer or chunk: count each chunk's share of real rows once
            self._counts["rows"] += int(real_q.sum())
            self._counts["prev"] += int((real_q & (rel >= 1)).sum())
            for b in range(rows.shape[0]):
                if bool(ok_seq[b]) and int(first[b]) >= lo and int(first[b]) <= hi:  # the chunk holding row 0
                    self._counts["ind"] += induction_pairs(batch.input_ids[b].to(dev), int(first[b]), int(length[b]))[2]

    def grids(self) -> dict[str, np.ndarray]:
        """The six metric grids ``[n_layers, n_heads]`` (NaN where the denominator is zero)."""
        c = self._counts

        def div(x, n):
            return x / n if n > 0 else np.full_like(x, np.nan)

        d1 = div(self._sums["d1"], c["rows"])
        return {
            "self_attention_score": div(self._sums["self"], c["rows"]),
            "prev_token_score": div(self._sums["prev"], c["prev"]),
            "pattern_entropy": div(self._sums["ent"], c["rows"]),
            "qk_distance": d1,
            "qk_distance_variance": div(self._sums["d2"], c["rows"]) - d1**2,
            "induction_score": div(self._sums["ind"], c["ind"]),
        }

    def results(self, ctx: ProbeContext):
        counts = dict(self._counts)
        return [
            self.head_scores(ctx, name, grid, description=DESCRIPTIONS[name], summary={"counts": counts})
            for name, grid in self.grids().items()
        ]
