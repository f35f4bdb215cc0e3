"""Parity: TransformerLens' head detector (``transformer_lens.head_detector``) in its ``abs`` form, against
TransformerLens itself on a causal model and against an independent computation on BERT, where TransformerLens
refuses (its ``abs`` branch asserts a lower-triangular pattern; a bidirectional encoder's is full).

``abs``: ``score = 1 - sum |A - P| / S`` per prompt (P the 0/1 target pattern from token ids, BOS included),
averaged over prompts; TransformerLens rounds each score to 3 decimals, attnlab does not. The ``mul`` form is
compared with TransformerLens in ``tests/test_pattern_parity.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_ref import run

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.probes.registry import PROBES

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["The cat sat on the mat. The cat sat on the mat.", "one two three one two three one two three"]


def target(name: str, ids: list[int]) -> torch.Tensor:
    s = len(ids)
    t = torch.tensor(ids)
    dup = ((t[:, None] == t[None, :]) & torch.ones(s, s, dtype=torch.bool).tril(-1)).double()
    if name == "previous_token":
        return torch.diag(torch.ones(s - 1, dtype=torch.float64), -1)
    if name == "duplicate_token":
        return dup
    ind = torch.zeros(s, s, dtype=torch.float64)
    ind[:, 1:] = dup[:, :-1]
    return ind


def abs_scores(maps, name, ids) -> np.ndarray:
    p = target(name, ids)
    s = len(ids)
    return np.stack([(1 - (a - p).abs().sum((-1, -2)) / s).numpy() for a in maps])


def scan_abs(m, name, ids):
    probe = PROBES[name](error_measure="abs")
    return attnlab.scan(m, probe, PromptSet("p", token_ids=ids), batch_size=2, progress=False)[name].scores


@pytest.mark.parametrize("name", ["previous_token", "duplicate_token", "induction"])
def test_abs_form_equals_transformer_lens_on_a_causal_model(loaded, name):
    from transformer_lens.head_detector import compute_head_attention_similarity_score

    m = loaded("gpt2")
    ids = [m.token_ids(p) for p in PROMPTS]
    tl = []
    for seq in ids:
        _, cache = m.bridge.run_with_cache(torch.tensor([seq]), remove_batch_dim=True)
        pat = target(name, seq).float()
        tl.append(
            [
                [
                    compute_head_attention_similarity_score(
                        cache[f"blocks.{l}.attn.hook_pattern"][h],
                        pat,
                        exclude_bos=False,
                        exclude_current_token=False,
                        error_measure="abs",
                    )
                    for h in range(m.n_heads)
                ]
                for l in range(m.n_layers)
            ]
        )
    got = scan_abs(m, name, ids)
    np.testing.assert_allclose(got, np.mean(tl, 0), rtol=0, atol=6e-4)  # TL rounds each score to 3 decimals


@pytest.mark.parametrize("arch", ["bert", "minilm"])
@pytest.mark.parametrize("name", ["previous_token", "induction"])
def test_abs_form_on_bert_equals_the_independent_formula(loaded, checkpoint_dir, arch, name):
    from transformers import AutoModel

    m = loaded(arch)
    hf = AutoModel.from_pretrained(m.path, attn_implementation="eager").eval()
    ids = [m.token_ids(p) for p in PROMPTS]
    ref = np.mean([abs_scores([a[0].double() for a in run(hf, seq).attentions], name, seq) for seq in ids], 0)
    np.testing.assert_allclose(scan_abs(m, name, ids), ref, rtol=0, atol=2e-6)


def test_transformer_lens_refuses_the_abs_form_on_bert(loaded):
    from transformer_lens.head_detector import compute_head_attention_similarity_score

    m = loaded("bert")
    seq = m.token_ids(PROMPTS[1])
    _, cache = m.bridge.run_with_cache(torch.tensor([seq]), remove_batch_dim=True)
    with pytest.raises(AssertionError):
        compute_head_attention_similarity_score(
            cache["blocks.0.attn.hook_pattern"][0],
            target("previous_token", seq).float(),
            exclude_bos=False,
            exclude_current_token=False,
            error_measure="abs",
        )
