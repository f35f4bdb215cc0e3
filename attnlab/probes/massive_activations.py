"""Massive activations in the residual stream (Sun et al. 2024, "Massive Activations in Large Language Models",
arXiv 2402.17762).

An activation ``x^(l)[t, d]`` of the residual stream output by layer l is massive if

    |x[t, d]| > abs_threshold (100)   and   |x[t, d]| >= ratio_threshold (1000) * median_d |x[t, d]|.

They sit on the starting token and delimiters — the same tokens that act as attention sinks — in a few fixed
dimensions. Both thresholds are parameters; the paper's "about 1,000x" is soft.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from attnlab.probes.base import Probe, ProbeContext


class MassiveActivations(Probe):
    """Per (layer, position): the largest |activation|, its ratio to the median, and massive-activation flags.

    Parameters
    ----------
    abs_threshold : float, default=100.0
    ratio_threshold : float, default=1000.0
    n_examples : int, default=1
        Prompts that get a per-token ``TokenScores`` result (rows: layers; values: max |x| at each position).
    """

    name = "massive_activations"

    def __init__(self, *, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0, n_examples: int = 1):
        self.abs_threshold = abs_threshold
        self.ratio_threshold = ratio_threshold
        self.n_examples = n_examples

    def attach(self, capture, ctx: ProbeContext) -> None:
        self._model = ctx.model
        self._layer_top: dict[int, list[float]] = defaultdict(list)
        self._layer_median: dict[int, list[float]] = defaultdict(list)
        self._layer_flagged: Counter = Counter()
        self._dims: Counter = Counter()
        self._tokens: Counter = Counter()
        self._examples: dict[int, dict] = {}
        self._pending: list = []
        capture.on("resid_post", self._on_resid)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def flags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``x`` ``[..., d]``: (max |x|, median |x|, bool mask of massive entries) over the last axis."""
        a = x.float().abs()
        med = a.median(dim=-1).values
        massive = (a > self.abs_threshold) & (a >= self.ratio_threshold * med[..., None])
        return a.max(dim=-1).values, med, massive

    def _on_resid(self, layer, x, batch) -> None:
        top, med, massive = self.flags(x)
        # kept on the device until the batch ends: the per-position maxima and medians, the massive entries
        self._pending.append((layer, top, med, torch.nonzero(massive)))  # hits: (row, position, dim)

    def _on_batch_end(self, batch, logits) -> None:
        if not self._pending:
            return
        layers = [p[0] for p in self._pending]
        tops = torch.stack([p[1] for p in self._pending]).float().cpu()  # [L, b, seq]: one transfer per batch
        meds = torch.stack([p[2] for p in self._pending]).float().cpu()
        hits_by_layer = [p[3].cpu() for p in self._pending]
        self._pending.clear()
        ids = batch.input_ids.cpu()
        for i, layer in enumerate(layers):
            top, med, all_hits = tops[i], meds[i], hits_by_layer[i]
            for b, p in enumerate(batch.prompt_indices):
                sl = batch.real_slice(b)
                t, m_ = top[b, sl], med[b, sl]
                self._layer_top[layer].append(float(t.max()))
                self._layer_median[layer].append(float(m_.median()))
                mine = all_hits[all_hits[:, 0] == b]
                mine = mine[(mine[:, 1] >= sl.start) & (mine[:, 1] < sl.stop)]
                hits = torch.stack([mine[:, 1] - sl.start, mine[:, 2]], 1) if len(mine) else mine[:, 1:]
                if len(hits):
                    positions = sorted({int(j) for j in hits[:, 0]})
                    self._layer_flagged[layer] += len(positions)
                    self._dims.update(int(d) for d in hits[:, 1])
                    toks = self._model.tokens_as_text(ids[b, sl].tolist())
                    self._tokens.update(toks[j] for j in positions)
                if p < self.n_examples:
                    ex = self._examples.setdefault(p, {"ids": ids[b, sl].tolist(), "rows": {}, "massive": set()})
                    ex["rows"][layer] = t.numpy()
                    if len(hits):
                        ex["massive"].update(int(j) for j in hits[:, 0])

    def results(self, ctx: ProbeContext):
        m = ctx.model
        layers = [
            {
                "layer": l,
                "max_abs": float(np.max(self._layer_top[l])) if self._layer_top[l] else float("nan"),
                "median_abs": float(np.median(self._layer_median[l])) if self._layer_median[l] else float("nan"),
                "massive_positions": int(self._layer_flagged[l]),
            }
            for l in range(m.n_layers)
        ]
        summary = {
            "layers": layers,
            "massive_dims": dict(self._dims.most_common(10)),
            "massive_tokens": dict(self._tokens.most_common(10)),
        }
        out = []
        for p, ex in sorted(self._examples.items()):
            values = np.stack([ex["rows"].get(l, np.full(len(ex["ids"]), np.nan)) for l in range(m.n_layers)])
            out.append(
                self.token_scores(
                    ctx,
                    f"massive_activations_{p}",
                    p,
                    m.tokens_as_text(ex["ids"]),
                    values,
                    [f"layer {l}" for l in range(m.n_layers)],
                    marks={"massive": sorted(ex["massive"])},
                    description="largest |residual activation| at each position after each layer",
                    summary=summary,
                )
            )
        return out
