"""Parity: RazorAttention's echo and induction scores (Tang et al. 2024) against an independent computation from
plain ``transformers`` attentions, with the paper's causal attention. Probe: BOS (where the tokenizer adds one) +
a random block of P tokens repeated; positions counted after BOS; echo mask ``E[i, j] = 1`` for ``i >= P``,
``j < i``, ``i = j (mod P)``; induction mask ``I[i, j + 1]`` for the same pairs; score = mass on the mask / S^2.

The reference code (mindspore golden-stick) recomputes ``softmax(QK^T)`` with a "causal mask" built as
``triu * -1e-5``, which masks nothing (every row then sees future keys); attnlab follows the paper (the model's own
causal attention), which is what this test checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_ref import attentions, load_hf

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.probes.razor_echo import RazorEchoInduction

pytestmark = pytest.mark.usefixtures("one_thread")


def masks(s: int, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    echo = torch.zeros(s, s, dtype=torch.float64)
    ind = torch.zeros(s, s, dtype=torch.float64)
    for i in range(period, s):
        for j in range(i):
            if (i - j) % period == 0:
                echo[i, j] = 1
                ind[i, j + 1] = 1
    return echo, ind


def reference(maps, offset: int, period: int) -> tuple[np.ndarray, np.ndarray]:
    s = maps[0].shape[-1] - offset
    e, ind = masks(s, period)
    echo = np.stack([(a[:, offset:, offset:] * e).sum((-1, -2)).numpy() / s**2 for a in maps])
    induction = np.stack([(a[:, offset:, offset:] * ind).sum((-1, -2)).numpy() / s**2 for a in maps])
    return echo, induction


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_echo_and_induction_equal_the_reference(loaded, checkpoint_dir, arch):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    rng = np.random.default_rng(0)
    bos = m.token_ids("x")[:-1]  # the tokenizer's BOS (empty for GPT-2)
    period = 7
    ids = []
    for _ in range(2):
        block = [int(t) for t in rng.choice(np.arange(10, 300), size=period, replace=False)]
        ids.append(bos + block * 3)
    refs = [reference(attentions(hf, seq), len(bos), period) for seq in ids]
    res = attnlab.scan(m, RazorEchoInduction(), PromptSet("p", token_ids=ids), batch_size=2, progress=False)
    np.testing.assert_allclose(res["razor_echo"].scores, np.mean([r[0] for r in refs], 0), rtol=0, atol=2e-7)
    np.testing.assert_allclose(res["razor_induction"].scores, np.mean([r[1] for r in refs], 0), rtol=0, atol=2e-7)
    assert res["razor_echo"].summary["n_prompts_scored"] == 2
