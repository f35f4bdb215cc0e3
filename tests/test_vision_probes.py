"""Vision probes: VHD / T-VHD with the outlier filter, VAR visual sinks and image-centric heads, and attention over
the image patch grid. Planted patterns are recovered exactly; the formulas of
docs/methods/attention_sinks.md §4 and docs/methods/vision_heads.md §1-2 hold; the probes run on the tiny LLaVA and on
organism-vlm."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import FakeCapture

import attnlab
from attnlab.capture import Capture
from attnlab.datasets.base import PromptSet
from attnlab.errors import AttnlabError
from attnlab.models.bundled import bundled_path
from attnlab.models.loading import Batch
from attnlab.probes.base import ProbeContext
from attnlab.probes.image_centric_heads import (
    ImageCentricHeads,
    attention_to_grid,
    find_sink_dims,
    image_attention_grid,
    phi,
)
from attnlab.probes.vision_aware_heads import VisionAwareHeads, filter_outliers, select_heads, total_vhd


def fake_model(n_layers, n_heads, d_model=8):
    return SimpleNamespace(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_model=d_model,
        causal=True,
        name="planted",
        tokens_as_text=lambda ids: [f"t{i}" for i in ids],
    )


# ---- VHD -------------------------------------------------------------------------------------------------------


def run_planted_vhd(probe, z_image, z_text, has_image=True):
    """Feed planted head outputs ``[L, b, s, H, d]`` of both branches; the last real token is the last position."""
    L, b, s, H, _ = z_image.shape
    model = fake_model(L, H)
    ctx = ProbeContext(model=model)
    cap = FakeCapture()
    probe.attach(cap, ctx)
    image_mask = torch.zeros(b, s, dtype=torch.bool)
    if has_image:
        image_mask[:, 1:3] = True
    batch = Batch(
        torch.arange(s).repeat(b, 1), torch.ones(b, s, dtype=torch.long), list(range(b)), image_mask=image_mask
    )
    last = s - 1
    probe._text_branch = lambda _batch: {l: z_text[l][:, last] for l in range(L)}
    for l in range(L):
        for h in cap.of("z"):
            h.fn(l, z_image[l], batch)
    for h in cap.of("batch_end"):
        h.fn(batch, None)
    return {r.name: r for r in probe.results(ctx)}


def test_planted_vision_aware_heads_and_outlier_are_recovered_exactly():
    L, b, s, H, d = 2, 2, 5, 4, 3
    g = torch.Generator().manual_seed(0)
    z_text = torch.randn(L, b, s, H, d, generator=g) * 0.1
    z_image = z_text.clone()
    z_image[1, :, -1, 2, 0] += 5.0  # L1H2: vision-aware, divergence 5
    z_image[0, :, -1, 1, 1] += 1.0  # L0H1: divergence 1
    z_image[0, :, -1, 3, 2] += 10.0  # L0H3: divergence 10 but also a huge text-only output -> outlier
    z_text[0, :, -1, 3] += 30.0
    z_image[0, :, -1, 3] += 30.0
    z_image[:, :, :-1] += 7.0  # earlier positions never matter
    res = run_planted_vhd(VisionAwareHeads(), z_image, z_text)
    raw, vhd = res["vhd_raw"].scores, res["vhd"].scores
    assert raw[1, 2] == pytest.approx(5.0) and raw[0, 1] == pytest.approx(1.0) and raw[0, 3] == pytest.approx(10.0)
    others = np.ones_like(raw, bool)
    others[1, 2] = others[0, 1] = others[0, 3] = False
    assert np.all(raw[others] == 0)
    assert vhd[0, 3] == 0 and res["vhd"].extra["outlier_rate"][0, 3] == 1.0
    assert res["vhd"].extra["outlier_rate"].sum() == 1.0  # only the planted outlier
    assert res["vhd"].extra["selected_rate"][0, 3] == 0  # outliers are never selected
    assert res["vhd"].top_heads(2) == [(1, 2), (0, 1)]
    unfiltered = run_planted_vhd(VisionAwareHeads(outlier_filter=False), z_image, z_text)
    assert unfiltered["vhd"].scores[0, 3] == pytest.approx(10.0)
    k = res["vhd"].summary["t_vhd_k"]
    assert k == 1 and res["vhd"].summary["t_vhd"] == [pytest.approx(6.0)] * 2  # top-1 per layer: 1 + 5


def test_vhd_selection_median_and_t_vhd():
    vhd = np.array([[0.1, 0.4, 0.3, 0.2], [3.0, 1.0, 2.0, 4.0]])
    sel = select_heads(vhd)
    assert sel.tolist() == [[False, True, True, False], [True, False, False, True]]  # H/2 strictly above the median
    assert total_vhd(vhd, 2) == pytest.approx(0.4 + 0.3 + 4.0 + 3.0)
    ta = np.array([[1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 9.0]])
    filtered, mask = filter_outliers(vhd, ta)
    assert mask.tolist() == [[False] * 4, [False, False, False, True]]  # row 0's top-TA head has an ordinary VHD
    assert filtered[1, 3] == 0 and not select_heads(filtered)[1, 3]


def test_vhd_is_zero_when_both_branches_see_the_same_input(loaded):
    """A vision-language model on prompts without images: both branches see the same input, so VHD is 0."""
    m = loaded("llava")
    res = attnlab.scan(m, VisionAwareHeads(), ["The cat sat on the mat.", "Paris is big."], progress=False)
    assert res["vhd"].scores.shape == (m.n_layers, m.n_heads)
    np.testing.assert_allclose(res["vhd"].scores, 0.0, atol=1e-6)
    assert res["vhd"].summary["prompts_without_image"] == [0, 1]


def test_vision_probes_refuse_a_text_model(loaded):
    """On a text model the vision probes are not scored (one line), rather than run to all zeros."""
    for probe in (VisionAwareHeads(), ImageCentricHeads()):
        with pytest.raises(AttnlabError, match="not scored: text model"):
            attnlab.scan(loaded("llama-gqa"), probe, ["The cat sat on the mat."], progress=False)


# ---- phi and sink dimensions ------------------------------------------------------------------------------------


def test_phi_acceptance_checks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g)
    x[2, 7] = 40.0
    dims = [7, 11]
    base = phi(x, dims)
    for c in (0.5, 3.0, 250.0):  # exact up to RMS's 1e-6 epsilon, negligible at these magnitudes
        torch.testing.assert_close(phi(c * x, dims), base, rtol=1e-4, atol=1e-4)
    assert torch.equal(phi(-x, dims), base)
    rms = x[2].pow(2).mean().add(1e-6).sqrt()
    assert base[2].item() == pytest.approx(max(abs(x[2, 7].item()), abs(x[2, 11].item())) / rms.item(), rel=1e-6)
    y = x.clone()
    y[:, dims] = 0
    assert torch.all(phi(y, dims) == 0)
    assert torch.all(phi(x, []) == 0)


def test_sink_dims_need_tau_on_anchor_tokens_across_prompts():
    anchor = np.zeros((4, 6))
    anchor[:, 2] = 50  # every prompt
    anchor[:3, 4] = 25  # 3 of 4 prompts
    anchor[:1, 5] = 90  # one prompt only
    anchor[:, 1] = 19.9  # below tau
    assert find_sink_dims(anchor, tau=20) == [2, 4]
    assert find_sink_dims(anchor, tau=20, min_prompt_fraction=1.0) == [2]


# ---- planted image-centric heads and visual sinks -------------------------------------------------------------

S, IMG, BOS, TEXT_SINK, D = 10, [2, 3, 4, 5], 0, 7, 512  # phi <= sqrt(d_model): tau = 20 needs d_model > 400


def planted_scene(n_layers=5):
    """Residuals with a sink dimension (5) on BOS in every layer, a visual sink (image token 3) entering layers 3 and 4,
    a text token (7) that is massive in sink dim 5 at layer 3 (a text sink, never a visual one), a massive value in a
    non-sink dim (1) on a non-anchor token, and sinks planted in layers 0-1 everywhere (never reported)."""
    g = torch.Generator().manual_seed(2)
    resid = torch.randn(n_layers, 1, S, D, generator=g)
    resid[:, 0, BOS, 5] = 300.0
    resid[3:, 0, 3, 5] = 300.0
    resid[3, 0, TEXT_SINK, 5] = 300.0
    resid[2:, 0, 8, 1] = 300.0
    resid[:2, 0, :, 5] = 300.0
    return resid


def planted_rows(n_heads=3):
    """Rows ``[layer] -> [1, H, q, S]`` for the text queries after the image (6..9)."""
    q = S - (IMG[-1] + 1)
    centric = torch.zeros(S)
    centric[BOS], centric[3] = 0.1, 0.1
    centric[[2, 4, 5]] = 0.8 / 3  # vis 0.9, non-sink ratio 0.8 / 0.9
    sinky = torch.zeros(S)
    sinky[BOS], sinky[3], sinky[2] = 0.2, 0.7, 0.1  # vis 0.8, ratio 0.125
    texty = torch.zeros(S)
    texty[BOS], texty[6], texty[2] = 0.5, 0.4, 0.1  # vis 0.1 < 0.2: skipped
    rows = torch.stack([centric, sinky, texty])[None, :, None, :].expand(1, n_heads, q, S).clone()
    return rows


def run_planted_var(probe, n_layers=5):
    model = fake_model(n_layers, 3, d_model=D)
    ctx = ProbeContext(model=model)
    cap = FakeCapture()
    probe.attach(cap, ctx)
    image_mask = torch.zeros(1, S, dtype=torch.bool)
    image_mask[0, IMG] = True
    batch = Batch(torch.arange(S)[None], torch.ones(1, S, dtype=torch.long), [0], image_mask=image_mask)
    resid = planted_scene(n_layers)
    rows = planted_rows()
    for layer in range(n_layers):  # every layer is fed; the probe itself must ignore layers 0 and 1
        for h in cap.of("resid_pre"):
            h.fn(layer, resid[layer], batch)
        for h in cap.of("rows"):
            q_pos = h.queries(batch)
            assert q_pos.tolist() == list(range(IMG[-1] + 1, S))
            for start in range(0, len(q_pos), 3):  # in chunks, as the engine delivers them
                sub = q_pos[start : start + 3]
                h.fn(layer, rows[:, :, start : start + len(sub)], sub, batch)
    for h in cap.of("batch_end"):
        h.fn(batch, None)
    return {r.name: r for r in probe.results(ctx)}


def test_planted_visual_sinks_and_image_centric_heads_are_recovered_exactly():
    res = run_planted_var(ImageCentricHeads())
    summary = res["image_centric"].summary
    assert summary["sink_dims"] == [5]  # dim 1 is massive too, but not on BOS/delimiters
    tokens = res["visual_sinks_0"]
    assert tokens.marks["visual_sink"] == [3]
    assert tokens.marks["text_sink"] == [BOS, TEXT_SINK]
    assert np.isnan(tokens.values[:2]).all()  # layers 0 and 1 report none
    assert summary["visual_sinks_per_image_by_layer"] == [0, 0, 0, 1, 1]
    icr = res["image_centric"].scores
    assert np.isnan(icr[[0, 1, 4]]).all()  # layers 0-1 never scored; the last layer is left out by default
    assert icr[3].tolist() == [1.0, 0.0, 0.0]  # only the planted image-centric head, in a layer with a visual sink
    assert icr[2].tolist() == [0.0, 0.0, 0.0]  # same rows, but layer 2 has no visual sink
    ratio = res["visual_nonsink_ratio"].scores
    assert ratio[3, 0] == pytest.approx(0.8 / 0.9) and ratio[3, 1] == pytest.approx(0.125) and np.isnan(ratio[3, 2])
    assert res["image_attention"].scores[3].tolist() == pytest.approx([0.9, 0.8, 0.1])
    strict = run_planted_var(ImageCentricHeads(rho=0.9))  # ratio 0.889 < 0.9: nothing selected
    assert np.nansum(strict["image_centric"].scores) == 0
    with_last = run_planted_var(ImageCentricHeads(include_last_layer=True))
    assert with_last["image_centric"].scores[4].tolist() == [1.0, 0.0, 0.0]
    given = run_planted_var(ImageCentricHeads(sink_dims=[1]))  # a given dim replaces the search
    assert given["image_centric"].summary["sink_dims"] == [1] and given["visual_sinks_0"].marks["visual_sink"] == []


def test_no_visual_sink_outside_the_image_span_even_when_every_token_is_a_sink():
    res = run_planted_var(ImageCentricHeads(sink_dims=list(range(D)), tau=0.0))
    marks = res["visual_sinks_0"].marks
    assert marks["visual_sink"] == IMG
    assert set(marks["text_sink"]).isdisjoint(IMG) and len(marks["text_sink"]) == S - len(IMG)


# ---- the patch grid ------------------------------------------------------------------------------------------------


def test_attention_to_grid_keeps_patch_order():
    row = torch.zeros(12)
    row[2:8] = torch.arange(6, dtype=torch.float32)
    grid = attention_to_grid(row, torch.arange(2, 8), (2, 3))
    assert grid.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="square"):
        attention_to_grid(row, torch.arange(2, 8))


# ---- real checkpoints ------------------------------------------------------------------------------------------------


def llava_prompts(n=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    texts = ["USER: <image>\nWhat is in the picture? ASSISTANT:", "USER: <image>\nIs it red? ASSISTANT:"][:n]
    return PromptSet(name="noise", texts=texts, images=images)


def test_vision_group_on_tiny_llava(loaded):
    m = loaded("llava")
    ps = llava_prompts()
    res = attnlab.scan(m, "vision", ps, progress=False)
    vhd = res["vhd"].scores
    assert vhd.shape == (m.n_layers, m.n_heads) and np.isfinite(vhd).all() and (vhd >= 0).all() and vhd.max() > 0
    assert res["vhd"].summary["prompts_without_image"] == []
    fused = attnlab.scan(m, VisionAwareHeads(attention="fused"), ps, attention="fused", progress=False)
    np.testing.assert_allclose(
        fused["vhd"].scores, vhd, rtol=1e-4, atol=1e-5
    )  # z from SDPA equals z from the eager path
    # the tiny LLaVA has 2 layers: VAR never reports layers 0 and 1, even when every token would be a sink
    var = attnlab.scan(m, ImageCentricHeads(sink_dims=list(range(m.d_model)), tau=0.0), ps, progress=False)
    assert np.isnan(var["image_centric"].scores).all()
    assert var["visual_sinks_0"].marks["visual_sink"] == [] and np.isnan(var["visual_sinks_0"].values).all()


def test_image_attention_grid_matches_the_full_pattern(loaded):
    from attnlab.figures import image_attention_overlay

    m = loaded("llava")
    ps = llava_prompts(1)
    layer, head = 1, 2
    grid = image_attention_grid(m, ps.texts[0], ps.images[0], layer=layer, head=head)
    batch = m.encode(ps.texts, images=ps.images)
    got = {}
    Capture(m, attention="eager", progress=False).on(
        "pattern", lambda l, p, b: got.setdefault("p", p.clone()), layers=[layer]
    ).run([batch])
    img_pos = torch.nonzero(batch.image_mask[0]).flatten()
    last = int(batch.lengths[0]) - 1
    expected = got["p"][0, head, last, img_pos].numpy()
    side = int(np.sqrt(len(img_pos)))
    assert grid.shape == (side, side)
    np.testing.assert_allclose(grid.ravel(), expected, atol=1e-6)
    fig = image_attention_overlay(ps.images[0], grid, layer=layer, head=head)
    assert fig.layout.meta["grid_shape"] == [side, side] and fig.layout.meta["total"] == pytest.approx(
        float(expected.sum()), abs=1e-6
    )
    assert [t.type for t in fig.data] == ["image", "heatmap"]


@pytest.mark.skipif(bundled_path("organism-vlm") is None, reason="organism-vlm not bundled")
def test_vision_probes_on_organism_vlm():
    from attnlab.datasets.shapes import render_scene, task_questions

    m = attnlab.load("organism-vlm")
    items = task_questions("attribute", 3, 0)
    texts = [f"USER: <image>\n{q.text} ASSISTANT:" for _, q in items]
    ps = PromptSet(name="shapes", texts=texts, images=[render_scene(s) for s, _ in items])
    res = attnlab.scan(m, [VisionAwareHeads(), ImageCentricHeads()], ps, progress=False)
    vhd = res["vhd"].scores
    assert np.isfinite(vhd).all() and vhd.max() > 0 and res["vhd"].summary["n_prompts"] == 3
    summary = res["image_centric"].summary
    top = [int(d) for d in summary["top_dims"]][:2]
    # the organism has no massive activations at tau = 20 (its model card: 0 visual sinks); phi with its two
    # strongest dimensions and a low tau must still agree with phi recomputed from the residual stream
    probe = ImageCentricHeads(sink_dims=top, tau=2.0)
    low = attnlab.scan(m, probe, ps, progress=False)
    batch = m.encode(ps.texts, images=ps.images)
    resid = {}
    Capture(m, progress=False).on("resid_pre", lambda l, x, b: resid.setdefault(l, x.clone()), layers=[3]).run([batch])
    sl = batch.real_slice(0)
    tokens = low["visual_sinks_0"]
    np.testing.assert_allclose(tokens.values[3], phi(resid[3][0, sl], top).numpy(), rtol=1e-5)
    assert np.isnan(tokens.values[:2]).all()
    image_pos = set(tokens.marks["image"])
    assert len(image_pos) == 64 and set(tokens.marks["visual_sink"]) <= image_pos
    assert set(tokens.marks["text_sink"]).isdisjoint(image_pos)
    icr = low["image_centric"].scores
    assert np.isnan(icr[[0, 1, m.n_layers - 1]]).all()
    assert ((icr[2:-1] >= 0) & (icr[2:-1] <= 1)).all()
    att = low["image_attention"].scores[2:-1]
    assert ((att >= 0) & (att <= 1 + 1e-6)).all()
