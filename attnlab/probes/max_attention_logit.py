"""The largest pre-softmax attention logit of each head: the quantity QK-Clip watches.

    max_logit(l, h) = max over prompts, real query positions i and visible keys j of  q_i . k_j * scale

with ``q``, ``k`` after rotary embeddings and ``scale`` the model's own attention scale (``1/sqrt(d_head)`` for most
models). Kimi K2's MuonClip (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534) rescales a
head's query and key weights whenever this maximum passes a threshold (100 in the paper), because unbounded
logits destabilise training; a census shows which heads of a trained model sit near such a bound. Soft-capped
models (Gemma-2) report the logit before the cap.

Cost: the scores of every row, in query chunks, in the same pass that finds each row's log-sum-exp on the fused
path (``AttentionView.max_logit``): memory ``chunk x T`` per head, compute like one attention pass; no pattern is
kept. The ``chunk_size`` parameter is the capture's (``Capture.chunk_size``).
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.probes.base import NoCapture, Probe, ProbeContext


class MaxAttentionLogit(Probe):
    """Largest scaled ``q . k`` of each head over the prompts' real query positions and visible keys.

    No parameters: rows are scored in the capture's query chunks.
    """

    name = "max_attention_logit"
    mergeable = True  # maxima (attnlab.sweep merges shards exactly)
    _parameter_constraints: dict = {}

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        self._model = m
        self._max = np.full((m.n_layers, m.n_heads), -np.inf)
        self._per_prompt: dict[int, np.ndarray] = {}
        self._pending: dict[int, object] = {}  # layer -> [b, H] on the device until the batch ends
        capture.on("attention", self._on_attention)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def _on_attention(self, layer, view, batch) -> None:
        self._pending[layer] = view.max_logit()

    def _on_batch_end(self, batch, logits) -> None:
        if not self._pending:
            return
        layers = sorted(self._pending)
        best = torch.stack([self._pending[l] for l in layers]).cpu().double().numpy()  # one transfer per batch
        self._pending.clear()
        m = self._model
        for i, layer in enumerate(layers):
            self._max[layer] = np.maximum(self._max[layer], best[i].max(0))
            for row, p in enumerate(batch.prompt_indices):
                self._per_prompt.setdefault(p, np.full((m.n_layers, m.n_heads), np.nan))[layer] = best[i, row]

    def partial(self):
        keys = sorted(self._per_prompt)
        shape = self._max.shape
        return {
            "arrays": {
                "max": self._max.copy(),
                "prompts": np.asarray(keys, dtype=np.int64),
                "per_prompt": np.stack([self._per_prompt[p] for p in keys]) if keys else np.zeros((0, *shape)),
            },
            "meta": {},
        }

    @classmethod
    def merge_partials(cls, parts):
        prompts = np.concatenate([p["arrays"]["prompts"] for p in parts])
        per_prompt = np.concatenate([p["arrays"]["per_prompt"] for p in parts])
        if len(np.unique(prompts)) != len(prompts):
            raise ValueError("max_attention_logit partials overlap in prompts; shards must be disjoint")
        order = np.argsort(prompts, kind="stable")
        best = parts[0]["arrays"]["max"]
        for part in parts[1:]:
            best = np.maximum(best, part["arrays"]["max"])
        return {"arrays": {"max": best, "prompts": prompts[order], "per_prompt": per_prompt[order]}, "meta": {}}

    def restore(self, ctx, partial):
        self.attach(NoCapture(), ctx)
        a = partial["arrays"]
        self._max = np.array(a["max"], dtype=np.float64)
        self._per_prompt = {int(p): np.array(a["per_prompt"][i]) for i, p in enumerate(a["prompts"])}

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
