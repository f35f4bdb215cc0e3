"""``attnlab eval`` holds a bounded number of items whatever --n is (issue #18: ``eval --n 100000`` grew to 8 GB):
items are made, scored and reduced to counts one chunk at a time, with the same metrics as scoring one list."""

from __future__ import annotations

import pytest

from attnlab.datasets import arithmetic, niah
from attnlab.models import induction, lm


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir / "gpt2")


def test_niah_is_scored_in_bounded_chunks_with_the_same_metrics(tokenizer, monkeypatch):
    """A planted model answers a trial correctly when its code is even: exact match, per length and per depth are
    those of the whole list, while no call ever holds more than the chunk and the trials are made lazily."""
    made, seen = [0], []
    inner = niah.iter_niah_trials

    def counting(*a, **k):
        for t in inner(*a, **k):
            made[0] += 1
            yield t

    def planted(model, tok, prompts, max_new, device, batch_size=64, on_batch=None):
        assert made[0] - sum(seen) <= len(prompts)  # nothing made beyond the chunk being scored
        seen.append(len(prompts))
        return [f" {answers[p]}" if int(answers[p]) % 2 == 0 else " 000x" for p in prompts]

    grid = dict(lengths=(128, 192), depths=(0, 50, 100), trials_per_cell=5, seed=3)
    trials = niah.build_niah_trials(tokenizer, grid["lengths"], grid["depths"], trials_per_cell=5, seed=3)
    answers = {t.prompt: t.answer for t in trials}
    want_hits = [int(t.answer) % 2 == 0 for t in trials]
    monkeypatch.setattr(lm, "greedy_generate", planted)
    monkeypatch.setattr(niah, "iter_niah_trials", counting)
    whole = lm.eval_niah(None, tokenizer, "cpu", **grid)
    monkeypatch.setattr(lm, "EVAL_CHUNK", 7)
    seen.clear()
    made[0] = 0
    chunked = lm.eval_niah(None, tokenizer, "cpu", **grid)
    assert max(seen) == 7 and sum(seen) == 30
    assert chunked == whole
    assert chunked["niah_n"] == 30 and chunked["niah_exact_match"] == pytest.approx(sum(want_hits) / 30)
    for length in grid["lengths"]:
        cell = [h for h, t in zip(want_hits, trials) if t.target_length == length]
        assert chunked["niah_by_length"][str(length)] == pytest.approx(sum(cell) / len(cell))


def test_arith_streams_the_same_problems(monkeypatch):
    problems = arithmetic.build_eval_problems(20, seed=4)
    assert [p.prompt for p in arithmetic.iter_eval_problems(20, seed=4)] == [p.prompt for p in problems]
    right = {p.prompt: p for p in problems[::3]}
    sizes = []

    def planted(model, tok, prompts, max_new, device, batch_size=64, on_batch=None):
        sizes.append(len(prompts))
        return [f"Answer: {right[p].answer}" if p in right else "Answer: -1" for p in prompts]

    monkeypatch.setattr(lm, "greedy_generate", planted)
    monkeypatch.setattr(lm, "EVAL_CHUNK", 6)
    out = lm.eval_arith(None, None, "cpu", n=20, seed=4)
    assert sizes == [6, 6, 6, 2] and out["arith_accuracy"] == pytest.approx(len(right) / 20)


def test_copy_eval_in_chunks_equals_one_forward(monkeypatch):
    """organism-induction's copy task: forwards of COPY_CHUNK sequences give the one-forward means."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).eval()
    whole = induction.eval_copy(model, n=10, length=8, seed=1)
    monkeypatch.setattr(induction, "COPY_CHUNK", 3)
    chunked = induction.eval_copy(model, n=10, length=8, seed=1)
    assert chunked.keys() == whole.keys()
    for k, v in whole.items():
        assert chunked[k] == pytest.approx(v, rel=1e-5), k
