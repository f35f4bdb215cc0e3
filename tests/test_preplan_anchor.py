"""Preplan / anchor probe (docs/methods/preplan_anchor.md): checks on planted attention maps with known
head groups, preplan tokens, anchors and coupled (dominated anchor, intro) pairs; smoke runs on a tiny Llama and on
organism-lm with an arithmetic problem."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import FakeCapture

import attnlab
from attnlab.datasets.reasoning import reasoning_prompt_set
from attnlab.errors import AttnlabError
from attnlab.models.loading import Batch
from attnlab.probes.base import ProbeContext
from attnlab.probes.preplan_anchor import (
    Identification,
    PreplanAnchor,
    gamma_weights,
    group_heads,
    identify,
    preplan_anchor,
    rescale_advantages,
    top_q,
)
from attnlab.probes.preplan_anchor import (
    evenly_spaced_middle_layers as middle_layers,  # (renamed: image_centric_heads has middle_half_layers)
)


def run_planted(probe, maps: torch.Tensor, prompt_len: int, *, pad: int = 0, chunk: int = 5):
    """Feed planted maps ``[layers, heads, s, s]`` of one prompt to the probe's handlers, as the engine would
    (only the handler's layers, only its query rows, in chunks); ``pad`` left-pads the sequence."""
    n_layers, n_heads, s, _ = maps.shape
    if pad:
        padded = torch.zeros(n_layers, n_heads, s + pad, s + pad)
        padded[:, :, pad:, pad:] = maps
        maps = padded
    model = SimpleNamespace(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        causal=True,
        name="planted",
        tokens_as_text=lambda ids: [f"t{i}" for i in ids],
    )
    ctx = ProbeContext(model=model, meta=[{"prompt_len": prompt_len}])
    cap = FakeCapture()
    probe.attach(cap, ctx)
    mask = torch.tensor([[0] * pad + [1] * s])
    batch = Batch(torch.arange(s + pad)[None], mask, [0])
    for site, fn, layers, queries in [(h.site, h.fn, h.layers, h.queries) for h in cap.handlers]:
        if site != "rows":
            continue
        q_all = queries(batch) if queries is not None else torch.arange(s + pad)
        for layer in range(n_layers):
            if layers is not None and layer not in layers:
                continue
            for i in range(0, len(q_all), chunk):
                q = q_all[i : i + chunk]
                fn(layer, maps[layer][None][:, :, q, :], q, batch)
    for site, fn in [(h.site, h.fn) for h in cap.handlers]:
        if site == "batch_end":
            fn(batch, None)
    return {r.name: r for r in probe.results(ctx)}


def offset_map(s: int, offset: int) -> torch.Tensor:
    """Each row attends to ``max(0, t - offset)`` (offset 0: self, 1: previous token)."""
    a = torch.zeros(s, s)
    a[torch.arange(s), (torch.arange(s) - offset).clamp(min=0)] = 1
    return a


# ---- the planted reasoning trace -----------------------------------------------------------------------------------
P, N, W = 8, 64, 10  # prompt 0..7, response 8..63
ONSETS = (15, 30)  # chunk onsets: local rows reach back to token 0 (WAAD = W)
ANCHORS = (16, 30, 47)  # columns the global heads attend to
QUIET = range(44, 51)  # WAAD constant (Delta 0): anchor 47 has no local chunk boundary before it
LOCAL_HEADS = {(0, 1), (1, 3), (0, 4)}
GLOBAL_HEADS = {(0, 0), (1, 1), (1, 4)}
MIDDLE_OFFSETS = {(0, 2): 3, (0, 3): 4, (1, 0): 5, (1, 2): 6}


def waad_target(t: int) -> float:
    if t in ONSETS:
        return float(W)
    if t in QUIET or t == 16:
        return 1.0
    if t == 14:
        return 1.2
    return 1.0 if t % 2 == 0 else 1.2


def local_map() -> torch.Tensor:
    a = offset_map(N, 1)
    for t in range(P, N):
        a[t] = 0
        w = waad_target(t)
        if w == W:
            a[t, 0] = 1
        else:  # 1 - e on t-1, e on t-2: WAAD = 1 + e
            a[t, t - 1], a[t, t - 2] = 2 - w, w - 1
    return a


def global_map() -> torch.Tensor:
    a = torch.zeros(N, N)
    for t in range(N):
        seen = [x for x in ANCHORS if x <= t]
        if seen:
            a[t, seen] = 1 / len(seen)
        else:
            a[t, 0] = 1
    return a


def planted_trace() -> torch.Tensor:
    maps = torch.zeros(2, 5, N, N)
    for l, h in LOCAL_HEADS:
        maps[l, h] = local_map()
    for l, h in GLOBAL_HEADS:
        maps[l, h] = global_map()
    for (l, h), off in MIDDLE_OFFSETS.items():
        maps[l, h] = offset_map(N, off)
    return maps


def r(positions):
    """Absolute positions -> response positions."""
    return sorted(p - P for p in positions)


def test_planted_trace_recovers_groups_preplan_anchors_and_coupled_pairs():
    n_delta = N - P - 1  # Delta undefined at the last response token
    n_fai = N - P - 10  # FAI undefined for the last H_lo tokens
    probe = PreplanAnchor(q_local=4 / n_delta, q_global=3 / n_fai)
    res = run_planted(probe, planted_trace(), P)
    heads = res["preplan_anchor_distance"]
    assert probe.selected_layers(2) == [0, 1]
    loc = {tuple(map(int, x)) for x in zip(*np.nonzero(heads.extra["local_fraction"] == 1))}
    glob = {tuple(map(int, x)) for x in zip(*np.nonzero(heads.extra["global_fraction"] == 1))}
    assert loc == LOCAL_HEADS and glob == GLOBAL_HEADS
    for (l, h), off in MIDDLE_OFFSETS.items():
        assert heads.scores[l, h] == pytest.approx(off)

    tok = res["preplan_anchor_tokens_0"]
    assert len(tok.tokens) == N - P
    waad = tok.values[tok.row_labels.index("WAAD")]
    np.testing.assert_allclose(waad, [waad_target(t) for t in range(P, N)], atol=1e-6)
    assert tok.marks["preplan"] == r([14, 15, 29, 30])  # both sides of each WAAD peak
    assert tok.marks["anchor"] == r(ANCHORS)
    assert tok.marks["coupled"] == r([16])  # low WAAD right after the chunk onset at 15
    assert tok.marks["intro"] == r([15])  # the onset: Delta_15 = 9 > Delta_14 = 8.8
    assert tok.summary["intro"] == {str(16 - P): 15 - P}
    fai = tok.values[tok.row_labels.index("FAI")]
    assert np.isnan(fai[-10:]).all() and np.isfinite(fai[:-10]).all()
    others = [i for i in range(len(fai) - 10) if i not in r(ANCHORS)]
    assert (fai[others] == 0).all()  # columns nobody attends to in their horizon
    gamma = tok.values[tok.row_labels.index("gamma (coupled)")]
    expected = np.ones(N - P)
    expected[r([30, 47])] = 1.5
    expected[r([16])] = 1.25
    expected[r([15])] = 1.25
    np.testing.assert_allclose(gamma, expected)


def test_planted_trace_is_the_same_with_left_padding_and_other_chunks():
    probe_args = dict(q_local=0.1, q_global=0.1)
    a = run_planted(PreplanAnchor(**probe_args), planted_trace(), P)
    b = run_planted(PreplanAnchor(**probe_args), planted_trace(), P, pad=3, chunk=7)
    np.testing.assert_allclose(a["preplan_anchor_distance"].scores, b["preplan_anchor_distance"].scores, atol=1e-9)
    ta, tb = a["preplan_anchor_tokens_0"], b["preplan_anchor_tokens_0"]
    np.testing.assert_allclose(ta.values, tb.values, atol=1e-9)
    assert ta.marks == tb.marks


def test_backward_distance_self_and_previous_token_heads():
    s = 12
    maps = torch.stack(
        [offset_map(s, 0), offset_map(s, 1), torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]]
    )[None]
    res = run_planted(PreplanAnchor(q_h=0.3), maps, 1)  # response = all rows but the first
    d = res["preplan_anchor_distance"].scores[0]
    assert d[0] == 0 and d[1] == pytest.approx(1.0) and (d >= 0).all()
    assert d[2] == pytest.approx(np.mean([t / 2 for t in range(1, s)]))


