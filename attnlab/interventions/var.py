"""VAR: visual attention redistribution (Kang et al., ICLR 2025, "See What You Are Told: Visual Attention Sink in
Large Multimodal Models", arXiv 2503.03321; see ``docs/methods/vision_heads.md`` §1).

**p convention: paper convention, p = the fraction MOVED** (``p = 0`` is the identity). The reference code's ``p``
is the fraction kept: reference ``p = 0.6`` is ``p = 0.4`` here.

Sinks (per forward pass, per layer l in ``layers_``): ``phi(x) = max_{d in sink_dims_} |x[d]| / RMS(x)`` on the hidden
state entering layer l (``blocks.{l}.hook_resid_pre``); a real token is a sink if ``phi >= tau``, a visual sink if it
also lies in the image span. ``sink_dims_`` comes from the probe (``attnlab.probes.image_centric_heads``) on the fit
split (or is given).

Rows redistributed (post-softmax, ``blocks.{l}.attn.hook_pattern``; **needs eager attention**, which the bridge
uses): in layers 2..L-2 (0-indexed; layers 0-1 and the last layer untouched), real text query rows after the
prompt's image (prefill) and every cached decoding row, of a head in ``heads_`` (heads the probe found image-centric
on the fit split), where the row is image-centric: ``vis = sum_{j in image} a_ij >= min_image_attention``, the
visual non-sink share ``(vis - visual-sink mass) / vis >= rho`` (paper convention) and the prompt has visual sinks
in that layer. Then, with S the sinks (text and visual) and V the visual non-sink keys:

    a'_ij = (1 - p) a_ij                            j in S
    a'_ij = a_ij + p * sum_S a * a_ij / sum_V a     j in V
    a'_ij = a_ij                                    otherwise (text non-sinks)

so rows still sum to 1 and ratios among V are kept (rows with no mass on V are left alone).

**tau on small models:** the paper's ``tau = 20`` assumes massive activations. Since
``|x[d]| / RMS(x) <= sqrt(d_model)``, organism-vlm (d_model 256) cannot reach phi >= 20 (phi <= 16; measured max
about 4.9): at tau = 20 it has no sinks and VAR is the identity. Use a model-appropriate ``tau`` (the measurement on
organism-vlm uses ``tau = 2.5`` with the sink dimensions searched at ``dim_tau = 4.0`` on BOS/delimiter tokens) and
report it with the results.

Image positions are read from the ``input_ids`` handed to the HF model (a forward pre-hook: ``input_ids ==
image_token_id``); on cached decoding steps the prefill's image mask and sink flags are extended with the new tokens.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from attnlab.errors import InputError
from attnlab.hooks import attn_hook, block_hook, kv_cache
from attnlab.interventions.base import Intervention, heads_by_layer
from attnlab.interventions.continuation import PromptMemory, prompt_mask
from attnlab.interventions.vhr import VisualFitMixin, prompt_set
from attnlab.params import BOOLEAN, INTEGERS, Interval, Options
from attnlab.probes.image_centric_heads import FIRST_SINK_LAYER, ImageCentricHeads, phi
from attnlab.probes.scan import scan

HEAD_SELECTIONS = ("fitted", "per_forward")


def var_layers(n_layers: int, include_last_layer: bool = False) -> list[int]:
    """Layers VAR may edit: 2..L-2 (2..L-1 with ``include_last_layer``)."""
    return [l for l in range(FIRST_SINK_LAYER, n_layers) if include_last_layer or l < n_layers - 1]


def redistribute(
    pattern: torch.Tensor,
    image_keys: torch.Tensor,
    sinks: torch.Tensor,
    rows: torch.Tensor,
    p: float,
    *,
    heads: torch.Tensor | None = None,
    min_image_attention: float = 0.2,
    rho: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on post-softmax rows ``pattern`` ``[b, H, q, k]``.

    ``image_keys`` / ``sinks`` ``[b, k]`` bool (sinks: text and visual, real tokens only); ``rows`` ``[b, q]`` bool
    (eligible query rows: text after the image); ``heads`` ``[H]`` bool (None = all). ``p`` is the fraction moved.
    Returns (new pattern, selected rows ``[b, H, q]``).
    """
    a = pattern.float()
    img = image_keys[:, None, None, :].float()
    snk = sinks[:, None, None, :].float()
    vsink = img * snk
    vns = img * (1.0 - snk)
    vis = (a * img).sum(-1)
    vsink_mass = (a * vsink).sum(-1)
    sink_mass = (a * snk).sum(-1)
    vns_mass = (a * vns).sum(-1)
    ratio = (vis - vsink_mass) / vis.clamp(min=1e-12)
    has_vsinks = (image_keys & sinks).any(-1)[:, None, None]
    sel = rows[:, None, :] & has_vsinks & (vis >= min_image_attention) & (ratio >= rho) & (vns_mass > 0)
    if heads is not None:
        sel = sel & heads.to(sel.device)[None, :, None]
    moved = a * (1.0 - p * snk) + (p * sink_mass / vns_mass.clamp(min=1e-30))[..., None] * a * vns
    out = torch.where(sel[..., None], moved, a)
    return out.to(pattern.dtype), sel


