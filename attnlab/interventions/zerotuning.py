"""ZeroTuning: head-specific scaling of the initial token's attention (Han et al., arXiv 2505.11739; see
``docs/methods/act_zerotuning.md`` §2).

For a selected head with post-softmax row a and initial (first real) key 0:

    a0' = gamma * a0 / D,   aj' = aj / D (j > 0),   D = (gamma - 1) * a0 + 1

All non-initial weights share the factor 1/D, so their ratios are kept; gamma > 1 flattens them, gamma < 1
sharpens them. Two exactly equal forms (``form=``):

- ``"softmax"``: the operator above on ``blocks.{l}.attn.hook_pattern`` (post-softmax; **needs eager attention**);
- ``"bias"``: ``+ln(gamma)`` on the initial key's pre-softmax score at ``blocks.{l}.attn.hook_attn_scores``; the
  same bias can be handed to any kernel that accepts an additive mask (SDPA), so this form is kernel-agnostic in
  principle (here it runs on the bridge's eager path like the other form).

With left padding the initial key is each row's first *real* key (read from the masked scores), not column 0.
The operator depends on no query index, so cached decoding steps (one query row) are handled as prefill rows.

Query rows (``query_tokens``, ``query_mode``; not in the paper, which scales every row): by default every query
row of a selected head is scaled. With ``query_tokens`` only the rows whose *query token* is one of those ids are
scaled (``query_mode="in"``) or only the other rows (``"not_in"``); the rest keep their attention exactly. The ids
are read from the forward pass's input (``embed.hook_in``), so a decoding step's single row is judged by the token
it reads. This is what tests a mechanism that acts on some positions only, e.g. organism-sink's backcopy head,
which is dormant (on the first token) at ordinary positions and active at trigger positions.

Fitting (labelled prompts, ``criterion="accuracy"``; or unlabelled, ``criterion="entropy"`` = mean entropy of the
label-restricted next-token distribution, lower is better):

1. Profiling (``profile=True``): each unit (a head index across all candidate layers, or one (layer, head)) is
   scaled alone by ``gamma_up`` and by ``gamma_down``; a unit is up-effective if gamma_up improves the criterion
   on the fit data by more than ``margin``, down-effective likewise (the larger improvement decides a unit that
   is both). The heads of the dominant type are kept (all candidates when no unit is effective).
2. Gamma: when ``gamma`` is None, the grid ``np.arange(lo, hi + step/2, step)`` is swept on the kept heads and
   the best value taken (ties: the gamma closest to 1). Predicted-label histograms are logged against collapse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attnlab.errors import InputError, InvalidParameterError
from attnlab.hooks import attn_hook, embed_hook
from attnlab.interventions.base import (
    Intervention,
    as_labeled,
    first_real_key,
    heads_by_layer,
    real_keys_from_scores,
    score_labels,
    validate_heads,
)
from attnlab.params import BOOLEAN, HEADS, INTEGERS, InstanceOf, Interval, Options

FORMS = ("softmax", "bias")
CRITERIA = ("accuracy", "entropy")
QUERY_MODES = ("in", "not_in")


def check_gamma(gamma: float, name: str = "gamma") -> float:
    """``gamma`` as a float, refused unless > 0: at 0 the softmax form divides 0 by 0 (NaN logits) wherever the
    initial token holds all the attention, and the bias form's ``-inf`` on the initial key leaves a row with no
    other visible key (position 0 itself) all ``-inf``, so its output depends on masked future keys."""
    g = float(gamma)
    if not g > 0.0 or not math.isfinite(g):
        raise ValueError(f"{name} must be a finite number > 0, got {gamma} (gamma = 1 is the identity)")
    return g


def zerotune_pattern(pattern: torch.Tensor, first: torch.Tensor, gamma: float) -> torch.Tensor:
    """Post-softmax form on rows ``[batch, heads, q, k]``; ``first`` ``[batch]`` is each row's initial key."""
    gamma = check_gamma(gamma)
    b = torch.arange(pattern.shape[0], device=pattern.device)
    a0 = pattern[b, :, :, first.to(pattern.device)]  # [batch, heads, q]
    d = (gamma - 1.0) * a0 + 1.0
    out = pattern / d.unsqueeze(-1)
    out[b, :, :, first.to(pattern.device)] = gamma * a0 / d
    return out


def zerotune_scores(scores: torch.Tensor, first: torch.Tensor, gamma: float) -> torch.Tensor:
    """Logit-bias form: ``scores`` ``[batch, heads, q, k]`` with ``ln(gamma)`` added at each row's initial key."""
    gamma = check_gamma(gamma)
    bias = torch.zeros(scores.shape[0], 1, 1, scores.shape[-1], dtype=scores.dtype, device=scores.device)
    bias[torch.arange(scores.shape[0], device=scores.device), 0, 0, first.to(scores.device)] = (
        math.log(gamma) if gamma > 0 else float("-inf")
    )
    return scores + bias