def test_groups_are_disjoint_with_ceil_sizes():
    rng = np.random.default_rng(0)
    for n_heads, q_h in [(10, 0.3), (7, 0.5), (12, 0.25), (5, 0.01)]:
        d = rng.random((2, n_heads))
        d[0, 0] = d[1, 0]  # a tie
        loc, glob = group_heads(d, q_h)
        k = int(np.ceil(round(q_h * 2 * n_heads, 9)))
        assert loc.sum() == k and glob.sum() == k and not (loc & glob).any()
        assert d[loc].max() <= d[~loc].min() and d[glob].min() >= d[~glob].max()
    loc, glob = group_heads(np.array([[np.nan, 1.0, 2.0, 3.0]]), 0.5)
    assert loc.tolist() == [[False, True, True, False]] and glob.tolist() == [[False, False, True, True]]


def test_waad_of_previous_token_and_first_token_maps():
    s, p = 30, 4
    prev = run_planted(PreplanAnchor(), offset_map(s, 1)[None, None].repeat(1, 2, 1, 1), p)["preplan_anchor_tokens_0"]
    np.testing.assert_allclose(prev.values[0], 1.0)
    first = run_planted(PreplanAnchor(window=8), offset_map(s, s)[None, None].repeat(1, 2, 1, 1), p, pad=2)[
        "preplan_anchor_tokens_0"
    ]
    np.testing.assert_allclose(first.values[0], [min(t, 8) for t in range(p, s)])  # min(t - 1, W) 1-indexed
    assert (first.values[0] >= 0).all() and (first.values[0] <= 8).all()


