"""Residual-state norms per position: where the residual stream *peaks* (Guo et al. 2024, "Active-Dormant Attention
Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835; Sun et al. 2024, "Massive
Activations in Large Language Models", arXiv 2402.17762; see ``docs/methods/attention_sinks.md`` §5).

The third extreme-token phenomenon: the sink token's residual state has a far larger norm than the others' (a
*residual-state peak*), which is what lets its key stand apart from every query. ``massive_activations`` looks at
single coordinates (|x| > 100 and 1000x the median); this probe looks at whole vectors. With ``x^(l)_t`` the
residual stream after layer l at position t (from the first real token):

    ratio(l, t) = ||x^(l)_t|| / median_u ||x^(l)_u||          (median over the prompt's real tokens)

Reduced per prompt and layer (each layer's norms stay on the device until the batch ends, then move at once):
the first token's ratio (summary ``layers``, averaged over prompts) and the positions whose ratio reaches
``peak_ratio`` (counted by token). The first ``n_examples`` prompts get a ``TokenScores`` of their norms (rows:
layers) with the peaks marked, for the app's tokens view.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from attnlab.params import Interval
from attnlab.probes.base import Probe, ProbeContext, lower_median


class ResidualNorms(Probe):
    """Norm of the residual stream at each position after each layer, and the positions that peak.

    Parameters
    ----------
    peak_ratio : float, default=5.0
        A position peaks at a layer when its norm is at least this multiple of the prompt's median norm there.
    n_examples : int, default=1
        Prompts that get a per-token ``TokenScores`` result (rows: layers; values: residual norm).
    """

    name = "residual_norms"
    _parameter_constraints = {
        "peak_ratio": [Interval(float, 0, None, closed="neither")],
        "n_examples": [Interval(int, 1, None)],  # the per-layer summary rides on the examples
    }

    def __init__(self, *, peak_ratio: float = 5.0, n_examples: int = 1):
        self.peak_ratio = peak_ratio
        self.n_examples = n_examples

    def _attach(self, capture, ctx: ProbeContext) -> None:
        self._model = ctx.model
        self._first_ratio: dict[int, list[float]] = defaultdict(list)
        self._first_norm: dict[int, list[float]] = defaultdict(list)
        self._median: dict[int, list[float]] = defaultdict(list)
        self._peaks: dict[int, Counter] = defaultdict(Counter)
        self._examples: dict[int, dict] = {}
        self._pending: list[tuple[int, torch.Tensor]] = []
        capture.on("resid_post", self._on_resid)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def _on_resid(self, layer: int, x: torch.Tensor, batch) -> None:
        self._pending.append((layer, x.float().norm(dim=-1)))  # [b, s], on the device until the batch ends

    def _on_batch_end(self, batch, logits) -> None:
        """Every layer's norms in one host transfer, then per (layer, prompt) over the prompt's real positions: the
        lower median (torch.median's), the first token's ratio to it, and the positions that peak."""
        if not self._pending:
            return
        layers = [l for l, _ in self._pending]
        norms = torch.stack([n for _, n in self._pending]).cpu()  # [L, b, s]
        self._pending.clear()
        real = batch.host_mask.bool()
        med = lower_median(norms, real)[..., None]  # [L, b, 1]
        ratio = norms / med.clamp_min(1e-30)
        first = batch.host_mask.argmax(-1)[None, :, None].expand(len(layers), -1, 1)
        first_ratio, first_norm = ratio.gather(-1, first)[..., 0], norms.gather(-1, first)[..., 0]
        peaking = ((ratio >= self.peak_ratio) & real).any(-1).tolist()  # [L][b]
        for i, layer in enumerate(layers):
            self._first_ratio[layer].extend(first_ratio[i].tolist())
            self._first_norm[layer].extend(first_norm[i].tolist())
            self._median[layer].extend(med[i, :, 0].tolist())
            for b, p in enumerate(batch.prompt_indices):
                if not peaking[i][b] and p >= self.n_examples:
                    continue
                sl = batch.real_slice(b)
                peaks = [int(j) for j in torch.nonzero(ratio[i, b, sl] >= self.peak_ratio).flatten()]
                if peaks:
                    self._peaks[layer].update(self._model.tokens_as_text(batch.host_ids[b, sl][peaks].tolist()))
                if p < self.n_examples:
                    ex = self._examples.setdefault(
                        p, {"ids": batch.host_ids[b, sl].tolist(), "rows": {}, "peaks": set()}
                    )
                    ex["rows"][layer] = norms[i, b, sl].numpy()
                    ex["peaks"].update(peaks)

    def results(self, ctx: ProbeContext):
        m = ctx.model
        mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
        layers = [
            {
                "layer": l,
                "first_token_ratio": mean(self._first_ratio[l]),
                "first_token_norm": mean(self._first_norm[l]),
                "median_norm": mean(self._median[l]),
                "peak_tokens": dict(self._peaks[l].most_common(5)),
            }
            for l in range(m.n_layers)
        ]
        summary = {"layers": layers, "peak_ratio": self.peak_ratio}
        out = []
        for p, ex in sorted(self._examples.items()):
            values = np.stack([ex["rows"].get(l, np.full(len(ex["ids"]), np.nan)) for l in range(m.n_layers)])
            out.append(
                self.token_scores(
                    ctx,
                    f"residual_norms_{p}",
                    p,
                    m.tokens_as_text(ex["ids"]),
                    values,
                    [f"layer {l}" for l in range(m.n_layers)],
                    marks={"peak": sorted(ex["peaks"])},
                    description=(
                        f"residual-stream norm per position after each layer (peak: >= {self.peak_ratio}x the median)"
                    ),
                    summary=summary,
                )
            )
        return out
