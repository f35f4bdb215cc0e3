"""Extreme-token probes (domain_sink, value_drain, residual_norms), the capture engine's value site, the
Bigram-Backcopy task and ZeroTuning restricted to some query rows: planted patterns, formulas and parity."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES
from fakes import FakeCapture

import attnlab
from attnlab.capture import Capture
from attnlab.datasets.bigram_backcopy import BigramBackcopy, make_task
from attnlab.errors import AttnlabError
from attnlab.hooks import attn_hook
from attnlab.interventions.zerotuning import ZeroTuning
from attnlab.lse import AttentionView, ScoreSpec
from attnlab.models.loading import Batch
from attnlab.probes.base import ProbeContext
from attnlab.probes.domain_sink import DomainSink
from attnlab.probes.residual_norms import ResidualNorms
from attnlab.probes.value_drain import ValueDrain

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_model(n_heads=2, n_kv_heads=None):
    return SimpleNamespace(
        n_layers=1,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads,
        causal=True,
        name="planted",
        tokens_as_text=lambda ids: [f"t{i}" for i in ids],
    )


def feed(probe, *, rows=None, v=None, resid=None, ids, mask=None, meta=None, model=None):
    """Run a probe's handlers on planted tensors of one layer; returns its results by name."""
    b, s = ids.shape
    model = model or fake_model(n_heads=rows.shape[1] if rows is not None else 2)
    ctx = ProbeContext(model=model, meta=meta or [])
    cap = FakeCapture()
    probe.attach(cap, ctx)
    batch = Batch(ids, torch.ones(b, s, dtype=torch.long) if mask is None else mask, list(range(b)))
    for fn in (h.fn for h in cap.of("attention")):  # the eager view of the planted pattern
        qk = torch.zeros(b, rows.shape[1], s, 1)
        fn(0, AttentionView(qk, qk, ScoreSpec(1.0, key_mask=batch.attention_mask), pattern=rows), batch)
    for fn in (h.fn for h in cap.of("v")):
        fn(0, v, batch)
    for fn in (h.fn for h in cap.of("resid_post")):
        fn(0, resid, batch)
    for fn in (h.fn for h in cap.of("batch_end")):
        fn(batch, None)
    return {r.name: r for r in probe.results(ctx)}


def active_dormant(s: int, domain: list[int]) -> torch.Tensor:
    """Head 0: previous token at ``domain`` rows, first token elsewhere; head 1: uniform causal attention."""
    a = torch.zeros(s, s)
    a[:, 0] = 1.0
    for i in domain:
        a[i] = 0
        a[i, i - 1] = 1.0
    uniform = torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]
    return torch.stack([a, uniform])


# ---- domain_sink --------------------------------------------------------------------------------------------------


def test_domain_sink_separates_active_and_dormant_rows_under_every_predicate():
    s, dom = 10, [3, 6, 7]
    ids = torch.arange(100, 100 + s)[None]
    ids[0, dom] = 7  # the domain's query token
    rows = active_dormant(s, dom)[None]
    results = [
        feed(DomainSink(tokens=[7], label="trig"), rows=rows, ids=ids),
        feed(DomainSink(where=lambda x: x == 7, label="trig"), rows=rows, ids=ids),
        feed(DomainSink(label="trig"), rows=rows, ids=ids, meta=[{"domain_positions": dom}]),
    ]
    uniform_in = np.mean([1 / (i + 1) for i in dom])
    uniform_out = np.mean([1 / (i + 1) for i in range(1, s) if i not in dom])
    for res in results:
        inside, outside = res["domain_sink_trig"].scores[0], res["domain_sink_not_trig"].scores[0]
        assert inside[0] == pytest.approx(0.0) and outside[0] == pytest.approx(1.0)  # dormant off, active on
        assert inside[1] == pytest.approx(uniform_in) and outside[1] == pytest.approx(uniform_out)
        assert res["domain_sink_gap_trig"].scores[0, 0] == pytest.approx(1.0)
    assert results[1]["domain_sink_trig"].params["where"].startswith("<callable")  # JSON-safe provenance


def test_domain_sink_left_padding_equals_unpadded_and_meta_positions_are_prompt_relative():
    s, pad, dom = 8, 3, [2, 5]
    rows = active_dormant(s, dom)[None]
    base = feed(DomainSink(), rows=rows, ids=torch.zeros(1, s, dtype=torch.long), meta=[{"domain_positions": dom}])
    padded = torch.zeros(1, 2, s + pad, s + pad)
    padded[:, :, pad:, pad:] = rows
    mask = torch.tensor([[0] * pad + [1] * s])
    shifted = feed(
        DomainSink(), rows=padded, ids=torch.zeros(1, s + pad, dtype=torch.long), mask=mask,
        meta=[{"domain_positions": dom}],
    )  # fmt: skip
    for name, r in base.items():
        np.testing.assert_allclose(r.scores, shifted[name].scores, atol=1e-6)


