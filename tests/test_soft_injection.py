"""Soft injection (SITE): identity at alpha = 0, only the last prompt token moves (or the cue and the answer tokens
with ``position="answer"``), the hooked z is what ``o_proj`` maps, gradients reach theta only, e_bar deterministic,
the answer loss reduces to the first-token loss on one-token answers, save/load round trip, data loading, and small
fits on organism-lm that must beat plain 0-shot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnlab.datasets.specs import load_task
from attnlab.errors import AttnlabError
from attnlab.hooks import attn_hook, block_hook
from attnlab.interventions.base import Intervention
from attnlab.interventions.soft_injection import SoftInjection, inject, last_occurrence

PROMPTS = ["Q: k q z\nA:", "Q: 12\nA: 13\n\nQ: 40\nA:", "Q: lamp, door, tree\nA:"]


@pytest.fixture(scope="module")
def organism():
    import attnlab

    return attnlab.load("organism-lm")


def tiny_task(n=24):
    return {
        "name": "succ",
        "train": [(str(i), str(i + 1)) for i in range(n)],
        "valid": [(str(i), str(i + 1)) for i in range(100, 108)],
    }


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


@pytest.mark.parametrize(
    "name,position",
    [
        ("gpt2", "cue"),
        ("llama-gqa", "cue"),
        ("organism", "cue"),
        ("organism", "answer"),
        ("qwen2", "last"),
        ("llava", "cue"),
    ],
)
def test_alpha_zero_is_the_identity(name, position, loaded, organism):
    m = organism if name == "organism" else loaded(name)
    si = fitted(m, alpha_scale=0.0, position=position)
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


def test_answer_position_injects_the_cue_and_the_answer_tokens_only(organism):
    m = organism
    si = fitted(m, position="answer", loss="answer")
    span = si.e_span_
    assert span.shape == (2, m.n_layers, m.n_heads, m.d_head)  # answers " 1" .. " 24": at most 2 tokens
    assert np.array_equal(si.e_bar_, fitted(m).e_bar_)  # offset 0 is the spec's e_bar
    si.theta_ = np.full_like(si.theta_, 3.0)
    prompt = "Q: 40\nA:"
    cue = len(m.token_ids(prompt)) - 1
    batch = m.encode([prompt + " 41\n\nQ", prompt], padding_side="right")
    seen = {}

    def grab(tag):
        def hook(z, hook=None):
            seen[tag] = z.detach().clone()

        return hook

    name = attn_hook(0, "hook_z")  # layer 0: later layers' z also moves downstream of an injected position
    with torch.no_grad():
        with m.bridge.hooks(fwd_hooks=[(name, grab("clean"))]):
            m.forward(batch)
        with si.apply(m), m.bridge.hooks(fwd_hooks=[(name, grab("inj"))]):
            m.forward(batch)
    diff = (seen["inj"] - seen["clean"]).abs().amax(dim=(-1, -2))
    changed = (diff[0] > 1e-4).nonzero().flatten().tolist()
    assert changed == [cue, cue + 1, cue + 2], changed  # the cue and the two span offsets; not before, not after
    assert (diff[1, : cue + 1] > 1e-4).tolist() == [False] * cue + [True]
    expected = (1 - torch.sigmoid(torch.tensor(3.0))) * seen["clean"][0, cue + 2] + torch.sigmoid(
        torch.tensor(3.0)
    ) * torch.as_tensor(span[1, 0])
    assert torch.allclose(seen["inj"][0, cue + 2], expected, atol=1e-5)


def _o_proj_weight(m, layer):
    (w,) = [
        p for n, p in m.bridge.named_parameters() if f"layers.{layer}." in n and "o_proj" in n and n.endswith("weight")
    ]
    return w


def test_the_hooked_z_is_what_o_proj_maps(organism):
    """``o_proj(z')`` is the model's own attention output: with z' = z it equals the clean one (to float
    precision) and with an injection the attention output at the injected position is ``W_O z'``."""
    m = organism
    si = fitted(m)
    si.theta_ = np.full_like(si.theta_, 1.0)
    layer = 5
    w = _o_proj_weight(m, layer)
    batch = m.encode(PROMPTS, padding_side="right")
    seen = {}

    def grab(tag):
        def hook(x, hook=None):
            seen[tag] = x.detach().clone()

        return hook

    hooks = lambda tag: [
        (attn_hook(layer, "hook_z"), grab(tag + "_z")),
        (block_hook(layer, "hook_attn_out"), grab(tag + "_out")),
    ]  # noqa: E731
    with torch.no_grad():
        with m.bridge.hooks(fwd_hooks=hooks("clean")):
            m.forward(batch)
        with si.apply(m), m.bridge.hooks(fwd_hooks=hooks("inj")):
            m.forward(batch)
    for tag in ("clean", "inj"):  # "inj_z" is the mixed z' (read after the injection hook)
        z, out = seen[tag + "_z"], seen[tag + "_out"]
        assert torch.allclose(out, z.flatten(-2) @ w.T, atol=1e-4), tag
    assert not torch.allclose(seen["clean_out"], seen["inj_out"], atol=1e-3)
    z = seen["clean_z"]  # z' = z (the mix with alpha 0) gives exactly the model's own o_proj output
    same = inject(z, batch.lengths - 1, torch.randn(z.shape[2], z.shape[3]), torch.zeros(z.shape[2]))
    assert torch.equal(same, z)


