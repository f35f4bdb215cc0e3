"""Head ablation, batched exact scores, attribution patching and the causal test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.ablation.causal_test import causal_test, random_head_sets
from attnlab.ablation.evaluators import niah_evaluator
from attnlab.ablation.head_ablation import HeadAblation, NotFittedError, uniform_pattern
from attnlab.ablation.metrics import AnswerTokens, LogitDifference
from attnlab.ablation.scores import ablation_scores, exact_ablation_grid, loop_ablation_grid
from attnlab.heads.results import HeadScores
from attnlab.hooks import attn_hook, block_hook
from attnlab.stats import spearman

PROMPTS = ["The cat sat on the mat, and the dog", "Paris is the capital of France; Berlin is", "One two three four"]
ANSWERS = [" sat on", " the capital", " five"]


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("mode", ["zero", "mean", "uniform"])
def test_batched_equals_per_head_loop(loaded, arch, mode):
    model = loaded(arch)
    metric = AnswerTokens(ANSWERS)
    batched, clean = exact_ablation_grid(
        model, PROMPTS, metric, mode=mode, max_batch=5
    )  # 5 rows: heads split across forwards
    loop, clean_loop = loop_ablation_grid(model, PROMPTS, metric, mode=mode)
    np.testing.assert_allclose(batched, loop, atol=1e-4, rtol=0)
    np.testing.assert_allclose(clean, clean_loop, atol=1e-4, rtol=0)
    assert np.nanmax(np.abs(clean.mean() - batched)) > 1e-4  # the ablations did something


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_batched_logit_diff_and_resample_equal_loop(loaded, arch):
    model = loaded(arch)
    metric = LogitDifference([" sat", " the", " five"], [" dog", " Rome", " six"])
    a, _ = exact_ablation_grid(model, PROMPTS, metric, mode="zero", max_batch=64)
    b, _ = loop_ablation_grid(model, PROMPTS, metric, mode="zero")
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    same_len = ["The cat sat on the mat.", "The dog sat on the log.", "Rome is in Italy, not France."]
    batch = model.encode(same_len)
    longer = [
        "Paris is the capital of France; Berlin is the capital of Germany.",
        "One two three four five six seven eight nine ten.",
        "The quick brown fox jumps over the lazy dog today.",
    ]
    reference = model.batch_from_ids([model.token_ids(p)[: batch.seq_len] for p in longer], [0, 1, 2])
    assert reference.seq_len == batch.seq_len
    metric = lambda logits, b: logits[torch.arange(logits.shape[0]), -1].log_softmax(-1)[:, 5]
    a, _ = exact_ablation_grid(model, same_len, metric, mode="resample", reference=reference, max_batch=6)
    b, _ = loop_ablation_grid(model, same_len, metric, mode="resample", reference=reference)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def _run(model, batch, hooks=()):
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=list(hooks)):
        return model.forward(batch)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_zeroing_all_heads_of_a_layer_equals_zeroing_its_attention_output(loaded, arch):
    model = loaded(arch)
    batch = model.encode(PROMPTS)
    o_proj_bias = {}

    def keep_bias(out, hook=None):  # with every z zero the attention output is just the o_proj bias (GPT-2)
        o_proj_bias["b"] = out.detach().clone()

    abl = HeadAblation([(0, h) for h in range(model.n_heads)], mode="zero").fit(model)
    with abl.apply(model, batch):
        ablated = _run(model, batch, [(block_hook(0, "hook_attn_out"), keep_bias)])
    attn_out = o_proj_bias["b"]
    assert torch.allclose(attn_out, attn_out[:1, :1].expand_as(attn_out), atol=1e-6)  # constant: no head contributes
    const = attn_out[:1, :1].clone()
    zeroed = _run(model, batch, [(block_hook(0, "hook_attn_out"), lambda x, hook=None: const.expand_as(x).clone())])
    clean = _run(model, batch)
    mask = batch.attention_mask.bool()
    assert (ablated - zeroed)[mask].abs().max() < 1e-4
    assert (ablated - clean)[mask].abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_mean_ablation_with_itself_as_reference_and_empty_set_are_identity(loaded, arch):
    model = loaded(arch)
    batch = model.encode(PROMPTS[:1])
    clean = _run(model, batch)
    abl = HeadAblation([(0, 1), (1, 2)], mode="mean", per_position=True).fit(model, batch)
    with abl.apply(model, batch):
        same = _run(model, batch)
    assert (same - clean).abs().max() < 1e-5
    with HeadAblation([], mode="zero").fit(model).apply(model, batch):
        assert (_run(model, batch) - clean).abs().max() == 0
    pooled = HeadAblation([(0, 1), (1, 2)], mode="mean").fit(model, batch)  # mean over positions: not identity
    with pooled.apply(model, batch):
        assert (_run(model, batch) - clean).abs().max() > 1e-4


def test_gqa_query_head_ablation_touches_only_its_slice(loaded):
    model = loaded("llama-gqa")
    assert model.n_kv_heads < model.n_heads
    batch = model.encode(PROMPTS)
    seen = {}

    def observe(z, hook=None):
        seen["z"] = z.detach().clone()

    _run(model, batch, [(attn_hook(1, "hook_z"), observe)])
    clean_z = seen["z"]
    for mode in ("zero", "uniform"):
        abl = HeadAblation([(1, 1)], mode=mode).fit(model)
        with abl.apply(model, batch):
            _run(model, batch, [(attn_hook(1, "hook_z"), observe)])
        changed = (seen["z"] - clean_z).abs().amax(dim=(0, 1, 3))
        assert changed[1] > 1e-4 and torch.all(changed[[0, 2, 3]] == 0), (
            mode,
            changed,
        )  # head 0 shares head 1's KV group


def test_uniform_pattern_excludes_padding_and_is_mean_of_values(loaded):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    w = uniform_pattern(mask, 2, 4)
    assert torch.allclose(w[0, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0]))
    assert torch.allclose(w[1, 1], torch.tensor([0.5, 0.5, 0, 0]))
    model = loaded("llama-gqa")
    batch = model.encode(PROMPTS[:2])  # right-padded
    got = {}
    hooks = [
        (attn_hook(0, "hook_v"), lambda v, hook=None: got.__setitem__("v", v.detach().clone())),
        (attn_hook(0, "hook_z"), lambda z, hook=None: got.__setitem__("z", z.detach().clone())),
    ]
    with HeadAblation([(0, 3)], mode="uniform").fit(model).apply(model, batch):
        _run(model, batch, hooks)
    v = got["v"][:, :, 3 // (model.n_heads // model.n_kv_heads)]
    m = batch.attention_mask.float()[:, :, None]
    expected = (v * m).cumsum(1) / m.cumsum(1)
    real = batch.attention_mask.bool()
    assert torch.allclose(got["z"][:, :, 3][real], expected[real], atol=1e-5)


def test_not_fitted_and_bad_parameters(loaded):
    model = loaded("gpt2")
    with pytest.raises(NotFittedError):
        with HeadAblation([(0, 0)]).apply(model):
            pass
    with pytest.raises(ValueError, match="mode"):
        HeadAblation([(0, 0)], mode="bogus").fit(model)
    with pytest.raises(ValueError, match="grid"):
        HeadAblation([(5, 0)]).fit(model)
    with pytest.raises(ValueError, match="reference"):
        HeadAblation([(0, 0)], mode="mean").fit(model)


def test_attribution_patching_correlates_with_exact_scores(loaded):
    model = loaded("llama-gqa")
    result = ablation_scores(model, PROMPTS, AnswerTokens(ANSWERS), mode="zero", attribution=True)
    assert isinstance(result, HeadScores) and result.scores.shape == (model.n_layers, model.n_heads)
    assert result.summary["atp_spearman"] > 0.5
    assert spearman(result.extra["atp"], result.scores) == result.summary["atp_spearman"]
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_random_head_sets_exclude_top_and_are_seeded():
    top = [(0, 1), (2, 3)]
    a = random_head_sets(4, 6, 2, top, n_seeds=5, seed=3)
    assert a == random_head_sets(4, 6, 2, top, n_seeds=5, seed=3)
    assert all(h not in top for s in a for h in s) and all(len(set(s)) == 2 for s in a)
    lm = random_head_sets(4, 6, 2, top, n_seeds=5, seed=3, layer_matched=True)
    assert all(sorted(l for l, _ in s) == [0, 2] for s in lm)


def _needle_mass_hook(grid: np.ndarray, l: int, span: tuple[int, int]):
    """Pattern hook adding each head's attention from the last query to the key positions ``span`` into ``grid[l]``."""

    def add(p, hook=None):
        grid[l] = grid[l] + p[0, :, -1, span[0] : span[1]].sum(-1).float().numpy()

    return add


