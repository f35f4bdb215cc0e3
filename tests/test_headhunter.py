"""SoftPAG head-level perturbation guidance and HeadHunter head search on the shipped organism-dit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from attnlab.interventions.headhunter import HeadHunter, search_labels  # noqa: E402
from attnlab.interventions.softpag import SoftPAG, perturbed, soft_identity  # noqa: E402
from attnlab.models import dit  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-dit"
LABELS = torch.tensor([0, 3, 7, 9])
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def org(one_thread):
    return dit.load(SHIPPED)


@pytest.fixture(scope="module")
def unguided(org):
    return dit.sample(org, LABELS, 1.0, STEPS, seed=0)


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.full((n,), 400), torch.arange(n) + 1


@pytest.mark.parametrize("params", [dict(u=0.0, scale=3.0), dict(u=1.0, scale=0.0), dict(u=1.0, scale=3.0, heads=())])
def test_neutral_guidance_equals_unguided_sampler_exactly(org, unguided, params):
    heads = params.pop("heads", [(0, 1), (4, 2)])
    out = SoftPAG(heads, **params).sample(org, LABELS, num_steps=STEPS, seed=0)
    assert torch.equal(out, unguided)


def test_guidance_changes_samples_and_cfg_form_reduces_to_cfg(org, unguided):
    out = SoftPAG([(0, 1), (4, 2)], u=1.0, scale=3.0).sample(org, LABELS, num_steps=STEPS, seed=0)
    assert (out - unguided).abs().max() > 1e-3
    cfg = dit.sample(org, LABELS, 3.0, STEPS, seed=0)
    same = SoftPAG([(0, 1)], u=0.0, scale=3.0, cfg_scale=3.0).sample(org, LABELS, num_steps=STEPS, seed=0)
    assert torch.equal(same, cfg)


def test_processor_u0_matches_unperturbed_and_u1_makes_selected_maps_identity(org):
    m = org.transformer
    x, t, y = _inputs()
    with torch.no_grad():
        ref = m(x, timestep=t, class_labels=y).sample
        with perturbed(m, [(0, 1), (2, 3)], 0.0):
            u0 = m(x, timestep=t, class_labels=y).sample
        with perturbed(m, [(0, 1), (2, 3)], 1.0, record=True) as st:
            u1 = m(x, timestep=t, class_labels=y).sample
        again = m(x, timestep=t, class_labels=y).sample  # processors restored on exit
    torch.testing.assert_close(u0, ref, atol=1e-5, rtol=0)
    assert (u1 - ref).abs().max() > 1e-3
    assert torch.equal(again, ref)
    assert set(st["maps"]) == {0, 2}
    for amap in st["maps"].values():
        assert amap.shape == (3, 1, 64, 64)
        assert torch.equal(amap, torch.eye(64).expand_as(amap))


def test_only_selected_rows_and_heads_change(org):
    """With rows = [False, True], row 1's unselected heads equal row 0's (same input) bit for bit."""
    m = org.transformer
    x, t, y = _inputs(1)
    captured = {}
    attn = m.transformer_blocks[1].attn1
    handle = attn.to_out[0].register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("z", args[0].detach().clone())
    )
    try:
        rows = torch.tensor([False, True])
        with torch.no_grad(), perturbed(m, [(1, 2)], 1.0, rows=rows):
            m(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=torch.cat([y, y]))
    finally:
        handle.remove()
    z = captured["z"].view(2, 64, attn.heads, -1)
    others = [h for h in range(attn.heads) if h != 2]
    assert torch.equal(z[0][:, others], z[1][:, others])
    assert (z[0][:, 2] - z[1][:, 2]).abs().max() > 1e-4


@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 1.0])
def test_soft_identity_rows_sum_to_one_and_endpoints(u):
    a = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)), -1)
    out = soft_identity(a, u)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, 5), atol=1e-6, rtol=0)
    if u == 0.0:
        assert torch.equal(out, a)
    if u == 1.0:
        assert torch.equal(out, torch.eye(5).expand_as(a))
    img = soft_identity(a, u, n_text_tokens=2, scope="image_only")
    torch.testing.assert_close(img.sum(-1), torch.ones(2, 3, 5), atol=1e-6, rtol=0)
    assert torch.equal(img[..., 3:, :], a[..., 3:, :])  # text rows unchanged


def _hunter(objective="classifier", **kw):
    base = dict(rounds=2, k=1, n_candidates=3, classes=(1, 8), n_per_class=1, num_steps=STEPS, seed=0, candidate_seed=0)
    base.update(kw)
    return HeadHunter(objective, **base)


def test_search_is_deterministic_ranked_and_grows(org, tmp_path):
    a = _hunter().fit(org)
    b = _hunter().fit(org)
    assert a.heads_ == b.heads_ and a.history_ == b.history_
    assert len(a.heads_) == 2 and len(set(a.heads_)) == 2
    for rnd in a.history_:
        scores = [s for _, _, s in rnd["scores"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert rnd["chosen"] == [rnd["scores"][0][:2]]
    assert list(a.history_[1]["chosen"][0]) not in [r[:2] for r in a.history_[0]["chosen"]]
    # the score of a round-0 head is the objective of its own guided samples, recomputed independently
    l, h, s = a.history_[0]["scores"][-1]
    labels = search_labels((1, 8), 1)
    imgs = SoftPAG([(l, h)], u=1.0, scale=3.0).sample(org, labels, num_steps=STEPS, seed=0)
    assert np.isclose(dit.get_scorer().prob_of(imgs, labels.numpy()).mean(), s)
    a.save(tmp_path)
    c = HeadHunter.load(tmp_path)
    assert c.heads_ == a.heads_ and c.guidance().heads == tuple(sorted(a.heads_))


def test_style_objective_runs_and_scores_thickness(org):
    hunter = _hunter("thickness", rounds=1, k=2).fit(org)
    assert len(hunter.heads_) == 2
    labels = search_labels((1, 8), 1)
    l, h, s = hunter.history_[0]["scores"][0]
    imgs = SoftPAG([(l, h)], u=1.0, scale=3.0).sample(org, labels, num_steps=STEPS, seed=0)
    assert np.isclose(dit.style_scores(imgs)["thickness"].mean(), s)
    with pytest.raises(ValueError):
        HeadHunter("nonsense", num_steps=1).fit(org)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_batched_noise_matches_separate_passes(org, cfg_scale):
    """eps = [eps_null + cfg (eps_cond - eps_null) | eps_cond] + s (eps_cond - eps_pert), from separate forwards."""
    m = org.transformer
    x, t, y = _inputs(2)
    heads = [(3, 0), (5, 7)]
    with torch.no_grad():
        got = SoftPAG(heads, u=0.5, scale=2.5, cfg_scale=cfg_scale).noise_fn()(m, x, t[0], y)
        cond = m(x, timestep=t, class_labels=y).sample
        null = m(x, timestep=t, class_labels=torch.full_like(y, dit.NULL_CLASS)).sample
        with perturbed(m, heads, 0.5):
            pert = m(x, timestep=t, class_labels=y).sample
    base = cond if cfg_scale == 1.0 else null + cfg_scale * (cond - null)
    torch.testing.assert_close(got, base + 2.5 * (cond - pert), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["uniform", "mean-query"])
def test_processor_variants_record_their_target_map_at_u1(org, variant):
    """The DiT processor uses the shared `soft_perturb`: u = 1 gives the variant's target (rows sum to 1)."""
    m = org.transformer
    x, t, y = _inputs(2)
    with torch.no_grad(), perturbed(m, [(2, 3)], 1.0, record=True, variant=variant) as st:
        m(x, timestep=t, class_labels=y)
    amap = st["maps"][2]
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 1, 64), atol=1e-5, rtol=0)
    if variant == "uniform":
        assert torch.equal(amap, torch.full_like(amap, 1 / 64))
    else:  # one mean query: every row is the same softmax(q_mean K^T / sqrt(d))
        torch.testing.assert_close(amap, amap[:, :, :1].expand_as(amap), atol=1e-6, rtol=0)
        assert (amap.max(-1).values > 1.5 / 64).all()


