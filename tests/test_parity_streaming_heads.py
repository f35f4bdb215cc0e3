"""Parity: the distant attention mass of streaming heads (DuoAttention / StreamingLLM split) against an independent
computation from plain ``transformers`` attentions: for sink s and recent window r, row i's visible window is
``{0..s-1} U {i-r+1..i}`` and ``distant = mean over rows i >= s + r of the mass on keys s <= j <= i - r``, per
prompt, averaged over prompts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHORT_SENTENCES
from parity_ref import attentions, load_hf

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.probes.streaming_heads import StreamingHeads, classify_streaming

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [" ".join(SHORT_SENTENCES[:3]), " ".join(SHORT_SENTENCES[2:5]), SHORT_SENTENCES[4]]


def reference_distant(maps, sink: int, recent: int) -> np.ndarray | None:
    n = maps[0].shape[-1]
    rows = range(sink + recent, n)
    if not len(rows):
        return None
    return np.stack(
        [np.mean([a[:, i, sink : i - recent + 1].sum(-1).numpy() for i in rows], 0) for a in maps]
    )  # [L, H]


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
@pytest.mark.parametrize(("sink", "recent"), [(1, 4), (4, 8)])
def test_distant_mass_equals_the_reference(loaded, checkpoint_dir, arch, sink, recent):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    ids = [m.token_ids(p) for p in PROMPTS]
    per_prompt = [reference_distant(attentions(hf, seq), sink, recent) for seq in ids]
    ref = np.mean([x for x in per_prompt if x is not None], 0)
    res = attnlab.scan(
        m, StreamingHeads(sink=sink, recent=recent), PromptSet("p", token_ids=ids), batch_size=3, progress=False
    )
    hs = res["streaming_heads"]
    np.testing.assert_allclose(hs.scores, ref, rtol=0, atol=2e-6)
    # the full/streaming split is the recommended rule applied to these scores (GQA: max over the KV group)
    np.testing.assert_array_equal(hs.extra["full_kv_heads"], classify_streaming(hs))
