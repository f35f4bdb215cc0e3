"""Preplan and anchor tokens of a reasoning response from attention: head grouping by mean backward distance,
WAAD and FAI ("Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy
Optimization", arXiv 2510.13554; see ``docs/methods/preplan_anchor.md``). No official code is public.

Prompt + response go through one forward pass; R is the set of response positions and every metric uses rows
t in R (keys s <= t range over prompt and response). Positions count from the sequence's first real token.

    d(l,h)  = 1/|R| sum_{t in R} sum_{s<=t} A[l,h][t,s] (t - s)          mean backward distance
    H_loc / H_glob = bottom / top ceil(q_h * n) heads by d (pooled over the selected layers, ranked per sequence)
    WAAD_t  = sum_s A_loc[t,s] min(t - s, W)                              t in R
    FAI_s   = 1/|T(s)| sum_{t in T(s)} A_glob[t,s],  T(s) = {t in R : s + H_lo <= t <= s + H_hi}   s in R
    Delta_t = |WAAD_t - WAAD_{t+1}|                                       t, t+1 in R
    preplan = TopQ(Delta, q_local);  anchor = TopQ(FAI, q_global)
    coupled (locally dominated anchors)
            D = {t in anchor : WAAD_t <= tau_waad and max_{u in [t-k,t-1]} Delta_u >= tau_delta}
    intro(t) = argmax_{u in [t-k, t-1]} Delta_u

Everything is computed inside the capture engine's ``"rows"`` handler for the response queries only (so the fused
long-context path works): because A_loc and A_glob are means of per-head maps and WAAD / FAI are linear in the
map, the handler keeps per-head WAAD rows and per-head band column sums ``[layers, heads, |R|]`` and combines
them at the end of each batch, once the per-sequence head groups are known. No ``[H, T, T]`` map is stored.

Choices where the paper is silent (all exposed as parameters; defaults as the spec recommends):

- heads are ranked per sequence, pooled over all (layer, head) pairs of the selected layers (``fixed_groups``
  freezes the groups instead, e.g. from a calibration batch);
- TopQ keeps ``ceil(q * n)`` of the n valid (non-NaN) positions (``q * n`` rounded to 9 decimals first, so
  ``0.14 * 50`` gives 7, not 8), ties broken by position (earlier first); FAI is NaN where T(s) is empty (the last H_lo
  response tokens) and those positions are never selected; Delta is NaN at the last response token;
- tau_waad / tau_delta default to the median of WAAD / Delta over the response (``None``); alpha = 0.5, k = 3;
- intro(t) is the earliest u in [t-k, t-1] (within the response, Delta defined) with the largest Delta;
- gamma uses set indicators (an intro shared by two dominated anchors counts once); the ``gamma`` row uses the
  coupled strategy.

Result names (per prompt p < ``n_examples`` for the token results):

- ``preplan_anchor_distance`` (HeadScores): mean backward distance d(l,h), mean over prompts (NaN outside the
  selected layers); ``extra``: ``local_fraction`` / ``global_fraction`` (share of prompts in which the head was in
  H_loc / H_glob); ``summary``: per-prompt groups and token sets.
- ``preplan_anchor_tokens_{p}`` (TokenScores over the response tokens): rows WAAD, Delta, FAI, gamma (coupled);
  marks ``preplan``, ``anchor``, ``coupled`` (D), ``intro`` (I(D)); positions index the response tokens.

The response span comes from the prompt set's per-prompt ``meta``: ``prompt_len`` (number of real tokens before
the response; the response runs to the end, or for ``response_len`` tokens). Prompts without ``prompt_len`` are
refused, or scored as all-response with ``whole_prompts=True``. ``attnlab.datasets.reasoning.reasoning_prompt_set``
builds such a set from (prompt, response) pairs and ``preplan_anchor`` runs the probe on one pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnlab.datasets.reasoning import reasoning_prompt_set
from attnlab.errors import AttnlabError, InvalidParameterError
from attnlab.heads.formats import format_head
from attnlab.params import BOOLEAN, DICT, INTEGERS, Interval, Options
from attnlab.probes.base import Probe, ProbeContext

# ---- pure functions (numpy) ---------------------------------------------------------------------------------------


def evenly_spaced_middle_layers(n_layers: int, n: int = 5) -> list[int]:
    """``round(linspace(floor(L/3), floor(2L/3), n))`` without duplicates (L = 36 -> 12, 15, 18, 21, 24)."""
    lo, hi = n_layers // 3, (2 * n_layers) // 3
    return sorted({int(x) for x in np.round(np.linspace(lo, hi, n))})


def n_top(q: float, n: int) -> int:
    """``ceil(q * n)`` with ``q * n`` rounded to 9 decimals (so floating error never adds an item), in [0, n]."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    return min(n, int(math.ceil(round(q * n, 9))))


