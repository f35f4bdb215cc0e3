"""ACT and ZeroTuning: operator acceptance checks (planted patterns), identity on real architectures, forms that
must agree, cached decoding, fitting hygiene and persistence."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHORT_SENTENCES

from attnlab.hooks import attn_hook
from attnlab.interventions.act import ACT, act_calibrate, act_sink_set
from attnlab.interventions.base import Intervention, NotFittedError, real_keys_from_scores
from attnlab.interventions.zerotuning import ZeroTuning, zerotune_pattern, zerotune_scores


def causal_pattern(b=2, h=3, n=7, seed=0, valid=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, n, generator=g) * 2
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
    if valid is not None:
        mask = mask & valid.bool()[:, None, None, :]
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return torch.softmax(x, -1), x


def all_heads(m):
    return [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]


def batch_of(m, padding_side="right"):
    if m.modality == "vision-language":
        from PIL import Image

        ims = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))]
        return m.encode(["<image>\nIs there a red square?", "<image> blue"], images=ims, padding_side=padding_side)
    return m.encode(SHORT_SENTENCES[:3], padding_side=padding_side)


@pytest.fixture(scope="module")
def organism():
    import attnlab

    return attnlab.load("organism-lm")


# ---- ACT operator ------------------------------------------------------------------------------------------------


def test_act_calibration_moves_exactly_the_sink_mass():
    A, _ = causal_pattern()
    S = torch.zeros(2, 3, 7, dtype=torch.bool)
    S[:, :, 2] = True
    S[0, 1, 4] = True
    beta = 0.4
    out = act_calibrate(A, S, beta)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, 7), atol=1e-5)
    assert (out.triu(1) == 0).all()
    s = S.unsqueeze(-2).expand_as(A)
    assert torch.equal(out[s], beta * A[s])  # sink entries exactly beta * A
    assert torch.equal(out[..., 0, :], A[..., 0, :])  # row 0 unchanged
    assert (out[..., 0] >= A[..., 0] - 1e-7).all()  # position 0 never scaled down
    # freed mass lands on non-sinks in proportion to their weight: non-sink ratios unchanged
    rows = 5
    non = ~S[0, 1]
    non[rows + 1 :] = False
    r_before = A[0, 1, rows, non] / A[0, 1, rows, non].sum()
    r_after = out[0, 1, rows, non] / out[0, 1, rows, non].sum()
    assert torch.allclose(r_before, r_after, atol=1e-6)
    moved = (out - A)[..., ~S[0, 0]].sum(-1)
    assert torch.allclose(moved[0, 0], (1 - beta) * (A[0, 0] * S[0, 0].float()).sum(-1), atol=1e-6)


def test_act_identity_cases():
    A, _ = causal_pattern()
    S = torch.zeros(2, 3, 7, dtype=torch.bool)
    assert torch.equal(act_calibrate(A, S, 0.4), A)  # S empty
    S[:, :, 3] = True
    assert torch.equal(act_calibrate(A, S, 1.0), A)  # beta = 1


def test_act_sink_set_excludes_position_zero_and_padding():
    n = 8
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :2] = False  # left padding: row 1's first real token sits at column 2
    x = torch.zeros(2, 1, n, n)
    x[..., 0] = 5.0  # a huge first-token sink
    x[1, ..., 2] = 5.0
    x[0, ..., 4] = 4.0  # a planted hidden sink
    x[1, ..., 5] = 4.0
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & valid[:, None, None, :]
    A = torch.softmax(x.masked_fill(~mask, torch.finfo(x.dtype).min), -1)
    S = act_sink_set(A, valid, 0.1)
    assert S[0, 0].nonzero().flatten().tolist() == [4]
    assert S[1, 0].nonzero().flatten().tolist() == [5]


def test_act_single_decoding_row_matches_the_full_map():
    A, _ = causal_pattern(n=9, seed=3)
    S = torch.zeros(2, 3, 9, dtype=torch.bool)
    S[..., 3] = True
    full = act_calibrate(A, S, 0.4)
    one = act_calibrate(A[..., -1:, :], S, 0.4)
    assert torch.allclose(one, full[..., -1:, :], atol=0)
    assert (one[..., 0] < 1 - 1e-3).all()  # never all weight on the first key


# ---- ZeroTuning operator ---------------------------------------------------------------------------------------------


def test_zerotuning_forms_agree_on_random_logits():
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False
    A, x = causal_pattern(valid=valid, seed=1)
    first = torch.tensor([0, 3])
    real_rows = valid[:, None, :, None]
    for gamma in (0.1, 0.5, 1.0, 2.0, 4.0):
        post = zerotune_pattern(A, first, gamma)
        bias = torch.softmax(zerotune_scores(x, first, gamma), -1)
        assert torch.allclose(post.masked_select(real_rows), bias.masked_select(real_rows), atol=1e-5)
        assert torch.allclose(post.sum(-1), torch.ones(2, 3, 7), atol=1e-5)
    assert torch.equal(zerotune_pattern(A, first, 1.0), A)
    # with left padding the scaled key is the first real one
    post = zerotune_pattern(A, first, 3.0)
    assert torch.equal(post[1, :, 5, :3], A[1, :, 5, :3])  # padding keys stay 0
    assert (post[1, :, 5, 3] > A[1, :, 5, 3]).all()


def test_zerotuning_sdpa_with_additive_mask_matches_eager():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    first = torch.zeros(2, dtype=torch.long)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + causal
    eager = zerotune_pattern(torch.softmax(scores, -1), first, 2.5) @ v
    mask = zerotune_scores(causal.expand(2, 1, 6, 6).clone(), first, 2.5)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(eager, fused, atol=1e-5)


def test_zerotuning_monotone_and_ratio_preserving():
    A, _ = causal_pattern(seed=2)
    first = torch.zeros(2, dtype=torch.long)
    a0 = [zerotune_pattern(A, first, g)[..., 1:, 0] for g in (1e-9, 0.5, 1.0, 2.0, 8.0)]
    orig = A[..., 1:, 0]  # gamma -> 0 takes the initial token's weight to 0 (gamma = 0 itself is refused)
    assert torch.all(a0[0][orig < 0.99] < 1e-6)
    for lo, hi in zip(a0, a0[1:]):
        assert (hi > lo).all()
    out = zerotune_pattern(A, first, 3.0)
    r = out[..., 6, 1:] / A[..., 6, 1:]
    assert torch.allclose(r, r[..., :1].expand_as(r), atol=1e-6)


# ---- on real architectures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen2", "llava", "organism-lm"])
def test_neutral_parameters_are_the_identity(loaded, organism, name):
    m = organism if name == "organism-lm" else loaded(name)
    batch = batch_of(m, padding_side="left")
    with torch.no_grad():
        base = m.forward(batch)
        for iv in (ACT(all_heads(m), beta=1.0), ZeroTuning(1.0, form="softmax"), ZeroTuning(1.0, form="bias")):
            with iv.fit(m).apply(m):
                out = m.forward(batch)
            assert torch.allclose(out, base, atol=1e-5), type(iv).__name__
        # the initial key of each row is found from the masked scores: padding keys are recognised
        seen = {}

        def observe(x, hook=None):
            seen["v"] = real_keys_from_scores(x)

        with m.bridge.hooks(fwd_hooks=[(attn_hook(0, "hook_attn_scores"), observe)]):
            m.forward(batch)
        assert torch.equal(seen["v"].cpu(), batch.attention_mask.bool())
        # and a non-neutral setting does change the outputs (the hooks are live)
        with ZeroTuning(3.0, form="bias").fit(m).apply(m):
            assert not torch.allclose(m.forward(batch), base, atol=1e-3)


def _patterns(m, batch, layer, iv=None):
    seen = {}

    def keep(p, hook=None):
        seen["p"] = p.detach().clone()

    with torch.no_grad():
        if iv is None:
            with m.bridge.hooks(fwd_hooks=[(attn_hook(layer, "hook_pattern"), keep)]):
                m.forward(batch)
        else:
            with iv.apply(m), m.bridge.hooks(fwd_hooks=[(attn_hook(layer, "hook_pattern"), keep)]):
                m.forward(batch)
    return seen["p"]


def test_act_on_a_model_moves_only_the_selected_heads_sink_mass(loaded):
    m = loaded("llama-gqa")
    batch = m.encode(SHORT_SENTENCES[:2], padding_side="left")
    iv = ACT([(0, 1)], beta=0.25, sinks=(2,)).fit(m)
    before, after = _patterns(m, batch, 0), _patterns(m, batch, 0, iv)
    others = [0, 2, 3]
    assert torch.equal(after[:, others], before[:, others])  # unselected heads bit-identical
    first = batch.first_real
    for b in range(2):
        s = int(first[b]) + 2
        rows = slice(s, None)
        assert torch.allclose(after[b, 1, rows, s], 0.25 * before[b, 1, rows, s], atol=1e-7)
        assert torch.allclose(after[b, 1].sum(-1), before[b, 1].sum(-1), atol=1e-5)
        assert torch.equal(after[b, 1, :s], before[b, 1, :s])  # rows that cannot see the sink: untouched


def test_zerotuning_forms_agree_on_a_model_with_left_padding(loaded):
    m = loaded("llama-gqa")
    batch = m.encode(SHORT_SENTENCES[:3], padding_side="left")
    heads = [(0, 0), (0, 3), (1, 2)]
    with torch.no_grad():
        with ZeroTuning(2.5, heads, form="softmax").fit(m).apply(m):
            post = m.forward(batch)
            single = m.forward(m.encode(SHORT_SENTENCES[2:3]))
        with ZeroTuning(2.5, heads, form="bias").fit(m).apply(m):
            bias = m.forward(batch)
    real = batch.attention_mask.bool()
    assert torch.allclose(post[real], bias[real], atol=1e-4)
    # the bias landed on the first real key: the padded row equals the prompt run alone
    n = int(batch.lengths[2])
    assert torch.allclose(bias[2, -n:], single[0], atol=1e-4)


def test_act_cached_decoding_step_equals_the_full_forward(organism):
    from transformers import DynamicCache

    m = organism
    ids = m.encode(["Text: the soup was great, and the room was clean.\nLabel:"]).input_ids
    iv = ACT(all_heads(m), beta=0.4, sinks=(3, 7)).fit(m)
    with torch.no_grad(), iv.apply(m):
        full = m.bridge(ids)
        cache = DynamicCache()
        m.bridge(ids[:, :-1], past_key_values=cache, use_cache=True)
        step = m.bridge(ids[:, -1:], past_key_values=cache, use_cache=True)
    with torch.no_grad():
        plain = m.bridge(ids)
    assert not torch.allclose(full[0, -1], plain[0, -1], atol=1e-2)  # calibration is active
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
    # auto sink sets: the decoding step reuses the prefill's S and runs; outside a prefill it refuses
    auto = ACT(all_heads(m), beta=0.4).fit(m)
    with torch.no_grad(), auto.apply(m):
        cache = DynamicCache()
        m.bridge(ids[:, :-1], past_key_values=cache, use_cache=True)
        assert auto._sink_cache  # S was computed at the prefill
        out = m.bridge(ids[:, -1:], past_key_values=cache, use_cache=True)
    assert torch.isfinite(out).all()


def test_apply_removes_hooks_on_error_and_composes(loaded):
    m = loaded("qwen2")
    batch = batch_of(m)
    zt = ZeroTuning(3.0, form="bias").fit(m)
    act = ACT(all_heads(m), beta=1.0).fit(m)
    with torch.no_grad():
        base = m.forward(batch)
        with pytest.raises(RuntimeError, match="boom"):
            with zt.apply(m):
                raise RuntimeError("boom")
        assert torch.equal(m.forward(batch), base)
        with zt.apply(m):
            alone = m.forward(batch)
        with zt.apply(m), act.apply(m):
            both = m.forward(batch)
        assert torch.allclose(both, alone, atol=1e-6)  # beta = 1 composes as the identity
        with zt.apply(m), ACT(all_heads(m), beta=0.2, sinks=(1, 2)).fit(m).apply(m):
            assert not torch.allclose(m.forward(batch), alone, atol=1e-4)
        assert torch.equal(m.forward(batch), base)
    with pytest.raises(NotFittedError):
        with ZeroTuning(2.0).apply(m):
            pass


# ---- fitting, splits, persistence ------------------------------------------------------------------------------------


def _cls_items(split, n, seed):
    from attnlab.datasets import classification as C

    return [p for t in C.LABELS for p in C.build_eval_prompts(t, 0, n, split=split, seed=seed)]


def test_fit_records_its_split_and_refuses_overlap(organism, tmp_path):
    m = organism
    fit, test = _cls_items("valid", 4, 1), _cls_items("test", 4, 2)
    zt = ZeroTuning(
        heads=[(l, h) for l in (1, 2) for h in range(3)], grid=(0.5, 2.0, 0.5), profile_unit="head_index"
    ).fit(m, fit, split="cls/valid")
    assert zt.fit_split_["name"] == "cls/valid" and zt.fit_split_["n"] == len(fit)
    zt.check_disjoint(test)
    with pytest.raises(ValueError, match="fit split"):
        zt.check_disjoint(test[:2] + fit[:1])
    assert zt.gamma_ in [r["gamma"] for r in zt.gamma_search_]
    best = max(r["value"] for r in zt.gamma_search_)
    assert next(r for r in zt.gamma_search_ if r["gamma"] == zt.gamma_)["value"] == best
    assert set(zt.heads_) <= set(zt.candidates_) and zt.head_type_ in ("up", "down", "none")
    assert len(zt.profile_) == 3  # one unit per head index, across layers 1 and 2
    # save / load: same parameters, fitted state and outputs
    zt.save(tmp_path / "zt")
    back = Intervention.load(tmp_path / "zt")
    assert (
        isinstance(back, ZeroTuning)
        and back.heads_ == zt.heads_
        and back.gamma_ == zt.gamma_
        and back.fit_split_ == zt.fit_split_
    )
    batch = m.encode([test[0].prompt])
    with torch.no_grad():
        with zt.apply(m):
            a = m.forward(batch)
        with back.apply(m):
            b = m.forward(batch)
    assert torch.equal(a, b)


def test_act_head_filtering_keeps_heads_that_beat_the_baseline(organism, tmp_path):
    m = organism
    fit = _cls_items("valid", 3, 3)
    cands = [(3, h) for h in range(4)]
    act = ACT(cands, beta=0.0).fit(m, fit, split="cls/valid")
    assert [tuple(r[:2]) for r in act.head_scores_] == cands
    kept = tuple(tuple(r[:2]) for r in act.head_scores_ if r[2] > act.baseline_["accuracy"])
    assert act.heads_ == kept
    act.save(tmp_path / "act")
    back = ACT.load(tmp_path / "act")
    assert back.heads_ == act.heads_ and back.candidates_ == act.candidates_ and back.beta == 0.0
    with pytest.raises(TypeError):
        ZeroTuning.load(tmp_path / "act")
