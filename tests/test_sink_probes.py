"""Sink probes on planted attention patterns (the formulas of docs/methods/attention_sinks.md) and on the
real pretrained MiniLM."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES
from fakes import FakeCapture

import attnlab
from attnlab.models.loading import Batch
from attnlab.probes.act_sinks import ActSinks
from attnlab.probes.base import ProbeContext
from attnlab.probes.first_token_sink import FirstTokenSink
from attnlab.probes.massive_activations import MassiveActivations


def fake_model(n_layers=1, n_heads=2, causal=True):
    return SimpleNamespace(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        causal=causal,
        name="planted",
        tokens_as_text=lambda ids: [f"t{i}" for i in ids],
    )


def run_planted(probe, pattern: torch.Tensor, mask: torch.Tensor | None = None, causal=True):
    """Feed one layer's planted pattern ``[b, h, s, s]`` to a probe through its handlers."""
    b, h, s, _ = pattern.shape
    model = fake_model(n_heads=h, causal=causal)
    ctx = ProbeContext(model=model)
    cap = FakeCapture()
    probe.attach(cap, ctx)
    mask = torch.ones(b, s, dtype=torch.long) if mask is None else mask
    batch = Batch(torch.arange(s).repeat(b, 1), mask, list(range(b)))
    for fn in [h.fn for h in cap.of("rows")]:
        for start in range(0, s, 3):  # in chunks, as the engine delivers them
            q = torch.arange(start, min(s, start + 3))
            fn(0, pattern[:, :, q, :], q, batch)
    for fn in [h.fn for h in cap.of("attention")]:  # the eager path's view of the planted pattern
        from attnlab.lse import AttentionView, ScoreSpec

        qk = torch.zeros(b, h, s, 4)
        fn(0, AttentionView(qk, qk, ScoreSpec(1.0, causal, key_mask=mask), pattern=pattern), batch)
    for fn in [h.fn for h in cap.of("batch_end")]:
        fn(batch, None)
    return {r.name: r for r in probe.results(ctx)}


def causal_uniform(s):
    return torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]


def only_first(s):
    a = torch.zeros(s, s)
    a[:, 0] = 1
    return a


def test_head_on_first_token_only():
    s = 10
    pattern = torch.stack([only_first(s), causal_uniform(s)])[None]  # head 0 planted sink, head 1 uniform
    res = run_planted(FirstTokenSink(), pattern)
    assert res["first_token_sink"].scores[0, 0] == pytest.approx(1.0)
    expected_uniform = np.mean([1 / (i + 1) for i in range(1, s)])
    assert res["first_token_sink"].scores[0, 1] == pytest.approx(expected_uniform)

    act = ActSinks()
    res = run_planted(act, pattern)
    assert res["act_first_score"].scores[0, 0] == pytest.approx(1.0)
    assert res["act_hidden_sinks"].scores[0, 0] == 0  # all other score_j are 0


def test_act_scores_of_uniform_attention_match_the_formula():
    s = 8
    probe = ActSinks()
    model = fake_model()
    probe.attach(FakeCapture(), ProbeContext(model=model))
    pattern = causal_uniform(s)[None, None].expand(1, 2, s, s)
    colsum = pattern.sum(2)
    batch = Batch(torch.zeros(1, s, dtype=torch.long), torch.ones(1, s, dtype=torch.long), [0])
    scores = probe.key_scores(colsum, batch)[0, 0]
    for j in range(s):
        expected = sum(1 / (i + 1) for i in range(j, s)) / (s - j)
        assert scores[j].item() == pytest.approx(expected)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_planted_hidden_sink_is_found_and_first_token_never_is():
    s = 12
    a = torch.zeros(s, s)
    a = causal_uniform(s)
    for i in range(5, s):  # once visible, token 5 takes half of every query's attention; the rest stays uniform
        a[i] *= 0.5
        a[i, 5] += 0.5
    res = run_planted(ActSinks(threshold=0.4), a[None, None])
    tokens = res["act_sink_tokens_0"]
    assert tokens.marks["hidden_sink"] == [5]
    assert 0 not in tokens.marks["hidden_sink"]
    assert res["act_hidden_sinks"].scores[0, 0] == pytest.approx(1.0)


def test_left_padding_equals_unpadded_on_planted_patterns():
    s, pad = 7, 3
    base = torch.stack([only_first(s), causal_uniform(s)])[None]
    padded = torch.zeros(1, 2, s + pad, s + pad)
    padded[:, :, pad:, pad:] = base
    mask = torch.tensor([[0] * pad + [1] * s])
    for probe_cls in (FirstTokenSink, ActSinks):
        a = run_planted(probe_cls(), base)
        b = run_planted(probe_cls(), padded, mask=mask)
        for name, r in a.items():
            if hasattr(r, "scores"):
                np.testing.assert_allclose(r.scores, b[name].scores, atol=1e-6)


def test_detection_never_modifies_the_pattern():
    pattern = torch.stack([only_first(6), causal_uniform(6)])[None]
    before = pattern.clone()
    run_planted(ActSinks(), pattern)
    run_planted(FirstTokenSink(n_sink_tokens=2), pattern)
    assert torch.equal(pattern, before)


def test_massive_activation_detector_thresholds():
    probe = MassiveActivations()
    x = torch.full((1, 1, 101), 0.2)
    x[..., 7] = 2000.0
    _, _, massive = probe.flags(x)
    assert massive[0, 0].nonzero().flatten().tolist() == [7]
    y = torch.ones((1, 1, 101))
    y[..., 3] = 150.0  # above 100 but only 150x the median
    assert not probe.flags(y)[2].any()


def test_minilm_cls_sink_and_hidden_sinks():
    m = attnlab.load("minilm")
    res = attnlab.scan(m, "sinks", SHORT_SENTENCES, progress=False)
    sink = res["first_token_sink"].scores
    middle = sink[1 : m.n_layers - 1]
    assert (middle > 0.5).mean() > 0.5, "most middle-layer heads should put over half their attention on [CLS]"
    hidden = res["act_hidden_sinks"].summary["hidden_sink_tokens"]
    top = max(hidden, key=hidden.get)
    assert top in ("[SEP]", ".", ",", ";"), f"strongest hidden sink is {top!r}"
    marks = res["act_sink_tokens_0"].marks["hidden_sink"]
    assert marks and min(marks) > 0


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen2", "bert", "llava"])
def test_every_probe_runs_on_each_architecture(loaded, name):
    from attnlab.datasets.base import PromptSet

    m = loaded(name)
    if m.modality == "vision-language":
        from PIL import Image

        prompts = PromptSet(
            name="img",
            texts=["<image>\nIs there a red square?", "<image> Describe it."],
            images=[Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (48, 40), (0, 0, 255))],
        )
    else:
        prompts = SHORT_SENTENCES[:3]
    res = attnlab.scan(m, "sinks,induction", prompts, progress=False, batch_size=2)
    for key in (
        "first_token_sink",
        "act_first_score",
        "act_hidden_sinks",
        "previous_token",
        "duplicate_token",
        "induction",
    ):
        scores = res[key].scores
        assert scores.shape == (m.n_layers, m.n_heads)
        assert np.isfinite(scores).all(), key
    assert ((res["first_token_sink"].scores >= 0) & (res["first_token_sink"].scores <= 1 + 1e-6)).all()
    assert res["massive_activations_0"].values.shape[0] == m.n_layers
