"""Scoring heads against a token-defined target pattern, as TransformerLens' ``head_detector`` does.

For a prompt of S tokens and a 0/1 target pattern P (S x S, lower triangular):

    mul:  score = sum(A' * P) / sum(A')          A' = A with the BOS column and/or the diagonal zeroed
    abs:  score = 1 - sum|A' - P| / S            (TransformerLens also rounds this to 3 decimals; we do not)

Scores are computed per prompt and averaged over prompts. Unlike ``head_detector``, rows arrive in query
chunks (so long prompts work) and the caller's attention is never modified. The three patterns live in
``previous_token``, ``duplicate_token`` and ``induction``.
"""

from __future__ import annotations

import torch

from attnlab.params import BOOLEAN, Options
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, query_validity

ERROR_MEASURES = ("mul", "abs")


class PatternMatchProbe(Probe):
    """Base for probes that compare attention rows with a target pattern built from token ids.

    Parameters
    ----------
    exclude_bos : bool, default=False
        Zero the attention to the first real token before scoring.
    exclude_current_token : bool, default=False
        Zero the diagonal before scoring.
    error_measure : {"mul", "abs"}, default="mul"
    """

    mergeable = True  # per-prompt sums (attnlab.sweep merges shards exactly)
    _ratios = ("_acc",)
    _parameter_constraints = {
        "exclude_bos": [BOOLEAN],
        "exclude_current_token": [BOOLEAN],
        "error_measure": [Options(ERROR_MEASURES)],
    }

    def __init__(self, *, exclude_bos: bool = False, exclude_current_token: bool = False, error_measure: str = "mul"):
        self.exclude_bos = exclude_bos
        self.exclude_current_token = exclude_current_token
        self.error_measure = error_measure

    def target(self, input_ids: torch.Tensor, q_pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Target pattern rows ``[batch, chunk, seq]`` (bool) for query positions ``q_pos``; keys before ``first``
        are padding."""
        raise NotImplementedError

    def _attach(self, capture, ctx: ProbeContext) -> None:
        self._acc = PerPromptRatio(ctx.model.n_layers, ctx.model.n_heads)
        self._chunk = int(getattr(capture, "chunk_size", 256))
        self._pairs = None  # the current batch's target pairs
        capture.on("attention", self._on_attention)

    def _target_pairs(self, batch, dev, s: int):
        """The batch's kept target entries as (prompt, query, key) pairs, with per-prompt target sizes and real
        row counts: the same for every layer, so found once per batch."""
        first = batch.first_real.to(dev)
        n = batch.lengths.to(dev)
        keys = torch.arange(s, device=dev)
        real_keys = (keys[None, :] >= first[:, None]) & (keys[None, :] < (first + n)[:, None])  # [b, s]
        ids = batch.input_ids.to(dev)
        parts, n_target, rows = [], torch.zeros(batch.size, device=dev), torch.zeros(batch.size, device=dev)
        for start in range(0, s, self._chunk):
            q_pos = torch.arange(start, min(start + self._chunk, s), device=dev)
            valid_q = query_validity(batch, q_pos)  # [b, c]
            keep = real_keys[:, None, :] & valid_q[:, :, None]  # [b, c, s]
            if self.exclude_bos:
                keep = keep & (keys[None, None, :] != first[:, None, None])
            if self.exclude_current_token:
                keep = keep & (keys[None, None, :] != q_pos[None, :, None])
            target = self.target(ids, q_pos, first) & keep
            bi, ci, ki = torch.nonzero(target, as_tuple=True)
            parts.append((bi, q_pos[ci], ki))
            n_target += target.sum((1, 2)).to(n_target.dtype)
            rows += valid_q.sum(1).to(rows.dtype)
        bi, qi, ki = (torch.cat([p[i] for p in parts]) for i in range(3))
        return batch, bi, qi, ki, n_target, rows

    def _on_attention(self, layer, view, batch) -> None:
        """Sums over the kept entries of each prompt: ``sum A P`` from the weights of the target's (sparse) pairs,
        ``sum A`` as the real rows' total mass (1 each) less the excluded BOS column and diagonal."""
        b, n_heads, s = view.shape
        dev = view.q.device
        first = batch.first_real.to(dev)
        n = batch.lengths.to(dev)
        if self._pairs is None or self._pairs[0] is not batch:
            self._pairs = self._target_pairs(batch, dev, s)
        _, bi, qi, ki, n_target, rows = self._pairs
        sum_ap = torch.zeros(b, n_heads, device=dev)
        sum_ap.index_add_(0, bi, view.pairs(bi, qi, ki).to(sum_ap.dtype))
        excluded = torch.zeros(b, n_heads, device=dev)
        all_q = torch.arange(s, device=dev)
        valid_all = query_validity(batch, all_q)[:, None, :]  # [b, 1, s]
        if self.exclude_bos:
            on_bos = view.mass_on(first[:, None])  # [b, h, s]
            excluded += torch.where(valid_all, on_bos, torch.zeros_like(on_bos)).sum(-1)
        if self.exclude_current_token:
            diag = view.diagonal(0)
            if self.exclude_bos:  # the first row's diagonal is the BOS entry, already excluded
                diag = torch.where((all_q[None, :] == first[:, None])[:, None, :], torch.zeros_like(diag), diag)
            excluded += torch.where(valid_all, diag, torch.zeros_like(diag)).sum(-1)
        sum_a = rows[:, None] - excluded
        if self.error_measure == "mul":
            num, den = sum_ap, sum_a
        else:  # sum |A' - P'| over kept entries = sum A' + |P'| - 2 sum A'P'  (P' is 0/1)
            num, den = sum_a + n_target[:, None] - 2 * sum_ap, n.float()
        self._acc.add(layer, batch.prompt_indices, num, den)

    def results(self, ctx: ProbeContext):
        scores = self._acc.mean()
        if self.error_measure == "abs":
            scores = 1.0 - scores
        return [self.head_scores(ctx, self.name, scores, description=type(self).__doc__.strip().splitlines()[0])]


def duplicate_target(
    input_ids: torch.Tensor, q_pos: torch.Tensor, first: torch.Tensor, *, shift: int = 0
) -> torch.Tensor:
    """``T[b, c, j] = (tok[q_c] == tok[j - shift])`` for ``first + shift <= j`` and ``j - shift < q_c``."""
    s = input_ids.shape[1]
    keys = torch.arange(s, device=input_ids.device)
    src = keys - shift
    src_tok = input_ids[:, src.clamp(min=0)]  # [b, s]
    q_tok = input_ids[:, q_pos]  # [b, c]
    same = q_tok[:, :, None] == src_tok[:, None, :]
    ok = (src[None, None, :] >= first[:, None, None]) & (src[None, None, :] < q_pos[None, :, None])
    return same & ok
