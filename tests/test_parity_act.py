"""Parity: ACT (Yu et al. 2024) sink scores and calibration against an independent computation on plain
``transformers`` (eager attention; calibration applied in a registered attention function, as the reference edits
its attention forward). The reference's documented behaviour: per head and sequence,
``score_j = sum_{i >= j} A[i, j] / (N - j)``, sinks ``S = {j > 0: score_j > threshold}`` (position 0 removed), then
``A'[i, s] = beta A[i, s]`` on S and the freed mass spread over the other keys in proportion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES
from parity_ref import attentions, edited_attention, load_hf, logits

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.interventions.act import ACT
from attnlab.probes.act_sinks import ActSinks

pytestmark = pytest.mark.usefixtures("one_thread")
THRESHOLD = 0.1


def ref_scores(a: torch.Tensor) -> torch.Tensor:
    """``[H, N]`` ACT score of every key of a causal map ``[H, N, N]``."""
    n = a.shape[-1]
    return a.sum(-2) / torch.arange(n, 0, -1, dtype=a.dtype)


def ref_calibrate(p: torch.Tensor, threshold: float, beta: float) -> torch.Tensor:
    """Calibrate one head's map ``[N, N]`` with its own sink set."""
    score = ref_scores(p[None].double())[0]
    sinks = score > threshold
    sinks[0] = False
    out = p.double().clone()
    for i in range(p.shape[0]):
        s = sinks[: i + 1]
        if not s.any():
            continue
        row = out[i, : i + 1]
        freed = (1 - beta) * row[s].sum()
        rest = row[~s].sum()
        if rest <= 0:
            continue
        new = row.clone()
        new[s] = beta * row[s]
        new[~s] = row[~s] + freed * row[~s] / rest
        out[i, : i + 1] = new
    return out.to(p.dtype)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_act_scores_equal_the_reference(loaded, checkpoint_dir, arch):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    ids = [m.token_ids(p) for p in SHORT_SENTENCES[:4]]
    first, hidden = [], []
    for seq in ids:
        sc = torch.stack([ref_scores(a) for a in attentions(hf, seq)])  # [L, H, N]
        first.append(sc[..., 0].numpy())
        hidden.append((sc[..., 1:] > THRESHOLD).sum(-1).double().numpy())
    res = attnlab.scan(m, ActSinks(threshold=THRESHOLD), PromptSet("p", token_ids=ids), batch_size=4, progress=False)
    np.testing.assert_allclose(res["act_first_score"].scores, np.mean(first, 0), rtol=0, atol=2e-6)
    np.testing.assert_allclose(res["act_hidden_sinks"].scores, np.mean(hidden, 0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_act_calibration_logits_equal_the_reference(loaded, checkpoint_dir, arch):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    heads = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads) if (l + h) % 2 == 0]
    beta, thr = 0.4, 0.05
    act = ACT(heads, beta=beta, threshold=thr, filter_heads=False).fit(m)

    def edit(layer, p, module):
        out = p.clone()
        for l, h in heads:
            if l == layer:
                out[0, h] = ref_calibrate(p[0, h], thr, beta)
        return out

    moved = 0.0
    for text in SHORT_SENTENCES[:3]:
        ids = m.token_ids(text)
        plain = logits(hf, ids)
        with edited_attention(hf, edit):
            ref = logits(hf, ids)
        with act.apply(m), torch.no_grad():
            got = m.forward(m.batch_from_ids([ids], [0]))[0].float()
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
        moved = max(moved, float((ref - plain).abs().max()))
    assert moved > 1e-3  # the calibration acted