def _needle_attention(model, trials) -> np.ndarray:
    """Retrieval proxy: mean attention from the answer-predicting position to the needle's code tokens."""
    from attnlab.datasets.niah import needle_token_span

    grid = np.zeros((model.n_layers, model.n_heads))
    for t in trials:
        ids = model.token_ids(t.prompt)
        span = needle_token_span(ids, model.tokenizer(" " + t.answer, add_special_tokens=False)["input_ids"])
        assert span is not None
        batch = model.batch_from_ids([ids], [0])
        hooks = [
            (
                attn_hook(l, "hook_pattern"),
                _needle_mass_hook(grid, l, span),
            )
            for l in range(model.n_layers)
        ]
        _run(model, batch, hooks)
    return grid / len(trials)


def test_organism_lm_needle_heads_matter_more_than_random_heads():
    """Zeroing the needle-attending heads of the most retrieval-like layer breaks NIAH; random heads do not."""
    import attnlab
    from attnlab.datasets.niah import build_niah_trials

    torch.set_num_threads(1)
    model = attnlab.load("organism-lm")
    proxy = _needle_attention(model, build_niah_trials(model.tokenizer, (200,), (20, 60), seed=11))
    layer = int(np.argmax(proxy.max(1)))
    masked = np.full_like(proxy, np.nan)
    masked[layer] = proxy[layer]
    scores = HeadScores(masked, name="needle_attention", probe="test")
    evaluate = niah_evaluator(model, lengths=(160, 288), depths=(10, 50, 90), trials_per_cell=1, seed=1)
    table = causal_test(scores, 4, evaluate, n_seeds=3, seed=0).set_index("condition")
    print(
        f"\nneedle layer {layer}; proxy max {proxy.max():.2f}\n"
        f"{table[['metric', 'ci_low', 'ci_high', 'drop', 'p_value', 'heads']]}"
    )
    assert table.loc["baseline", "metric"] >= 0.8
    assert table.loc["top_k", "drop"] >= 0.5
    assert table.loc["random", "drop"] <= 0.2


