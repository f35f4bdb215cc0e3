"""SoftPAG: head-level perturbed-attention guidance on organism-dit through a diffusers attention processor.

See ``docs/methods/headhunter_softpag.md`` §1-2 (Ahn et al., arXiv 2506.10978; PAG, arXiv 2403.17377).

Perturbation (SoftPAG, Eq. 7): in each selected ``(layer, head)`` the self-attention map ``A`` is replaced by
``A' = (1 - u) * A + u * I`` before ``A' V``; ``u = 0`` is the unperturbed model, ``u = 1`` hard identity PAG.
Rows of ``A'`` sum to 1 for every ``u``. Non-selected heads keep the output of diffusers' own SDPA kernel.

Variants (spec section 3; `soft_perturb`, shared with the causal-LM path in `softpag_lm`): ``identity`` (Eq. 7, the
default), ``fisher-rao``, ``slerp``, ``log-linear`` toward the identity, and the targets ``uniform``, ``mean-query``
(SoftSEG, from the processor's own q and k) and ``max`` (one-hot argmax), all with rows summing to 1.

Guidance (paper Eq. 5, the reference pipeline's form)::

    eps = eps_cond + s * (eps_cond - eps_pert)                                   # cfg_scale == 1 (default)
    eps = eps_null + cfg * (eps_cond - eps_null) + s * (eps_cond - eps_pert)     # cfg_scale != 1

``eps_pert`` is computed from the conditional label. The default ``cfg_scale = 1`` is organism-dit's "no CFG"
(plain conditional model), which is what the reference HeadHunter search does (SD3 ``guidance_scale = 0``:
two passes per step, conditional and perturbed). All passes of one step run as one batch; only the rows of the
perturbed pass go through the explicit (eager) attention map.

Identity: ``s = 0``, ``u = 0`` or an empty head set returns exactly `dit.guided_noise(..., cfg_scale)` (the
perturbed pass is skipped), so sampling equals the unguided sampler bit for bit. The processor itself at
``u = 0`` equals the unperturbed model to fp32 tolerance (eager softmax vs the SDPA kernel).

Scope: the spec's ``scope = joint | image_only`` matters only for joint image + text sequences (SD3/FLUX).
organism-dit has 64 image tokens and no text tokens, so both scopes are the same map; ``scope`` is accepted and
recorded, and ``"image_only"`` with ``n_text_tokens > 0`` leaves text rows and the image-text blocks unchanged.

This is not a TransformerBridge `Intervention` (the DiT is not a bridge model and has no hook names); it keeps
that class's shape instead: explicit parameters, ``apply(transformer)`` as a context manager that swaps the
processors and always restores them, and JSON ``save`` / ``load``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnlab.heads.io import read_json, write_json
from attnlab.models import dit
from attnlab.params import HEADS, Interval, Options, Parameterized

SCOPES = ("joint", "image_only")
JSON_NAME = "softpag.json"


VARIANTS = ("identity", "fisher-rao", "slerp", "log-linear", "uniform", "mean-query", "max")
# Smoothing of the log-linear variant's identity target: mass on EACH visible off-diagonal entry, the diagonal keeping
# the rest, as the reference does (cvlab-kaist/HeadHunter ``interpolate_log_linear_with_identity``, ``dirac_eps``).
# The paper gives no value; a different epsilon moves the map by up to 0.33 at u = 0.5.
DIRAC_EPS = 1e-6
LOG_FLOOR = 1e-12  # visible weights are floored here before the power (the reference's clamp), so 0^(1-u) is never hit
_RENORMALISED = ("fisher-rao", "slerp", "log-linear")


def _visible(attn_map: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Bool mask of the keys each row may attend to (all keys when ``visible`` is None)."""
    if visible is None:
        return torch.ones(attn_map.shape, dtype=torch.bool, device=attn_map.device)
    return visible.to(attn_map.device).bool().expand(attn_map.shape)


