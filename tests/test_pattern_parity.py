"""Previous-token, duplicate-token and induction scores equal TransformerLens' head_detector on the same inputs."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.head_detector import detect_head

import attnlab
from attnlab.datasets.base import PromptSet

TL_NAMES = {
    "previous_token": "previous_token_head",
    "duplicate_token": "duplicate_token_head",
    "induction": "induction_head",
}
PROMPTS = ["The cat sat on the mat. The cat sat on the mat.", "one two three one two three one two three"]


def _tl_scores(model, name, ids, **kw):
    per_prompt = []
    for seq in ids:
        tokens = torch.tensor([seq])
        _, cache = model.bridge.run_with_cache(tokens, remove_batch_dim=True)
        tl_pattern = eval(
            f"__import__('transformer_lens.head_detector', fromlist=['x']).get_{TL_NAMES[name]}_detection_pattern"
        )(tokens)
        per_prompt.append(
            detect_head(model.bridge, "unused", tl_pattern, cache=cache, **kw)
            if False
            else _score_with_cache(model, cache, tl_pattern, **kw)
        )
    return torch.stack(per_prompt).mean(0).numpy()


def _score_with_cache(model, cache, pattern, **kw):
    from transformer_lens.head_detector import compute_head_attention_similarity_score

    out = torch.zeros(model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]
        for h in range(model.n_heads):
            out[layer, h] = compute_head_attention_similarity_score(pat[h], pattern, **kw)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "minilm"])
@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(exclude_bos=True),
        dict(exclude_current_token=True),
        dict(exclude_bos=True, exclude_current_token=True),
    ],
)
def test_mul_scores_match_head_detector(loaded, arch, flags):
    m = loaded(arch)
    ids = [m.token_ids(p) for p in PROMPTS]
    from attnlab.probes.registry import PROBES

    probes = [PROBES[n](**flags) for n in TL_NAMES]
    res = attnlab.scan(m, probes, PromptSet(name="p", token_ids=ids), progress=False, batch_size=2)
    for name in TL_NAMES:
        ours = res[name].scores
        theirs = _tl_scores(
            m,
            name,
            ids,
            exclude_bos=flags.get("exclude_bos", False),
            exclude_current_token=flags.get("exclude_current_token", False),
            error_measure="mul",
        )
        assert abs(ours - theirs).max() < 1e-5, (name, flags)


def test_detect_head_itself_agrees_on_a_single_prompt(loaded):
    """The real detect_head entry point (it tokenizes with the bridge) on one prompt."""
    m = loaded("gpt2")
    prompt = PROMPTS[0]
    tl = detect_head(m.bridge, prompt, "induction_head").numpy()
    ids = m.bridge.to_tokens(prompt)[0].tolist()
    ours = attnlab.scan(m, "induction", PromptSet(name="p", token_ids=[ids]), progress=False)["induction"].scores
    assert abs(ours - tl).max() < 1e-5


def test_abs_measure_matches_head_detector_up_to_its_rounding(loaded):
    m = loaded("llama-gqa")
    ids = [m.token_ids(PROMPTS[1])]
    from attnlab.probes.previous_token import PreviousTokenHeads

    ours = attnlab.scan(
        m, [PreviousTokenHeads(error_measure="abs")], PromptSet(name="p", token_ids=ids), progress=False
    )["previous_token"].scores
    theirs = _tl_scores(m, "previous_token", ids, exclude_bos=False, exclude_current_token=False, error_measure="abs")
    assert abs(ours - theirs).max() <= 5e-4 + 1e-6


def test_planted_previous_token_head_scores_as_the_spec_says():
    """A perfect previous-token map scores (S-1)/S with mul (row 0 attends to itself), 1.0 excluding the current
    token."""
    from test_sink_probes import run_planted

    from attnlab.probes.previous_token import PreviousTokenHeads

    s = 9
    a = torch.zeros(s, s)
    a[0, 0] = 1
    for i in range(1, s):
        a[i, i - 1] = 1
    assert run_planted(PreviousTokenHeads(), a[None, None])["previous_token"].scores[0, 0] == pytest.approx((s - 1) / s)
    assert run_planted(PreviousTokenHeads(exclude_current_token=True), a[None, None])["previous_token"].scores[
        0, 0
    ] == pytest.approx(1.0)


def test_induction_heads_light_up_on_repeated_tokens_when_planted():
    from attnlab.models.loading import Batch
    from attnlab.probes.induction import InductionHeads

    # tokens 0..4 then the same again: an induction head at i >= 5 attends to i - 5 + 1
    s = 10
    a = torch.zeros(s, s)
    for i in range(s):
        if i >= 5:
            a[i, i - 4] = 1
        else:
            a[i, 0] = 1
    probe = InductionHeads()
    from fakes import FakeCapture
    from test_sink_probes import fake_model

    from attnlab.probes.base import ProbeContext

    cap = FakeCapture()
    ctx = ProbeContext(model=fake_model(n_heads=1))
    probe.attach(cap, ctx)
    ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    batch = Batch(ids, torch.ones_like(ids), [0])
    from attnlab.lse import AttentionView, ScoreSpec

    qk = torch.zeros(1, 1, s, 4)
    cap.of("attention")[0].fn(0, AttentionView(qk, qk, ScoreSpec(1.0), pattern=a[None, None]), batch)
    score = probe.results(ctx)[0].scores[0, 0]
    assert score == pytest.approx(5 / 10)  # rows 5..9 are perfect, rows 0..4 have nothing to copy
