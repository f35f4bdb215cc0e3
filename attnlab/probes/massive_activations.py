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

from attnlab.params import Interval
from attnlab.probes.base import NoCapture, Probe, ProbeContext, lower_median, merged_counter, pairs


class MassiveActivations(Probe):
    """Per (layer, position): the largest |activation|, its ratio to the median, and massive-activation flags.

    Parameters
    ----------
    abs_threshold : float, default=100.0
    ratio_threshold : float, default=1000.0
    n_examples : int, default=1
        Prompts that get a per-token ``TokenScores`` result (rows: layers; values: max |x| at each position).

    Checked when the probe is used (``_parameter_constraints``): finite thresholds, ``abs_threshold >= 0``,
    ``ratio_threshold > 0``, ``n_examples`` an integer >= 0 (an ``InvalidParameterError``, a ``ValueError``; on the
    command line, one line and exit 2).
    """

    name = "massive_activations"
    mergeable = True  # per-prompt maxima / medians, tallies and examples (attnlab.sweep merges shards exactly)
    _parameter_constraints = {
        "abs_threshold": [Interval(float, 0, None)],
        "ratio_threshold": [Interval(float, 0, None, closed="neither")],
        "n_examples": [Interval(int, 0, None)],
    }

    def __init__(self, *, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0, n_examples: int = 1):
        self.abs_threshold = abs_threshold
        self.ratio_threshold = ratio_threshold
        self.n_examples = n_examples

    def _attach(self, capture, ctx: ProbeContext) -> None:
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
        """For ``x`` ``[..., d]``: (max |x|, median |x|, bool mask of massive entries) over the last axis.

        |x|, its maximum and its median are exact in the model's own dtype (order statistics of its values); the
        comparisons promote to float32 element by element, with no float32 copy of the residual stream."""
        a, med = self._abs_median(x)
        top, massive = self._massive(x, a, med)
        return top, med, massive if massive is not None else torch.zeros(x.shape, dtype=torch.bool)

    @staticmethod
    def _abs_median(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|x|, its median over the last axis). On CPU (float32/64) the median is numpy's introselect in place --
        the same order statistic as torch.median's lower median, ~3x faster, no copy -- so the returned |x| has each
        row's entries reordered (its maximum is unchanged); ``_massive`` takes |x| afresh where order matters."""
        a = x.abs()
        if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
            k = (a.shape[-1] - 1) // 2
            rows = a.numpy()
            rows.partition(k, axis=-1)  # in place: a is ours (a fresh |x|)
            return a, torch.from_numpy(rows[..., k].copy()).float()
        return a, a.median(dim=-1).values.float()

    def _massive(self, x: torch.Tensor, a: torch.Tensor, med: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(max |x|, the massive mask), or (max |x|, None) on CPU when no entry is massive: an entry passes both
        tests exactly when its position's maximum does, so a position-level check spares the element-level one
        (on an accelerator the check would cost a sync per layer: there the mask is always built). ``a`` is
        ``_abs_median``'s |x| (rows possibly reordered: read for its maxima only)."""
        floor = torch.full((1,), float(self.abs_threshold), device=a.device)  # a float32 tensor: float32 compare
        top = a.amax(dim=-1).float()
        if a.device.type == "cpu":
            if not bool(((top > floor) & (top >= self.ratio_threshold * med)).any()):
                return top, None
            a = x.abs()  # in the model's order again
        return top, (a > floor) & (a >= self.ratio_threshold * med[..., None])

    def _on_resid(self, layer, x, batch) -> None:
        a, med = self._abs_median(x)
        top, massive = self._massive(x, a, med)
        if massive is None:  # nothing massive in this layer (CPU early out): the counts are zeros
            any_ = torch.zeros(a.shape[:-1], dtype=torch.bool)
            dims = torch.zeros(a.shape[0], a.shape[-1], dtype=torch.long)
        else:
            massive &= batch.attention_mask.to(massive.device).bool()[..., None]  # real positions only
            any_, dims = massive.any(-1), massive.sum(-2)
        # kept on the device until the batch ends (no sync per layer): per position the maximum, the median and
        # whether any entry is massive; per prompt and dimension the number of massive entries
        self._pending.append((layer, top, med, any_, dims))

    def _on_batch_end(self, batch, logits) -> None:
        if not self._pending:
            return
        layers = [p[0] for p in self._pending]
        tops, meds, flagged, dims = (  # [L, b, seq] / [L, b, d]: one transfer each per batch
            torch.stack([p[i] for p in self._pending]).cpu() for i in (1, 2, 3, 4)
        )
        self._pending.clear()
        ids = batch.host_ids
        real = batch.host_mask.bool()  # [b, seq]
        # per (layer, prompt), over the prompt's real positions, for all layers at once: the largest |x| and the
        # lower median of the positions' medians
        top = tops.masked_fill(~real, -torch.inf).amax(-1)
        median = lower_median(meds, real)
        n_flagged = (flagged & real).sum(-1).tolist()  # [L][b]
        for i, layer in enumerate(layers):
            self._layer_top[layer].extend(top[i].tolist())
            self._layer_median[layer].extend(median[i].tolist())
            for b, p in enumerate(batch.prompt_indices):
                if not n_flagged[i][b] and p >= self.n_examples:
                    continue  # (the common case: nothing more to record)
                sl = batch.real_slice(b)
                t = tops[i, b, sl]
                positions = torch.nonzero(flagged[i, b, sl]).flatten().tolist()
                if positions:
                    self._layer_flagged[layer] += len(positions)
                    hit_dims = torch.nonzero(dims[i, b]).flatten()
                    self._dims.update(dict(zip(hit_dims.tolist(), dims[i, b, hit_dims].tolist(), strict=True)))
                    toks = self._model.tokens_as_text(ids[b, sl].tolist())
                    self._tokens.update(toks[j] for j in positions)
                if p < self.n_examples:
                    ex = self._examples.get(p)
                    if ex is None:
                        tokens = self._model.tokens_as_text(ids[b, sl].tolist())
                        ex = self._examples[p] = {"tokens": tokens, "rows": {}, "massive": set()}
                    ex["rows"][layer] = t.numpy()
                    ex["massive"].update(positions)

    def partial(self):
        arrays = {}
        for name, lists in (("top", self._layer_top), ("median", self._layer_median)):
            arrays.update({f"{name}.{l}": np.asarray(v, dtype=np.float64) for l, v in lists.items()})
        examples = {}
        for p, ex in self._examples.items():
            examples[str(p)] = {"tokens": ex["tokens"], "massive": sorted(ex["massive"]), "layers": list(ex["rows"])}
            arrays.update({f"example.{p}.row.{l}": row for l, row in ex["rows"].items()})
        meta = {
            "layers": sorted(set(self._layer_top) | set(self._layer_median)),
            "flagged": pairs(self._layer_flagged),
            "dims": pairs(self._dims),
            "tokens": pairs(self._tokens),
            "examples": examples,
        }
        return {"arrays": arrays, "meta": meta}

    @classmethod
    def merge_partials(cls, parts):
        metas = [p["meta"] for p in parts]
        layers = sorted({l for m in metas for l in m["layers"]})
        arrays = {}
        for name in ("top", "median"):
            for l in layers:
                found = [p["arrays"][f"{name}.{l}"] for p in parts if f"{name}.{l}" in p["arrays"]]
                arrays[f"{name}.{l}"] = np.concatenate(found) if found else np.zeros(0)
        examples = {}
        for part in parts:
            for p, ex in part["meta"]["examples"].items():
                if p in examples:
                    raise ValueError(f"massive_activations partials overlap in prompt {p}; shards must be disjoint")
                examples[p] = ex
            arrays.update({k: v for k, v in part["arrays"].items() if k.startswith("example.")})
        meta = {
            "layers": layers,
            "flagged": pairs(merged_counter(m["flagged"] for m in metas)),
            "dims": pairs(merged_counter(m["dims"] for m in metas)),
            "tokens": pairs(merged_counter(m["tokens"] for m in metas)),
            "examples": examples,
        }
        return {"arrays": arrays, "meta": meta}

    def restore(self, ctx, partial):
        self.attach(NoCapture(), ctx)
        meta, arrays = partial["meta"], partial["arrays"]
        for l in meta["layers"]:
            self._layer_top[int(l)] = [float(x) for x in arrays.get(f"top.{l}", [])]
            self._layer_median[int(l)] = [float(x) for x in arrays.get(f"median.{l}", [])]
        self._layer_flagged = merged_counter([meta["flagged"]])
        self._dims = merged_counter([meta["dims"]])
        self._tokens = merged_counter([meta["tokens"]])
        self._examples = {
            int(p): {
                "tokens": ex["tokens"],
                "rows": {int(l): arrays[f"example.{p}.row.{l}"] for l in ex["layers"]},
                "massive": set(ex["massive"]),
            }
            for p, ex in meta["examples"].items()
        }

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
            values = np.stack([ex["rows"].get(l, np.full(len(ex["tokens"]), np.nan)) for l in range(m.n_layers)])
            out.append(
                self.token_scores(
                    ctx,
                    f"massive_activations_{p}",
                    p,
                    ex["tokens"],
                    values,
                    [f"layer {l}" for l in range(m.n_layers)],
                    marks={"massive": sorted(ex["massive"])},
                    description="largest |residual activation| at each position after each layer",
                    summary=summary,
                )
            )
        return out