def test_fai_band_and_empty_horizons():
    s, p = 40, 5
    a = offset_map(s, 12)  # every row looks exactly 12 back: only s = t - 12 gets attention
    res = run_planted(PreplanAnchor(h_lo=10, h_hi=15), a[None, None].repeat(1, 2, 1, 1), p)["preplan_anchor_tokens_0"]
    fai = res.values[2]
    n_r = s - p
    for i in range(n_r):
        horizon = [t for t in range(i + 10, min(n_r - 1, i + 15) + 1)]
        if not horizon:
            assert np.isnan(fai[i])
        else:  # one row of the horizon (t = s + 12) puts weight 1 on s
            assert fai[i] == pytest.approx((1 if i + 12 < n_r else 0) / len(horizon))
    assert not set(res.marks["anchor"]) & set(range(n_r - 10, n_r))
    out = run_planted(PreplanAnchor(h_lo=13, h_hi=20), a[None, None].repeat(1, 2, 1, 1), p)["preplan_anchor_tokens_0"]
    assert np.nanmax(out.values[2]) == 0  # the attended distance lies outside the horizon


def test_top_q_and_gamma_rules():
    x = np.array([1.0, 3.0, 3.0, np.nan, 0.5, 3.0])
    assert top_q(x, 1.0) == [0, 1, 2, 4, 5]
    assert top_q(x, 0.4) == [1, 2] == top_q(x.copy(), 0.4)  # ceil(0.4 * 5) = 2; ties: earlier first
    assert top_q(np.arange(10.0), 0.3) == [7, 8, 9]
    assert len(top_q(np.arange(50.0), 0.14)) == 7  # 0.14 * 50 = 7.000000000000001 in floating point, ceil = 7
    ident = Identification(
        preplan=[0, 1], anchor=[2, 5, 7], coupled=[5, 7], intro={5: 3, 7: 3}, tau_waad=0, tau_delta=0
    )
    n = 9
    assert (gamma_weights(n, ident, gamma_amp=1.0) == 1).all()
    np.testing.assert_allclose(gamma_weights(n, ident, alpha=0.0), gamma_weights(n, ident, strategy="anchor"))
    g1 = gamma_weights(n, ident, alpha=1.0, gamma_amp=2.0)
    assert g1[5] == g1[7] == 1 and g1[3] == 2 and g1[2] == 2  # intro 3 shared by two anchors counts once
    gl = gamma_weights(n, ident, strategy="local", gamma_amp=2.0)
    assert gl.tolist() == [2, 2, 1, 1, 1, 1, 1, 1, 1]


def test_advantage_rescaling_modes_and_no_gradient():
    adv = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    gamma = torch.tensor([1.5, 1.5, 1.0], requires_grad=True)
    v2 = rescale_advantages(adv, gamma)
    v1 = rescale_advantages(adv, gamma, mode="v1")
    assert v2.tolist() == [1.5, -3.0, 0.5] and v1.tolist() == [1.5, -2.0, 0.5]
    v2.sum().backward()
    assert gamma.grad is None and adv.grad.tolist() == [1.5, 1.5, 1.0]