def top_q(x: np.ndarray, q: float) -> list[int]:
    """Positions (sorted) whose value is in the top ``ceil(q * n)`` of the n non-NaN values; ties: earlier first.

    ``q = 1`` selects every valid position; NaN positions are never selected.
    """
    x = np.asarray(x, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(x))
    k = n_top(q, len(valid))
    order = valid[np.argsort(-x[valid], kind="stable")]
    return sorted(int(i) for i in order[:k])


def group_heads(d: np.ndarray, q_h: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (shape of ``d``) of local heads (bottom ``ceil(q_h n)`` by d) and global heads (top).

    NaN entries (unselected layers) take part in neither. Ties are broken by flat (layer, head) order: the earlier
    head counts as more local. For ``q_h <= 0.5`` the groups are disjoint.
    """
    d = np.asarray(d, dtype=np.float64)
    flat = d.ravel()
    valid = np.flatnonzero(~np.isnan(flat))
    k = n_top(q_h, len(valid))
    asc = valid[np.argsort(flat[valid], kind="stable")]
    desc = valid[np.argsort(-flat[valid], kind="stable")]
    loc = np.zeros(flat.shape, dtype=bool)
    glob = np.zeros(flat.shape, dtype=bool)
    loc[asc[:k]] = True
    glob[desc[:k]] = True
    return loc.reshape(d.shape), glob.reshape(d.shape)


def backward_distance_rows(rows: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """``sum_s A[t,s] (t - s)`` per row: ``rows`` ``[..., c, S]``, ``q_pos`` ``[c]`` -> ``[..., c]`` (causal keys)."""
    dist = (q_pos[:, None] - torch.arange(rows.shape[-1], device=rows.device)[None, :]).clamp(min=0).to(rows.dtype)
    return (rows * dist).sum(-1)


def waad_rows(rows: torch.Tensor, q_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``sum_s A[t,s] min(t - s, W)`` per row (Def. 4.1), same shapes as ``backward_distance_rows``."""
    dist = (
        (q_pos[:, None] - torch.arange(rows.shape[-1], device=rows.device)[None, :])
        .clamp(min=0, max=window)
        .to(rows.dtype)
    )
    return (rows * dist).sum(-1)


def delta_of(waad: np.ndarray) -> np.ndarray:
    """``Delta_t = |WAAD_t - WAAD_{t+1}|``; NaN at the last position."""
    w = np.asarray(waad, dtype=np.float64)
    out = np.full(w.shape, np.nan)
    out[:-1] = np.abs(w[:-1] - w[1:])
    return out


@dataclass
class Identification:
    """Token sets of one response (positions index the response tokens)."""

    preplan: list[int]
    anchor: list[int]
    coupled: list[int]  # D: anchors that are locally dominated
    intro: dict[int, int]  # t in D -> intro(t)
    tau_waad: float
    tau_delta: float


def identify(
    waad: np.ndarray,
    fai: np.ndarray,
    *,
    q_local: float = 0.4,
    q_global: float = 0.4,
    tau_waad: float | None = None,
    tau_delta: float | None = None,
    k: int = 3,
) -> Identification:
    """Preplan tokens TopQ(Delta), anchors TopQ(FAI), and the locally dominated anchors with their intro tokens."""
    waad = np.asarray(waad, dtype=np.float64)
    delta = delta_of(waad)
    tw = float(np.nanmedian(waad)) if tau_waad is None else float(tau_waad)
    if tau_delta is not None:
        td = float(tau_delta)
    else:  # a one-token response has no Delta: nothing can be dominated
        td = float(np.nanmedian(delta)) if np.isfinite(delta).any() else math.inf
    preplan = top_q(delta, q_local)
    anchor = top_q(fai, q_global)
    coupled, intro = [], {}
    for t in anchor:
        us = [u for u in range(max(0, t - k), t) if np.isfinite(delta[u])]
        if not us or not waad[t] <= tw:
            continue
        vals = delta[us]
        if vals.max() >= td:
            coupled.append(t)
            intro[t] = us[int(np.argmax(vals))]
    return Identification(preplan, anchor, coupled, intro, tw, td)


def gamma_weights(
    n: int, ident: Identification, *, strategy: str = "coupled", gamma_amp: float = 1.5, alpha: float = 0.5
) -> np.ndarray:
    """Credit weights gamma_t over the n response tokens for ``strategy`` in {"coupled", "anchor", "local"}.

    coupled: ``1 + (gamma_amp - 1) * (1{t in T_glob minus D} + (1 - alpha) 1{t in D} + alpha 1{t in I(D)})`` with
    set indicators: an intro token shared by several dominated anchors counts once. local / anchor: gamma_amp on
    T_loc / T_glob, else 1.
    """
    g = np.ones(n)
    if strategy == "local":
        g[ident.preplan] = gamma_amp
        return g
    if strategy == "anchor":
        g[ident.anchor] = gamma_amp
        return g
    if strategy != "coupled":
        raise ValueError(f"strategy must be 'coupled', 'anchor' or 'local', got {strategy!r}")
    anchor = np.zeros(n, dtype=bool)
    anchor[ident.anchor] = True
    dom = np.zeros(n, dtype=bool)
    dom[ident.coupled] = True
    intro = np.zeros(n, dtype=bool)
    intro[list(ident.intro.values())] = True
    share = (anchor & ~dom) + (1 - alpha) * dom + alpha * intro
    return 1 + (gamma_amp - 1) * share


def rescale_advantages(adv: torch.Tensor, gamma: torch.Tensor | np.ndarray, *, mode: str = "v2") -> torch.Tensor:
    """``A~_t = gamma_t A_t`` with gamma detached; ``mode="v1"`` scales only non-negative advantages."""
    g = torch.as_tensor(gamma, dtype=adv.dtype, device=adv.device).detach()
    if mode == "v2":
        return adv * g
    if mode == "v1":
        return torch.where(adv >= 0, adv * g, adv)
    raise ValueError(f"mode must be 'v1' or 'v2', got {mode!r}")


# ---- the probe ---------------------------------------------------------------------------------------------------


class PreplanAnchor(Probe):
    """Head groups, WAAD, FAI and preplan / anchor / coupled tokens of reasoning responses (see module docstring).

    Parameters
    ----------
    layers : "middle", "all" or list of int, default="middle"
        Layers whose heads are scored: ``"middle"`` = 5 evenly spaced layers of the middle third (the paper's
        choice; duplicates removed on shallow models).
    q_h : float, default=0.3
        Fraction of the pooled (layer, head) pairs in each of H_loc and H_glob.
    window : int, default=10
        W of WAAD.
    h_lo, h_hi : int, default=10, 100
        FAI horizon [s + H_lo, s + H_hi] (v2 defaults; v1 used 10, 50).
    q_local, q_global : float, default=0.4
        TopQ fractions for preplan tokens (Delta) and anchors (FAI); the paper uses one q = 0.4 for both.
    tau_waad, tau_delta : float or None, default=None
        Domination thresholds; None = median over the response (spec recommendation).
    k : int, default=3
        Look-back window of the domination test and of intro(t).
    alpha : float, default=0.5
        Share of a dominated anchor's bonus moved to its intro token (coupled gamma).
    gamma_amp : float, default=1.5
        Amplification of the credit weights reported in the ``gamma`` row.
    fixed_groups : dict or None, default=None
        ``{"local": [(l, h), ...], "global": [...]}`` to freeze the head groups instead of ranking per sequence.
    n_examples : int, default=3
        Prompts (by index) that get a ``TokenScores`` result.
    whole_prompts : bool, default=False
        Score a prompt without a response span (no ``meta["prompt_len"]``, e.g. plain prose) as all-response.
        By default such prompts are refused: the metrics are defined on a reasoning response.
    """

    name = "preplan_anchor"
    _parameter_constraints = {
        "layers": [Options(("middle", "all")), INTEGERS],
        "q_h": [Interval(float, 0, 0.5, closed="right")],  # the local and global groups must be disjoint
        "window": [Interval(int, 1, None)],
        "h_lo": [Interval(int, 0, None)],
        "h_hi": [Interval(int, 0, None)],
        "q_local": [Interval(float, 0, 1)],
        "q_global": [Interval(float, 0, 1)],
        "tau_waad": [Interval(float, None, None), None],
        "tau_delta": [Interval(float, None, None), None],
        "k": [Interval(int, 1, None)],
        "alpha": [Interval(float, None, None)],
        "gamma_amp": [Interval(float, None, None)],
        "fixed_groups": [DICT, None],
        "n_examples": [Interval(int, 0, None)],
        "whole_prompts": [BOOLEAN],
    }

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.h_hi < self.h_lo:
            raise InvalidParameterError(f"PreplanAnchor parameter h_hi must be >= h_lo ({self.h_lo}), got {self.h_hi}")

    def __init__(
        self,
        *,
        layers: str | Sequence[int] = "middle",
        q_h: float = 0.3,
        window: int = 10,
        h_lo: int = 10,
        h_hi: int = 100,
        q_local: float = 0.4,
        q_global: float = 0.4,
        tau_waad: float | None = None,
        tau_delta: float | None = None,
        k: int = 3,
        alpha: float = 0.5,
        gamma_amp: float = 1.5,
        fixed_groups: dict | None = None,
        n_examples: int = 3,
        whole_prompts: bool = False,
    ):
        self.layers = layers
        self.q_h = q_h
        self.window = window
        self.h_lo = h_lo
        self.h_hi = h_hi
        self.q_local = q_local
        self.q_global = q_global
        self.tau_waad = tau_waad
        self.tau_delta = tau_delta
        self.k = k
        self.alpha = alpha
        self.gamma_amp = gamma_amp
        self.fixed_groups = fixed_groups
        self.n_examples = n_examples
        self.whole_prompts = whole_prompts

    # -- setup

    def selected_layers(self, n_layers: int) -> list[int]:
        if isinstance(self.layers, str):
            return evenly_spaced_middle_layers(n_layers) if self.layers == "middle" else list(range(n_layers))
        layers = [int(l) for l in self.layers]
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise AttnlabError(f"layers {bad} out of range for a model with {n_layers} layers")
        return sorted(set(layers))

    def _attach(self, capture, ctx: ProbeContext) -> None:
        if not self.whole_prompts:
            spans = [isinstance(x, dict) and x.get("prompt_len") is not None for x in ctx.meta]
            missing = next((i for i in range(max(ctx.n_prompts, len(spans))) if i >= len(spans) or not spans[i]), None)
            if missing is not None:
                raise AttnlabError(
                    f"preplan_anchor: prompt {missing} has no response to score (no prompt/response split); use "
                    "--dataset arithmetic or reasoning_prompt_set(model, [(prompt, response), ...]), or "
                    "PreplanAnchor(whole_prompts=True) to score whole prompts"
                )
        m = ctx.model
        self._model = m
        self._meta = ctx.meta
        self._sel = self.selected_layers(m.n_layers)
        self._acc: dict[int, dict[str, torch.Tensor]] = {}
        self._prompts: list[dict] = []
        capture.on("rows", self._on_rows, layers=self._sel, queries=self._response_queries)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def response_span(self, batch, b: int) -> tuple[int, int]:
        """Absolute ``[start, end)`` of prompt b's response in the padded batch."""
        p = batch.prompt_indices[b]
        first, n = int(batch.first_real[b]), int(batch.lengths[b])
        m = self._meta[p] if p < len(self._meta) and isinstance(self._meta[p], dict) else {}
        start = int(m.get("prompt_len", 0))
        end = start + int(m["response_len"]) if m.get("response_len") is not None else n
        if not 0 <= start < end <= n:
            raise AttnlabError(f"prompt {p}: response span [{start}, {end}) is empty or outside its {n} tokens")
        return first + start, first + end

    def _response_queries(self, batch) -> torch.Tensor:
        return torch.unique(torch.cat([torch.arange(*self.response_span(batch, b)) for b in range(batch.size)]))

    # -- per chunk: linear per-head statistics

    def _on_rows(self, layer: int, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> None:
        b, h, c, s = rows.shape
        dev = rows.device
        q_pos = q_pos.to(dev)
        spans = torch.tensor([self.response_span(batch, i) for i in range(b)], device=dev)  # [b, 2]
        in_r_q = (q_pos[None, :] >= spans[:, :1]) & (q_pos[None, :] < spans[:, 1:])  # [b, c]
        keys = torch.arange(s, device=dev)
        in_r_k = (keys[None, :] >= spans[:, :1]) & (keys[None, :] < spans[:, 1:])  # [b, s]
        gap = q_pos[:, None] - keys[None, :]  # [c, s]
        band = ((gap >= self.h_lo) & (gap <= self.h_hi))[None] & in_r_q[:, :, None] & in_r_k[:, None, :]  # [b, c, s]
        acc = self._acc.setdefault(
            layer,
            {
                "d": torch.zeros(b, h, device=dev, dtype=torch.float64),
                "waad": torch.zeros(b, h, s, device=dev, dtype=torch.float64),
                "col": torch.zeros(b, h, s, device=dev, dtype=torch.float64),
            },
        )
        w = in_r_q.to(rows.dtype)[:, None, :]
        acc["d"] += (backward_distance_rows(rows, q_pos) * w).sum(-1).double()
        acc["waad"][:, :, q_pos] += (waad_rows(rows, q_pos, self.window) * w).double()
        acc["col"] += torch.einsum("bhcs,bcs->bhs", rows, band.to(rows.dtype)).double()

    # -- per batch: groups, WAAD, FAI, identification

    def _groups(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fixed_groups is None:
            return group_heads(d, self.q_h)
        loc = np.zeros(d.shape, dtype=bool)
        glob = np.zeros(d.shape, dtype=bool)
        for mask, key in ((loc, "local"), (glob, "global")):
            for l, hh in self.fixed_groups[key]:
                mask[int(l), int(hh)] = True
        return loc, glob

    def _on_batch_end(self, batch, logits) -> None:
        m = self._model
        acc, self._acc = self._acc, {}
        for b in range(batch.size):
            p = batch.prompt_indices[b]
            start, end = self.response_span(batch, b)
            first = int(batch.first_real[b])
            n_r = end - start
            d = np.full((m.n_layers, m.n_heads), np.nan)
            waad_h = np.full((m.n_layers, m.n_heads, n_r), np.nan)
            col_h = np.full((m.n_layers, m.n_heads, n_r), np.nan)
            for layer, a in acc.items():
                d[layer] = a["d"][b].cpu().numpy() / n_r
                waad_h[layer] = a["waad"][b, :, start:end].cpu().numpy()
                col_h[layer] = a["col"][b, :, start:end].cpu().numpy()
            loc, glob = self._groups(d)
            waad = waad_h[loc].mean(0)
            # |T(s)|: response rows t with s + h_lo <= t <= s + h_hi (t < end)
            s_abs = np.arange(start, end)
            count = np.clip(np.minimum(end - 1, s_abs + self.h_hi) - (s_abs + self.h_lo) + 1, 0, None)
            with np.errstate(invalid="ignore", divide="ignore"):
                fai = np.where(count > 0, col_h[glob].mean(0) / np.maximum(count, 1), np.nan)
            ident = identify(
                waad,
                fai,
                q_local=self.q_local,
                q_global=self.q_global,
                tau_waad=self.tau_waad,
                tau_delta=self.tau_delta,
                k=self.k,
            )
            gamma = gamma_weights(n_r, ident, strategy="coupled", gamma_amp=self.gamma_amp, alpha=self.alpha)
            ids = batch.host_ids[b, start:end].tolist()
            self._prompts.append(
                {
                    "prompt": p,
                    "d": d,
                    "local": loc,
                    "global": glob,
                    "waad": waad,
                    "delta": delta_of(waad),
                    "fai": fai,
                    "gamma": gamma,
                    "ident": ident,
                    "ids": ids,
                    "response_start": start - first,
                }
            )

    # -- results

    def results(self, ctx: ProbeContext):
        m = ctx.model
        prompts = sorted(self._prompts, key=lambda r: r["prompt"])
        shape = (m.n_layers, m.n_heads)
        if prompts:
            d_all = np.stack([r["d"] for r in prompts])
            d_mean = np.full(shape, np.nan)
            d_mean[self._sel] = d_all[:, self._sel].mean(0)
            loc_frac = np.stack([r["local"] for r in prompts]).mean(0)
            glob_frac = np.stack([r["global"] for r in prompts]).mean(0)
        else:
            d_mean, loc_frac, glob_frac = np.full(shape, np.nan), np.zeros(shape), np.zeros(shape)
        labels = lambda mask: [format_head(int(l), int(h)) for l, h in zip(*np.nonzero(mask))]
        per_prompt = [
            {
                "prompt": r["prompt"],
                "response_start": r["response_start"],
                "n_response": len(r["ids"]),
                "local_heads": labels(r["local"]),
                "global_heads": labels(r["global"]),
                "preplan": r["ident"].preplan,
                "anchor": r["ident"].anchor,
                "coupled": r["ident"].coupled,
                "intro": {str(t): u for t, u in r["ident"].intro.items()},
                "tau_waad": r["ident"].tau_waad,
                "tau_delta": r["ident"].tau_delta,
            }
            for r in prompts
        ]
        out = [
            self.head_scores(
                ctx,
                "preplan_anchor_distance",
                d_mean,
                description=(
                    f"mean backward distance d(l,h) over response rows (layers {self._sel}); "
                    f"bottom/top {self.q_h:.0%} = local/global heads"
                ),
                extra={"local_fraction": loc_frac, "global_fraction": glob_frac},
                summary={"layers": self._sel, "n_prompts": len(prompts), "prompts": per_prompt},
                higher_is="more",
            )
        ]
        for r in prompts:
            if r["prompt"] >= self.n_examples:
                continue
            ident = r["ident"]
            out.append(
                self.token_scores(
                    ctx,
                    f"preplan_anchor_tokens_{r['prompt']}",
                    r["prompt"],
                    m.tokens_as_text(r["ids"]),
                    np.stack([r["waad"], r["delta"], r["fai"], r["gamma"]]),
                    ["WAAD", "Delta", "FAI", "gamma (coupled)"],
                    marks={
                        "preplan": ident.preplan,
                        "anchor": ident.anchor,
                        "coupled": ident.coupled,
                        "intro": sorted(set(ident.intro.values())),
                    },
                    description=(
                        "WAAD (local heads), Delta, FAI (global heads) and coupled credit weights over the response "
                        "tokens"
                    ),
                    summary={
                        "response_start": r["response_start"],
                        "intro": {str(t): u for t, u in ident.intro.items()},
                        "local_heads": labels(r["local"]),
                        "global_heads": labels(r["global"]),
                    },
                )
            )
        return out


# ---- convenience -------------------------------------------------------------------------------------------------


def preplan_anchor(model, prompt, response, *, attention: str = "auto", **params) -> dict[str, Any]:
    """Run ``PreplanAnchor(**params)`` on one (prompt, response) pair; returns the scan's results by name."""
    from attnlab.probes.scan import scan  # not at the top: scan imports the probe registry, which imports this module

    res = scan(
        model,
        PreplanAnchor(**params),
        reasoning_prompt_set(model, [(prompt, response)]),
        batch_size=1,
        attention=attention,
        progress=False,
    )
    return res.results
