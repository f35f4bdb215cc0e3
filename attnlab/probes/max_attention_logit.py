"""The largest pre-softmax attention logit of each head: the quantity QK-Clip watches.

    max_logit(l, h) = max over prompts, real query positions i and visible keys j of  q_i . k_j * scale

with ``q``, ``k`` after rotary embeddings and ``scale`` the model's own attention scale (``1/sqrt(d_head)`` for most
models). Kimi K2's MuonClip (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534) rescales a
head's query and key weights whenever this maximum passes a threshold (100 in the paper), because unbounded
logits destabilise training; a census shows which heads of a trained model sit near such a bound. Soft-capped
models (Gemma-2) report the logit before the cap.

Cost: the scores of every row, in query chunks (``attnlab.lse.max_logit``): memory ``chunk x T`` per head, compute
like one attention pass; no pattern is built or kept.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab import lse
from attnlab.probes.base import Probe, ProbeContext


def attention_scaling(model, layer: int) -> float:
    """The scale the model's attention multiplies ``q . k`` by (its HF module's ``scaling``, else 1/sqrt(d_head))."""
    attn = model.bridge.blocks[layer].attn
    original = getattr(attn, "original_component", attn)
    for sub in original.modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, (int, float)):
            return float(scaling)
    return float(model.d_head) ** -0.5


class MaxAttentionLogit(Probe):
    """Largest scaled ``q . k`` of each head over the prompts' real query positions and visible keys.

    Parameters
    ----------
    chunk_size : int, default=256
        Query rows scored at once.
    """

    name = "max_attention_logit"

    def __init__(self, *, chunk_size: int = 256):
        self.chunk_size = chunk_size

    def attach(self, capture, ctx: ProbeContext) -> None:
        if int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}")
        m = ctx.model
        self._model = m
        self._max = np.full((m.n_layers, m.n_heads), -np.inf)
        self._per_prompt: dict[int, np.ndarray] = {}
        self._q: dict[int, torch.Tensor] = {}
        self._k: dict[int, torch.Tensor] = {}
        capture.on("q", self._on_q)
        capture.on("k", self._on_k)

    def _on_q(self, layer, q, batch) -> None:
        self._q[layer] = q
        self._maybe_score(layer, batch)

    def _on_k(self, layer, k, batch) -> None:
        self._k[layer] = k
        self._maybe_score(layer, batch)

    def _maybe_score(self, layer, batch) -> None:
        if layer not in self._q or layer not in self._k:
            return
        q, k = self._q.pop(layer), self._k.pop(layer)
        mask = batch.attention_mask.to(q.device)
        spec = lse.ScoreSpec(
            scaling=attention_scaling(self._model, layer), causal=bool(self._model.causal), key_mask=mask
        )
        best = lse.max_logit(q, k, spec, chunk=int(self.chunk_size), real_queries=mask.bool()).cpu().double().numpy()
        self._max[layer] = np.maximum(self._max[layer], best.max(0))
        m = self._model
        for row, p in enumerate(batch.prompt_indices):
            self._per_prompt.setdefault(p, np.full((m.n_layers, m.n_heads), np.nan))[layer] = best[row]

    def results(self, ctx: ProbeContext):
        per_prompt = np.stack([self._per_prompt[p] for p in sorted(self._per_prompt)])
        return [
            self.head_scores(
                ctx,
                self.name,
                np.where(np.isfinite(self._max), self._max, np.nan),
                description="largest pre-softmax attention logit q.k*scale (the quantity QK-Clip bounds)",
                extra={"mean_per_prompt_max": per_prompt.mean(0)},
            )
        ]
