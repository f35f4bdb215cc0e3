"""Visual sink tokens and image-centric heads (VAR: Kang et al., ICLR 2025, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", arXiv 2503.03321; docs/methods/attention_sinks.md §4 "Visual sink tokens" and
docs/methods/vision_heads.md §1 "VAR"), plus per-head attention over the image patch grid.

Sink dimensions ``D_sink`` are the model's own massive-activation dimensions, found by a search (or given):
per dimension d, ``r_d(x) = |x[d]| / RMS(x)`` on the hidden states entering the middle layers; a dimension is a sink
dimension when its maximum over the BOS/delimiter tokens of a prompt reaches ``tau`` in at least
``min_prompt_fraction`` of the prompts. Then, for the hidden state ``x`` entering layer l (layers 2..L-1 only):

    phi(x) = max_{d in D_sink} |x[d]| / RMS(x),   RMS(x) = sqrt(mean_d x[d]^2 + 1e-6)   (fp32, no norm weight)
    token t is a sink at layer l if phi >= tau; a visual sink if it also lies inside the image span.

Image-centric rows (per layer >= 2, head, text query row after the image): ``vis = sum_{j in image} a_ij``; rows with
``vis < min_image_attention`` are skipped; ``r = (vis - visual-sink attention) / vis`` (visual non-sink ratio); the
row is image-centric if ``r >= rho`` (paper convention; the reference code's ``rho_code = 1 - rho``) and the layer
has visual sinks in that prompt. A head's image-centric score is the fraction of its text rows after the image that
are image-centric, averaged over prompts.
"""

from __future__ import annotations

import math
import string
from collections import defaultdict

import numpy as np
import torch

from attnlab.capture import Capture
from attnlab.params import BOOLEAN, INTEGERS, Interval
from attnlab.probes.base import PerPromptRatio, Probe, ProbeContext, require_images

RMS_EPS = 1e-6
FIRST_SINK_LAYER = 2  # layers 0 and 1 never report sinks (VAR leaves them untouched)


def dim_ratios(x: torch.Tensor) -> torch.Tensor:
    """``|x[d]| / RMS(x)`` for every dimension of ``x`` ``[..., d]`` (fp32, without the learned norm weight)."""
    x = x.float()
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return x.abs() / rms


def phi(x: torch.Tensor, dims) -> torch.Tensor:
    """VAR's sink score ``max_{d in dims} |x[d]| / RMS(x)`` over the last axis; 0 when ``dims`` is empty."""
    dims = list(dims)
    if not dims:
        return torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
    return dim_ratios(x)[..., dims].amax(-1)


def is_delimiter(token: str) -> bool:
    """Punctuation-only or newline tokens (the tokens that carry massive activations besides BOS)."""
    text = token.replace("\\n", "\n").replace("<0x0A>", "\n")
    t = text.strip()
    if not t:
        return "\n" in text
    return all(c in string.punctuation for c in t)


def find_sink_dims(anchor_max: np.ndarray, *, tau: float = 20.0, min_prompt_fraction: float = 0.5) -> list[int]:
    """Sink dimensions from ``anchor_max`` ``[prompts, d]`` (per prompt: max over middle layers and BOS/delimiter
    tokens of ``|x[d]| / RMS(x)``): the dimensions reaching ``tau`` in at least ``min_prompt_fraction`` of prompts."""
    a = np.asarray(anchor_max, float)
    if a.size == 0:
        return []
    frac = (a >= tau).mean(0)
    return [int(d) for d in np.nonzero(frac >= min_prompt_fraction)[0]]


