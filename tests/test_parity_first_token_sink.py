"""Parity: StreamingLLM's first-token sink mass against an independent computation from plain ``transformers``
(eager attention, ``output_attentions=True``, each prompt unpadded) on tiny checkpoints; attnlab runs the same
token ids batched with padding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHORT_SENTENCES
from parity_ref import attentions, load_hf

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.probes.first_token_sink import FirstTokenSink

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sink_mass(maps: list, k: int) -> np.ndarray:
    """sink_mass(l, h) = mean over rows i >= k of sum_{j < k} A[i, j] (row 0..k-1 excluded)."""
    return np.stack([a[:, k:, :k].sum(-1).mean(-1).numpy() for a in maps])


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
@pytest.mark.parametrize("k", [1, 3])
def test_first_token_sink_equals_the_reference(loaded, checkpoint_dir, arch, k):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    ids = [m.token_ids(p) for p in SHORT_SENTENCES[:4]]
    ref = np.mean([reference_sink_mass(attentions(hf, seq), k) for seq in ids], 0)
    res = attnlab.scan(m, FirstTokenSink(n_sink_tokens=k), PromptSet("p", token_ids=ids), batch_size=4, progress=False)
    got = res["first_token_sink"].scores
    assert got.shape == ref.shape == (m.n_layers, m.n_heads)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
