"""Parity: soft injection of task embeddings (SITE, Park & Rhee 2025) against an independent re-implementation of
the reference's documented behaviour on plain ``transformers``: the task embedding is the ``o_proj`` input (every
query head's output) at a prompt's last token; injection mixes ``z' = (1 - alpha) z + alpha e_bar`` at the
**prompt's** last token of every layer, ``o_proj`` then maps z'; later (decoding) tokens are never modified.

With ``position="last"`` attnlab must inject at the prompt's last token also when greedy decoding re-runs prompt +
generated tokens (the evaluation harness), not at the newest token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_ref import head_outputs, load_hf, o_projs

from attnlab.interventions.soft_injection import SoftInjection, zero_shot

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "llama-gqa"


def fitted(m, position: str, seed: int = 0) -> SoftInjection:
    """A SoftInjection with a given embedding and theta, as ``fit`` would leave it (no training needed here)."""
    g = torch.Generator().manual_seed(seed)
    d = m.d_model // m.n_heads
    si = SoftInjection(position=position)
    si.e_bar_ = (torch.randn(m.n_layers, m.n_heads, d, generator=g) * 2).numpy()
    si.theta_ = torch.randn(m.n_layers, m.n_heads, generator=g).numpy().astype(np.float32)
    si.fit_split_ = {"name": "given", "n": 0, "digests": []}
    si.model_ = {"name": m.name, "n_layers": m.n_layers, "n_heads": m.n_heads}
    si.task_ = "given"
    return si


@torch.no_grad()
def reference_logits(hf, ids, e_bar, alpha, n_heads, *, inject_at: int | None) -> torch.Tensor:
    """Logits of one sequence with z mixed at position ``inject_at`` (None: nowhere) in every layer."""
    handles = []
    for l, proj in enumerate(o_projs(hf)):

        def pre(mod, args, l=l):
            x = args[0]
            if inject_at is None:
                return None
            z = x.reshape(x.shape[0], x.shape[1], n_heads, -1).clone()
            a = alpha[l][:, None].to(z.dtype)
            z[:, inject_at] = (1 - a) * z[:, inject_at] + a * e_bar[l].to(z.dtype)
            return (z.reshape(x.shape),)

        handles.append(proj.register_forward_pre_hook(pre))
    try:
        return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def test_task_embedding_is_the_o_proj_input_at_the_last_token(loaded, checkpoint_dir):
    m = loaded(ARCH)
    hf = load_hf(checkpoint_dir / ARCH)
    train = [("cat", "dog")] * 12  # every sampled few-shot prompt is the same, so the mean is that prompt's z
    si = SoftInjection(n_prompts=3, n_shots=3)
    emb = si.task_embedding(m, train)[0]  # [L, H, d]
    from attnlab.datasets.icl import format_prompt

    ids = m.token_ids(format_prompt(train[:3], "cat"))
    z = head_outputs(hf, ids, o_projs, m.n_heads)
    ref = torch.stack([z[l][-1] for l in range(m.n_layers)])
    torch.testing.assert_close(emb.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("position", ["cue", "last"])
def test_injected_logits_equal_the_reference(loaded, checkpoint_dir, position):
    m = loaded(ARCH)
    hf = load_hf(checkpoint_dir / ARCH)
    si = fitted(m, position)
    alpha = torch.sigmoid(torch.as_tensor(si.theta_))
    e_bar = torch.as_tensor(si.e_bar_)
    ids = m.token_ids(zero_shot("cat"))
    ref = reference_logits(hf, ids, e_bar, alpha, m.n_heads, inject_at=len(ids) - 1)
    with si.apply(m), torch.no_grad():
        got = m.forward(m.batch_from_ids([ids], [0]))[0].float()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
    plain = reference_logits(hf, ids, e_bar, alpha, m.n_heads, inject_at=None)
    assert (ref - plain).abs().max() > 1e-2


@torch.no_grad()
def reference_greedy(hf, ids, e_bar, alpha, n_heads, n_new) -> list[int]:
    """Greedy decoding that injects at the prompt's last token only (each pass recomputes the whole sequence, which
    equals cached decoding with an injected prefill)."""
    seq = list(ids)
    for _ in range(n_new):
        seq.append(int(reference_logits(hf, seq, e_bar, alpha, n_heads, inject_at=len(ids) - 1)[-1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("position", ["cue", "last"])
def test_greedy_decoding_injects_at_the_prompts_last_token(loaded, checkpoint_dir, position):
    m = loaded(ARCH)
    hf = load_hf(checkpoint_dir / ARCH)
    si = fitted(m, position, seed=1)
    alpha = torch.sigmoid(torch.as_tensor(si.theta_))
    e_bar = torch.as_tensor(si.e_bar_)
    n_new = 5
    for x in ("cat", "Paris"):
        ids = m.token_ids(zero_shot(x))
        ref = reference_greedy(hf, ids, e_bar, alpha, m.n_heads, n_new)
        got, drift = [], []
        with si.apply(m), torch.no_grad():  # the harness's way: re-run prompt + generated tokens, no cache
            for _ in range(n_new):
                got.append(int(m.forward(m.batch_from_ids([ids + got], [0]))[0, -1].argmax()))
        assert got == ref
        if position == "last":  # a fresh context per pass (no memory of the prompt) re-injects at the newest token
            step2 = ids + got[:1]
            with si.apply(m), torch.no_grad():
                newest = m.forward(m.batch_from_ids([step2], [0]))[0, -1].float()
            fixed = reference_logits(hf, step2, e_bar, alpha, m.n_heads, inject_at=len(ids) - 1)[-1]
            drift.append(float((newest - fixed).abs().max()))
            assert max(drift) > 1e-3


def test_cached_decoding_steps_are_not_injected(loaded):
    m = loaded(ARCH)
    si = fitted(m, "last", seed=2)
    ids = m.token_ids(zero_shot("cat"))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=m.pad_token_id)
    with si.apply(m), torch.no_grad():
        cached = m.hf_model.generate(torch.tensor([ids]), use_cache=True, **kw)
        uncached = m.hf_model.generate(torch.tensor([ids]), use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()  # both inject at the prompt's last token only