def test_domain_sink_gives_each_batch_its_own_domain():
    """Two batches through one probe score as each batch alone (the per-batch mask is never reused)."""
    s = 9
    rows_a, rows_b = active_dormant(s, [2, 3])[None], active_dormant(s, [6])[None]
    meta = [{"domain_positions": [2, 3]}, {"domain_positions": [6]}]
    probe, model = DomainSink(), fake_model()
    ctx = ProbeContext(model=model, meta=meta)
    cap = FakeCapture()
    probe.attach(cap, ctx)
    for p, rows in enumerate((rows_a, rows_b)):  # a fresh Batch object per forward, as the engine makes
        batch = Batch(torch.zeros(1, s, dtype=torch.long), torch.ones(1, s, dtype=torch.long), [p])
        qk = torch.zeros(1, 2, s, 1)
        for fn in (h.fn for h in cap.of("attention")):
            fn(0, AttentionView(qk, qk, ScoreSpec(1.0), pattern=rows), batch)
        del batch
    res = {r.name: r for r in probe.results(ctx)}
    assert res["domain_sink_domain"].scores[0, 0] == pytest.approx(0.0)  # both batches' domains active
    assert res["domain_sink_not_domain"].scores[0, 0] == pytest.approx(1.0)


def test_domain_sink_without_a_domain_is_a_user_error():
    with pytest.raises(AttnlabError, match="domain_sink needs a domain"):
        feed(DomainSink(), rows=active_dormant(5, [2])[None], ids=torch.zeros(1, 5, dtype=torch.long))


# ---- value_drain -----------------------------------------------------------------------------------------------


def test_value_drain_formula_and_gqa_mapping():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 2, 6, 4, generator=g)  # [b, kv, s, d]
    v[:, 0, 0] *= 0.01  # KV head 0: the first token drains
    res = feed(ValueDrain(), v=v, ids=torch.zeros(2, 6, dtype=torch.long), model=fake_model(n_heads=4, n_kv_heads=2))
    drain = res["value_drain"]
    norms = v.norm(dim=-1)
    expected = (norms[:, :, 0] / norms.mean(-1)).mean(0).numpy()  # mean over prompts, all tokens in the mean
    np.testing.assert_allclose(drain.extra["kv_scores"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(drain.scores[0], np.repeat(expected, 2), rtol=1e-5)  # query h -> KV h // 2
    np.testing.assert_allclose(drain.per_kv_head("max")[0], expected, rtol=1e-5)
    assert drain.scores[0, 0] < 0.05 and drain.higher_is == "less"


def test_value_drain_ignores_left_padding():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 2, 5, 4, generator=g)
    base = feed(ValueDrain(), v=v, ids=torch.zeros(1, 5, dtype=torch.long))["value_drain"].scores
    padded = torch.cat([torch.full((1, 2, 3, 4), 50.0), v], dim=2)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    got = feed(ValueDrain(), v=padded, ids=torch.zeros(1, 8, dtype=torch.long), mask=mask)["value_drain"].scores
    np.testing.assert_allclose(got, base, rtol=1e-6)


# ---- residual_norms ---------------------------------------------------------------------------------------------


def test_residual_norms_find_a_planted_peak():
    x = torch.ones(1, 6, 8)
    x[0, 0] *= 12.0  # the first token's norm is 12x every other's
    x[0, 4] *= 3.0
    res = feed(ResidualNorms(peak_ratio=5.0), resid=x, ids=torch.arange(6)[None])
    ex = res["residual_norms_0"]
    np.testing.assert_allclose(ex.values[0], x[0].norm(dim=-1).numpy(), rtol=1e-6)
    assert ex.marks["peak"] == [0]
    layer = ex.summary["layers"][0]
    assert layer["first_token_ratio"] == pytest.approx(12.0) and layer["peak_tokens"] == {"t0": 1}


# ---- the capture engine's value site -----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_value_site_gives_the_models_value_states_per_kv_head(loaded, attention):
    m = loaded("llama-gqa")
    assert m.n_kv_heads < m.n_heads
    batch = m.encode(SHORT_SENTENCES[:2])
    got = {}
    cap = Capture(m, attention=attention, progress=False)
    cap.on("v", lambda l, v, b: got.__setitem__(l, v.clone()))
    want = {}
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(lambda mod, i, o, l=l: want.__setitem__(l, o.detach().clone()))
        for l, layer in enumerate(m.hf_model.model.layers)
    ]
    try:
        with torch.no_grad():
            cap.run_batch(batch)
    finally:
        for h in hooks:
            h.remove()
    assert cap.last_path == attention
    for l in range(m.n_layers):
        expected = want[l].view(batch.size, batch.seq_len, m.n_kv_heads, m.d_head).transpose(1, 2)
        assert got[l].shape == (batch.size, m.n_kv_heads, batch.seq_len, m.d_head)
        assert torch.allclose(got[l], expected, atol=1e-6)


