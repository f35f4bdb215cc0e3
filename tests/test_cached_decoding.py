"""Cached decoding equals uncached decoding, on every generative tiny architecture and on organism-lm, with no
intervention and with each intervention that supports a KV cache (ACT, VAR); SoftPAG decoding refuses one.

These tests catch a transformers / transformer-lens pair whose bridge drops the cache (transformers 5.24 renamed
the attention modules' ``past_key_values`` argument to ``cache``): the first generated token is still right, every
later one is computed without its prefix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.interventions.act import ACT
from attnlab.interventions.softpag_lm import SoftPAGDecoding
from attnlab.interventions.var import VAR
from attnlab.models.bundled import bundled_path

GENERATIVE = ("gpt2", "llama-gqa", "qwen2", "llava")
N_NEW = 5


def prompt_inputs(m) -> dict:
    """Two right-aligned prompts (left padding, as generate wants) and, for a VLM, their images."""
    if m.modality == "vision-language":
        from PIL import Image

        rng = np.random.default_rng(0)
        ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
        b = m.encode(["<image>\nIs there a red square?", "<image> blue"], images=ims, padding_side="left")
    else:
        b = m.encode(["The cat sat on the mat.", "Paris is the capital of"], padding_side="left")
    kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
    if b.pixel_values is not None:
        kw["pixel_values"] = b.pixel_values
    return kw


def generate(m, kw: dict, *, use_cache: bool):
    """Greedy ``generate`` of the loaded model (its HF modules run through the bridge): tokens and per-step logits."""
    with torch.no_grad():
        out = m.hf_model.generate(
            **kw,
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=m.pad_token_id,
        )
    return out.sequences, torch.stack(out.logits, 1).float()


def assert_cache_exact(m, kw: dict) -> torch.Tensor:
    seq_c, log_c = generate(m, kw, use_cache=True)
    seq_u, log_u = generate(m, kw, use_cache=False)
    assert log_c.shape[1] == N_NEW
    torch.testing.assert_close(log_c, log_u, rtol=0, atol=1e-4)
    assert torch.equal(seq_c, seq_u)
    return log_u


@pytest.mark.parametrize("arch", GENERATIVE)
def test_cached_generate_equals_uncached_on_tiny_architectures(loaded, arch):
    m = loaded(arch)
    assert_cache_exact(m, prompt_inputs(m))


@pytest.mark.skipif(bundled_path("organism-lm") is None, reason="organism-lm not bundled")
def test_cached_generate_equals_uncached_on_organism_lm_plain_and_under_act():
    import attnlab

    m = attnlab.load("organism-lm")
    kw = prompt_inputs(m)
    plain = assert_cache_exact(m, kw)
    heads = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]
    act = ACT(heads, beta=0.4, sinks=(0, 3)).fit(m)
    with act.apply(m):
        steered = assert_cache_exact(m, kw)
    assert (steered - plain).abs().max() > 1e-2  # the calibration acted on every step compared


@pytest.mark.parametrize("arch", ("llama-gqa", "qwen2"))
def test_act_cached_generate_equals_uncached_on_tiny_architectures(loaded, arch):
    m = loaded(arch)
    kw = prompt_inputs(m)
    plain = assert_cache_exact(m, kw)
    heads = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]
    with ACT(heads, beta=0.3, sinks=(0, 2)).fit(m).apply(m):
        steered = assert_cache_exact(m, kw)
    assert (steered - plain).abs().max() > 1e-4


@pytest.mark.skipif(bundled_path("organism-vlm") is None, reason="organism-vlm not bundled")
def test_var_cached_generate_equals_uncached_and_edits_every_step():
    """VAR keeps the image-token mask across cached steps, so every generated token is edited as without a cache.
    (organism-vlm: the tiny LLaVA has 2 layers and VAR edits layers 2..L-2, none of them.)"""
    from test_vhr_var import shape_prompts

    import attnlab

    m = attnlab.load("organism-vlm")
    fit = shape_prompts(2, 1)
    kw = prompt_inputs(m)
    plain = assert_cache_exact(m, kw)
    var = VAR(p=0.5, tau=2.5, dim_tau=4.0).fit(m, fit)
    assert var.heads_
    with var.apply(m):
        edited = assert_cache_exact(m, kw)
    # edits reach the generated steps, not only the prefill's last position
    assert (edited[:, 1:] - plain[:, 1:]).abs().max() > 1e-4


def test_softpag_decoding_refuses_a_kv_cache(loaded):
    m = loaded("llama-gqa")
    pag = SoftPAGDecoding(heads=[(0, 0), (1, 1)], u=1.0, scale=1.0).fit(m)
    ids = prompt_inputs(m)["input_ids"][:1]
    from transformers import DynamicCache

    with pag.apply(m), torch.no_grad():
        uncached = m.bridge(ids)  # the guided logits
        assert torch.isfinite(uncached).all()
        with pytest.raises(NotImplementedError, match="KV cache"):
            m.bridge(ids, past_key_values=DynamicCache(), use_cache=True)


def test_version_check_names_both_versions(monkeypatch):
    """The load-time check warns, naming both packages' versions, when transformers is past the rename and the
    bridge does not read the new name; the installed (locked) pair passes."""
    import importlib.metadata as md

    from attnlab.models import loading

    assert loading.check_versions() is None
    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "5.25.0" if name == "transformers" else real(name))
    msg = loading.check_versions()
    import inspect

    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    if '"cache"' in inspect.getsource(AttentionBridge._update_kv_cache):
        assert msg is None
    else:
        assert msg is not None and "transformers 5.25.0" in msg and real("transformer-lens") in msg
        assert "\n" not in msg
