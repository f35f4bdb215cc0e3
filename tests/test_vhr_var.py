"""VHR and VAR interventions: identity at the neutral parameter (tiny LLaVA and organism-vlm), exact planted
redistribution / head scaling, and fit/test hygiene (docs/methods/vision_heads.md §1-2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.interventions.base import Intervention
from attnlab.interventions.registry import build
from attnlab.interventions.var import VAR, redistribute, var_layers
from attnlab.interventions.vhr import VHR, VisualPrompt, auto_layers, scale_heads, vhr_selection
from attnlab.models.bundled import bundled_path

needs_organism = pytest.mark.skipif(bundled_path("organism-vlm") is None, reason="organism-vlm not bundled")


def shape_prompts(n_scenes: int, seed: int) -> list[VisualPrompt]:
    from attnlab.datasets.shapes import pope_questions, render_scene

    return [
        VisualPrompt(f"USER: <image>\n{q.text} ASSISTANT:", render_scene(s))
        for s, q in pope_questions("adversarial", n_scenes, seed)
    ]


def noise_prompts(n: int = 2) -> list[VisualPrompt]:
    from PIL import Image

    rng = np.random.default_rng(0)
    texts = [
        "USER: <image>\nWhat is in the picture? ASSISTANT:",
        "USER: <image>\nIs it red? ASSISTANT:",
        "USER: <image>\nIs there a dog? ASSISTANT:",
    ]
    return [
        VisualPrompt(texts[i % 3], Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))) for i in range(n)
    ]


def logits(model, items):
    b = model.encode([i.text for i in items], images=[i.image for i in items], padding_side="left")
    with torch.no_grad():
        return model.forward(b).float()


@pytest.fixture(scope="module")
def organism():
    return attnlab.load("organism-vlm")


# ---- planted ---------------------------------------------------------------------------------------------------


def test_planted_var_moves_exactly_p_of_the_sink_mass_to_visual_non_sinks():
    g = torch.Generator().manual_seed(0)
    b, H, q, k = 2, 3, 4, 10
    pattern = torch.softmax(torch.randn(b, H, q, k, generator=g) * 2, -1).double()
    image = torch.zeros(b, k, dtype=torch.bool)
    image[:, 2:7] = True
    sinks = torch.zeros(b, k, dtype=torch.bool)
    sinks[:, 0] = True  # text sink (BOS)
    sinks[:, 3] = True  # visual sink
    rows = torch.ones(b, q, dtype=torch.bool)
    rows[1, 0] = False  # e.g. an image-token query row: never edited
    heads = torch.tensor([True, False, True])
    p = 0.3
    new, sel = redistribute(pattern, image, sinks, rows, p, heads=heads, min_image_attention=0.0, rho=0.0)
    assert sel[:, 1].sum() == 0 and not sel[1, :, 0].any() and sel[0, 0].all()
    s = sinks[:, None, None, :]
    vns = (image & ~sinks)[:, None, None, :]
    text_nonsink = (~image & ~sinks)[:, None, None, :]
    m = sel[..., None]
    # sinks scaled by (1 - p); the moved mass lands on visual non-sinks, proportionally; row sums stay 1
    torch.testing.assert_close(torch.where(m & s, new, 0 * new), torch.where(m & s, (1 - p) * pattern, 0 * pattern))
    moved = p * (pattern * s).sum(-1)
    gained = ((new - pattern) * vns).sum(-1)
    torch.testing.assert_close(torch.where(sel, gained, 0 * gained), torch.where(sel, moved, 0 * moved))
    ratio_old = pattern[..., 4] / pattern[..., 5]
    ratio_new = new[..., 4] / new[..., 5]
    torch.testing.assert_close(ratio_new, ratio_old)
    torch.testing.assert_close(new.sum(-1), torch.ones(b, H, q, dtype=torch.float64))
    # text non-sink columns untouched everywhere; unselected rows untouched entirely
    torch.testing.assert_close(new * text_nonsink, pattern * text_nonsink, rtol=0, atol=0)
    torch.testing.assert_close(new[~sel], pattern[~sel], rtol=0, atol=0)
    assert (new[sel] != pattern[sel]).any()


def test_var_row_rule_vis_threshold_rho_and_layers_without_visual_sinks():
    pattern = torch.zeros(1, 1, 3, 6, dtype=torch.float64)
    pattern[0, 0, 0] = torch.tensor([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])  # vis = 0.08 < 0.2: skipped
    pattern[0, 0, 1] = torch.tensor([0.2, 0.6, 0.05, 0.05, 0.05, 0.05])  # visual sink share 0.6/0.75 > 1 - rho: skipped
    pattern[0, 0, 2] = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.1, 0.1])  # selected
    image = torch.tensor([[False, True, True, True, False, False]])
    sinks = torch.tensor([[True, True, False, False, False, False]])
    rows = torch.ones(1, 3, dtype=torch.bool)
    _, sel = redistribute(pattern, image, sinks, rows, 0.5, rho=0.5)
    assert sel[0, 0].tolist() == [False, False, True]
    _, sel = redistribute(pattern, image, sinks & ~image, rows, 0.5, rho=0.0)  # no visual sink: nothing selected
    assert not sel.any()
    assert var_layers(6) == [2, 3, 4] and var_layers(6, True) == [2, 3, 4, 5]


def test_vhr_selection_median_outliers_and_head_scaling():
    vhd = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 9.0, 1.0]])
    rate = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.0]])  # L1H2 is an outlier in most prompts
    sel = vhr_selection(vhd, rate, [0, 1])
    assert sel[0].tolist() == [False, False, True, True] and sel[1].tolist() == [True, True, False, False]
    assert not vhr_selection(vhd, rate, [1])[0].any()  # unreinforced layers select nothing
    assert auto_layers(32) == [1, *range(18, 32)] and auto_layers(6) == [1, 3, 4, 5]
    z = torch.randn(2, 3, 4, 5)
    out = scale_heads(z, [1, 3], 2.0, 4)
    torch.testing.assert_close(out[:, :, [0, 2]], z[:, :, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, [1, 3]], 2 * z[:, :, [1, 3]])
    torch.testing.assert_close(scale_heads(z.reshape(2, 3, 20), [1, 3], 2.0, 4), out.reshape(2, 3, 20))


# ---- identity and exactness on real models ---------------------------------------------------------------------


def test_identity_at_neutral_parameters_on_tiny_llava(loaded):
    m = loaded("llava")
    fit, test = noise_prompts(2), noise_prompts(3)[2:]
    base = logits(m, fit + test)
    vhr = VHR(alpha=1.0).fit(m, fit)
    assert vhr.layers_ == [1] and len(vhr.heads_) > 0
    with vhr.apply(m):
        torch.testing.assert_close(logits(m, fit + test), base, rtol=0, atol=1e-5)
    var = VAR(p=0.0, tau=0.0, sink_dims=list(range(m.d_model))).fit(m, fit)
    with var.apply(m):
        torch.testing.assert_close(logits(m, fit + test), base, rtol=0, atol=1e-5)
    vhr2 = VHR(alpha=2.0).fit(m, fit)
    with vhr2.apply(m):
        assert (logits(m, fit + test) - base).abs().max() > 1e-3  # the identity above is not vacuous


@needs_organism
def test_identity_and_effect_on_organism_vlm(organism):
    m = organism
    fit, test = shape_prompts(2, 1), shape_prompts(1, 2)[:4]
    base = logits(m, test)
    for neutral, active in (
        (VHR(alpha=1.0), VHR(alpha=2.0)),
        (VAR(p=0.0, tau=2.5, dim_tau=4.0), VAR(p=0.5, tau=2.5, dim_tau=4.0)),
    ):
        neutral.fit(m, fit)
        with neutral.apply(m):
            torch.testing.assert_close(logits(m, test), base, rtol=0, atol=1e-5)
        active.fit(m, fit)
        with active.apply(m):
            moved = logits(m, test)
            if isinstance(active, VAR):
                assert active.heads_ and sum(int(s.sum()) for s in active.last_selected.values()) > 0
        assert (moved - base).abs().max() > 1e-4, type(active).__name__
    torch.testing.assert_close(logits(m, test), base, rtol=0, atol=0)  # hooks removed on exit


@needs_organism
def test_vhr_changes_layer_output_by_exactly_the_scaled_selected_heads(organism):
    m = organism
    vhr = VHR(alpha=3.0).fit(m, shape_prompts(2, 1))
    items = shape_prompts(1, 3)[:2]
    first = min(vhr.layers_)  # layers before it are untouched, so its o_proj input is the same in both runs

    def o_proj(layer):
        (hit,) = [
            (n, mod)
            for n, mod in m.hf_model.named_modules()
            if f"language_model.layers.{layer}." in n and "o_proj" in n and isinstance(mod, torch.nn.Linear)
        ]
        return hit

    mods = dict([o_proj(first), o_proj(0)])
    rec = {}

    def grab(key):
        def hook(mod, args, out):
            rec[key] = (args[0].detach().clone(), out.detach().clone())

        return hook

    def run(tag):
        hs = [mod.register_forward_hook(grab((tag, n))) for n, mod in mods.items()]
        try:
            logits(m, items)
        finally:
            for h in hs:
                h.remove()

    run("base")
    with vhr.apply(m):
        run("vhr")
    n0, n1 = o_proj(0)[0], o_proj(first)[0]
    if first != 0:
        torch.testing.assert_close(rec[("vhr", n0)][1], rec[("base", n0)][1], rtol=0, atol=0)
    x0, y0 = rec[("base", n1)]
    _, y1 = rec[("vhr", n1)]
    W = mods[n1].weight
    heads = [h for l, h in vhr.heads_ if l == first]
    assert 0 < len(heads) < m.n_heads
    expected = sum(
        (vhr.alpha - 1) * x0[..., h * m.d_head : (h + 1) * m.d_head] @ W[:, h * m.d_head : (h + 1) * m.d_head].T
        for h in heads
    )
    torch.testing.assert_close(
        y1 - y0, expected, rtol=1e-4, atol=1e-5 * float(y0.abs().max()) * 10
    )  # float32 round-off of two matmuls


# ---- fit/test hygiene, persistence, registry -------------------------------------------------------------------


def test_fit_and_test_splits_are_disjoint_and_checked(loaded, tmp_path):
    m = loaded("llava")
    fit, other = noise_prompts(2), noise_prompts(3)
    vhr = VHR(alpha=2.0).fit(m, fit, split="noise/fit")
    with pytest.raises(ValueError, match="fit split"):
        vhr.check_disjoint(other)  # other[:2] are the fit prompts
    vhr.check_disjoint(other[2:])
    # the same question about a different image is a different prompt
    from PIL import Image

    same_text = [VisualPrompt(fit[0].text, Image.new("RGB", (30, 30), (1, 2, 3)))]
    vhr.check_disjoint(same_text)
    assert vhr.fit_split_["name"] == "noise/fit" and vhr.fit_split_["n"] == 2
    back = Intervention.load(vhr.save(tmp_path / "vhr"))
    assert isinstance(back, VHR) and back.heads_ == vhr.heads_ and back.layers_ == vhr.layers_
    with back.apply(m), torch.no_grad():
        a = logits(m, other[2:])
    with vhr.apply(m), torch.no_grad():
        torch.testing.assert_close(logits(m, other[2:]), a, rtol=0, atol=0)
    assert isinstance(build("vhr", ["alpha=1.5"]), VHR) and build("var", ["p=0.2", "tau=3"]).p == 0.2
    with pytest.raises(ValueError):
        VHR().fit(loaded("gpt2"), fit)  # a text model takes no images