class VAR(VisualFitMixin, Intervention):
    """Move a fraction ``p`` of image-centric rows' sink attention to the visual non-sink tokens.

    Parameters
    ----------
    p : float, default=0.4
        Fraction of the sink attention MOVED (paper convention; reference code ``p = 1 - this``). 0 = identity.
        0.4 matches the released config (reference ``p: 0.6``).
    tau : float, default=20.0
        Sink threshold on phi (paper). Small models need less (see the module docstring; organism-vlm: 2.5).
    dim_tau : float or None, default=None
        Threshold for the sink-dimension search on BOS/delimiter tokens of the fit split (None = ``tau``).
    sink_dims : list of int or None, default=None
        Sink dimensions; None = searched by the probe on the fit split.
    rho : float, default=0.5
        Minimum visual non-sink share of a selected row (paper convention; 0.5 = the hallucination setting).
    min_image_attention : float, default=0.2
        Rows giving the image less attention are never edited.
    min_head_score : float, default=0.0
        With ``head_selection="fitted"``, a head is kept when its image-centric score on the fit split (share of
        rows selected) exceeds this.
    head_selection : {"fitted", "per_forward"}, default="fitted"
        ``"fitted"``: edit only the heads the probe found image-centric on the fit split. ``"per_forward"``: the
        reference code's behaviour, every head of the edited layers is eligible and rows are selected in each
        forward pass.
    include_last_layer : bool, default=False
        Also edit the last layer, as the released reference code does (the paper leaves it unmodified).
    batch_size : int, default=8

    Attributes
    ----------
    sink_dims_ : list of int
    layers_ : list of int
    heads_ : tuple of (layer, head)
    image_centric_ : ndarray [L, H]
        The probe's image-centric score on the fit split (NaN for layers VAR never edits).
    visual_sinks_per_image_ : list of float
        Mean visual sinks per fit image by layer, at ``tau``.
    fit_split_ : dict
    """

    name = "var"
    _head_fields = ("heads_",)
    _parameter_constraints = {
        "p": [Interval(float, 0, 1)],  # the fraction moved
        "tau": [Interval(float, 0, None)],
        "dim_tau": [Interval(float, 0, None), None],
        "sink_dims": [INTEGERS, None],
        "rho": [Interval(float, 0, 1)],
        "min_image_attention": [Interval(float, 0, 1)],
        "min_head_score": [Interval(float, None, None)],
        "head_selection": [Options(HEAD_SELECTIONS)],
        "include_last_layer": [BOOLEAN],
        "batch_size": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        p: float = 0.4,
        tau: float = 20.0,
        *,
        dim_tau: float | None = None,
        sink_dims: Sequence[int] | None = None,
        rho: float = 0.5,
        min_image_attention: float = 0.2,
        min_head_score: float = 0.0,
        head_selection: str = "fitted",
        include_last_layer: bool = False,
        batch_size: int = 8,
    ):
        self.p = p
        self.tau = tau
        self.dim_tau = dim_tau
        self.sink_dims = sink_dims
        self.rho = rho
        self.min_image_attention = min_image_attention
        self.min_head_score = min_head_score
        self.head_selection = head_selection
        self.include_last_layer = include_last_layer
        self.batch_size = batch_size
        self._reset_state()

    # ---- fitting ---------------------------------------------------------------------------------------------

    def _probe(self, tau, dims):
        return ImageCentricHeads(
            tau=tau,
            sink_dims=None if dims is None else [int(d) for d in dims],
            rho=self.rho,
            min_image_attention=self.min_image_attention,
            include_last_layer=self.include_last_layer,
            n_examples=0,
        )

    def _fit(self, model, items: list) -> None:
        ps = prompt_set(items)
        dims = self.sink_dims
        search = None
        if dims is None:
            first = scan(
                model,
                self._probe(self.dim_tau if self.dim_tau is not None else self.tau, None),
                ps,
                batch_size=self.batch_size,
                progress=False,
            )
            search = first["image_centric"].summary
            dims = search["sink_dims"]
        res = scan(model, self._probe(self.tau, dims), ps, batch_size=self.batch_size, progress=False)
        score = np.asarray(res["image_centric"].scores, float)
        self.sink_dims_ = [int(d) for d in dims]
        self.layers_ = var_layers(model.n_layers, self.include_last_layer)
        self.image_centric_ = score
        self.visual_sinks_per_image_ = [
            float(x) for x in res["image_centric"].summary["visual_sinks_per_image_by_layer"]
        ]
        floor = -np.inf if self.head_selection == "per_forward" else self.min_head_score
        self.heads_ = tuple(
            (int(l), int(h))
            for l in self.layers_
            for h in range(model.n_heads)
            if self.head_selection == "per_forward" or (np.isfinite(score[l, h]) and score[l, h] > floor)
        )
        self.notes_ = self._notes(model, search)
        for note in self.notes_:
            warnings.warn(f"VAR: {note}", RuntimeWarning, stacklevel=3)

    def _notes(self, model, search) -> list[str]:
        """Why VAR will change nothing on this model, in words, for reports and the CLI (empty when it can act)."""
        bound = float(np.sqrt(model.d_model))
        dim_tau = self.dim_tau if self.dim_tau is not None else self.tau
        if not self.layers_:
            return [
                f"{model.name} has {model.n_layers} layers and VAR edits layers 2..L-2 (2..L-1 with "
                f"include_last_layer), none of them here, so VAR changes nothing"
            ]
        if not self.sink_dims_:
            seen = [v["max_ratio"] for v in (search or {}).get("top_dims", {}).values()]
            largest = f"largest |x[d]|/RMS(x) on BOS/delimiter tokens {max(seen):.2f}; " if seen else ""
            return [
                f"no sink dimension reaches dim_tau={dim_tau:g} on the fit split ({largest}at most "
                f"sqrt(d_model)={bound:.1f} on this model), so there are no sinks and VAR changes nothing; lower tau "
                f"(and dim_tau), e.g. --param tau=2.5"
            ]
        if not any(v > 0 for v in self.visual_sinks_per_image_):
            return [
                f"no image token reaches phi >= tau={self.tau:g} on the fit split in sink dimensions "
                f"{self.sink_dims_} (phi <= sqrt(d_model)={bound:.1f} on this model), so no row can be edited and VAR "
                f"changes nothing; lower tau"
            ]
        if not self.heads_:
            return [
                f"no head of layers {self.layers_} is image-centric on the fit split (score > "
                f"min_head_score={self.min_head_score:g}), so VAR edits nothing; lower tau, or use "
                f"head_selection='per_forward' (the reference's per-forward row selection)"
            ]
        return []

    # ---- applying --------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._img = None  # [b, k] image keys of the current forward (extended on cached steps)
        self._real = None  # [b, k] real keys
        self._sinks: dict[int, torch.Tensor] = {}  # layer -> [b, k]
        self._prompt = None  # [b, k] the prompt's real tokens (generated tokens are never sinks)
        self._memory = PromptMemory()
        self._pre_handle = None
        self._selected: dict[int, torch.Tensor] = {}

    @property
    def last_selected(self) -> dict[int, torch.Tensor]:
        """Rows edited in the last forward pass inside ``apply``, per layer ``[b, H, q]`` (for reports and tests)."""
        return self._selected

    @contextlib.contextmanager
    def apply(self, model) -> Iterator:
        """Forward passes inside run with VAR; the image-token pre-hook and the bridge hooks are removed on exit."""
        self._check_fitted()
        image_id = model.image_token_id
        if image_id is None:
            raise InputError(f"VAR needs a vision-language model; {model.name} takes no images")

        def pre(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return None
            mask = kwargs.get("attention_mask")
            img = ids == image_id
            cached = (
                kv_cache(kwargs) is not None
                and self._img is not None
                and self._img.shape[0] == ids.shape[0]
                and (mask is None or mask.shape[1] == self._img.shape[1] + ids.shape[1])
            )
            self._img = torch.cat([self._img, img], 1) if cached else img
            self._real = mask.bool() if mask is not None else torch.ones_like(self._img)
            if cached:  # new tokens of a cached decoding step are generated, never prompt
                self._prompt = torch.cat([self._prompt, torch.zeros_like(img)], 1)
            else:
                self._sinks = {}
                real = self._real.to(ids.device)
                self._prompt = prompt_mask(real, self._memory.prompt_lengths(ids, real).to(ids.device))
            self._selected = {}
            return None

        with Intervention.apply(self, model):
            self._pre_handle = model.hf_model.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                yield model
            finally:
                self._pre_handle.remove()

    def hooks(self, model) -> list:
        by_layer = heads_by_layer(self.heads_)
        out = []
        for l in self.layers_:
            if l not in by_layer:
                continue
            mask = torch.zeros(model.n_heads, dtype=torch.bool)
            mask[by_layer[l]] = True
            out.append((block_hook(l, "hook_resid_pre"), self._resid_hook(l)))
            out.append((attn_hook(l, "hook_pattern"), self._pattern_hook(l, mask)))
        return out

    def _resid_hook(self, layer: int):
        def hook(x, hook=None):
            new = phi(x, self.sink_dims_) >= self.tau
            prev = self._sinks.get(layer)
            self._sinks[layer] = (
                torch.cat([prev, new], 1)
                if prev is not None
                and prev.shape[0] == new.shape[0]
                and prev.shape[1] + new.shape[1] == (self._img.shape[1] if self._img is not None else -1)
                else new
            )
            return None

        return hook

    def _pattern_hook(self, layer: int, heads: torch.Tensor):
        def hook(pattern, hook=None):
            b, _, q, k = pattern.shape
            if (
                self._img is None
                or self._img.shape != (b, k)
                or layer not in self._sinks
                or self._sinks[layer].shape != (b, k)
            ):
                return None  # no image context for this pass (e.g. a text-only forward): leave it alone
            dev = pattern.device
            img, real = self._img.to(dev), self._real.to(dev)
            sinks = self._sinks[layer].to(dev) & real & self._prompt.to(dev)  # sinks are prompt tokens (prefill)
            pos = torch.arange(k, device=dev)
            last_img = torch.where(img, pos[None, :], torch.full_like(pos[None, :], -1)).amax(1)  # [b]
            q_abs = torch.arange(k - q, k, device=dev)
            rows = (q_abs[None, :] > last_img[:, None]) & (last_img[:, None] >= 0) & real[:, k - q :]
            new, sel = redistribute(
                pattern,
                img,
                sinks,
                rows,
                float(self.p),
                heads=heads,
                min_image_attention=self.min_image_attention,
                rho=self.rho,
            )
            self._selected[layer] = sel.cpu()
            return new

        return hook

    def summary(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "method": self.name,
            "p_moved": self.p,
            "p_convention": "fraction moved (paper); reference code p = 1 - this",
            "tau": self.tau,
            "sink_dims": self.sink_dims_,
            "layers": self.layers_,
            "head_selection": self.head_selection,
            "include_last_layer": self.include_last_layer,
            "n_heads": len(self.heads_),
            "visual_sinks_per_image": self.visual_sinks_per_image_,
            "notes": list(getattr(self, "notes_", [])),
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }


__all__ = ["VAR", "redistribute", "var_layers"]
