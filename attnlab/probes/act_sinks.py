"""ACT sink detection, including hidden (non-initial) sinks (Yu et al. 2024, "Unveiling and Harnessing Hidden
Attention Sinks: Training-Free Attention Calibration for Enhancing Large Language Models", ICML 2024,
arXiv 2406.15765).

Per head and per prompt (positions from the first real token, N real tokens):

    score_j = sum_{i=j..N-1} A[i, j] / (N - j)        (mean attention key j gets from the queries that see it)
    S = { j : score_j > threshold }

For bidirectional encoders (BERT) every query sees every key, so ``score_j = mean_i A[i, j]``. Sinks at j > 0 are
*hidden* sinks: delimiters, punctuation and separators that soak up attention mid-sequence. Unlike the reference
code (which drops the first element of the sorted index list), position 0 is removed explicitly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from attnlab.params import Interval, Options
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, merged_counter, pairs, query_validity


class ActSinks(Probe):
    """ACT sink scores per head and the hidden-sink tokens of each prompt.

    Parameters
    ----------
    threshold : float, default=0.1
        Fixed threshold on ``score_j`` (the official scripts' value).
    threshold_mode : {"fixed", "alpha_over_n"}, default="fixed"
        ``"alpha_over_n"`` uses ``alpha / N`` instead (a third-party variant, not in the official code).
    alpha : float, default=5.0
        Used only with ``threshold_mode="alpha_over_n"``.
    min_heads : int, default=1
        A token is reported as a hidden sink of a prompt when it is an ACT sink (j > 0) in at least this many heads
        (ACT itself works per head, so one head suffices by default).
    n_examples : int, default=3
        How many prompts get a per-token ``TokenScores`` result (rows: layers; values: fraction of the layer's
        heads in which the token is a sink).
    """

    name = "act_sinks"
    mergeable = True  # per-prompt sums, token tallies and examples (attnlab.sweep merges shards exactly)
    _ratios = ("_first", "_hidden")
    _parameter_constraints = {
        "threshold": [Interval(float, 0, None)],
        "threshold_mode": [Options(("fixed", "alpha_over_n"))],
        "alpha": [Interval(float, 0, None)],
        "min_heads": [Interval(int, 0, None)],
        "n_examples": [Interval(int, 0, None)],
    }

    def __init__(
        self,
        *,
        threshold: float = 0.1,
        threshold_mode: str = "fixed",
        alpha: float = 5.0,
        min_heads: int = 1,
        n_examples: int = 3,
    ):
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.alpha = alpha
        self.min_heads = min_heads
        self.n_examples = n_examples

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        self._causal = m.causal
        self._first = PerPromptRatio(m.n_layers, m.n_heads)
        self._hidden = PerPromptRatio(m.n_layers, m.n_heads)
        self._colsum: dict[int, torch.Tensor] = {}
        self._examples: dict[int, dict] = {}
        self._token_counts: Counter = Counter()
        self._prompts_with_hidden = 0
        self._n_prompts = 0
        self._model = m
        capture.on("attention", self._on_attention)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def _on_attention(self, layer, view, batch) -> None:
        valid = query_validity(batch, torch.arange(view.shape[2], device=view.q.device))
        self._colsum[layer] = view.column_sums(valid)  # attention each key receives from the real queries

    def key_scores(self, colsum: torch.Tensor, batch) -> torch.Tensor:
        """``score_j`` ``[batch, heads, seq]`` from column sums; NaN at padded keys."""
        s = colsum.shape[-1]
        keys = torch.arange(s, device=colsum.device)[None, :]
        first = batch.first_real.to(colsum.device)[:, None]
        n = batch.lengths.to(colsum.device)[:, None]
        real = (keys >= first) & (keys < first + n)
        seen_by = (first + n - keys) if self._causal else n.expand(-1, s)
        scores = colsum / seen_by.clamp(min=1)[:, None, :].float()
        return scores.masked_fill(~real[:, None, :], float("nan"))

    def _threshold(self, batch) -> torch.Tensor:
        if self.threshold_mode == "fixed":
            return torch.full((batch.size,), self.threshold)
        return self.alpha / batch.lengths.float().cpu()

    def _on_batch_end(self, batch, logits) -> None:
        layers = sorted(self._colsum)
        thr = self._threshold(batch)[:, None, None]
        first = batch.first_real.cpu()
        flags_all = []
        if not layers:
            return
        # every layer's key scores in one host transfer
        all_scores = self.key_scores(torch.stack([self._colsum[l] for l in layers]), batch).cpu()
        for i, layer in enumerate(layers):
            scores = all_scores[i]
            flags = scores > thr  # NaN compares False
            b_idx = torch.arange(batch.size)
            self._first.add(layer, batch.prompt_indices, scores[b_idx, :, first], torch.ones(batch.size))
            hidden = flags.clone()
            hidden[b_idx, :, first] = False
            self._hidden.add(layer, batch.prompt_indices, hidden.sum(-1).float(), torch.ones(batch.size))
            flags_all.append(hidden)
        self._colsum.clear()
        if not flags_all:
            return
        stacked = torch.stack(flags_all, 1).float()  # [b, L, H, S]
        per_layer = stacked.mean(2)  # [b, L, S]
        n_flagging = stacked.flatten(1, 2).sum(1)  # [b, S]: heads in which the token is a hidden sink
        overall = n_flagging / stacked.shape[1] / stacked.shape[2]
        for b, p in enumerate(batch.prompt_indices):
            sl = batch.real_slice(b)
            hidden_pos = [int(j) for j in torch.nonzero(n_flagging[b, sl] >= self.min_heads).flatten() if j > 0]
            self._n_prompts += 1
            if not hidden_pos and p >= self.n_examples:
                continue  # nothing to tally or keep: the prompt's tokens are not needed
            toks = self._model.tokens_as_text(batch.host_ids[b, sl].tolist())
            if hidden_pos:
                self._prompts_with_hidden += 1
            for j in hidden_pos:  # tally how many heads flag each hidden-sink token
                self._token_counts[toks[j]] += int(n_flagging[b, sl][j])
            if p < self.n_examples:
                self._examples[p] = {
                    "tokens": toks,
                    "values": np.concatenate([per_layer[b, :, sl].numpy(), overall[b, sl].numpy()[None]], 0),
                    "hidden": hidden_pos,
                }

    def partial(self):
        part = super().partial()
        part["meta"].update(
            token_counts=pairs(self._token_counts),
            prompts_with_hidden=self._prompts_with_hidden,
            n_prompts=self._n_prompts,
            examples={str(p): {"tokens": ex["tokens"], "hidden": ex["hidden"]} for p, ex in self._examples.items()},
        )
        part["arrays"].update({f"example.{p}.values": ex["values"] for p, ex in self._examples.items()})
        return part

    @classmethod
    def merge_partials(cls, parts):
        merged = super().merge_partials(parts)
        metas = [p["meta"] for p in parts]
        merged["meta"].update(
            token_counts=pairs(merged_counter(m["token_counts"] for m in metas)),
            prompts_with_hidden=sum(m["prompts_with_hidden"] for m in metas),
            n_prompts=sum(m["n_prompts"] for m in metas),
            examples={p: ex for m in metas for p, ex in m["examples"].items()},
        )
        for part in parts:
            merged["arrays"].update({k: v for k, v in part["arrays"].items() if k.startswith("example.")})
        return merged

    def restore(self, ctx, partial):
        super().restore(ctx, partial)
        meta = partial["meta"]
        self._token_counts = merged_counter([meta["token_counts"]])
        self._prompts_with_hidden = int(meta["prompts_with_hidden"])
        self._n_prompts = int(meta["n_prompts"])
        self._examples = {
            int(p): {**ex, "values": partial["arrays"][f"example.{p}.values"]} for p, ex in meta["examples"].items()
        }

    def results(self, ctx: ProbeContext):
        m = ctx.model
        out = [
            self.head_scores(
                ctx,
                "act_first_score",
                self._first.mean(),
                description="ACT score of the first real token (mean attention it receives)",
            ),
            self.head_scores(
                ctx,
                "act_hidden_sinks",
                self._hidden.mean(),
                description=(
                    "mean number of hidden (non-initial) ACT sinks per prompt "
                    f"(score_j > {self.threshold if self.threshold_mode == 'fixed' else f'{self.alpha}/N'})"
                ),
                summary={
                    "hidden_sink_tokens": dict(
                        self._token_counts.most_common(20)
                    ),  # token -> heads flagging it, summed over prompts
                    "prompts_with_hidden_sinks": self._prompts_with_hidden,
                    "n_prompts": self._n_prompts,
                },
            ),
        ]
        for p, ex in sorted(self._examples.items()):
            out.append(
                self.token_scores(
                    ctx,
                    f"act_sink_tokens_{p}",
                    p,
                    ex["tokens"],
                    ex["values"],
                    [f"layer {l}" for l in range(m.n_layers)] + ["all layers"],
                    marks={"hidden_sink": ex["hidden"], "first": [0]},
                    description="fraction of heads in which each token is an ACT sink",
                )
            )
        return out
