"""VHR: vision-aware head reinforcement (He et al., ACL 2025, "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", arXiv 2412.13949; see ``docs/methods/vision_heads.md`` §2).

Head selection (``fit``), at the first generation step t = 0 (the last prompt token, which predicts the first answer
token), with the VHD probe (``attnlab.probes.vision_aware_heads``) on a fit split of image prompts:

1. per prompt: ``VHD_{l,i} = ||A_{l,i}(image + text) - A_{l,i}(text only)||``, ``TA_{l,i} = ||A_{l,i}(text only)||^2``;
   the outlier filter (Eq. 6) zeroes VHD where both VHD and TA exceed mean + std over the layer's heads;
2. mean filtered VHD over the fit prompts; heads that were outliers in at least ``max_outlier_rate`` of the fit
   prompts get 0 (so an outlier head is never selected);
3. per reinforced layer l: ``H_l = {i : VHD_{l,i} > median_i VHD_{l,i}}`` (strictly above the median).

Applying: the selected heads' outputs (``A_{l,i}``, before concatenation and ``W_O``, hook ``blocks.{l}.attn.hook_z``)
are multiplied by ``alpha`` at every position (prefill and every decoding step); the heads stay fixed for all steps
(KV-cache consistency). Because it scales head outputs, not probabilities, it works with any attention kernel.
``alpha = 1`` is the identity; layers outside ``layers_`` are never touched.

**Deviation from the paper, stated:** the paper selects H_l per input, layer by layer in one forward pass with the
image-free branch (VHD at layer l read from states already reinforced at earlier layers). Here the selection is
fitted once on a fit split (mean VHD of unreinforced passes, the probe's definition) and reused for every test
input, so the test inputs never pick their own heads and no image-free pass is needed at test time.

Reinforced layers (``layers="auto"``): the paper's LLaVA-1.5 recipe (layer 1 plus the last 14 of 32 layers) scaled
to the model's depth: layer 1 plus the last ``round(14 / 32 * n_layers)`` layers.

Fit data for the vision interventions are ``VisualPrompt``s (text + PIL image); their identity for the fit/test
disjointness check is the SHA-256 of the text together with the image's pixels, so two splits that ask the same
question about different scenes do not collide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnlab.datasets.base import PromptSet
from attnlab.datasets.specs import image_prompt_key
from attnlab.errors import InputError, InvalidParameterError
from attnlab.hooks import attn_hook
from attnlab.interventions.base import Intervention, heads_by_layer
from attnlab.params import INTEGERS, Interval, Options
from attnlab.probes.scan import scan
from attnlab.probes.vision_aware_heads import VisionAwareHeads

PAPER_LAST_LAYERS, PAPER_DEPTH = 14, 32


# ---- image prompts shared by the vision interventions ------------------------------------------------------------


@dataclass(frozen=True)
class VisualPrompt:
    """A VLM prompt: ``text`` (with the model's image placeholder) and its PIL ``image``."""

    text: str
    image: Any

    @property
    def key(self) -> str:
        """Identity of the prompt for fit/test hygiene: the text plus a digest of the image's pixels."""
        return image_prompt_key(self.text, self.image)


def as_visual(items: Sequence[Any]) -> list[VisualPrompt]:
    """``VisualPrompt``s from VisualPrompts, ``(text, image)`` pairs or dicts with ``text``/``prompt`` and ``image``."""
    out = []
    for it in items:
        if isinstance(it, VisualPrompt):
            out.append(it)
        elif isinstance(it, dict):
            out.append(VisualPrompt(str(it.get("text", it.get("prompt"))), it["image"]))
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            out.append(VisualPrompt(str(it[0]), it[1]))
        elif getattr(it, "image", None) is not None and hasattr(it, "prompt"):  # e.g. a specs.ImageQuestion
            out.append(VisualPrompt(str(it.prompt), it.image))
        else:
            raise InputError(
                f"a vision fit item is a VisualPrompt, (text, image) or a dict with text and image; got {it!r}"
            )
    return out


def prompt_set(items: Sequence[VisualPrompt], name: str = "fit") -> PromptSet:
    return PromptSet(name=name, texts=[it.text for it in items], images=[it.image for it in items])


class VisualFitMixin:
    """Fit data and ``check_disjoint`` over ``VisualPrompt``s: ``_fit`` gets them, the fit split records (and
    ``check_disjoint`` compares) their keys."""

    def _fit_data(self, model, data) -> list[VisualPrompt]:
        if data is None or len(data) == 0:
            raise InputError(f"{type(self).__name__}.fit needs image prompts (VisualPrompt or (text, image) pairs)")
        if model.image_token_id is None:
            raise InputError(f"{type(self).__name__} needs a vision-language model; {model.name} takes no images")
        return as_visual(data)

    def _fit_split(self, items: list[VisualPrompt], split: str | None) -> dict:
        return Intervention._fit_split(self, [it.key for it in items], split)

    def check_disjoint(self, prompts) -> None:
        items = list(prompts)
        keys = [
            it if isinstance(it, str) else it.key
            for it in (items if all(isinstance(i, str) for i in items) else as_visual(items))
        ]
        Intervention.check_disjoint(self, keys)


# ---- VHR ---------------------------------------------------------------------------------------------------------


def auto_layers(n_layers: int) -> list[int]:
    """Layer 1 plus the last ``round(14/32 * n_layers)`` layers (the paper's LLaVA-1.5 layers scaled to depth)."""
    n_last = max(1, int(round(PAPER_LAST_LAYERS / PAPER_DEPTH * n_layers)))
    return sorted({l for l in [1, *range(n_layers - n_last, n_layers)] if 0 <= l < n_layers})


def vhr_selection(
    vhd: np.ndarray, outlier_rate: np.ndarray, layers: Sequence[int], *, max_outlier_rate: float = 0.5
) -> np.ndarray:
    """Selected heads ``[L, H]`` bool from mean filtered VHD ``[L, H]``: per layer in ``layers``, the heads strictly
    above the layer's median after zeroing heads that were outliers in at least ``max_outlier_rate`` of prompts."""
    v = np.where(np.asarray(outlier_rate) >= max_outlier_rate, 0.0, np.nan_to_num(np.asarray(vhd, float)))
    sel = np.zeros(v.shape, bool)
    for l in layers:
        sel[l] = v[l] > np.median(v[l])
    return sel


def scale_heads(z: torch.Tensor, heads: Sequence[int], alpha: float, n_heads: int) -> torch.Tensor:
    """Head outputs ``z`` (``[b, s, H, d]`` or flattened ``[b, s, H*d]``) with ``heads`` multiplied by ``alpha``."""
    shape = z.shape
    zz = z.reshape(*shape[:-1], n_heads, -1) if z.dim() == 3 else z
    scale = torch.ones(n_heads, dtype=z.dtype, device=z.device)
    scale[list(heads)] = alpha
    return (zz * scale[:, None]).reshape(shape)


class VHR(VisualFitMixin, Intervention):
    """Scale the outputs of VHD-selected heads by ``alpha`` on the reinforced layers.

    Parameters
    ----------
    alpha : float, default=2.0
        Scale of the selected heads' outputs (paper: 2; 4 degenerates). 1 = identity.
    layers : "auto" or list of int, default="auto"
        Reinforced layers L_r ("auto": layer 1 plus the last round(14/32 * n_layers)).
    max_outlier_rate : float, default=0.5
        Heads that were Eq. 6 outliers in at least this share of the fit prompts are never selected.
    batch_size : int, default=8
        Batch size of the VHD scan on the fit split.

    Attributes
    ----------
    heads_ : tuple of (layer, head)
        The selected heads (H_l for every l in ``layers_``).
    layers_ : list of int
    vhd_ : ndarray [L, H]
        Mean filtered VHD on the fit split (the selection score).
    outlier_rate_ : ndarray [L, H]
    fit_split_ : dict
    """

    name = "vhr"
    _head_fields = ("heads_",)
    _parameter_constraints = {
        "alpha": [Interval(float, 0, None)],
        "layers": [Options(("auto",)), INTEGERS],
        "max_outlier_rate": [Interval(float, 0, 1)],
        "batch_size": [Interval(int, 1, None)],
    }

    def __init__(self, alpha: float = 2.0, layers: Any = "auto", *, max_outlier_rate: float = 0.5, batch_size: int = 8):
        self.alpha = alpha
        self.layers = layers
        self.max_outlier_rate = max_outlier_rate
        self.batch_size = batch_size

    def _fit(self, model, items: list[VisualPrompt]) -> None:
        auto = isinstance(self.layers, str)
        layers = auto_layers(model.n_layers) if auto else sorted({int(l) for l in self.layers})
        if any(not 0 <= l < model.n_layers for l in layers):
            raise InvalidParameterError(f"VHR parameter layers {layers} outside {model.name}'s {model.n_layers} layers")
        res = scan(model, VisionAwareHeads(), prompt_set(items), batch_size=self.batch_size, progress=False)
        vhd = np.asarray(res["vhd"].scores, float)
        rate = np.asarray(res["vhd"].extra["outlier_rate"], float)
        sel = vhr_selection(vhd, rate, layers, max_outlier_rate=self.max_outlier_rate)
        self.layers_ = layers
        self.vhd_ = vhd
        self.outlier_rate_ = rate
        self.heads_ = tuple((int(l), int(h)) for l, h in zip(*np.nonzero(sel)))

    def hooks(self, model) -> list:
        return [
            (attn_hook(l, "hook_z"), self._z_hook(hs, model.n_heads)) for l, hs in heads_by_layer(self.heads_).items()
        ]

    def _z_hook(self, heads: list[int], n_heads: int):
        alpha = float(self.alpha)

        def hook(z, hook=None):
            return scale_heads(z, heads, alpha, n_heads)

        return hook

    def summary(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "method": self.name,
            "alpha": self.alpha,
            "layers": self.layers_,
            "heads": [list(p) for p in self.heads_],
            "n_heads": len(self.heads_),
            "selection": "fixed from the fit split (mean VHD at t = 0)",
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }


__all__ = ["VHR", "VisualPrompt", "as_visual", "auto_layers", "vhr_selection", "scale_heads"]