def test_variant_is_passed_to_softpag_in_search_guidance_and_save(org, tmp_path):
    """HeadHunter(variant=...) scores candidates with that SoftPAG variant (not Eq. 7's identity) and keeps it."""
    hunter = _hunter(rounds=1, k=1, n_candidates=2, variant="uniform").fit(org)
    labels = search_labels((1, 8), 1)
    l, h, s = hunter.history_[0]["scores"][0]
    probs = {
        v: dit.get_scorer()
        .prob_of(
            SoftPAG([(l, h)], u=1.0, scale=3.0, variant=v).sample(org, labels, num_steps=STEPS, seed=0), labels.numpy()
        )
        .mean()
        for v in ("uniform", "identity")
    }
    assert np.isclose(probs["uniform"], s)
    assert not np.isclose(probs["identity"], s)
    assert hunter.guidance().variant == "uniform" and hunter.guidance(u=0.5).u == 0.5
    hunter.save(tmp_path)
    assert HeadHunter.load(tmp_path).guidance().variant == "uniform"
    with pytest.raises(ValueError):  # parameters are checked when the search runs (attnlab.params), before it samples
        HeadHunter(variant="nonsense").fit(org)


def test_compare_pairs_images_across_conditions(org):
    """Same noise and labels in every condition: found = all of layer 7 gives a paired difference of exactly 0
    against the layer-7 row, and each row's difference is the difference of the per-image means."""
    from attnlab.interventions.headhunter import compare, comparison_table

    hunter = HeadHunter(num_steps=STEPS, seed=0)
    hunter.heads_ = tuple((7, h) for h in range(8))
    res = compare(org, hunter, n_per_class=1, num_steps=STEPS, seed=1000, layers=[6, 7], random_draws=1)
    by = {r["name"]: r for r in res["rows"]}
    assert by["layer 7"]["found_minus"]["objective"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    per = {k: np.asarray(v["objective"]) for k, v in res["per_image"].items()}
    for name in ("none", "layer 6", "random 1"):
        assert np.isclose(by[name]["found_minus"]["objective"]["mean"], per["found"].mean() - per[name].mean())
    assert len(per["none"]) == 10 and res["best_layer"] in ("layer 6", "layer 7")
    assert "| layer 6 |" in comparison_table(res)
    with pytest.raises(ValueError):
        compare(org, hunter, seed=0)
