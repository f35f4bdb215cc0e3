"""ACT: attention calibration on hidden sinks (Yu et al., ICML 2024, arXiv 2406.15765; see
``docs/methods/act_zerotuning.md`` §1).

Per sequence and selected head, the sink set S holds the keys whose ACT score (mean attention a key receives from
the real queries that see it, ``score_j = sum_{i>=j} A[i,j] / (N - j)``) exceeds ``threshold``; the first real
token is excluded explicitly (it is the ordinary sink, not a hidden one). Then for every query row i:

    A'[i,s] = beta * A[i,s]                       s in S
    m_i     = (1 - beta) * sum_{s in S} A[i,s]
    A'[i,j] = A[i,j] + m_i * A[i,j] / sum_{k not in S} A[i,k]      j not in S (includes the first token)

Rows without sink mass (row 0, whose only key is the first token) are unchanged; rows with no non-sink mass too.

**Needs eager attention**: it edits post-softmax rows at ``blocks.{l}.attn.hook_pattern``, which fires on the
bridge's eager attention (``attnlab.load`` boots it that way); a fused kernel never materialises the rows.

**Cached decoding** (q_len < k_len, e.g. one query row per generated token): the rows are indexed by absolute
position (the reference's ``A'[0,0] = 1`` would put all weight on the first key there). The sink set of a decoding
step is the one computed at the prefill of the same ``apply`` context (new tokens are never sinks), so a prefix
prefill + one decoding step equals the full forward whenever both see the same S (tested with a fixed ``sinks``).

Head filtering (``fit`` with labelled prompts): every candidate head is calibrated alone and the calibration set's
accuracy measured; heads strictly above the uncalibrated baseline are kept (the spec's recommended rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnlab.hooks import attn_hook
from attnlab.interventions.base import (
    Intervention,
    as_labeled,
    first_real_key,
    heads_by_layer,
    real_keys_from_scores,
    score_labels,
    validate_heads,
)
from attnlab.params import BOOLEAN, HEADS, INTEGERS, Interval
from attnlab.progress import bar


def act_scores(pattern: torch.Tensor, valid: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
    """ACT score per key ``[batch, heads, seq]`` of a square prefill pattern ``[batch, heads, seq, seq]``.

    ``valid`` ``[batch, seq]`` marks real tokens (queries and keys share positions in a prefill).
    """
    v = valid.to(pattern.dtype)
    colsum = torch.einsum("bhqk,bq->bhk", pattern, v)
    if causal:
        seen_by = v.flip(-1).cumsum(-1).flip(-1)  # real queries at positions >= j
    else:
        seen_by = v.sum(-1, keepdim=True).expand_as(v)
    return colsum / seen_by.clamp_min(1.0)[:, None, :]


def act_sink_set(pattern: torch.Tensor, valid: torch.Tensor, threshold: float, *, causal: bool = True) -> torch.Tensor:
    """Sink set S ``[batch, heads, seq]`` (bool): real keys with ACT score > threshold, first real token excluded."""
    s = (act_scores(pattern, valid, causal=causal) > threshold) & valid[:, None, :].bool()
    first = first_real_key(valid)
    s[torch.arange(s.shape[0], device=s.device), :, first] = False
    return s


def act_calibrate(pattern: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """Calibrated rows ``A'`` of ``pattern`` ``[..., q, k]`` given sink masks ``sinks`` ``[..., k]`` (same for every
    row).

    Works on any number of query rows (a prefill square or a single cached-decoding row): rows are only rescaled
    within themselves, so no row index is special.
    """
    s = sinks.unsqueeze(-2).to(pattern.dtype)
    sink_part = pattern * s
    non_part = pattern - sink_part
    sink_mass = sink_part.sum(-1, keepdim=True)
    non_mass = non_part.sum(-1, keepdim=True)
    freed = (1.0 - beta) * sink_mass
    out = beta * sink_part + non_part * (1.0 + freed / non_mass.clamp_min(torch.finfo(pattern.dtype).tiny))
    return torch.where((non_mass > 0) & (sink_mass > 0), out, pattern)


class ACT(Intervention):
    """ACT attention calibration of selected heads on their hidden sinks (needs eager attention).

    Parameters
    ----------
    heads : sequence of (layer, head) or None, default=None
        Candidate heads. None = every head of ``layers``.
    beta : float, default=0.4
        Factor on sink attention; 1 is the identity.
    threshold : float, default=0.1
        ACT-score threshold of the sink set.
    layers : sequence of int or None, default=None
        Candidate layers when ``heads`` is None; None = layers 2 .. n_layers - 2 (the paper's 2-30 of 32).
    filter_heads : bool, default=True
        With labelled ``data`` in ``fit``: keep only heads whose lone calibration beats the baseline accuracy.
    sinks : sequence of int or None, default=None
        Fixed sink positions (relative to the first real token, > 0) instead of the per-sequence ACT sink set:
        for planted checks and for comparing a full forward with cached decoding.
    batch_size : int, default=32

    Attributes
    ----------
    candidates_ : tuple of (layer, head)
    heads_ : tuple of (layer, head)
        Heads that are calibrated.
    baseline_ : dict
        Calibration-set scores without calibration (when fitted on labelled data).
    head_scores_ : list of [layer, head, accuracy]
        Calibration-set accuracy with each candidate calibrated alone.
    fit_split_ : dict
        Name and prompt digests of the fit data.
    """

    name = "act"
    _head_fields = ("heads_", "candidates_")
    _parameter_constraints = {
        "heads": [HEADS, None],
        "beta": [Interval(float, 0, None)],
        "threshold": [Interval(float, 0, None)],
        "layers": [INTEGERS, None],
        "filter_heads": [BOOLEAN],
        "sinks": [INTEGERS, None],
        "batch_size": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        heads: Sequence[tuple[int, int]] | None = None,
        *,
        beta: float = 0.4,
        threshold: float = 0.1,
        layers: Sequence[int] | None = None,
        filter_heads: bool = True,
        sinks: Sequence[int] | None = None,
        batch_size: int = 32,
    ):
        self.heads = heads
        self.beta = beta
        self.threshold = threshold
        self.layers = layers
        self.filter_heads = filter_heads
        self.sinks = sinks
        self.batch_size = batch_size
        self._sink_cache: dict[int, torch.Tensor] = {}
        self._valid: dict[int, torch.Tensor] = {}

    # ---- fitting ---------------------------------------------------------------------------------------------

    def _candidates(self, model) -> tuple[tuple[int, int], ...]:
        if self.heads is not None:
            return validate_heads(model, self.heads)
        layers = range(2, max(2, model.n_layers - 1)) if self.layers is None else self.layers
        return validate_heads(model, [(l, h) for l in layers for h in range(model.n_heads)])

    def _fit(self, model, data) -> None:
        self.causal_ = bool(model.causal)
        self.candidates_ = self._candidates(model)
        if data is None or not self.filter_heads:
            self.heads_ = self.candidates_
            return
        items = as_labeled(data)
        self.baseline_ = score_labels(model, items, batch_size=self.batch_size)
        scores = []
        for head in bar(self.candidates_, desc="act: head filtering", unit="head"):
            with self._hooked(model, self._hooks_for((head,))):
                scores.append([head[0], head[1], score_labels(model, items, batch_size=self.batch_size)["accuracy"]])
        self.head_scores_ = scores
        self.heads_ = tuple((l, h) for l, h, acc in scores if acc > self.baseline_["accuracy"])
        with self._hooked(model, self._hooks_for(self.heads_)):
            self.combined_ = score_labels(model, items, batch_size=self.batch_size)

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._sink_cache = {}
        self._valid = {}

    def hooks(self, model) -> list:
        return self._hooks_for(self.heads_)

    def _hooks_for(self, heads) -> list:
        out = []
        for layer, hs in heads_by_layer(heads).items():
            out.append((attn_hook(layer, "hook_attn_scores"), self._scores_hook(layer)))
            out.append((attn_hook(layer, "hook_pattern"), self._pattern_hook(layer, hs)))
        return out

    def _scores_hook(self, layer: int):
        def hook(scores, hook=None):
            self._valid[layer] = real_keys_from_scores(scores)  # observe only

        return hook

    def _fixed_sinks(self, valid: torch.Tensor) -> torch.Tensor:
        b, k = valid.shape
        first = first_real_key(valid)
        pos = torch.arange(k, device=valid.device)[None, :] - first[:, None]
        wanted = torch.tensor([int(s) for s in self.sinks if int(s) > 0], device=valid.device, dtype=torch.long)
        return torch.isin(pos, wanted) & valid.bool()

    def _sink_masks(self, layer: int, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sink masks ``[batch, heads, k]`` for the selected heads' rows ``[batch, heads, q, k]``."""
        b, h, q, k = rows.shape
        if self.sinks is not None:
            return self._fixed_sinks(valid)[:, None, :].expand(b, h, k)
        if q == k:  # prefill: S from this sequence's own map
            s = act_sink_set(rows, valid, self.threshold, causal=getattr(self, "causal_", True))
            self._sink_cache[layer] = s
            return s
        prev = self._sink_cache.get(layer)
        if prev is None or prev.shape[:2] != (b, h):
            raise RuntimeError(
                "ACT got a cached decoding step without its prefill in the same apply() context; "
                "run the prefill inside it"
            )
        if prev.shape[-1] >= k:
            return prev[..., :k]
        return torch.cat([prev, prev.new_zeros(b, h, k - prev.shape[-1])], -1)  # new tokens are never sinks

    def _pattern_hook(self, layer: int, heads: list[int]):
        def hook(pattern, hook=None):
            b, _, q, k = pattern.shape
            valid = self._valid.get(layer)
            if valid is None or valid.shape != (b, k):
                valid = torch.ones(b, k, dtype=torch.bool, device=pattern.device)
            idx = torch.tensor(heads, device=pattern.device)
            rows = pattern[:, idx]
            sinks = self._sink_masks(layer, rows, valid.to(pattern.device))
            out = pattern.clone()  # never modify a tensor we did not allocate
            out[:, idx] = act_calibrate(rows, sinks, self.beta)
            return out

        return hook

    def summary(self) -> dict[str, Any]:
        """What was fitted, for reports."""
        self._check_fitted()
        out = {
            "method": self.name,
            "beta": self.beta,
            "threshold": self.threshold,
            "n_candidates": len(self.candidates_),
            "n_heads": len(self.heads_),
            "heads": [list(h) for h in self.heads_],
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }
        if hasattr(self, "baseline_"):
            out["fit_baseline_accuracy"] = self.baseline_["accuracy"]
            out["fit_combined_accuracy"] = self.combined_["accuracy"]
        return out
