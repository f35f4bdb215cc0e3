"""SoftPAG variants (shared operator), perturbation-guided decoding on causal LMs, and the LM HeadHunter search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES

from attnlab.hooks import attn_hook
from attnlab.interventions.base import Intervention
from attnlab.interventions.headhunter import greedy_head_search
from attnlab.interventions.softpag import VARIANTS, soft_perturb, target_map
from attnlab.interventions.softpag_lm import AnswerLogprob, SoftPAGDecoding, perturbed_lm

LM_ARCHS = ("gpt2", "llama-gqa", "qwen2")


pytestmark = pytest.mark.usefixtures("one_thread")


def causal_map(b=2, h=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vis = torch.tril(torch.ones(n, n, dtype=torch.bool)).expand(b, h, n, n).clone()
    vis[1, :, :, :2] = False  # row 1: two left-padding keys
    vis[1, :, :2, :] = False  # their query rows see nothing
    x = (torch.randn(b, h, n, n, generator=g) * 2).masked_fill(~vis, float("-inf"))
    a = torch.softmax(x, -1).nan_to_num(0.0)
    q, k = torch.randn(b, h, n, 4, generator=g), torch.randn(b, h, n, 4, generator=g)
    return a, vis, q, k


# ---- the shared operator ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 1.0])
def test_variant_rows_sum_to_one_endpoints_and_causal_validity(variant, u):
    a, vis, q, k = causal_map()
    kw = dict(visible=vis, q=q, k=k, causal=True)
    out = soft_perturb(a, u, variant, **kw)
    live = vis.any(-1)  # rows that see at least one key
    torch.testing.assert_close(out.sum(-1)[live], torch.ones(int(live.sum())), atol=1e-5, rtol=0)
    assert torch.equal(out[~live], a[~live])  # rows that see nothing (left-padding queries) are left alone
    assert (out[live.unsqueeze(-1).expand_as(vis) & ~vis] == 0).all()  # no mass on masked (future / padding) keys
    if u == 0.0:
        assert torch.equal(out, a)
    if u == 1.0:
        assert torch.equal(out, target_map(a, variant, **kw))
    if 0.0 < u < 1.0:
        assert not torch.allclose(out[live], a[live], atol=1e-4)


def test_targets_are_what_the_docstring_says():
    a, vis, q, k = causal_map()
    n = a.shape[-1]
    live = vis.any(-1)
    eye = torch.eye(n).expand_as(a)
    for v in ("identity", "fisher-rao", "slerp"):
        assert torch.equal(target_map(a, v, visible=vis)[live], eye[live])
    uni = target_map(a, "uniform", visible=vis)
    torch.testing.assert_close(uni[0, 0, 3], torch.tensor([0.25] * 4 + [0.0] * (n - 4)))  # uniform over keys <= 3
    torch.testing.assert_close(uni[1, 0, 3], torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0]))  # not over padding keys
    mx = target_map(a, "max", visible=vis)
    assert torch.equal(mx.argmax(-1)[live], a.argmax(-1)[live]) and torch.equal(
        mx.sum(-1)[live], torch.ones(int(live.sum()))
    )
    # mean-query: row i uses the running mean of queries <= i (causal), softmax over visible keys
    mq = target_map(a, "mean-query", visible=vis, q=q, k=k, causal=True)
    i = 4
    qm = q[0, 1, : i + 1].mean(0)
    torch.testing.assert_close(mq[0, 1, i, : i + 1], torch.softmax(k[0, 1, : i + 1] @ qm / 2.0, -1))
    full = target_map(a[..., :, :], "mean-query", q=q, k=k)  # non-causal (DiT): one mean over all queries, all keys
    assert torch.allclose(full[0, 0, 0], full[0, 0, -1])
    with pytest.raises(ValueError, match="mean-query"):
        target_map(a, "mean-query", visible=vis)
    with pytest.raises(ValueError):
        soft_perturb(a, 0.5, "nonsense")


# ---- guided decoding on real architectures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism():
    import attnlab

    return attnlab.load("organism-lm")


def _model(name, loaded, organism):
    return organism if name == "organism-lm" else loaded(name)


@pytest.mark.parametrize("name", LM_ARCHS + ("llava", "organism-lm"))
def test_neutral_guidance_equals_the_model(name, loaded, organism):
    m = _model(name, loaded, organism)
    batch = m.encode(SHORT_SENTENCES[:3], padding_side="right")
    heads = [(0, 1), (m.n_layers - 1, m.n_heads - 1)]
    with torch.no_grad():
        ref = m.forward(batch)
        for params in (
            dict(heads=heads, u=0.0, scale=2.0),
            dict(heads=heads, u=1.0, scale=0.0),
            dict(heads=[], u=1.0, scale=2.0),
        ):
            iv = SoftPAGDecoding(**params).fit(m)
            with iv.apply(m):
                out = m.forward(batch)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        iv = SoftPAGDecoding(heads, u=1.0, scale=2.0).fit(m)
        with iv.apply(m):
            guided = m.forward(batch)
        after = m.forward(batch)  # hook removed on exit
    assert (guided - ref).abs().max() > 1e-3
    assert torch.equal(after, ref)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_guided_logits_are_the_guidance_formula_and_padding_invariant(name, loaded):
    m = loaded(name)
    heads = [(0, 1), (1, 2)]
    batch = m.encode(SHORT_SENTENCES[:2], padding_side="right")
    single = m.encode(SHORT_SENTENCES[1:2])
    n = single.input_ids.shape[1]
    with torch.no_grad():
        clean = m.forward(batch)
        for variant in ("identity", "uniform", "mean-query", "slerp"):
            with perturbed_lm(m, heads, 0.5, variant):
                pert = m.forward(batch)
            iv = SoftPAGDecoding(heads, u=0.5, scale=1.5, variant=variant).fit(m)
            with iv.apply(m):
                guided = m.forward(batch)
                alone = m.forward(single)
            torch.testing.assert_close(guided, clean + 1.5 * (clean - pert), atol=1e-5, rtol=0)
            torch.testing.assert_close(guided[1, :n], alone[0], atol=1e-4, rtol=0)  # padding keys never attended


def test_only_selected_heads_change_in_the_perturbed_pass(loaded):
    """GQA: query head 2 of layer 1 shares its KV head with head 3, which must stay bit-identical."""
    m = loaded("llama-gqa")
    batch = m.encode(SHORT_SENTENCES[:2], padding_side="right")
    got: dict[str, torch.Tensor] = {}

    def grab(key):
        def f(x, hook=None):
            got[key] = x.detach().clone()

        return f

    sites = [(attn_hook(1, "hook_pattern"), "pattern"), (attn_hook(1, "hook_z"), "z")]
    with torch.no_grad():
        with m.bridge.hooks(fwd_hooks=[(n, grab("clean_" + k)) for n, k in sites]):
            m.forward(batch)
        with perturbed_lm(m, [(1, 2)], 1.0), m.bridge.hooks(fwd_hooks=[(n, grab("pert_" + k)) for n, k in sites]):
            m.forward(batch)
    others = [0, 1, 3]
    assert torch.equal(got["pert_pattern"][:, others], got["clean_pattern"][:, others])
    assert torch.equal(got["pert_z"][:, :, others], got["clean_z"][:, :, others])
    assert (got["pert_z"][:, :, 2] - got["clean_z"][:, :, 2]).abs().max() > 1e-4


# ---- search ----------------------------------------------------------------------------------------------------


DATA = [
    {"prompt": s.rsplit(" ", 1)[0], "label": s.rsplit(" ", 1)[1], "labels": [s.rsplit(" ", 1)[1]]}
    for s in SHORT_SENTENCES[:4]
]


def test_greedy_search_invariants_and_determinism(loaded, tmp_path):
    m = loaded("llama-gqa")
    kw = dict(u=1.0, scale=1.0, rounds=2, k=2, n_candidates=5, candidate_seed=3)
    a = SoftPAGDecoding(None, **kw).fit(m, DATA)
    b = SoftPAGDecoding(None, **kw).fit(m, DATA)
    assert a.heads_ == b.heads_ and a.history_ == b.history_
    assert len(a.heads_) == 4 and len(set(a.heads_)) == 4
    assert [tuple(p) for r in a.history_ for p in r["chosen"]] == list(a.heads_)  # grows round by round
    for r in a.history_:
        assert [s for *_, s in r["scores"]] == sorted((s for *_, s in r["scores"]), reverse=True)
        assert [list(p) for p in r["chosen"]] == [s[:2] for s in r["scores"][:2]]
    assert not {tuple(s[:2]) for s in a.history_[1]["scores"]} & set(a.heads_[:2])
    # a round-1 score is the guided answer log-prob with round-0's heads plus that head, recomputed independently
    l, h, s = a.history_[1]["scores"][-1]
    assert np.isclose(AnswerLogprob(m, DATA)(list(a.heads_[:2]) + [(l, h)], 1.0, 1.0), s, atol=1e-6)
    assert np.isclose(a.baseline_score_, AnswerLogprob(m, DATA)(), atol=1e-6)
    a.save(tmp_path / "iv")
    c = Intervention.load(tmp_path / "iv")
    assert isinstance(c, SoftPAGDecoding) and c.heads_ == a.heads_ and c.history_ == a.history_
    batch = m.encode(SHORT_SENTENCES[:2])
    with torch.no_grad():
        with a.apply(m):
            x = m.forward(batch)
        with c.apply(m):
            y = m.forward(batch)
    assert torch.equal(x, y)


def test_greedy_search_pool_and_errors():
    calls = []

    def score(hs):
        calls.append(list(hs))
        return -sum(l * 10 + h for l, h in hs)  # prefers low heads: deterministic order

    chosen, hist = greedy_head_search([(2, 0), (0, 1), (1, 1), (0, 0)], score, rounds=2, k=1)
    assert chosen == [(0, 0), (0, 1)] and len(calls) == 4 + 3
    with pytest.raises(ValueError):
        greedy_head_search([(0, 0)], score, rounds=2, k=1)
    with pytest.raises(ValueError, match="search"):
        SoftPAGDecoding(None).fit(type("M", (), {"name": "x", "n_layers": 1, "n_heads": 1})(), None)


def test_search_pool_restricted_to_layers(loaded):
    m = loaded("llama-gqa")
    iv = SoftPAGDecoding(None, rounds=1, k=1, layers=[1]).fit(m, DATA[:2])
    assert set(iv.pool_) == {(1, h) for h in range(m.n_heads)} and iv.heads_[0][0] == 1
    assert len(iv.history_[0]["scores"]) == m.n_heads


def test_cli_softpag_search_on_organism(tmp_path, capsys):
    from attnlab.cli import main

    rc = main(
        [
            "intervene",
            "--model",
            "organism-lm",
            "--method",
            "softpag",
            "--fit",
            "icl:choose_last:valid",
            "--eval",
            "icl:choose_last:test",
            "--n",
            "4",
            "--param",
            "layers=[3]",
            "--param",
            "k=1",
            "--param",
            "n_candidates=2",
            "--n-boot",
            "200",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "exact_match" in out and "softpag on organism-lm" in out
    import json

    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["fitted"]["searched"] and len(rep["fitted"]["heads"]) == 1 and rep["fitted"]["heads"][0][0] == 3
    assert rep["fit_split"]["name"].startswith("icl:choose_last:valid") and rep["eval_split"]["name"].startswith(
        "icl:choose_last:test"
    )