def middle_half_layers(n_layers: int) -> list[int]:
    """Default search layers: the middle half of the stack, never below layer 2."""
    lo = max(FIRST_SINK_LAYER, n_layers // 4)
    hi = max(lo + 1, n_layers - n_layers // 4)
    return [l for l in range(lo, hi) if l < n_layers]


def last_image_position(batch) -> torch.Tensor:
    """Index of each prompt's last image token ``[batch]`` (``seq_len`` when a prompt has no image)."""
    s = batch.seq_len
    if batch.image_mask is None:
        return torch.full((batch.size,), s, dtype=torch.long)
    pos = torch.arange(s, device=batch.image_mask.device)[None, :].expand(batch.size, -1)
    last = torch.where(batch.image_mask, pos, torch.full_like(pos, -1)).amax(1)
    return torch.where(last >= 0, last, torch.full_like(last, s)).cpu()


def text_after_image(batch) -> torch.Tensor:
    """Query selector for the capture engine: positions after the earliest image end in the batch."""
    start = int(last_image_position(batch).min()) + 1
    return torch.arange(min(start, batch.seq_len), batch.seq_len)


def rows_after_image(batch, q_pos: torch.Tensor) -> torch.Tensor:
    """``[batch, chunk]`` bool: the query is a real text token after its prompt's image."""
    q = q_pos.cpu()[None, :]
    first = batch.first_real.cpu()[:, None]
    end = first + batch.lengths.cpu()[:, None]
    return (q > last_image_position(batch)[:, None]) & (q < end)


def image_centric_rows(
    rows: torch.Tensor,
    image_keys: torch.Tensor,
    visual_sinks: torch.Tensor,
    valid: torch.Tensor,
    *,
    min_image_attention: float = 0.2,
    rho: float = 0.5,
):
    """Score attention rows ``[b, H, q, s]`` against the image span.

    ``image_keys`` / ``visual_sinks``: ``[b, s]`` bool; ``valid``: ``[b, q]`` bool (text rows after the image).
    Returns ``vis`` (image attention), ``ratio`` (visual non-sink share, NaN where not eligible), ``eligible``
    (valid and ``vis >= min_image_attention``) and ``selected`` (eligible, the prompt has visual sinks in this layer,
    and ``ratio >= rho``), all ``[b, H, q]``.
    """
    rows = rows.float()
    vis = (rows * image_keys[:, None, None, :].float()).sum(-1)
    vsink = (rows * visual_sinks[:, None, None, :].float()).sum(-1)
    eligible = valid[:, None, :] & (vis >= min_image_attention)
    ratio = torch.where(eligible, (vis - vsink) / vis.clamp(min=1e-12), torch.full_like(vis, float("nan")))
    has_sinks = visual_sinks.any(-1)[:, None, None]
    selected = eligible & has_sinks & (ratio >= rho)
    return vis, ratio, eligible, selected


class ImageCentricHeads(Probe):
    """VAR visual sink tokens (phi per token and layer) and image-centric heads.

    Parameters
    ----------
    tau : float, default=20.0
        Sink threshold on phi (paper); ``phi >= tau`` (the reference's strict ``>`` differs only at equality).
    sink_dims : list of int or None, default=None
        The model's sink dimensions; None = search them (on the first batch, then kept for the whole scan).
    search_layers : list of int or None, default=None
        Layers whose input hidden states the search reads; None = the middle half of the stack (from layer 2).
    min_prompt_fraction : float, default=0.5
        A dimension is a sink dimension when it reaches ``tau`` on a BOS/delimiter token in at least this share of
        the searched prompts.
    rho : float, default=0.5
        Minimum visual non-sink ratio of an image-centric row (paper convention; 0.8 general VL tasks, 0.5
        hallucination, 0.9 vision-centric). The reference code's maximum sink share is ``1 - rho``.
    min_image_attention : float, default=0.2
        Rows giving the image less attention than this are skipped (reference ``summ``).
    include_last_layer : bool, default=False
        Score heads of the last layer too (the paper leaves it unmodified).
    n_examples : int, default=3
        Prompts that get a ``TokenScores`` of phi (rows: layers) with visual/text sinks marked.
    """

    name = "image_centric_heads"
    _parameter_constraints = {
        "tau": [Interval(float, 0, None)],
        "sink_dims": [INTEGERS, None],
        "search_layers": [INTEGERS, None],
        "min_prompt_fraction": [Interval(float, 0, 1)],
        "rho": [Interval(float, 0, 1)],
        "min_image_attention": [Interval(float, 0, 1)],
        "include_last_layer": [BOOLEAN],
        "n_examples": [Interval(int, 0, None)],
    }

    def __init__(
        self,
        *,
        tau: float = 20.0,
        sink_dims: list[int] | None = None,
        search_layers: list[int] | None = None,
        min_prompt_fraction: float = 0.5,
        rho: float = 0.5,
        min_image_attention: float = 0.2,
        include_last_layer: bool = False,
        n_examples: int = 3,
    ):
        self.tau = tau
        self.sink_dims = sink_dims
        self.search_layers = search_layers
        self.min_prompt_fraction = min_prompt_fraction
        self.rho = rho
        self.min_image_attention = min_image_attention
        self.include_last_layer = include_last_layer
        self.n_examples = n_examples

    # ---- wiring ------------------------------------------------------------------------------------------------

    def phi_layers(self, n_layers: int) -> list[int]:
        return list(range(FIRST_SINK_LAYER, n_layers))

    def head_layers(self, n_layers: int) -> list[int]:
        return [l for l in self.phi_layers(n_layers) if self.include_last_layer or l < n_layers - 1]

    def _attach(self, capture, ctx: ProbeContext) -> None:
        require_images(self, ctx.model)
        m = ctx.model
        self._model = m
        self._dims = [int(d) for d in self.sink_dims] if self.sink_dims is not None else None
        self._dims_source = "given" if self._dims is not None else "searched"
        self._search = [
            l
            for l in (self.search_layers if self.search_layers is not None else middle_half_layers(m.n_layers))
            if 0 <= l < m.n_layers
        ]
        self._anchor_max: dict[int, np.ndarray] = {}  # prompt -> [d] max ratio over search layers and anchor tokens
        self._ratios: dict[int, torch.Tensor] = {}  # layer -> [b, s, d] (only until the sink dims are known)
        self._phi: dict[int, torch.Tensor] = {}  # layer -> [b, s]
        self._rows: dict[int, list] = defaultdict(list)
        self._anchor_cache = None
        self._icr = PerPromptRatio(m.n_layers, m.n_heads)
        self._ratio = PerPromptRatio(m.n_layers, m.n_heads)
        self._vis = PerPromptRatio(m.n_layers, m.n_heads)
        self._visual_counts = np.zeros(m.n_layers)
        self._text_counts = np.zeros(m.n_layers)
        self._n_images = 0
        self._sink_tokens: dict[str, int] = defaultdict(int)
        self._examples: dict[int, dict] = {}
        self._head_layers = self.head_layers(m.n_layers)
        resid_layers = sorted(set(self.phi_layers(m.n_layers)) | set(self._search))
        if resid_layers:
            capture.on("resid_pre", self._on_resid, layers=resid_layers)
        if self._head_layers:
            capture.on("rows", self._on_rows, layers=self._head_layers, queries=text_after_image)
        capture.on("batch_end", self._on_batch_end, logits=None)  # reads no logits

    def _anchors(self, batch) -> torch.Tensor:
        """``[b, s]`` bool: each prompt's first real token and its delimiter tokens (never image tokens)."""
        if self._anchor_cache is not None and self._anchor_cache[0] is batch:
            return self._anchor_cache[1]
        mask = torch.zeros(batch.size, batch.seq_len, dtype=torch.bool)
        for b in range(batch.size):
            sl = batch.real_slice(b)
            toks = self._model.tokens_as_text(batch.host_ids[b, sl].tolist())
            mask[b, sl.start] = True
            for j, t in enumerate(toks):
                if is_delimiter(t):
                    mask[b, sl.start + j] = True
        if batch.image_mask is not None:
            mask &= ~batch.image_mask.cpu()
        self._anchor_cache = (batch, mask)
        return mask

    def _on_resid(self, layer, x, batch) -> None:
        r = dim_ratios(x).cpu()  # [b, s, d]
        if layer in self._search:
            anchors = self._anchors(batch)
            amax = torch.where(anchors[..., None], r, torch.zeros_like(r)).amax(1).numpy()  # [b, d]
            for b, p in enumerate(batch.prompt_indices):
                self._anchor_max[p] = np.maximum(self._anchor_max.get(p, amax[b]), amax[b])
        if layer >= FIRST_SINK_LAYER:
            if self._dims is not None:
                self._phi[layer] = r[..., self._dims].amax(-1) if self._dims else torch.zeros(r.shape[:2])
            else:
                self._ratios[layer] = r

    def _on_rows(self, layer, rows, q_pos, batch) -> None:
        if layer not in self._head_layers:  # layers 0-1 (and by default the last) are never scored
            return
        self._rows[layer].append((q_pos.cpu(), rows.float().cpu()))

    # ---- per batch ---------------------------------------------------------------------------------------------

    def _on_batch_end(self, batch, logits) -> None:
        m = self._model
        if self._dims is None:
            self._dims = find_sink_dims(
                np.stack([self._anchor_max[p] for p in batch.prompt_indices if p in self._anchor_max])
                if self._anchor_max
                else np.zeros((0, m.d_model)),
                tau=self.tau,
                min_prompt_fraction=self.min_prompt_fraction,
            )
            self._dims_source = f"searched on the first batch ({batch.size} prompts)"
            for layer, r in self._ratios.items():
                self._phi[layer] = r[..., self._dims].amax(-1) if self._dims else torch.zeros(r.shape[:2])
        self._ratios = {}
        real = batch.attention_mask.bool().cpu()
        image = batch.image_mask.cpu() if batch.image_mask is not None else torch.zeros_like(real)
        sinks = {l: (self._phi[l] >= self.tau) & real for l in self._phi}
        visual = {l: s & image for l, s in sinks.items()}
        for layer, chunks in self._rows.items():
            for q_pos, rows in chunks:
                valid = rows_after_image(batch, q_pos)
                vis, ratio, eligible, selected = image_centric_rows(
                    rows, image, visual[layer], valid, min_image_attention=self.min_image_attention, rho=self.rho
                )
                n_rows = valid.sum(-1).float()
                self._icr.add(layer, batch.prompt_indices, selected.float().sum(-1), n_rows)
                self._ratio.add(layer, batch.prompt_indices, torch.nan_to_num(ratio).sum(-1), eligible.float().sum(-1))
                self._vis.add(layer, batch.prompt_indices, (vis * valid[:, None, :]).sum(-1), n_rows)
        self._rows = defaultdict(list)
        self._record(batch, real, image, sinks, visual)
        self._phi = {}
        self._anchor_cache = None

    def _record(self, batch, real, image, sinks, visual) -> None:
        m = self._model
        for b, p in enumerate(batch.prompt_indices):
            sl = batch.real_slice(b)
            has_image = bool(image[b].any())
            self._n_images += int(has_image)
            toks = m.tokens_as_text(batch.host_ids[b, sl].tolist())
            for l in sinks:
                self._visual_counts[l] += int(visual[l][b].sum())
                self._text_counts[l] += int((sinks[l][b] & ~image[b]).sum())
                for j in torch.nonzero(sinks[l][b, sl]).flatten().tolist():
                    self._sink_tokens[toks[j]] += 1
            if p < self.n_examples:
                values = np.full((m.n_layers, len(toks)), np.nan)
                for l, ph in self._phi.items():
                    values[l] = ph[b, sl].numpy()
                vis_pos = sorted({j for l in visual for j in torch.nonzero(visual[l][b, sl]).flatten().tolist()})
                txt_pos = sorted(
                    {j for l in sinks for j in torch.nonzero((sinks[l][b] & ~image[b])[sl]).flatten().tolist()}
                )
                self._examples[p] = {
                    "tokens": toks,
                    "values": values,
                    "marks": {
                        "visual_sink": vis_pos,
                        "text_sink": txt_pos,
                        "image": torch.nonzero(image[b, sl]).flatten().tolist(),
                    },
                }

    # ---- results -----------------------------------------------------------------------------------------------

    def found_dims(self) -> list[int]:
        """The sink dimensions in use (given, or found by the search); empty before the first batch."""
        return list(self._dims or [])

    def results(self, ctx: ProbeContext):
        m = ctx.model
        anchor = (
            np.stack([self._anchor_max[p] for p in sorted(self._anchor_max)])
            if self._anchor_max
            else np.zeros((0, m.d_model))
        )
        frac = (anchor >= self.tau).mean(0) if len(anchor) else np.zeros(m.d_model)
        top = np.argsort(-anchor.max(0))[:8] if len(anchor) else []
        n_img = max(self._n_images, 1)
        summary = {
            "sink_dims": self.found_dims(),
            "sink_dims_source": self._dims_source,
            "sink_dims_all_prompts": find_sink_dims(anchor, tau=self.tau, min_prompt_fraction=self.min_prompt_fraction),
            "search_layers": self._search,
            "top_dims": {
                int(d): {"max_ratio": float(anchor[:, d].max()), "prompt_fraction": float(frac[d])} for d in top
            },
            "tau": self.tau,
            "phi_max_possible": math.sqrt(
                m.d_model
            ),  # |x[d]| / RMS(x) <= sqrt(d_model): no sink can reach a larger tau
            "phi_layers": self.phi_layers(m.n_layers),
            "visual_sinks_per_image_by_layer": (self._visual_counts / n_img).tolist(),
            "text_sinks_per_prompt_by_layer": (self._text_counts / n_img).tolist(),
            "sink_tokens": dict(sorted(self._sink_tokens.items(), key=lambda kv: -kv[1])[:20]),
            "n_prompts_with_image": self._n_images,
        }
        out = [
            self.head_scores(
                ctx,
                "image_centric",
                self._icr.mean(),
                description=(
                    "share of text rows after the image that are image-centric "
                    f"(vis >= {self.min_image_attention}, visual non-sink ratio >= {self.rho}, layer has visual sinks)"
                ),
                extra={"visual_nonsink_ratio": self._ratio.mean(), "image_attention": self._vis.mean()},
                summary=summary,
            ),
            self.head_scores(
                ctx,
                "visual_nonsink_ratio",
                self._ratio.mean(),
                description=(
                    f"mean visual non-sink ratio over text rows with image attention >= {self.min_image_attention}"
                ),
            ),
            self.head_scores(
                ctx,
                "image_attention",
                self._vis.mean(),
                description="mean attention of text rows after the image to the image tokens",
            ),
        ]
        for p, ex in sorted(self._examples.items()):
            out.append(
                self.token_scores(
                    ctx,
                    f"visual_sinks_{p}",
                    p,
                    ex["tokens"],
                    ex["values"],
                    [f"layer {l}" for l in range(m.n_layers)],
                    marks=ex["marks"],
                    description=(
                        f"phi = max over sink dims {self.found_dims()} of |x[d]|/RMS(x) entering each layer "
                        f"(layers 0-1 not scored); sinks: phi >= {self.tau}"
                    ),
                    summary={"sink_dims": self.found_dims(), "tau": self.tau},
                )
            )
        return out


# ---- attention over the image patch grid --------------------------------------------------------------------------


def grid_shape_for(n_tokens: int, grid_shape: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid of ``n_tokens`` image tokens: ``grid_shape`` if given, else a square one."""
    if grid_shape is not None:
        gh, gw = int(grid_shape[0]), int(grid_shape[1])
        if gh * gw != n_tokens:
            raise ValueError(f"grid {gh}x{gw} does not hold {n_tokens} image tokens")
        return gh, gw
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} image tokens do not form a square grid; pass grid_shape=(h, w)")
    return side, side


def attention_to_grid(row, image_positions, grid_shape: tuple[int, int] | None = None) -> np.ndarray:
    """One attention row ``[seq]`` -> its weights on the image tokens as a ``[grid_h, grid_w]`` array (row-major
    patch order, as vision towers flatten patches)."""
    row = np.asarray(row.detach().cpu() if isinstance(row, torch.Tensor) else row, dtype=np.float64)
    pos = np.asarray(
        image_positions.cpu() if isinstance(image_positions, torch.Tensor) else image_positions, dtype=np.int64
    )
    gh, gw = grid_shape_for(len(pos), grid_shape)
    return row[pos].reshape(gh, gw)


def image_attention_grid(
    model,
    text: str,
    image,
    *,
    layer: int,
    head: int,
    query: int = -1,
    grid_shape: tuple[int, int] | None = None,
    attention: str = "auto",
) -> np.ndarray:
    """Attention of one head from one query position over the image patch grid, ready to overlay on the image
    (``attnlab.figures.image_attention_overlay``).

    ``query`` indexes the prompt's real tokens (negative: from the end; -1 = the last prompt token).
    """
    batch = model.encode([text], images=[image])
    sl = batch.real_slice(0)
    n_real = sl.stop - sl.start
    q = query + n_real if query < 0 else query
    if not 0 <= q < n_real:
        raise ValueError(f"query {query} is outside the prompt's {n_real} tokens")
    if not 0 <= head < model.n_heads or not 0 <= layer < model.n_layers:
        raise ValueError(f"no head L{layer}H{head} in a {model.n_layers} x {model.n_heads} model")
    got = {}
    pos = torch.tensor([sl.start + q])

    def grab(l, rows, q_pos, b):
        got["row"] = rows[0, head, 0].float().cpu()

    Capture(model, attention=attention, progress=False).on("rows", grab, layers=[layer], queries=lambda b: pos).run(
        iter([batch])
    )
    image_positions = torch.nonzero(batch.image_mask[0]).flatten()
    if len(image_positions) == 0:
        raise ValueError("the prompt has no image tokens")
    return attention_to_grid(got["row"], image_positions, grid_shape)