def test_cli_ablate_rejects_malformed_heads_spec(tmp_path, capsys):
    from attnlab.cli import main

    assert main(["ablate", "--model", "organism-lm", "--heads", "no-colon-here", "--out", str(tmp_path)]) == 2
    assert "RUN_DIR:result_name" in capsys.readouterr().err


class _IdsMetric:
    """Mean next-token log-prob per row on fixed, equal-length token ids (no padding: TransformerLens' patching
    runs ``run_with_hooks(tokens)`` without an attention mask)."""

    name = "next_token_logprob"

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def encode(self, model, prompts):
        return model.batch_from_ids(self.ids.tolist(), list(range(len(prompts))))

    def __call__(self, logits, batch=None):
        ids = self.ids.to(logits.device)[torch.as_tensor(batch.prompt_indices) if batch is not None else slice(None)]
        return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].mean(-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_equals_transformer_lens_patching(loaded, arch, mode):
    """Our batched exact scores equal TransformerLens' own per-head patching (``get_act_patch_attn_head_out_all_pos``,
    one forward per head) when the patched-in "clean" z is zero or the reference mean."""
    from transformer_lens import patching

    model = loaded(arch)
    n = min(len(model.token_ids(p)) for p in PROMPTS)
    ids = torch.tensor([model.token_ids(p)[:n] for p in PROMPTS])
    metric = _IdsMetric(ids)
    batched, clean = exact_ablation_grid(model, PROMPTS, metric, mode=mode, max_batch=7)
    abl = HeadAblation(mode=mode).fit(
        model, metric.encode(model, PROMPTS) if mode == "mean" else None, layers=range(model.n_layers)
    )
    shape = (len(PROMPTS), n, model.n_heads, model.d_head)
    cache = {
        attn_hook(l, "hook_z"): torch.zeros(shape)
        if mode == "zero"
        else abl.means_[l][None, None].expand(shape).clone()
        for l in range(model.n_layers)
    }
    with torch.no_grad():
        tl = patching.get_act_patch_attn_head_out_all_pos(
            model.bridge, ids, cache, lambda logits: metric(logits), reduce="mean"
        )
    assert tl.shape == (model.n_layers, model.n_heads)
    np.testing.assert_allclose(batched, tl.cpu().numpy(), atol=1e-4, rtol=0)
    assert np.abs(clean.mean() - batched).max() > 1e-3  # the heads matter: the comparison is not vacuous


SAME_LEN = ["The cat sat on the mat.", "The dog sat on the log."]


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_clean_attention_reuse_equals_per_head_loop(loaded, arch, mode, monkeypatch):
    """The default path reuses the ablated layer's clean attention (rank-one W_O correction) and runs the last
    layer's queries only at the read positions; it equals the per-head loop, padded (explicit mask) or not
    (mask None: the restricted queries build their own causal rows)."""
    import attnlab.ablation.scores as scores_mod
    import attnlab.fused as fused_mod

    calls = {"reuse": 0, "queries": 0, "masks": set()}
    reuse, queries = scores_mod._clean_attention_forward, fused_mod.attention_at_queries

    def spy_reuse(*a, **k):
        calls["reuse"] += 1
        return reuse(*a, **k)

    def spy_queries(module, query, key, value, attention_mask, *a, **k):
        calls["queries"] += 1
        calls["masks"].add(attention_mask is None)
        return queries(module, query, key, value, attention_mask, *a, **k)

    monkeypatch.setattr(scores_mod, "_clean_attention_forward", spy_reuse)
    monkeypatch.setattr(fused_mod, "attention_at_queries", spy_queries)
    model = loaded(arch)
    for prompts, metric in (
        (PROMPTS, AnswerTokens(ANSWERS)),
        (SAME_LEN, LogitDifference([" The", " The"], [" cat", " dog"])),
    ):
        new, clean = exact_ablation_grid(model, prompts, metric, mode=mode, max_batch=5)
        loop, _ = loop_ablation_grid(model, prompts, metric, mode=mode)
        np.testing.assert_allclose(new, loop, atol=1e-4, rtol=0)
        assert np.nanmax(np.abs(clean.mean() - new)) > 1e-3  # the heads matter: not vacuous
    assert calls["reuse"] > 0 and calls["queries"] > 0
    assert calls["masks"] == {True, False}, calls["masks"]  # both mask branches of the query-restricted attention ran


def test_clean_attention_reuse_falls_back_where_it_does_not_apply(loaded, monkeypatch):
    """Post-norm BERT (attention output = LayerNorm(dense(z) + x), not linear in z), the eager and uniform paths
    and ``reuse_attention=False`` never take the reuse path; the previous path gives the same scores."""
    import attnlab.ablation.scores as scores_mod

    calls = []
    monkeypatch.setattr(scores_mod, "_clean_attention_forward", lambda *a, **k: calls.append(1))
    bert = loaded("bert")
    with pytest.warns(UserWarning, match="does not reproduce"):
        exact_ablation_grid(bert, PROMPTS[:2], AnswerTokens(ANSWERS[:2]), mode="zero", max_batch=8)
    model = loaded("llama-gqa")
    for kw in ({"attention": "eager"}, {"reuse_attention": False}, {"mode": "uniform"}):
        exact_ablation_grid(model, PROMPTS, AnswerTokens(ANSWERS), **{"mode": "zero", **kw})
    assert calls == []
    monkeypatch.undo()
    new, _ = exact_ablation_grid(model, PROMPTS, AnswerTokens(ANSWERS), mode="zero")
    old, _ = exact_ablation_grid(model, PROMPTS, AnswerTokens(ANSWERS), mode="zero", reuse_attention=False)
    np.testing.assert_allclose(new, old, atol=1e-4, rtol=0)


def test_bert_scores_equal_the_loop_through_the_prefix_check(loaded):
    """On BERT the bridge's start_at_layer path does not reproduce the clean run; the grid notices (one checked
    partial forward), says so, and falls back to full forwards, so the scores still equal the per-head loop."""
    model = loaded("bert")
    metric = AnswerTokens(ANSWERS[:2])
    with pytest.warns(UserWarning, match="does not reproduce the clean run"):
        batched, clean = exact_ablation_grid(model, PROMPTS[:2], metric, mode="zero", max_batch=8)
    loop, clean_loop = loop_ablation_grid(model, PROMPTS[:2], metric, mode="zero")
    np.testing.assert_allclose(batched, loop, atol=1e-4, rtol=0)
    assert (
        np.nanmax(np.abs(loop - clean_loop.mean())) > 1e-3
    )  # the ablations move the metric by more than the tolerance
