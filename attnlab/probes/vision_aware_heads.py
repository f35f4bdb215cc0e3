"""Vision-aware heads by head divergence (VHD) and total VHD (T-VHD) (He et al., ACL 2025, "Cracking the Code of
Hallucination in LVLMs with Vision-aware Head Divergence", arXiv 2412.13949; docs/methods/vision_heads.md §2).

Per prompt, at the position predicting the first answer token (the last real prompt token, t = 0, where VHR fixes its
heads), with ``A_{l,i}`` the output of head i of layer l before ``W_O`` (capture site ``"z"``):

    VHD_{l,i} = || A_{l,i}(image + text) - A_{l,i}(text only) ||_2        (Eq. 4; text only = image tokens removed)
    TA_{l,i}  = || A_{l,i}(text only) ||_2^2
    outlier   : VHD_{l,i} > mean_i VHD + std_i VHD  and  TA_{l,i} > mean_i TA + std_i TA    -> VHD_{l,i} := 0 (Eq. 6)
    selected  : VHD_{l,i} > median_i VHD_{l,i}  (after the outlier filter; the VHR head set H_l)
    T-VHD     = sum_l (sum of the top-k VHD_{l,i} over heads i)                             (Eq. 5, k = H/4 default)

The image-free branch is a second forward pass (through the capture engine) of the same prompt with its image
tokens removed and no pixels. Heads are scored without VHR's layer-by-layer reinforcement (a probe, not an
intervention). Head scores are means over prompts.

Variants the spec leaves room for (parameters; defaults = the spec): ``positions="text"`` averages VHD over every
text token after the image instead of the t = 0 position only (the paper's Eq. 4 holds at every decoding step);
``normalize="layer_mean"`` divides each prompt's VHD by its layer's mean over heads before averaging, so heads are
ranked against their own layer (VHR selects per layer; raw VHD grows with a layer's output norm). On organism-vlm
none of these variants makes the top VHD heads hurt image questions more than random heads (see
``scripts/vhd_causal.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from attnlab.capture import Capture
from attnlab.params import BOOLEAN, Interval, Options
from attnlab.probes.base import Probe, ProbeContext, require_images


def head_divergence(z_image: torch.Tensor, z_text: torch.Tensor) -> torch.Tensor:
    """VHD: L2 distance between per-head outputs ``[..., heads, d_head]`` of the two branches -> ``[..., heads]``."""
    return (z_image.double() - z_text.double()).norm(dim=-1)


def text_activation(z_text: torch.Tensor) -> torch.Tensor:
    """TA: squared L2 norm of each head's output in the image-free branch -> ``[..., heads]``."""
    return z_text.double().pow(2).sum(-1)


def outlier_mask(vhd: np.ndarray, ta: np.ndarray, *, ddof: int = 0) -> np.ndarray:
    """Heads whose VHD *and* TA both exceed mean + std over their layer's heads (Eq. 6). Inputs ``[layers, heads]``."""
    vhd, ta = np.asarray(vhd, float), np.asarray(ta, float)
    v_thr = vhd.mean(-1, keepdims=True) + vhd.std(-1, ddof=ddof, keepdims=True)
    t_thr = ta.mean(-1, keepdims=True) + ta.std(-1, ddof=ddof, keepdims=True)
    return (vhd > v_thr) & (ta > t_thr)