def test_answer_loss_equals_first_token_loss_for_one_token_answers(organism):
    m = organism
    letters = {
        "name": "first",
        "train": [(f"{a} q z", a) for a in "abcdefghijklmnop"],
        "valid": [(f"{a} k r", a) for a in "qrstuvw"],
    }
    si = SoftInjection(n_prompts=4, n_shots=2, n_steps=0, n_val=4, loss="first_token").fit(m, letters)
    assert all(len(m.tokenizer(" " + y, add_special_tokens=False)["input_ids"]) == 1 for _, y in letters["valid"])
    theta = torch.randn(m.n_layers, m.n_heads, generator=torch.Generator().manual_seed(0))
    e = si._embeddings(m)
    with torch.no_grad():
        first = si._ce(m, letters["valid"], theta, e)
        si.loss = "answer"
        answer = si._ce(m, letters["valid"], theta, e)
        assert torch.allclose(first, answer, atol=1e-6)
        multi = [("12", "13"), ("40", "41"), ("75", "76")]  # " 13" is two tokens: the losses now differ
        si.loss = "first_token"
        first_m = si._ce(m, multi, theta, e)
        si.loss = "answer"
        assert not torch.allclose(first_m, si._ce(m, multi, theta, e), atol=1e-4)
    with pytest.raises(ValueError):
        SoftInjection(loss="all").fit(m, letters)


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
    with pytest.raises(AttnlabError, match="record 0 needs 'input' and 'output'"):
        load_task(str(tmp_path / "bad.json"))


def test_answer_injection_beats_zero_shot_on_successor(organism):
    """The numeric case the spec's first-token loss cannot fit (organism-lm copies the first digit): the answer
    variant (``position="answer"``, ``loss="answer"``) must lift held-out successor accuracy clearly."""
    from attnlab.datasets.specs import load_data
    from attnlab.interventions.evaluate import evaluate_intervention

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    m = organism
    si = SoftInjection(n_steps=10, val_every=5, n_val=16, n_prompts=8, position="answer", loss="answer").fit(
        m, "icl:successor"
    )
    rep = evaluate_intervention(m, si, load_data("icl:successor:test:0", n=24), n_boot=200)
    row = rep.table.set_index("metric").loc["exact_match"]
    assert row["intervened"] >= row["baseline"] + 0.25, rep.table
    assert si.summary()["best_val_loss"] < si.summary()["baseline_val_loss"]


def test_injection_beats_zero_shot_on_organism(organism):
    from attnlab.datasets.specs import load_data
    from attnlab.interventions.evaluate import evaluate_intervention

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    m = organism
    si = SoftInjection(n_steps=20, val_every=10, n_val=16, n_prompts=12).fit(m, "icl:uppercase")
    test = load_data("icl:uppercase:test:0", n=16)
    rep = evaluate_intervention(m, si, test, n_boot=200)
    row = rep.table.set_index("metric").loc["exact_match"]
    assert row["intervened"] >= row["baseline"] + 0.3, rep.table
    assert si.summary()["best_val_loss"] < si.summary()["baseline_val_loss"]
