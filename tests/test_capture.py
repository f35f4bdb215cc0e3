"""The capture engine: eager and fused attention paths agree; GQA, padding and chunking are handled."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_ARCHS, SHORT_SENTENCES

import attnlab
from attnlab import lse
from attnlab.capture import Capture, KeptLogits, attention_rows


def _batch(m, padding_side="right"):
    if m.modality == "vision-language":
        from PIL import Image

        ims = [Image.new("RGB", (40, 40), c) for c in ((200, 0, 0), (0, 0, 200))]
        return m.encode(["<image>\nIs there a red square?", "<image> blue"], images=ims, padding_side=padding_side)
    return m.encode(SHORT_SENTENCES[:3], padding_side=padding_side)


def _collect(m, batch, attention, chunk_size=4):
    rows, zs = {}, {}
    c = Capture(m, attention=attention, chunk_size=chunk_size, progress=False)
    c.on("rows", lambda l, r, q, b: rows.setdefault(l, []).append(r.clone()))
    c.on("z", lambda l, z, b: zs.__setitem__(l, z.clone()))
    with torch.no_grad():
        logits = c.run_batch(batch)
    assert c.last_path == attention
    return logits, {l: torch.cat(v, dim=2) for l, v in rows.items()}, zs


@pytest.mark.parametrize("name", ALL_ARCHS)
@pytest.mark.parametrize("block", ["dense", "rows"])
def test_fused_path_matches_eager(loaded, name, block, monkeypatch):
    """Fused rows both ways: from a short batch's kept weights block, and computed per chunk (no block)."""
    if block == "rows":
        monkeypatch.setattr(lse, "DENSE_BUDGET", 0)
    m = loaded(name)
    batch = _batch(m)
    mask = batch.attention_mask.bool()
    le, re_, ze = _collect(m, batch, "eager")
    lf, rf, zf = _collect(m, batch, "fused")
    assert torch.allclose(le[mask], lf[mask], atol=1e-4)
    assert set(re_) == set(range(m.n_layers))
    for layer in re_:
        assert re_[layer].shape == (batch.size, m.n_heads, batch.seq_len, batch.seq_len)
        real_q = mask[:, None, :, None]
        assert torch.allclose(re_[layer] * real_q, rf[layer] * real_q, atol=1e-5)
        assert torch.allclose(ze[layer][mask], zf[layer][mask], atol=1e-5)


def test_rows_of_real_queries_sum_to_one_and_ignore_padding(loaded):
    m = loaded("llama-gqa")
    batch = _batch(m)
    _, rows, _ = _collect(m, batch, "fused")
    mask = batch.attention_mask.bool()
    r = rows[1]
    sums = r.sum(-1)  # [b, h, q]
    assert torch.allclose(sums[mask[:, None, :].expand_as(sums)], torch.ones(()), atol=1e-5)
    assert (r * (~mask)[:, None, None, :]).abs().max() == 0  # no attention on padded keys


def test_fused_path_never_builds_a_pattern(loaded):
    m = loaded("llama-gqa")
    fired = []
    c = Capture(m, attention="fused", progress=False)
    c.on("rows", lambda *a: None)
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: fired.append(hook.name)) for l in range(m.n_layers)]
    with m.bridge.hooks(fwd_hooks=hooks), torch.no_grad():
        c.run_batch(_batch(m))
    assert fired == []
    with pytest.raises(ValueError, match="fused path never builds"):
        bad = Capture(m, attention="fused", progress=False).on("pattern", lambda *a: None)
        bad.run_batch(_batch(m))


def test_auto_mode_takes_fused_path_for_long_inputs(loaded):
    m = loaded("llama-gqa")
    c = Capture(m, attention="auto", fused_min_len=8, progress=False).on("rows", lambda *a: None)
    with torch.no_grad():
        c.run_batch(m.encode(["the cat sat on the mat and the dog sat on the log"]))
    assert c.last_path == "fused"
    c.fused_min_len = 10_000
    with torch.no_grad():
        c.run_batch(m.encode(["the cat sat on the mat and the dog sat on the log"]))
    assert c.last_path == "eager"


def test_attention_rows_handles_gqa_groups():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    rows = attention_rows(q, k, torch.arange(6), scaling=8**-0.5, key_mask=None, causal=True)
    k_rep = k.repeat_interleave(2, dim=1)  # query heads 0,1 -> KV head 0; 2,3 -> KV head 1
    ref = (q @ k_rep.transpose(-1, -2)) * 8**-0.5
    ref = ref.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    assert torch.allclose(rows, ref, atol=1e-6)


