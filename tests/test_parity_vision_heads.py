"""Parity: VHD, T-VHD and VHR (He et al., ACL 2025) against an independent computation on a plain ``transformers``
LLaVA (tiny random checkpoint): head outputs are the ``o_proj`` inputs at the last prompt token, with the image
(input ids + pixels) and without it (image tokens removed, no pixels); ``VHD = ||A(image) - A(text)||_2``,
``TA = ||A(text)||^2``, outliers (both above their layer's mean + std) zeroed, T-VHD = sum over layers of the top-k
VHD; VHR multiplies the selected heads' outputs by alpha on every position (an ``o_proj`` pre-hook)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_ref import head_outputs, load_hf, o_projs

import attnlab
from attnlab.interventions.vhr import VHR, VisualPrompt, prompt_set
from attnlab.probes.vision_aware_heads import VisionAwareHeads

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "llava"


def prompts(n: int = 3) -> list[VisualPrompt]:
    from PIL import Image

    rng = np.random.default_rng(0)
    texts = ["USER: <image>\nWhat is in the picture? ASSISTANT:", "USER: <image>\nIs it red? ASSISTANT:"]
    return [
        VisualPrompt(texts[i % 2], Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))) for i in range(n)
    ]


def branches(m, hf, item):
    b = m.encode([item.text], images=[item.image])
    sl = b.real_slice(0)
    ids = b.input_ids[0, sl].tolist()
    img = b.image_mask[0, sl].tolist()
    z_img = head_outputs(hf, ids, o_projs, m.n_heads, pixel_values=b.pixel_values[:1])
    text_ids = [t for t, is_img in zip(ids, img) if not is_img]
    z_txt = head_outputs(hf, text_ids, o_projs, m.n_heads)
    zi = torch.stack([z_img[l][-1] for l in range(m.n_layers)])  # [L, H, d]
    zt = torch.stack([z_txt[l][-1] for l in range(m.n_layers)])
    return zi, zt, ids, b


def reference_vhd(zi, zt):
    vhd = (zi - zt).norm(dim=-1).numpy()
    ta = zt.pow(2).sum(-1).numpy()
    out = (vhd > vhd.mean(-1, keepdims=True) + vhd.std(-1, keepdims=True)) & (
        ta > ta.mean(-1, keepdims=True) + ta.std(-1, keepdims=True)
    )
    return vhd, np.where(out, 0.0, vhd)


def test_vhd_and_t_vhd_equal_the_reference(loaded, checkpoint_dir):
    m = loaded(ARCH)
    hf = load_hf(checkpoint_dir / ARCH, vlm=True)
    items = prompts()
    raws, filts = zip(*(reference_vhd(*branches(m, hf, it)[:2]) for it in items))
    res = attnlab.scan(m, VisionAwareHeads(), prompt_set(items), batch_size=3, progress=False)
    np.testing.assert_allclose(res["vhd_raw"].scores, np.mean(raws, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res["vhd"].scores, np.mean(filts, 0), rtol=1e-4, atol=1e-6)
    k = max(1, m.n_heads // 4)
    t_vhd = [float(np.sort(f, -1)[:, -k:].sum()) for f in filts]
    np.testing.assert_allclose(res["vhd"].summary["t_vhd"], t_vhd, rtol=1e-4)
    assert np.mean(raws) > 0


def test_vhr_logits_equal_the_reference(loaded, checkpoint_dir):
    m = loaded(ARCH)
    hf = load_hf(checkpoint_dir / ARCH, vlm=True)
    items = prompts()
    alpha = 2.0
    vhr = VHR(alpha=alpha, layers=list(range(m.n_layers))).fit(m, items[:2])
    assert vhr.heads_
    _, _, ids, b = branches(m, hf, items[2])
    handles = []
    for l, proj in enumerate(o_projs(hf)):
        heads = [h for ll, h in vhr.heads_ if ll == l]

        def pre(mod, args, heads=heads):
            x = args[0]
            z = x.reshape(*x.shape[:-1], m.n_heads, -1).clone()
            z[..., heads, :] *= alpha
            return (z.reshape(x.shape),)

        handles.append(proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), pixel_values=b.pixel_values[:1], use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    with vhr.apply(m), torch.no_grad():
        got = m.forward(b)[0, b.real_slice(0)].float()
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-4)
