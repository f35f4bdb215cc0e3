"""Parity: massive activations (Sun et al. 2024) against an independent computation on plain ``transformers``
(each decoder layer's output hidden state read by a forward hook): an activation is massive when
``|x| > abs_threshold`` and ``|x| >= ratio_threshold * median_d |x[t]|``.

Per layer attnlab reports the largest |x| and the median over prompts of the per-prompt median of the per-token
medians; the paper's plot shows the median of |x| over the whole layer output (all tokens and dimensions). The two
medians differ (on Llama-2-7B by up to about half); the flags do not depend on it (they use each token's own
median), as checked below."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES
from parity_ref import load_hf

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.probes.massive_activations import MassiveActivations

pytestmark = pytest.mark.usefixtures("one_thread")


def decoder_layers(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


@torch.no_grad()
def layer_outputs(hf, ids) -> list[torch.Tensor]:
    got = []
    hooks = [
        layer.register_forward_hook(lambda mod, a, out: got.append((out[0] if isinstance(out, tuple) else out)[0]))
        for layer in decoder_layers(hf)
    ]
    try:
        hf(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [x.double() for x in got]  # [seq, d] per layer


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
def test_massive_activations_equal_the_reference(loaded, checkpoint_dir, arch):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    ids = [m.token_ids(p) for p in SHORT_SENTENCES[:3]]
    outs = [layer_outputs(hf, seq) for seq in ids]
    abs_t, ratio_t = 0.0, 3.0  # low enough that random weights have some "massive" entries
    probe = MassiveActivations(abs_threshold=abs_t, ratio_threshold=ratio_t, n_examples=3)
    res = attnlab.scan(m, probe, PromptSet("p", token_ids=ids), batch_size=3, progress=False)
    summary = res["massive_activations_0"].summary
    for l in range(m.n_layers):
        xs = [o[l].abs() for o in outs]
        row = summary["layers"][l]
        assert row["max_abs"] == pytest.approx(max(float(x.max()) for x in xs), rel=1e-5)
        per_prompt = [float(x.median(-1).values.median()) for x in xs]
        assert row["median_abs"] == pytest.approx(float(np.median(per_prompt)), rel=1e-5)
        flagged = sum(int(((x > abs_t) & (x >= ratio_t * x.median(-1, keepdim=True).values)).any(-1).sum()) for x in xs)
        assert row["massive_positions"] == flagged
    for p, o in enumerate(outs):  # per-token largest |x| after each layer
        got = res[f"massive_activations_{p}"].values
        ref = np.stack([x.abs().max(-1).values.numpy() for x in o])
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    assert sum(r["massive_positions"] for r in summary["layers"]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("d", [7, 8, 384])
def test_flags_median_is_torch_lower_median(dtype, d):
    """``flags`` takes the CPU median by numpy's partition (float32/64) or torch (other dtypes): both give exactly
    ``torch.median``'s lower median, ties and odd/even widths included, and the same massive mask."""
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(3, 5, d, generator=g) * 10).round().to(dtype)  # rounded: many ties
    x[0, 0, 0] = 5000.0  # one massive entry
    top, med, massive = MassiveActivations(abs_threshold=100.0, ratio_threshold=10.0).flags(x)
    want = x.abs().median(dim=-1).values.float()
    assert torch.equal(med, want)
    assert torch.equal(top, x.abs().amax(dim=-1).float())
    assert massive[0, 0, 0] and int(massive.sum()) == 1