def test_identify_domination_thresholds():
    waad = np.array([1, 1, 10, 1, 1, 1, 1, 1.0])
    fai = np.array([0, 0, 0, 1, 0, 0, 2, 0.0])
    ident = identify(waad, fai, q_global=0.25, tau_delta=1.0)
    assert ident.anchor == [3, 6] and ident.coupled == [3] and ident.intro == {3: 1}  # Delta_1 = Delta_2 = 9: earlier
    assert identify(waad, fai, q_global=0.25, tau_waad=0.5).coupled == []


def test_middle_layers():
    assert middle_layers(36) == [12, 15, 18, 21, 24]
    assert middle_layers(8) == [2, 3, 4, 5]
    assert PreplanAnchor(layers="all").selected_layers(3) == [0, 1, 2]


# ---- real models ---------------------------------------------------------------------------------------------------


def check_results(res, m, n_response):
    heads = res["preplan_anchor_distance"]
    sel = heads.summary["layers"]
    assert heads.scores.shape == (m.n_layers, m.n_heads)
    assert np.isfinite(heads.scores[sel]).all() and (heads.scores[sel] >= 0).all()
    assert np.isnan(np.delete(heads.scores, sel, axis=0)).all()
    k = int(np.ceil(round(0.3 * len(sel) * m.n_heads, 9)))
    assert heads.extra["local_fraction"].sum() == k and heads.extra["global_fraction"].sum() == k
    tok = res["preplan_anchor_tokens_0"]
    assert len(tok.tokens) == n_response
    waad = tok.values[0]
    assert np.isfinite(waad).all() and (waad >= -1e-6).all() and (waad <= 10 + 1e-6).all()
    assert len(tok.marks["preplan"]) == int(np.ceil(round(0.4 * (n_response - 1), 9)))
    assert set(tok.marks["coupled"]) <= set(tok.marks["anchor"])
    return tok


def test_smoke_tiny_llama_eager_equals_fused(loaded):
    torch.set_num_threads(1)
    m = loaded("llama-gqa")
    prompt, response = (
        "The cat sat on the mat and then it",
        " walked to the door, looked outside and came back in again to sleep on the warm mat.",
    )
    eager = preplan_anchor(m, prompt, response, attention="eager", layers="all", h_lo=2, h_hi=8)
    n_response = len(reasoning_prompt_set(m, [(prompt, response)]).token_ids[0]) - len(m.token_ids(prompt))
    tok = check_results(eager, m, n_response)
    fused = preplan_anchor(m, prompt, response, attention="fused", layers="all", h_lo=2, h_hi=8)
    np.testing.assert_allclose(
        eager["preplan_anchor_distance"].scores, fused["preplan_anchor_distance"].scores, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(tok.values, fused["preplan_anchor_tokens_0"].values, rtol=1e-4, atol=1e-4)


def test_registered_and_runs_through_scan_on_organism_lm():
    torch.set_num_threads(1)
    from attnlab.datasets.arithmetic import build_eval_problems

    m = attnlab.load("organism-lm")
    probs = build_eval_problems(2, seed=3)
    prob = probs[0]
    ps = reasoning_prompt_set(m, [(p.prompt, p.solution) for p in probs])
    assert len(ps.token_ids[0]) != len(ps.token_ids[1])  # padded batch: per-prompt response spans
    res = attnlab.scan(m, "preplan_anchor", ps, progress=False, batch_size=2)
    alone = attnlab.scan(
        m, "preplan_anchor", reasoning_prompt_set(m, [(probs[1].prompt, probs[1].solution)]), progress=False
    )
    np.testing.assert_allclose(
        res["preplan_anchor_tokens_1"].values, alone["preplan_anchor_tokens_0"].values, rtol=1e-4, atol=1e-5
    )
    n_response = ps.meta[0]["response_len"]
    tok = check_results(res.results, m, n_response)
    assert res["preplan_anchor_distance"].summary["layers"] == middle_layers(m.n_layers)
    assert "".join(tok.tokens).replace(" ", "").startswith(prob.solution.replace(" ", "")[:4])


def test_prompts_without_a_response_span_are_refused_or_scored_whole(loaded):
    m = loaded("llama-gqa")
    texts = ["one two three four five six seven eight nine ten eleven twelve", "a b c d e f g h i j k l m n o p"]
    with pytest.raises(AttnlabError, match="prompt 0 has no response to score"):
        attnlab.scan(m, "preplan_anchor", texts, progress=False, batch_size=2)
    res = attnlab.scan(m, PreplanAnchor(whole_prompts=True), texts, progress=False, batch_size=2)
    assert len(res["preplan_anchor_tokens_1"].tokens) == len(m.token_ids(texts[1]))
