"""Soft injection (SITE): identity at alpha = 0, only the last prompt token moves, gradients reach theta only,
save/load round trip, data loading, and a small fit on organism-lm that must beat plain 0-shot."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.hooks import attn_hook
from attnlab.interventions.base import Intervention
from attnlab.interventions.soft_injection import SoftInjection, inject, last_occurrence, load_task

PROMPTS = ["Q: k q z\nA:", "Q: 12\nA: 13\n\nQ: 40\nA:", "Q: lamp, door, tree\nA:"]


@pytest.fixture(scope="module")
def organism():
    import attnlab

    return attnlab.load("organism-lm")


def tiny_task(n=24):
    return {"name": "succ", "train": [(str(i), str(i + 1)) for i in range(n)], "valid": [(str(i), str(i + 1)) for i in range(100, 108)]}


def fitted(model, **kw):
    params = dict(n_prompts=4, n_shots=2, n_steps=3, val_every=2, n_val=4, seed=0)
    params.update(kw)
    return SoftInjection(**params).fit(model, tiny_task())


def test_inject_operator_mixes_only_the_chosen_positions():
    z = torch.randn(2, 5, 3, 4)
    e = torch.randn(3, 4)
    alpha = torch.tensor([0.0, 0.5, 1.0])
    out = inject(z, torch.tensor([4, -1]), e, alpha)
    assert torch.equal(out[1], z[1]) and torch.equal(out[0, :4], z[0, :4])
    assert torch.equal(out[0, 4, 0], z[0, 4, 0]) and torch.allclose(out[0, 4, 2], e[2])
    assert torch.allclose(out[0, 4, 1], (z[0, 4, 1] + e[1]) / 2)


def test_last_occurrence_finds_the_cue_or_minus_one():
    ids = torch.tensor([[5, 1, 2, 7, 1, 2, 9], [3, 3, 3, 3, 3, 3, 3]])
    assert last_occurrence(ids, [1, 2]).tolist() == [5, -1]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "organism"])
def test_alpha_zero_is_the_identity(name, loaded, organism):
    m = organism if name == "organism" else loaded(name)
    si = fitted(m, alpha_scale=0.0)
    batch = m.encode(PROMPTS)
    with torch.no_grad():
        ref = m.forward(batch)
        with si.apply(m):
            out = m.forward(batch)
        si.theta_ = np.full_like(si.theta_, -np.inf)  # the theta -> -inf form, at full scale
        si.alpha_scale = 1.0
        with si.apply(m):
            out2 = m.forward(batch)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(out2, ref, atol=1e-5)
    si.theta_ = np.zeros_like(si.theta_)  # a real injection must change the output (the hook is live)
    with torch.no_grad(), si.apply(m):
        assert not torch.allclose(m.forward(batch), ref, atol=1e-3)


def test_only_the_last_prompt_token_is_injected(organism):
    m = organism
    si = fitted(m)
    si.theta_ = np.full_like(si.theta_, 3.0)
    # the prompt followed by a generated answer: only the prompt's last token (the cue's end) may change in z
    batch = m.encode(["Q: 40\nA: 41", "Q: k q z\nA:"], padding_side="right")
    ids = batch.input_ids
    ends = [m.token_ids("Q: 40\nA:").__len__() - 1, int(batch.lengths[1]) - 1]
    seen = {}

    def grab(tag):
        def hook(z, hook=None):
            seen[tag] = z.detach().clone()

        return hook

    name = attn_hook(0, "hook_z")
    with torch.no_grad():
        with m.bridge.hooks(fwd_hooks=[(name, grab("clean"))]):
            m.forward(batch)
        with si.apply(m), m.bridge.hooks(fwd_hooks=[(name, grab("inj"))]):
            m.forward(batch)
    diff = (seen["inj"] - seen["clean"]).abs().amax(dim=(-1, -2))  # [batch, seq]
    for b, p in enumerate(ends):
        assert diff[b, p] > 1e-3
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[p] = False
        assert diff[b, others].max() == 0
    # a KV-cached decoding step (new tokens only, no cue) is left alone
    one = m.encode(["lamp"])
    with torch.no_grad():
        ref = m.forward(one)
        with si.apply(m):
            assert torch.equal(m.forward(one), ref)


def test_gradients_reach_theta_only(organism):
    m = organism
    before = {n: p.detach().clone() for n, p in m.bridge.named_parameters()}
    flags = {n: p.requires_grad for n, p in m.bridge.named_parameters()}
    si = fitted(m, n_steps=4, select="last")
    assert not np.allclose(si.theta_, 0.0)  # theta moved (the last theta is kept)
    for n, p in m.bridge.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n]
    assert si.e_bar_.shape == (m.n_layers, m.n_heads, 32)
    again = SoftInjection(n_prompts=4, n_shots=2, n_steps=0, seed=0).fit(m, tiny_task())
    assert np.array_equal(again.e_bar_, si.e_bar_)  # seeded prompt sampling


def test_save_load_round_trip(organism, tmp_path):
    m = organism
    si = fitted(m)
    si.save(tmp_path / "si")
    back = Intervention.load(tmp_path / "si")
    assert isinstance(back, SoftInjection) and back.get_params() == si.get_params()
    batch = m.encode(PROMPTS)
    with torch.no_grad():
        with si.apply(m):
            a = m.forward(batch)
        with back.apply(m):
            b = m.forward(batch)
    assert torch.equal(a, b)
    assert back.summary()["selected_heads"] == si.summary()["selected_heads"]
    with pytest.raises(ValueError):
        back.check_disjoint(["Q: 3\nA:"])  # a train query


def test_load_task_reads_function_vector_files(tmp_path):
    rows = [{"input": f"w{i}", "output": f"W{i}"} for i in range(100)]
    f = tmp_path / "upper.json"
    f.write_text(json.dumps(rows))
    t = load_task(str(f))
    assert (len(t.train), len(t.valid), len(t.test)) == (70, 9, 21)
    assert not {x for x, _ in t.train} & {x for x, _ in t.test}
    d = tmp_path / "task"
    d.mkdir()
    (d / "train.json").write_text(json.dumps(rows[:50]))
    (d / "valid.json").write_text(json.dumps(rows[50:60]))
    t = load_task(str(d))
    assert len(t.train) == 50 and len(t.valid) == 10 and t.test == []
    (tmp_path / "bad.json").write_text(json.dumps([{"input": "a"}]))
    with pytest.raises(Exception):
        load_task(str(tmp_path / "bad.json"))


def test_injection_beats_zero_shot_on_organism(organism):
    from attnlab.interventions.evaluate import evaluate_intervention, load_data

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    m = organism
    si = SoftInjection(n_steps=20, val_every=10, n_val=16, n_prompts=12).fit(m, "icl:uppercase")
    test = load_data("icl:uppercase:test:0", n=16)
    rep = evaluate_intervention(m, si, test, n_boot=200)
    row = rep.table.set_index("metric").loc["exact_match"]
    assert row["intervened"] >= row["baseline"] + 0.3, rep.table
    assert si.summary()["best_val_loss"] < si.summary()["baseline_val_loss"]