def test_left_padding_gives_the_same_scores_as_unpadded(loaded):
    m = loaded("llama-gqa")
    prompts = ["the cat", "The quick brown fox jumps over the lazy dog."]
    right = attnlab.scan(m, "sinks,induction", prompts, progress=False, batch_size=2)
    single = attnlab.scan(m, "sinks,induction", prompts, progress=False, batch_size=1)
    for name in ("first_token_sink", "act_first_score", "previous_token", "induction"):
        assert abs(right[name].scores - single[name].scores).max() < 1e-5, name
    # left padding through the batch builder
    from attnlab.probes.base import ProbeContext
    from attnlab.probes.first_token_sink import FirstTokenSink

    ids = [m.token_ids(p) for p in prompts]
    probe = FirstTokenSink()
    cap = Capture(m, progress=False)
    probe.attach(cap, ProbeContext(model=m))
    with torch.no_grad():
        cap.run_batch(m.batch_from_ids(ids, [0, 1], padding_side="left"))
    assert abs(probe.results(ProbeContext(model=m))[0].scores - single["first_token_sink"].scores).max() < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llava"])
def test_kept_logits_equal_the_full_logits_at_the_kept_positions(loaded, name):
    m = loaded(name)
    batch = _batch(m)
    with torch.no_grad():
        full = Capture(m, progress=False).run_batch(batch)
        kept = Capture(m, progress=False).run_batch(batch, logit_positions=torch.tensor([1, -1]))
    assert isinstance(kept, KeptLogits) and kept.values.shape[:2] == (batch.size, 2)
    last = batch.seq_len - 1
    assert torch.allclose(kept[0, torch.tensor([1, last])], full[0, [1, last]], atol=1e-5)
    assert torch.allclose(kept[1, -1], full[1, -1], atol=1e-5)
    with pytest.raises(IndexError, match="kept only at positions"):
        kept[0, 2]


def test_batch_end_handlers_decide_which_logits_are_computed(loaded):
    m = loaded("llama-gqa")
    batch = _batch(m)
    seen = []
    c = Capture(m, progress=False).on("batch_end", lambda b, lg: seen.append(lg), logits=lambda b: torch.tensor([3]))
    c.on("batch_end", lambda b, lg: None, logits=None)  # reads none: adds nothing
    with torch.no_grad():
        c.run(iter([batch]))
        assert isinstance(seen[-1], KeptLogits) and seen[-1].positions.tolist() == [3]
        c.on("batch_end", lambda b, lg: None)  # a handler that may read any position forces the full logits
        c.run(iter([batch]))
    assert torch.is_tensor(seen[-1]) and seen[-1].shape[1] == batch.seq_len
    with pytest.raises(ValueError, match="batch_end"):
        c.on("z", lambda *a: None, logits=None)


def test_models_without_logits_to_keep_get_full_logits(loaded):
    m = loaded("bert")
    batch = _batch(m)
    with torch.no_grad():
        out = Capture(m, progress=False).run_batch(batch, logit_positions=torch.tensor([1]))
    assert torch.is_tensor(out) and out.shape[1] == batch.seq_len


@pytest.mark.parametrize("name", ALL_ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_kept_weights_block_replaces_the_sdpa_call(loaded, name, padding_side, monkeypatch):
    """A layer whose whole weights block the capture scored anyway takes its output from it (``A @ v``) instead of
    a second attention call: the same per-head outputs and logits as SDPA's. Left padding gives causal models
    query rows that see no key, where SDPA keeps its own convention: every layer then calls SDPA."""
    import transformers.integrations.sdpa_attention as sdpa

    m = loaded(name)
    batch = _batch(m, padding_side)
    real = batch.attention_mask.bool()
    calls = []
    original = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run(keep_block: bool):
        calls.clear()
        zs = {}
        c = Capture(m, attention="fused", progress=False)
        c.on("z", lambda l, z, b: zs.__setitem__(l, z.clone()))
        if keep_block:
            c.on("attention", lambda l, view, b: view.entropy())
        with torch.no_grad():
            logits = c.run_batch(batch)
        return logits, zs, len(calls)

    logits_sdpa, z_sdpa, n_sdpa = run(False)
    logits_kept, z_kept, n_kept = run(True)
    reused = padding_side == "right" or name == "bert"  # bidirectional: every query row sees a key
    assert n_sdpa - n_kept == (m.n_layers if reused else 0)
    torch.testing.assert_close(logits_kept[real], logits_sdpa[real], atol=1e-5, rtol=1e-5)
    for layer in range(m.n_layers):
        torch.testing.assert_close(z_kept[layer][real], z_sdpa[layer][real], atol=1e-5, rtol=1e-5)