def test_new_probes_agree_on_eager_and_fused_paths(loaded):
    m = loaded("llama-gqa")
    prompts = SHORT_SENTENCES[:3]
    probes = lambda: [DomainSink(where=lambda ids: ids % 3 == 0), ValueDrain(), ResidualNorms()]  # noqa: E731
    eager = attnlab.scan(m, probes(), prompts, attention="eager", progress=False)
    fused = attnlab.scan(m, probes(), prompts, attention="fused", progress=False)
    for name, r in eager.results.items():
        if hasattr(r, "scores"):
            np.testing.assert_allclose(r.scores, fused[name].scores, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_allclose(r.values, fused[name].values, atol=1e-4, err_msg=name)


# ---- the task ------------------------------------------------------------------------------------------------------


def test_bigram_backcopy_copies_after_triggers_and_follows_the_chain_elsewhere(tmp_path):
    task = make_task(vocab_size=16, n_triggers=2, concentration=0.3, trigger_rate=0.25, seed=3)
    assert np.allclose(task.transition[: 16 - 2].sum(1), 1) and not task.transition[14:].any()
    ids = task.sample(400, 40, np.random.default_rng(0))
    assert (ids[:, 0] == task.bos_id).all() and (ids[:, 1:] >= task.token_offset).all()
    trig = task.trigger_mask(ids)
    b, t = np.nonzero(trig[:, :-1])
    assert len(b) > 500 and (ids[b, t + 1] == ids[b, t - 1]).all()  # back-copy
    assert not trig[b, t + 1].any() and not trig[:, 1].any()  # a trigger never follows a trigger or BOS
    # ordinary transitions follow the chain: empirical frequencies of one busy row match it
    ordinary = task.bigram_mask(ids)
    s = ids - task.token_offset
    cur = np.bincount(s[:, :-1][ordinary[:, :-1]], minlength=16).argmax()
    nxt = s[:, 1:][ordinary[:, :-1] & (s[:, :-1] == cur)]
    freq = np.bincount(nxt, minlength=16) / len(nxt)
    assert np.abs(freq - task.transition[cur]).max() < 0.08
    # the oracle loss is the chain's own -log p at bigram positions
    nll = task.oracle_nll(ids)
    assert np.isnan(nll[~ordinary[:, :-1]]).all() and np.isfinite(nll[ordinary[:, :-1]]).all()
    # saved and read back exactly
    task.save(tmp_path)
    back = BigramBackcopy.load(tmp_path)
    assert back.triggers == task.triggers and np.array_equal(back.transition, task.transition)
    assert np.array_equal(back.sample(3, 20, np.random.default_rng(5)), task.sample(3, 20, np.random.default_rng(5)))
    assert task.token_names()[-2:] == ["T0", "T1"]


def test_bigram_backcopy_dataset_needs_a_model_trained_on_it(loaded):
    from attnlab.datasets import DATASETS

    with pytest.raises(AttnlabError, match="needs a model trained on the task"):
        DATASETS["bigram-backcopy"](loaded("llama-gqa"), 4, 0)


# ---- ZeroTuning on some query rows --------------------------------------------------------------------------------


def _pattern(m, batch, layer, iv=None):
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


@pytest.mark.parametrize("form", ["softmax", "bias"])
def test_zerotuning_query_tokens_scale_only_the_chosen_rows(loaded, form):
    m = loaded("llama-gqa")
    batch = m.encode(SHORT_SENTENCES[:2], padding_side="left")
    ids = batch.input_ids
    chosen = sorted({int(ids[0, -1]), int(ids[1, -3])})  # a few real tokens' ids
    rows = torch.isin(ids, torch.tensor(chosen)) & batch.attention_mask.bool()
    before = _pattern(m, batch, 1)
    full = _pattern(m, batch, 1, ZeroTuning(3.0, [(1, 2)], form=form).fit(m))
    for mode, sel in (("in", rows), ("not_in", ~rows & batch.attention_mask.bool())):
        iv = ZeroTuning(3.0, [(1, 2)], form=form, query_tokens=chosen, query_mode=mode).fit(m)
        after = _pattern(m, batch, 1, iv)
        assert torch.equal(after[:, [0, 1, 3]], before[:, [0, 1, 3]])  # other heads untouched
        for b in range(2):
            on = sel[b]
            assert torch.allclose(after[b, 2, on], full[b, 2, on], atol=1e-5)  # scaled rows = the full method
            off = ~on & batch.attention_mask[b].bool()
            assert torch.allclose(after[b, 2, off], before[b, 2, off], atol=1e-6)  # the others keep their attention
        for b in range(2):  # gamma > 1: more on the first token wherever it did not already hold everything
            a0, a0_new = before[b, 2, sel[b], batch.first_real[b]], after[b, 2, sel[b], batch.first_real[b]]
            assert (a0_new[a0 < 0.999] > a0[a0 < 0.999]).all() and len(a0) > 0


def test_zerotuning_query_mode_is_validated_at_fit(loaded):
    m = loaded("llama-gqa")
    iv = ZeroTuning(2.0, [(0, 0)], query_tokens=[5], query_mode="sometimes")  # the constructor only stores
    with pytest.raises(ValueError, match="query_mode"):
        iv.fit(m)