def filter_outliers(vhd: np.ndarray, ta: np.ndarray, *, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(VHD with outlier heads set to 0, the outlier mask)."""
    mask = outlier_mask(vhd, ta, ddof=ddof)
    return np.where(mask, 0.0, np.asarray(vhd, float)), mask


def select_heads(vhd: np.ndarray) -> np.ndarray:
    """VHR's head set per layer: heads with VHD strictly above their layer's median. ``[layers, heads]`` bool."""
    vhd = np.asarray(vhd, float)
    return vhd > np.median(vhd, axis=-1, keepdims=True)


def total_vhd(vhd: np.ndarray, k: int) -> float:
    """T-VHD: sum over layers of the sum of the top-k VHD values of the layer's heads."""
    vhd = np.asarray(vhd, float)
    k = max(1, min(int(k), vhd.shape[-1]))
    return float(np.sort(vhd, axis=-1)[:, -k:].sum())


def layer_normalized(vhd: np.ndarray) -> np.ndarray:
    """VHD divided by its layer's mean over heads (``[..., layers, heads]``); a layer whose mean is 0 gives 0."""
    vhd = np.asarray(vhd, float)
    mean = vhd.mean(-1, keepdims=True)
    return np.divide(vhd, mean, out=np.zeros_like(vhd), where=mean > 0)


def last_real(batch) -> torch.Tensor:
    """Index of each prompt's last real token ``[batch]``."""
    return batch.first_real + batch.lengths - 1


def text_only_batch(model, batch):
    """The same prompts with their image tokens removed and no pixels (VHD's second branch)."""
    ids = []
    for b in range(batch.size):
        sl = batch.real_slice(b)
        keep = (
            ~batch.image_mask[b, sl].cpu()
            if batch.image_mask is not None
            else torch.ones(sl.stop - sl.start, dtype=torch.bool)
        )
        ids.append(batch.input_ids[b, sl].cpu()[keep].tolist())
    return model.batch_from_ids(ids, batch.prompt_indices, padding_side="right")


class VisionAwareHeads(Probe):
    """VHD per query head, with the outlier filter and the VHR selection rate; T-VHD per prompt in the summary.

    Parameters
    ----------
    outlier_filter : bool, default=True
        Apply Eq. 6 per prompt before averaging (the main score); the unfiltered mean is reported as ``vhd_raw``.
    std_ddof : int, default=0
        Degrees of freedom of the per-layer std in the outlier rule (0: population std over the layer's heads).
    top_k : int or None, default=None
        k of T-VHD; None = n_heads // 4 (at least 1), as recommended by the spec (the paper does not state k).
    attention : {"auto", "eager", "fused"}, default="auto"
        Attention path of the image-free branch's forward pass.
    positions : {"last", "text"}, default="last"
        Where VHD is measured: ``"last"`` = the last prompt token (t = 0, the spec); ``"text"`` = mean over the
        text tokens after the image (aligned with the same tokens of the image-free branch).
    normalize : {"none", "layer_mean"}, default="none"
        ``"layer_mean"``: each prompt's (filtered) VHD divided by its layer's mean over heads (a layer whose mean
        is 0 scores 0), so the ranking compares heads within their layer.
    """

    name = "vision_aware_heads"
    _parameter_constraints = {
        "outlier_filter": [BOOLEAN],
        "std_ddof": [Interval(int, 0, None)],
        "top_k": [Interval(int, 1, None), None],
        "attention": [Options(("auto", "eager", "fused"))],
        "positions": [Options(("last", "text"))],
        "normalize": [Options(("none", "layer_mean"))],
    }

    def __init__(
        self,
        *,
        outlier_filter: bool = True,
        std_ddof: int = 0,
        top_k: int | None = None,
        attention: str = "auto",
        positions: str = "last",
        normalize: str = "none",
    ):
        self.outlier_filter = outlier_filter
        self.std_ddof = std_ddof
        self.top_k = top_k
        self.attention = attention
        self.positions = positions
        self.normalize = normalize

    def _attach(self, capture, ctx: ProbeContext) -> None:
        require_images(self, ctx.model)
        self._model = ctx.model
        self._z_image: dict[int, torch.Tensor] = {}
        self._vhd: dict[int, np.ndarray] = {}  # prompt -> [L, H] raw VHD
        self._ta: dict[int, np.ndarray] = {}
        self._skipped: list[int] = []
        capture.on("z", self._on_z)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def _on_z(self, layer, z, batch) -> None:
        if self.positions == "text":
            self._z_image[layer] = z.float().cpu()  # [b, s, H, d]; reduced at batch end
            return
        idx = last_real(batch).to(z.device)
        self._z_image[layer] = z[torch.arange(z.shape[0], device=z.device), idx].float().cpu()  # [b, H, d]

    def _text_branch(self, batch) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        text_batch = text_only_batch(self._model, batch)

        def grab(layer, z, b):
            if self.positions == "text":
                out[layer] = z.float().cpu()
                return
            idx = last_real(b).to(z.device)
            out[layer] = z[torch.arange(z.shape[0], device=z.device), idx].float().cpu()

        Capture(self._model, attention=self.attention, progress=False).on("z", grab).run_batch(text_batch)
        return out

    def _text_position_vhd(self, batch, zi: torch.Tensor, zt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean VHD / TA over each prompt's text tokens after its image (``zi``/``zt``: ``[b, L, s, H, d]``)."""
        vhd, ta = [], []
        for b in range(batch.size):
            sl = batch.real_slice(b)
            img = (
                batch.image_mask[b, sl].cpu()
                if batch.image_mask is not None
                else torch.zeros(sl.stop - sl.start, dtype=torch.bool)
            )
            text_idx = torch.nonzero(~img).flatten()  # real positions kept in the image-free branch, in order
            after = (
                torch.nonzero(text_idx > int(torch.nonzero(img).max())).flatten()
                if img.any()
                else torch.arange(len(text_idx))
            )
            a, t = zi[b][:, sl.start + text_idx[after]], zt[b][:, after]  # image-free branch is right-padded from 0
            vhd.append(head_divergence(a, t).mean(1).numpy())
            ta.append(text_activation(t).mean(1).numpy())
        return np.stack(vhd), np.stack(ta)

    def _on_batch_end(self, batch, logits) -> None:
        z_img = self._z_image
        self._z_image = {}
        has_image = (
            batch.image_mask.any(1).cpu() if batch.image_mask is not None else torch.zeros(batch.size, dtype=torch.bool)
        )
        z_txt = self._text_branch(batch)
        layers = range(self._model.n_layers)
        zi = torch.stack([z_img[l] for l in layers], 1)  # [b, L, H, d] ([b, L, s, H, d] for positions="text")
        zt = torch.stack([z_txt[l] for l in layers], 1)
        if self.positions == "text":
            vhd, ta = self._text_position_vhd(batch, zi, zt)
        else:
            vhd, ta = head_divergence(zi, zt).numpy(), text_activation(zt).numpy()
        for b, p in enumerate(batch.prompt_indices):
            if not bool(has_image[b]):
                self._skipped.append(p)  # both branches see the same input: VHD = 0
            self._vhd[p], self._ta[p] = vhd[b], ta[b]

    def per_prompt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw VHD, filtered VHD, outlier mask), each ``[prompts, L, H]`` in prompt order."""
        with_image = [k for k in sorted(self._vhd) if k not in set(self._skipped)]
        keys = with_image or sorted(self._vhd)  # prompts without an image only count when there is nothing else
        L, H = self._model.n_layers, self._model.n_heads
        if not keys:
            empty = np.zeros((0, L, H))
            return empty, empty, empty.astype(bool)
        raw = np.stack([self._vhd[k] for k in keys])
        filt, mask = zip(*(filter_outliers(self._vhd[k], self._ta[k], ddof=self.std_ddof) for k in keys))
        if self.normalize == "layer_mean":
            raw, filt = layer_normalized(raw), layer_normalized(np.stack(filt))
        return raw, np.stack(filt), np.stack(mask)

    def results(self, ctx: ProbeContext):
        m = ctx.model
        raw, filt, mask = self.per_prompt()
        main = filt if self.outlier_filter else raw
        k = self.top_k if self.top_k is not None else max(1, m.n_heads // 4)
        nan = np.full((m.n_layers, m.n_heads), np.nan)
        mean = lambda a: a.mean(0) if len(a) else nan
        selected = (
            np.stack([select_heads(v) for v in main]) if len(main) else np.zeros((0, m.n_layers, m.n_heads), bool)
        )
        t_vhd = [total_vhd(v, k) for v in main]
        summary = {
            "t_vhd": t_vhd,
            "t_vhd_mean": float(np.mean(t_vhd)) if t_vhd else None,
            "t_vhd_k": int(k),
            "position": "last prompt token (predicts the first answer token, t = 0)"
            if self.positions == "last"
            else "mean over the text tokens after the image",
            "normalize": self.normalize,
            "n_prompts": len(main),
            "prompts_without_image": self._skipped,  # left out of the means unless no prompt has an image
        }
        extra = {
            "outlier_rate": mean(mask.astype(float)),
            "selected_rate": mean(selected.astype(float)),
            "text_activation": mean(np.stack([self._ta[k_] for k_ in sorted(self._ta)]))
            if self._ta
            else nan,  # all prompts
        }
        return [
            self.head_scores(
                ctx,
                "vhd",
                mean(main),
                description="vision-aware head divergence ||A(image, text) - A(text)|| "
                + (
                    "at the last prompt token"
                    if self.positions == "last"
                    else "averaged over the text tokens after the image"
                )
                + (", divided by the layer's mean" if self.normalize == "layer_mean" else "")
                + ", mean over prompts"
                + (" (outlier heads zeroed per prompt, Eq. 6)" if self.outlier_filter else ""),
                extra=extra,
                summary=summary,
            ),
            self.head_scores(
                ctx,
                "vhd_raw",
                mean(raw),
                description="VHD without the outlier filter, mean over prompts",
                summary={"n_prompts": len(raw)},
            ),
        ]
