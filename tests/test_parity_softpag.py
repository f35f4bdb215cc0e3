"""Parity: SoftPAG's interpolations (HeadHunter, Ahn et al. 2025) against an independent re-implementation of the
reference code's documented behaviour (``cvlab-kaist/HeadHunter``, ``attention_processor.py``), all seven variants:

- identity (Eq. 7): ``(1 - u) A + u I``;
- Fisher-Rao: ``(u I + (1 - u) sqrt(A))^2``, rows renormalised;
- slerp: the great-circle path from ``sqrt(A)`` to ``sqrt(I)`` on each row's unit sphere (lerp below a tiny
  angle), squared, rows renormalised;
- log-linear: ``P^u * A^(1 - u)``, rows renormalised, with ``P`` the identity smoothed by ``dirac_eps = 1e-6`` on
  every off-diagonal entry (diagonal ``1 - eps (N - 1)``) and A floored at 1e-12 (the reference's values);
- uniform, mean-query (SoftSEG: ``softmax(mean_q q . K^T / sqrt(d))``), max (one-hot argmax): ``(1 - u) A + u T``.

Then end to end on organism-dit: the maps SoftPAG's processor uses in the perturbed pass equal the reference
variant applied to the block's own ``softmax(q k^T * scale)``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnlab.interventions.softpag import DIRAC_EPS, VARIANTS, soft_perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(a: torch.Tensor, u: float, variant: str, q=None, k=None) -> torch.Tensor:
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype).expand_as(a)
    t = 1.0 - u  # the reference's parameter: 0 -> identity, 1 -> A
    if variant == "identity":
        return (1 - u) * a + u * eye
    if variant == "fisher-rao":
        s = (1 - t) * eye + t * a.clamp_min(0).sqrt()
        out = s.pow(2)
        return out / (out.sum(-1, keepdim=True) + 1e-12)
    if variant == "slerp":
        if t <= 0:
            return eye.clone()
        root = a.clamp_min(0).sqrt()
        theta = torch.acos((root * eye).sum(-1, keepdim=True).clamp(-1 + 1e-12, 1 - 1e-12))
        c1 = torch.sin((1 - t) * theta) / torch.sin(theta)
        c2 = torch.sin(t * theta) / torch.sin(theta)
        small = theta < 1e-4
        c1 = torch.where(small, torch.full_like(c1, 1 - t), c1)
        c2 = torch.where(small, torch.full_like(c2, t), c2)
        out = (c1 * eye + c2 * root).pow(2)
        return out / (out.sum(-1, keepdim=True) + 1e-12)
    if variant == "log-linear":
        p = eye * (1.0 - DIRAC_EPS * (n - 1)) + DIRAC_EPS
        num = p.pow(1.0 - t) * a.clamp_min(1e-12).pow(t)
        return num / num.sum(-1, keepdim=True)
    if variant == "uniform":
        target = torch.full_like(a, 1.0 / n)
    elif variant == "max":
        target = torch.zeros_like(a).scatter_(-1, a.argmax(-1, keepdim=True), 1.0)
    else:  # mean-query
        qm = q.mean(-2, keepdim=True)
        target = torch.softmax(qm @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1).expand_as(a)
    return (1 - u) * a + u * target


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("u", [0.25, 0.5, 0.8])
def test_each_variant_equals_the_reference_map(variant, u):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) * 3, -1)
    got = soft_perturb(a, u, variant, q=q, k=k)
    torch.testing.assert_close(got, reference(a, u, variant, q, k), rtol=0, atol=1e-9)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_log_linear_smoothing_matters_at_the_reference_value():
    g = torch.Generator().manual_seed(1)
    a = torch.softmax(torch.randn(1, 1, 64, 64, generator=g, dtype=torch.float64) * 4, -1)
    ref = reference(a, 0.5, "log-linear")
    torch.testing.assert_close(soft_perturb(a, 0.5, "log-linear"), ref, rtol=0, atol=1e-9)
    old = soft_perturb(a, 0.5, "log-linear", dirac_eps=1e-3 / 63)  # attnlab's former 1e-3 spread over the row
    assert (old - ref).abs().max() > 0.05


SHIPPED = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-dit"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="organism-dit not bundled")
@pytest.mark.parametrize("variant", ["identity", "log-linear", "slerp", "mean-query"])
def test_organism_dit_perturbed_maps_equal_the_reference(variant):
    pytest.importorskip("diffusers")
    from attnlab.interventions.softpag import attention_modules, perturbed
    from attnlab.models import dit

    org = dit.load(SHIPPED)
    m = org.transformer
    layer, heads, u = 2, [1, 5], 0.5
    attn = attention_modules(m)[layer]
    seen = {}

    def grab(mod, args, kw):
        seen.setdefault("x", args[0] if args else kw["hidden_states"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, generator=g)
    try:
        with torch.no_grad(), perturbed(m, [(layer, h) for h in heads], u, variant=variant, record=True) as state:
            m(x, timestep=torch.full((2,), 300), class_labels=torch.tensor([1, 7]))
    finally:
        handle.remove()
    h_in = seen["x"]
    b, n, _ = h_in.shape
    hd = attn.to_q.out_features // attn.heads
    q = attn.to_q(h_in).view(b, n, attn.heads, hd).transpose(1, 2)[:, heads].double()
    k = attn.to_k(h_in).view(b, n, attn.heads, hd).transpose(1, 2)[:, heads].double()
    a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
    torch.testing.assert_close(state["maps"][layer].double(), reference(a, u, variant, q, k), rtol=0, atol=2e-5)