def _diagonal(attn_map: torch.Tensor) -> torch.Tensor:
    """Identity map over the last two dims; with fewer queries than keys (cached decoding) query ``i`` maps to key
    ``i + n_k - n_q`` (its own position), so the map stays causal-valid."""
    nq, nk = attn_map.shape[-2], attn_map.shape[-1]
    eye = torch.zeros(nq, nk, dtype=attn_map.dtype, device=attn_map.device)
    eye[torch.arange(nq), torch.arange(nq) + (nk - nq)] = 1.0
    return eye.expand_as(attn_map)


def _kept_rows(attn_map: torch.Tensor, variant: str, visible: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``[..., n_q, 1]`` left as ``attn_map``: no visible key, or (identity targets) the own position not visible
    (padding queries); None when ``visible`` is None (every row is perturbed)."""
    if visible is None:
        return None
    vis = _visible(attn_map, visible)
    keep = ~vis.any(-1, keepdim=True)
    if variant in ("identity", "fisher-rao", "slerp", "log-linear"):
        keep = keep | ~(vis & (_diagonal(attn_map) > 0)).any(-1, keepdim=True)
    return keep


def target_map(
    attn_map: torch.Tensor,
    variant: str = "identity",
    *,
    visible: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    query_valid: torch.Tensor | None = None,
    dirac_eps: float = DIRAC_EPS,
) -> torch.Tensor:
    """The map a variant moves ``attn_map`` ``[..., n_q, n_k]`` toward (its value at ``u = 1``).

    - ``identity``, ``fisher-rao``, ``slerp``: the identity (each query attends to its own position; causal-valid).
    - ``log-linear``: the smoothed identity ``P = (1 - dirac_eps (|visible| - 1)) I + dirac_eps`` on the visible
      keys, so each off-diagonal entry holds ``dirac_eps`` (the reference's construction and value, 1e-6; its
      diagonal gets ``dirac_eps`` on top too, which the row normalisation after the power absorbs).
    - ``uniform``: ``1 / |visible|`` over each row's visible keys; for a causal LM the visible keys are the
      causally visible (and non-padding) ones, so row ``i`` is uniform over keys ``<= i``, never over future keys.
    - ``mean-query`` (SoftSEG): ``softmax(q_mean K^T * scale)`` over the visible keys; needs ``q`` ``[..., n_q, d]``
      and ``k`` ``[..., n_k, d]`` of the same heads (raises ValueError without them). ``q_mean`` is the mean of
      the valid queries (``query_valid`` ``[..., n_q]``, default all); with ``causal`` it is the running mean over
      queries ``<= i`` so no row sees a future query. ``scale`` defaults to ``1 / sqrt(d)``.
    - ``max``: one-hot at each row's argmax of ``attn_map``.

    ``visible`` (bool, broadcastable to ``attn_map``) marks the keys a row may attend to; None = all keys.
    Rows without a visible key keep ``attn_map``'s row, and so do rows whose own position is not visible for the
    identity targets (padding queries, whose outputs no real token reads).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    vis = _visible(attn_map, visible)
    n_vis = vis.sum(-1, keepdim=True)
    if variant in ("identity", "fisher-rao", "slerp"):
        out = _diagonal(attn_map).clone()
    elif variant == "log-linear":
        if not 0.0 <= dirac_eps < 1.0:
            raise ValueError(f"dirac_eps must be in [0, 1), got {dirac_eps}")
        # as the reference builds it: (1 - eps (n - 1)) I + eps on every visible key, the diagonal included
        diag = 1.0 - dirac_eps * (n_vis.to(attn_map.dtype) - 1.0).clamp_min(0.0)
        out = _diagonal(attn_map) * diag + dirac_eps * vis.to(attn_map.dtype)
    elif variant == "uniform":
        out = vis.to(attn_map.dtype) / n_vis.clamp_min(1).to(attn_map.dtype)
    elif variant == "max":
        out = torch.zeros_like(attn_map).scatter_(-1, attn_map.argmax(-1, keepdim=True), 1.0)
    else:
        if q is None or k is None:
            raise ValueError("variant 'mean-query' (SoftSEG) needs the queries q and keys k of the perturbed heads")
        q, k = q.to(attn_map.dtype), k.to(attn_map.dtype)
        w = (
            torch.ones(q.shape[:-1], dtype=q.dtype, device=q.device)
            if query_valid is None
            else query_valid.to(q.dtype).expand(q.shape[:-1])
        )
        qw = q * w.unsqueeze(-1)
        if causal:
            q_mean = qw.cumsum(-2) / w.cumsum(-1).clamp_min(1.0).unsqueeze(-1)
        else:
            q_mean = (qw.sum(-2, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1.0).unsqueeze(-1)).expand_as(q)
        sc = (q_mean @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else float(scale))
        out = sc.masked_fill(~vis, float("-inf")).softmax(-1)
    keep = _kept_rows(attn_map, variant, visible)
    out = out.nan_to_num(0.0)
    return out if keep is None else torch.where(keep, attn_map, out)


def soft_perturb(
    attn_map: torch.Tensor,
    u: float,
    variant: str = "identity",
    *,
    visible: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    query_valid: torch.Tensor | None = None,
    dirac_eps: float = DIRAC_EPS,
    n_text_tokens: int = 0,
    scope: str = "joint",
) -> torch.Tensor:
    """SoftPAG map of strength ``u`` in [0, 1] for one variant; used by the DiT processor and the causal-LM hooks.

    With ``T = target_map(...)`` (see there for the targets and arguments), ``I`` the identity:

    - ``identity`` (default, Eq. 7): ``(1 - u) A + u I`` (exactly `soft_identity`, ``scope`` supported);
    - ``fisher-rao``: ``(u I + (1 - u) sqrt(A))^2``;
    - ``slerp``: spherical interpolation from ``sqrt(A)`` to ``sqrt(I)`` on each row's unit sphere, squared;
    - ``log-linear``: ``P^u * A^(1 - u)`` elementwise, ``P`` the identity smoothed by ``dirac_eps`` on each visible
      off-diagonal entry (reference value 1e-6), visible weights of ``A`` floored at 1e-12 as the reference clamps;
    - ``uniform``, ``mean-query``, ``max``: ``(1 - u) A + u T``.

    The three non-linear ones are row-normalised after the formula; the linear ones are convex combinations of
    two row-stochastic maps, so their rows already sum to 1 (renormalising would only add round-off).
    ``u = 0`` returns ``A`` and ``u = 1`` the target map exactly. Every target is zero where ``A`` is masked
    (causal or padding) when ``visible`` is given, so a causal model stays causal for every variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not 0.0 <= float(u) <= 1.0:
        raise ValueError(f"u must lie in [0, 1], got {u}")
    keep = _kept_rows(attn_map, variant, visible)
    if variant == "identity":
        out = soft_identity(attn_map, u, n_text_tokens=n_text_tokens, scope=scope)
        return out if keep is None else torch.where(keep, attn_map, out)
    if scope == "image_only" and n_text_tokens > 0:
        raise NotImplementedError(
            f"scope='image_only' with text tokens is implemented for variant 'identity' only, not {variant!r}"
        )
    if u == 0.0:
        return attn_map.clone()
    tgt = target_map(
        attn_map,
        variant,
        visible=visible,
        q=q,
        k=k,
        scale=scale,
        causal=causal,
        query_valid=query_valid,
        dirac_eps=dirac_eps,
    )
    if u == 1.0:
        return tgt
    a = attn_map.clamp_min(0.0)
    if variant == "fisher-rao":
        out = (u * tgt + (1.0 - u) * a.sqrt()) ** 2  # sqrt(I) == I
    elif variant == "slerp":
        x, y = a.sqrt(), tgt.sqrt()
        omega = (x * y).sum(-1, keepdim=True).clamp(-1.0, 1.0).acos()
        so = omega.sin()
        small = so < 1e-6
        safe = torch.where(small, torch.ones_like(so), so)
        sl = (torch.sin((1.0 - u) * omega) / safe) * x + (torch.sin(u * omega) / safe) * y
        out = torch.where(small, (1.0 - u) * x + u * y, sl) ** 2
    elif variant == "log-linear":
        floor = (
            a.clamp_min(LOG_FLOOR) if visible is None else torch.where(_visible(a, visible), a.clamp_min(LOG_FLOOR), a)
        )
        out = tgt.pow(u) * floor.pow(1.0 - u)
    else:
        return (1.0 - u) * attn_map + u * tgt  # kept rows: tgt == attn_map there
    out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out if keep is None else torch.where(keep, attn_map, out)


def soft_identity(attn_map: torch.Tensor, u: float, *, n_text_tokens: int = 0, scope: str = "joint") -> torch.Tensor:
    """``(1 - u) * A + u * I`` over the last two (square) dims; ``image_only`` perturbs only the image block.

    Image tokens are taken to come first and the last ``n_text_tokens`` to be text (SD3 layout). With
    ``image_only`` the image rows become ``(1 - u) * A + u * I`` restricted to image keys plus ``(1 - u) * A``
    on text keys, so rows still sum to 1; text rows are returned unchanged.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    n = attn_map.shape[-1]
    eye = _diagonal(attn_map)  # torch.eye for a square map
    if u == 1.0 and (scope == "joint" or n_text_tokens == 0):
        return eye.clone()  # exact identity (no 0 * A round-off)
    out = (1.0 - u) * attn_map + u * eye
    if scope == "image_only" and n_text_tokens > 0:
        n_img = n - n_text_tokens
        out[..., n_img:, :] = attn_map[..., n_img:, :]
    return out


class SoftPAGProcessor:
    """A diffusers attention processor that perturbs chosen heads in chosen batch rows.

    ``heads``: head indices of this layer to perturb. ``state`` is shared with the owning `SoftPAG` context:
    ``state["rows"]`` a bool tensor ``[batch]`` of rows to perturb (None = no row), ``state["u"]`` the strength,
    ``state["record"]`` when True stores the perturbed maps in ``state["maps"][layer]`` ``[rows, heads, N, N]``.
    """

    def __init__(self, layer: int, heads: Sequence[int], state: dict, base: Any):
        self.layer = int(layer)
        self.heads = sorted(int(h) for h in heads)
        self.state = state
        self.base = base  # the processor it replaces (restored on exit)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            encoder_hidden_states is not None
            or hidden_states.ndim != 3
            or attn.spatial_norm is not None
            or attn.group_norm is not None
        ):
            raise NotImplementedError("SoftPAGProcessor handles plain 3-D self-attention only (organism-dit's attn1)")
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n, b).view(b, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        rows = self.state.get("rows")
        u = float(self.state.get("u", 0.0))
        if rows is not None and bool(rows.any()) and self.heads:
            idx = rows.nonzero().flatten().to(out.device)
            hsel = torch.tensor(self.heads, device=out.device)
            qs, ks, vs = (t[idx][:, hsel] for t in (q, k, v))
            scores = (qs @ ks.transpose(-1, -2)) * attn.scale
            if mask is not None:
                scores = scores + mask[idx][:, hsel]
            amap = soft_perturb(
                scores.softmax(-1),
                u,
                self.state.get("variant", "identity"),
                q=qs,
                k=ks,
                scale=attn.scale,
                n_text_tokens=self.state.get("n_text_tokens", 0),
                scope=self.state.get("scope", "joint"),
                dirac_eps=self.state.get("dirac_eps", DIRAC_EPS),
            )
            if self.state.get("record"):
                self.state.setdefault("maps", {})[self.layer] = amap.detach().clone()
            sub = out[idx]
            sub[:, hsel] = (amap @ vs).to(out.dtype)
            out = out.index_copy(0, idx, sub)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _heads_tuple(heads: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted({(int(l), int(h)) for l, h in heads}))


def attention_modules(transformer) -> list:
    """The self-attention module of each block (``transformer_blocks[i].attn1``)."""
    return [blk.attn1 for blk in transformer.transformer_blocks]


def validate_dit_heads(transformer, heads: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """Sorted unique ``(layer, head)`` pairs inside the DiT's grid (raises ValueError otherwise)."""
    mods = attention_modules(transformer)
    out = _heads_tuple(heads)
    for l, h in out:
        if not (0 <= l < len(mods) and 0 <= h < mods[l].heads):
            raise ValueError(f"head {(l, h)} outside the DiT grid of {len(mods)} layers x {mods[0].heads} heads")
    return out


@contextlib.contextmanager
def perturbed(
    transformer,
    heads: Sequence[Sequence[int]],
    u: float,
    *,
    rows: torch.Tensor | None = None,
    scope: str = "joint",
    n_text_tokens: int = 0,
    record: bool = False,
    variant: str = "identity",
    dirac_eps: float = DIRAC_EPS,
) -> Iterator[dict]:
    """Install `SoftPAGProcessor` on the layers of ``heads``; yields the shared state, restores processors on exit.

    ``rows`` (bool ``[batch]``) picks the batch rows to perturb; None perturbs every row. The state's ``"rows"``
    may be reassigned inside the block (as `SoftPAG.noise_fn` does per step).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 <= float(u) <= 1.0:
        raise ValueError(f"u must lie in [0, 1], got {u}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    heads = validate_dit_heads(transformer, heads)
    state: dict = {
        "variant": variant,
        "dirac_eps": float(dirac_eps),
        "u": float(u),
        "rows": rows,
        "all_rows": rows is None,
        "scope": scope,
        "n_text_tokens": int(n_text_tokens),
        "record": record,
        "maps": {},
    }
    mods = attention_modules(transformer)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    saved = {}
    try:
        for l, hs in by_layer.items():
            saved[l] = mods[l].processor
            mods[l].set_processor(_AllRows(SoftPAGProcessor(l, hs, state, saved[l])))
        yield state
    finally:
        for l, proc in saved.items():
            mods[l].set_processor(proc)


class _AllRows:
    """Wrapper that fills ``state["rows"]`` with all rows when the context was opened with ``rows=None``."""

    def __init__(self, proc: SoftPAGProcessor):
        self.proc = proc

    def __call__(self, attn, hidden_states, *args, **kwargs):
        st = self.proc.state
        if st.get("all_rows"):
            st["rows"] = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
        return self.proc(attn, hidden_states, *args, **kwargs)


class SoftPAG(Parameterized):
    """Head-level SoftPAG guidance for organism-dit (parameters checked when it runs: ``attnlab.params``).

    Parameters
    ----------
    heads : sequence of (layer, head)
        Heads whose attention map is perturbed in the perturbed pass (e.g. `HeadHunter.heads_`).
    u : float, default=1.0
        SoftPAG strength in [0, 1]; 0 = no perturbation, 1 = identity map.
    scale : float, default=3.0
        Perturbation-guidance weight ``s`` (``w`` in the paper); 0 = no guidance.
    cfg_scale : float, default=1.0
        Classifier-free guidance scale of organism-dit (1 = off, i.e. the plain conditional model).
    scope : {"joint", "image_only"}, default="joint"
        Which block of the map becomes the identity (same for organism-dit, which has no text tokens).
    variant : one of `VARIANTS`, default="identity"
        SoftPAG interpolation / target (`soft_perturb`); "identity" is Eq. 7.
    dirac_eps : float, default=1e-6
        ``log-linear`` only: mass on each off-diagonal entry of the smoothed identity target (the reference's value;
        the paper states none).
    """

    name = "softpag"
    _parameter_constraints = {
        "heads": [HEADS],
        "u": [Interval(float, 0, 1)],
        "scale": [Interval(float, None, None)],
        "cfg_scale": [Interval(float, None, None)],
        "scope": [Options(SCOPES)],
        "variant": [Options(VARIANTS)],
        "dirac_eps": [Interval(float, 0, 1, closed="left")],
    }

    def __init__(
        self,
        heads: Sequence[Sequence[int]] = (),
        u: float = 1.0,
        scale: float = 3.0,
        cfg_scale: float = 1.0,
        scope: str = "joint",
        variant: str = "identity",
        dirac_eps: float = DIRAC_EPS,
    ):
        self.heads = heads
        self.u = u
        self.scale = scale
        self.cfg_scale = cfg_scale
        self.scope = scope
        self.variant = variant
        self.dirac_eps = dirac_eps

    def is_identity(self) -> bool:
        """True when guidance is a no-op (s = 0, u = 0 or no heads): sampling then skips the perturbed pass."""
        return float(self.scale) == 0.0 or float(self.u) == 0.0 or not _heads_tuple(self.heads)

    def noise_fn(self) -> Callable:
        """``noise_fn(transformer, x, t, labels) -> eps`` for `dit.sample` (checks the parameters first)."""
        self._validate_params()
        heads, u, scale, cfg_scale = _heads_tuple(self.heads), float(self.u), float(self.scale), float(self.cfg_scale)

        def fn(model, x, t, labels):
            if self.is_identity():
                return dit.guided_noise(model, x, t, labels, cfg_scale)
            n = x.shape[0]
            tt = t.expand(n) if t.ndim else t.repeat(n)
            use_cfg = cfg_scale != 1.0
            parts = 3 if use_cfg else 2
            xs = torch.cat([x] * parts)
            ys = [labels, labels] + ([torch.full_like(labels, dit.NULL_CLASS)] if use_cfg else [])
            rows = torch.zeros(parts * n, dtype=torch.bool, device=x.device)
            rows[n : 2 * n] = True
            with perturbed(
                model, heads, u, rows=rows, scope=self.scope, variant=self.variant, dirac_eps=float(self.dirac_eps)
            ):
                out = model(xs, timestep=torch.cat([tt] * parts), class_labels=torch.cat(ys)).sample
            eps_cond, eps_pert = out[:n], out[n : 2 * n]
            base = eps_cond if not use_cfg else out[2 * n :] + cfg_scale * (eps_cond - out[2 * n :])
            return base + scale * (eps_cond - eps_pert)

        return fn

    def sample(
        self, organism, labels, num_steps: int = 10, seed: int = 0, device: str = "cpu", **kwargs
    ) -> torch.Tensor:
        """`dit.sample` with this guidance; images (N, 1, S, S) in [0, 1]."""
        noise_fn = self.noise_fn()
        return dit.sample(organism, labels, float(self.cfg_scale), num_steps, seed, device, noise_fn=noise_fn, **kwargs)

    @contextlib.contextmanager
    def apply(self, transformer) -> Iterator[dict]:
        """Every forward inside runs with the selected heads perturbed (all rows); yields the processor state."""
        self._validate_params()
        with perturbed(
            transformer, self.heads, self.u, scope=self.scope, variant=self.variant, dirac_eps=float(self.dirac_eps)
        ) as state:
            yield state

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        write_json(d / JSON_NAME, {"method": self.name, "params": self.get_params()})
        return d

    @classmethod
    def load(cls, directory: str | Path) -> SoftPAG:
        return cls(**read_json(Path(directory) / JSON_NAME)["params"])


__all__ = [
    "SoftPAG",
    "SoftPAGProcessor",
    "perturbed",
    "soft_identity",
    "soft_perturb",
    "target_map",
    "VARIANTS",
    "attention_modules",
    "validate_dit_heads",
]