class ZeroTuning(Intervention):
    """Scale the initial token's attention in selected heads by gamma.

    Parameters
    ----------
    gamma : float or None, default=None
        Scaling factor (1 = identity). None: chosen on the fit data over ``grid``.
    heads : sequence of (layer, head) or None, default=None
        Candidate heads; None = every head of every layer.
    form : {"softmax", "bias"}, default="softmax"
        Post-softmax operator (eager attention) or the equal ``+ln(gamma)`` logit bias.
    profile : bool, default=True
        Profile up-/down-effective units on the fit data and keep the dominant type's heads.
    gamma_up, gamma_down : float, default=2.0, 0.5
        Profiling gammas.
    margin : float, default=0.0
        Improvement a unit needs to count as effective (strict).
    profile_unit : {"head_index", "layer_head"}, default="head_index"
        ``"head_index"``: head h of every candidate layer together (n_heads runs); ``"layer_head"``: each head alone.
    grid : (lo, hi, step), default=(0.1, 4.0, 0.1)
    criterion : {"accuracy", "entropy"}, default="accuracy"
        Labelled accuracy (higher is better) or label-restricted output entropy (lower is better; needs no labels).
    batch_size : int, default=32
    query_tokens : sequence of int or None, default=None
        Token ids whose query rows are scaled (with ``query_mode="in"``) or left alone (``"not_in"``); None =
        every row (the paper). Not in the paper: see the module docstring.
    query_mode : {"in", "not_in"}, default="in"

    Attributes
    ----------
    candidates_, heads_ : tuple of (layer, head)
    gamma_ : float
    head_type_ : {"up", "down", "none", "given"}
    profile_ : list of dict
        Per unit: heads, criterion at gamma_up and gamma_down, and the baseline.
    gamma_search_ : list of dict
        Per grid gamma: criterion value, accuracy, entropy, predicted-label histogram.
    fit_split_ : dict
    """

    name = "zerotuning"
    _head_fields = ("heads_", "candidates_")
    _parameter_constraints = {
        # gamma = 0 divides 0 by 0 in the softmax form and leaves rows all -inf in the bias form (check_gamma)
        "gamma": [Interval(float, 0, None, closed="neither"), None],
        "heads": [HEADS, None],
        "form": [Options(FORMS)],
        "profile": [BOOLEAN],
        "gamma_up": [Interval(float, 0, None, closed="neither")],
        "gamma_down": [Interval(float, 0, None, closed="neither")],
        "margin": [Interval(float, None, None)],
        "profile_unit": [Options(("head_index", "layer_head"))],
        "grid": [InstanceOf((tuple, list), "a (lo, hi, step) triple")],
        "criterion": [Options(CRITERIA)],
        "batch_size": [Interval(int, 1, None)],
        "query_tokens": [INTEGERS, None],
        "query_mode": [Options(QUERY_MODES)],
    }

    def __init__(
        self,
        gamma: float | None = None,
        heads: Sequence[tuple[int, int]] | None = None,
        *,
        form: str = "softmax",
        profile: bool = True,
        gamma_up: float = 2.0,
        gamma_down: float = 0.5,
        margin: float = 0.0,
        profile_unit: str = "head_index",
        grid: Sequence[float] = (0.1, 4.0, 0.1),
        criterion: str = "accuracy",
        batch_size: int = 32,
        query_tokens: Sequence[int] | None = None,
        query_mode: str = "in",
    ):
        self.gamma = gamma
        self.heads = heads
        self.form = form
        self.profile = profile
        self.gamma_up = gamma_up
        self.gamma_down = gamma_down
        self.margin = margin
        self.profile_unit = profile_unit
        self.grid = grid
        self.criterion = criterion
        self.batch_size = batch_size
        self.query_tokens = query_tokens
        self.query_mode = query_mode
        self._first: dict[int, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.gamma is None and float(self.grid[0]) <= 0:
            raise InvalidParameterError(f"ZeroTuning's gamma grid must start above 0, got grid={tuple(self.grid)}")

    # ---- fitting ---------------------------------------------------------------------------------------------

    def _value(self, model, items) -> tuple[float, dict]:
        """Criterion as "higher is better" plus the full scores."""
        s = score_labels(model, items, batch_size=self.batch_size)
        return (s["accuracy"] if self.criterion == "accuracy" else -s["entropy"]), s

    def _run(self, model, items, heads, gamma) -> tuple[float, dict]:
        with self._hooked(model, self._hooks_for(heads, gamma)):
            return self._value(model, items)

    def _fit(self, model, data) -> None:
        self.candidates_ = (
            validate_heads(model, self.heads)
            if self.heads is not None
            else tuple((l, h) for l in range(model.n_layers) for h in range(model.n_heads))
        )
        self.heads_ = self.candidates_
        self.head_type_ = "given"
        if data is None:
            if self.gamma is None:
                raise InputError("gamma=None is chosen on fit data: call fit(model, data) with prompts")
            self.gamma_ = float(self.gamma)
            return
        items = as_labeled(data)
        if self.criterion == "accuracy" and any(it.label is None for it in items):
            raise InputError(
                "criterion='accuracy' needs labelled fit data; use criterion='entropy' for unlabelled prompts"
            )
        base, base_scores = self._value(model, items)
        self.baseline_ = base_scores
        if self.profile:
            self._profile(model, items, base)
        if self.gamma is not None:
            self.gamma_ = float(self.gamma)
            return
        lo, hi, step = (float(x) for x in self.grid)
        search = []
        for g in np.round(np.arange(lo, hi + step / 2, step), 10):
            v, s = (base, base_scores) if g == 1.0 else self._run(model, items, self.heads_, float(g))
            search.append(
                {
                    "gamma": float(g),
                    "value": v,
                    "accuracy": s["accuracy"],
                    "entropy": s["entropy"],
                    "predicted": s["predicted"],
                }
            )
        self.gamma_search_ = search
        best = max(search, key=lambda r: (r["value"], -abs(math.log(r["gamma"]))))
        self.gamma_ = best["gamma"]

    def _profile(self, model, items, base: float) -> None:
        layers = sorted({l for l, _ in self.candidates_})
        if self.profile_unit == "head_index":
            units = [tuple(p for p in self.candidates_ if p[1] == h) for h in sorted({h for _, h in self.candidates_})]
        else:
            units = [(p,) for p in self.candidates_]
        prof, up, down = [], [], []
        for unit in units:
            v_up, _ = self._run(model, items, unit, self.gamma_up)
            v_down, _ = self._run(model, items, unit, self.gamma_down)
            gain_up, gain_down = v_up - base, v_down - base
            kind = "none"
            if max(gain_up, gain_down) > self.margin:
                kind = "up" if gain_up >= gain_down else "down"
            (up if kind == "up" else down if kind == "down" else []).append(unit)
            prof.append({"heads": [list(p) for p in unit], "up": v_up, "down": v_down, "baseline": base, "type": kind})
        self.profile_ = prof
        self.profiled_layers_ = layers
        if not up and not down:
            self.head_type_ = "none"
            return
        self.head_type_ = "up" if len(up) >= len(down) else "down"
        chosen = up if self.head_type_ == "up" else down
        self.heads_ = tuple(sorted(p for unit in chosen for p in unit))

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._first = {}
        self._rows = None

    def hooks(self, model) -> list:
        return self._hooks_for(self.heads_, self.gamma_)

    def _hooks_for(self, heads, gamma: float) -> list:
        out = [(embed_hook("hook_in"), self._ids_hook)] if self.query_tokens is not None else []
        for layer, hs in heads_by_layer(heads).items():
            out.append((attn_hook(layer, "hook_attn_scores"), self._scores_hook(layer, hs, gamma)))
            if self.form == "softmax":
                out.append((attn_hook(layer, "hook_pattern"), self._pattern_hook(layer, hs, gamma)))
        return out

    def _ids_hook(self, ids, hook=None):
        """Observe the input ids: which query rows this forward pass scales (``query_tokens``)."""
        wanted = torch.isin(ids, torch.as_tensor([int(t) for t in self.query_tokens], device=ids.device))
        self._rows = wanted if self.query_mode == "in" else ~wanted
        return None

    def _only_rows(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` on the query rows being scaled, ``old`` elsewhere (``[batch, heads, q, k]``)."""
        if self.query_tokens is None:
            return new
        rows = self._rows
        if rows is None or rows.shape != (old.shape[0], old.shape[2]):
            raise RuntimeError("ZeroTuning(query_tokens=...) saw no input ids for this forward pass (embed.hook_in)")
        return torch.where(rows.to(old.device)[:, None, :, None], new, old)

    def _scores_hook(self, layer: int, heads: list[int], gamma: float):
        def hook(scores, hook=None):
            first = first_real_key(real_keys_from_scores(scores))
            if self.form == "softmax":
                self._first[layer] = first  # observe only; the pattern hook edits
                return None
            idx = torch.tensor(heads, device=scores.device)
            out = scores.clone()
            out[:, idx] = self._only_rows(zerotune_scores(scores[:, idx], first, gamma), scores[:, idx])
            return out

        return hook

    def _pattern_hook(self, layer: int, heads: list[int], gamma: float):
        def hook(pattern, hook=None):
            first = self._first.get(layer)
            if first is None or first.shape[0] != pattern.shape[0]:
                first = torch.zeros(pattern.shape[0], dtype=torch.long, device=pattern.device)
            idx = torch.tensor(heads, device=pattern.device)
            out = pattern.clone()
            out[:, idx] = self._only_rows(zerotune_pattern(pattern[:, idx], first, gamma), pattern[:, idx])
            return out

        return hook

    def summary(self) -> dict[str, Any]:
        """What was fitted, for reports."""
        self._check_fitted()
        out = {
            "method": self.name,
            "form": self.form,
            "gamma": self.gamma_,
            "head_type": self.head_type_,
            "n_heads": len(self.heads_),
            "criterion": self.criterion,
            "query_tokens": None if self.query_tokens is None else [int(t) for t in self.query_tokens],
            "query_mode": self.query_mode,
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }
        if hasattr(self, "baseline_"):
            out["fit_baseline"] = {k: self.baseline_[k] for k in ("accuracy", "entropy")}
        return out
