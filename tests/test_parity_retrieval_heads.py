"""Parity: retrieval heads (Wu et al. 2024) against an independent re-run of the reference procedure on plain
``transformers`` (Retrieval_Head's ``retrieval_head_detection.py``, documented behaviour): prefill the prompt but
its last token, then greedy cached decoding from that token with ``output_attentions=True``; at each step every
head's last-row argmax key j* counts ``1 / (n_e - n_s)`` when it lies in the needle span and the prompt token there
is the token just generated; decoding stops at a newline; a trial counts when rouge1 recall with Porter stemming
(the ``rouge_score`` package) of the answer by the stripped response exceeds 0.5; a head's score is the mean over
counted trials. On organism-lm attnlab's generation mode and its teacher-forced probe both equal it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_ref import load_hf

import attnlab
from attnlab.datasets.niah_set import niah_prompt_set
from attnlab.models.bundled import bundled_path
from attnlab.probes.retrieval_heads import retrieval_scores_generate, rouge1_recall

pytestmark = pytest.mark.usefixtures("one_thread")
needs_lm = pytest.mark.skipif(bundled_path("organism-lm") is None, reason="organism-lm not bundled")


@torch.no_grad()
def reference_trial(hf, tok, prompt_ids, span, answer, max_new_tokens=50):
    n_s, n_e = span
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    score = np.zeros((L, H))
    out = hf(input_ids=torch.tensor([prompt_ids[:-1]]), use_cache=True)
    past, inp, generated = out.past_key_values, prompt_ids[-1], []
    for _ in range(max_new_tokens):
        out = hf(input_ids=torch.tensor([[inp]]), past_key_values=past, use_cache=True, output_attentions=True)
        past = out.past_key_values
        inp = int(out.logits[0, -1].argmax())
        generated.append(inp)
        for l, att in enumerate(out.attentions):
            for h in range(H):
                j = int(att[0, h, -1].argmax())
                if n_s <= j < n_e and inp == prompt_ids[j]:
                    score[l, h] += 1 / (n_e - n_s)
        if "\n" in tok.decode([inp]) or inp == tok.eos_token_id:
            break
    response = tok.decode(generated, skip_special_tokens=True).strip()
    from rouge_score import rouge_scorer

    passed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(answer, response)["rouge1"].recall > 0.5
    return score, passed, response


@needs_lm
def test_generation_mode_and_probe_equal_the_reference_on_organism_lm():
    m = attnlab.load("organism-lm")
    hf = load_hf(bundled_path("organism-lm"))
    ps = niah_prompt_set(m, lengths=[96], depths=[25.0, 75.0], seed=3)
    ref_scores, ref_passed = [], []
    for ids, meta in zip(ps.token_ids, ps.meta):
        s, ok, _ = reference_trial(hf, m.tokenizer, ids[: meta["prompt_len"]], meta["needle_span"], meta["answer"])
        ref_scores.append(s)
        ref_passed.append(ok)
    assert all(ref_passed)
    ref = np.mean([s for s, ok in zip(ref_scores, ref_passed) if ok], 0)
    gen = retrieval_scores_generate(m, ps)
    np.testing.assert_allclose(gen.scores, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gen.extra["trial_scores"], np.stack(ref_scores), rtol=0, atol=1e-12)
    probe = attnlab.scan(m, "retrieval_heads", ps, progress=False)["retrieval_heads"]
    np.testing.assert_allclose(probe.scores, ref, rtol=0, atol=1e-12)  # every answer right: teacher forcing = greedy
    assert set(probe.top_heads(2)) == {(3, 10), (3, 11)}


CASES = [
    ("417", " 417\n"),
    ("walks in parks", "he walked in the park"),
    ("take a walk in Chaoyang Park and have a cup of Espresso", "walking in chaoyang parks, espresso"),
    ("records were once again broken", "the record was broken again"),
    ("Because he is a mean person", "because he's mean"),
]


@pytest.mark.parametrize(("answer", "response"), CASES)
def test_rouge_gate_equals_rouge_score_with_porter_stemming(answer, response):
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(answer, response)["rouge1"].recall
    assert rouge1_recall(answer, response) == pytest.approx(ref, abs=1e-12)


def test_stemming_flips_the_gate_for_word_answers():
    flips = [
        (a, r) for a, r in CASES if (rouge1_recall(a, r, stem=True) > 0.5) != (rouge1_recall(a, r, stem=False) > 0.5)
    ]
    assert len(flips) >= 2  # without stemming a different set of trials passes
    assert rouge1_recall("417", " 417\n", stem=True) == rouge1_recall("417", " 417\n", stem=False) == 1.0
