"""RazorAttention echo and induction scores (Tang et al. 2024, "RazorAttention: Efficient KV Cache Compression
Through Retrieval Heads", arXiv 2407.15891; reference ``mindspore_gs/sequence_compress/razor_attention``).

Probe: BOS + a random block of P tokens repeated several times. Positions i, j count from the first *random*
token (BOS excluded, unlike the reference masks, which mislabel key 0):

    echo       E[i, j]   = 1  for i >= P, j < i, i = j (mod P)      (earlier copies of the current token)
    induction  I[i, j+1] = 1  for the same (i, j)                    (the token after an earlier copy)
    score      = mean(A (.) M) over the S x S matrix = mass on the mask / S^2     (S = tokens after BOS)

The period P and whether a BOS leads are found from each prompt's tokens (smallest P with
``seq[o + P:] == seq[o:-P]``, o = 0 or 1), so any repeated-random prompt set works; prompts without a period are
skipped and counted. Echo and induction masks are disjoint for P > 1. RazorAttention keeps the top 1% of
(layer, KV head) pairs by echo and the top 14% by induction as retrieval heads (GQA: max over the group's query
heads); the union is reported in the induction result's summary.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.params import Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext


def find_period(ids) -> tuple[int, int] | None:
    """``(offset, period)`` of a repeated sequence (offset 1 when a non-repeating BOS leads), or None."""
    seq = [int(t) for t in ids]
    for o in (0, 1):
        n = len(seq) - o
        for p in range(1, n // 2 + 1):
            if seq[o + p] == seq[o] and seq[o + p :] == seq[o : len(seq) - p]:
                return o, p
    return None


def echo_induction_masks(rel_q: torch.Tensor, rel_k: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean echo and induction masks ``[len(rel_q), len(rel_k)]`` for relative positions (BOS-excluded)."""
    i = rel_q[:, None]
    j = rel_k[None, :]
    d = i - j
    rows_ok = (i >= period) & (j >= 0)
    echo = rows_ok & (d > 0) & (d % period == 0)
    induction = rows_ok & (j >= 1) & (d >= 0) & ((d + 1) % period == 0)
    return echo, induction


def razor_selection(
    echo_kv: np.ndarray, induction_kv: np.ndarray, *, echo_fraction: float = 0.01, induction_fraction: float = 0.14
) -> dict[str, list[int]]:
    """RazorAttention's retrieval heads: union of the top ``round(N*echo_fraction)`` (layer, KV head) pairs by echo
    and top ``round(N*induction_fraction)`` by induction -> ``{layer: [kv_head, ...]}`` (layers as strings)."""
    n = echo_kv.size
    picked: set[tuple[int, int]] = set()
    for arr, frac in ((echo_kv, echo_fraction), (induction_kv, induction_fraction)):
        flat = np.where(np.isnan(arr), -np.inf, arr).ravel()
        for idx in np.argsort(-flat, kind="stable")[: int(round(n * frac))]:
            if np.isfinite(flat[idx]):
                picked.add(tuple(int(x) for x in np.unravel_index(idx, arr.shape)))
    out: dict[str, list[int]] = {}
    for l, k in sorted(picked):
        out.setdefault(str(l), []).append(k)
    return out


class RazorEchoInduction(Probe):
    """Echo and induction scores on repeated random tokens; two results, ``razor_echo`` and ``razor_induction``.

    Parameters
    ----------
    echo_fraction : float, default=0.01
    induction_fraction : float, default=0.14
        Fractions of (layer, KV head) pairs kept by each score for the RazorAttention selection.
    """

    name = "razor_echo_induction"
    mergeable = True  # per-prompt sums and periods (attnlab.sweep merges shards exactly)
    _ratios = ("_echo", "_ind")
    _parameter_constraints = {
        "echo_fraction": [Interval(float, 0, 1)],
        "induction_fraction": [Interval(float, 0, 1)],
    }

    def __init__(self, *, echo_fraction: float = 0.01, induction_fraction: float = 0.14):
        self.echo_fraction = echo_fraction
        self.induction_fraction = induction_fraction

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        self._echo = PerPromptRatio(m.n_layers, m.n_heads)
        self._ind = PerPromptRatio(m.n_layers, m.n_heads)
        self._periods: dict[int, tuple[int, int] | None] = {}
        self._chunk = int(getattr(capture, "chunk_size", 256))
        capture.on("attention", self._on_attention)

    def _period(self, batch, b: int):
        p = batch.prompt_indices[b]
        if p not in self._periods:
            self._periods[p] = find_period(batch.host_ids[b, batch.real_slice(b)].tolist())
        return self._periods[p]

    def _on_attention(self, layer: int, view, batch) -> None:
        """Mass on the echo and induction masks from the weights of their (sparse) pairs, query chunk by chunk."""
        dev = view.q.device
        t = view.shape[2]
        for b in range(batch.size):
            found = self._period(batch, b)
            if found is None:
                continue
            offset, period = found
            start = int(batch.first_real[b]) + offset
            S = int(batch.lengths[b]) - offset
            rel_k = torch.arange(t, device=dev) - start
            rel_k = torch.where(rel_k < S, rel_k, torch.full_like(rel_k, -1))  # padding keys never in a mask
            sums = {}
            for c0 in range(start, start + S, self._chunk):
                q_pos = torch.arange(c0, min(c0 + self._chunk, start + S), device=dev)
                masks = echo_induction_masks(q_pos - start, rel_k, period)
                for name, mask in zip(("echo", "ind"), masks):
                    ci, ki = torch.nonzero(mask, as_tuple=True)
                    w = view.pairs(torch.full_like(ci, b), q_pos[ci], ki).sum(0)
                    sums[name] = sums[name] + w if name in sums else w
            if not sums:
                continue
            den = torch.full((1,), float(S) * S)  # summed over all S rows of S keys
            for name, acc in (("echo", self._echo), ("ind", self._ind)):
                acc.add(layer, [batch.prompt_indices[b]], sums[name][None], den)

    def partial(self):
        part = super().partial()
        part["meta"]["periods"] = [[p, list(v) if v else None] for p, v in self._periods.items()]
        return part

    @classmethod
    def merge_partials(cls, parts):
        merged = super().merge_partials(parts)
        merged["meta"]["periods"] = [item for p in parts for item in p["meta"]["periods"]]
        return merged

    def restore(self, ctx, partial):
        super().restore(ctx, partial)
        self._periods = {int(p): tuple(v) if v else None for p, v in partial["meta"]["periods"]}

    def results(self, ctx: ProbeContext):
        echo, ind = self._echo.mean(), self._ind.mean()
        n_kv = ctx.model.n_kv_heads
        skipped = sorted(p for p, v in self._periods.items() if v is None)
        out = []
        for name, scores, what in (
            ("razor_echo", echo, "echo (earlier copies of the current token)"),
            ("razor_induction", ind, "induction (token after an earlier copy)"),
        ):
            out.append(
                self.head_scores(
                    ctx,
                    name,
                    scores,
                    description=f"RazorAttention {what}: mean(A * mask) over S x S on repeated random tokens",
                    summary={"n_prompts_scored": len(self._periods) - len(skipped), "prompts_without_period": skipped},
                )
            )
        if np.isfinite(echo).any():
            echo_kv = out[0].per_kv_head("max") if n_kv else echo
            ind_kv = out[1].per_kv_head("max") if n_kv else ind
            out[1].summary["razor_retrieval_kv_heads"] = razor_selection(
                echo_kv, ind_kv, echo_fraction=self.echo_fraction, induction_fraction=self.induction_fraction
            )
        return out
