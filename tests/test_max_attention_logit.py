"""max_attention_logit equals the largest masked ``q . k * scaling`` recorded inside the HF model's own attention
call (an attention function registered with transformers' AttentionInterface sees the exact q, k, mask and scale
the model uses), on tiny GPT-2, Llama-GQA and Qwen2, with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab import lse
from attnlab.probes.max_attention_logit import MaxAttentionLogit

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The cat sat on the mat and the dog sat too.", "Paris is in France.", "One two three four five six."]


def recorded_max_logits(hf, batch):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recorder(module, query, key, value, attention_mask, scaling=None, **kwargs):
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        s = (query.double() @ k.double().transpose(-1, -2)) * scaling
        visible = torch.ones_like(s, dtype=torch.bool)
        if attention_mask is not None:
            visible = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
        else:
            visible = torch.tril(visible)
        real_q = batch.attention_mask.bool()[:, None, :, None]
        seen.append(s.masked_fill(~(visible & real_q), -1e30).amax((-2, -1)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("attnlab_test_recorder", recorder)
    hf.set_attn_implementation("attnlab_test_recorder")
    with torch.no_grad():
        hf(batch.input_ids, attention_mask=batch.attention_mask)
    return torch.stack(seen, 1).amax(0).numpy()  # [layers, heads] over prompts


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
@pytest.mark.parametrize("attention", ["eager", "fused", "fused-rows"])
def test_max_logit_equals_the_models_own_scores(loaded, checkpoint_dir, arch, attention, monkeypatch):
    from transformers import AutoModelForCausalLM

    if attention == "fused-rows":  # no kept block: rows streamed in chunks of 4
        monkeypatch.setattr(lse, "DENSE_BUDGET", 0)
        attention = "fused"
    model = loaded(arch)
    got = attnlab.scan(model, MaxAttentionLogit(), PROMPTS, progress=False, attention=attention, chunk_size=4)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir / arch).eval()
    batch = model.encode(PROMPTS)
    want = recorded_max_logits(hf, batch)
    np.testing.assert_allclose(got["max_attention_logit"].scores, want, rtol=1e-5, atol=1e-4)
