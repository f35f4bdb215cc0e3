"""HeadVis's six metrics: attnlab's probe equals an independent re-derivation of Neuronpedia's definitions
(``compute-head-metrics.py``: eager HF attention, right padding, sums over all rows divided by row counts) on
tiny checkpoints and on organism-induction; planted patterns give the closed-form values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnlab
from attnlab.datasets.base import PromptSet
from attnlab.models.bundled import bundled_path
from attnlab.probes.headvis import METRICS, HeadVisMetrics

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_metrics(hf_model, sequences: list[list[int]], pad_id: int, threshold: float = 0.01):
    """Neuronpedia's six metrics recomputed from ``output_attentions`` of an eager HF model (float64 sums)."""
    n = len(sequences)
    t = max(len(s) for s in sequences)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, s in enumerate(sequences):  # right padding, as the reference tokenizes
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        att = hf_model(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    n_layers, n_heads = len(att), att[0].shape[1]
    sums = {k: np.zeros((n_layers, n_heads)) for k in ("self", "prev", "ent", "d1", "d2", "ind")}
    rows = prev_rows = ind_rows = 0
    for b, s in enumerate(sequences):
        length = len(s)
        if length < 2:
            continue
        rows += length
        prev_rows += length - 1
        pairs = [(i, p + 1) for i in range(length) for p in range(i) if s[p] == s[i]]
        ind_rows += len({i for i, _ in pairs})
        pos = np.arange(length)
        dist = np.abs(pos[:, None] - pos[None, :])
        for l, a in enumerate(att):
            a = a[b, :, :length, :length].double().numpy()  # [H, L, L]
            sums["self"][l] += np.einsum("hii->h", a)
            sums["prev"][l] += np.array(
                [a[h, np.arange(1, length), np.arange(length - 1)].sum() for h in range(n_heads)]
            )
            sums["ent"][l] += -(a * np.log(np.clip(a, 1e-300, None))).sum((1, 2))
            sums["d1"][l] += (a * dist).sum((1, 2))
            sums["d2"][l] += (a * dist**2).sum((1, 2))
            for i, k in pairs:
                w = a[:, i, k]
                sums["ind"][l] += np.where(w < threshold, 0.0, w)
    d1 = sums["d1"] / rows
    return {
        "self_attention_score": sums["self"] / rows,
        "prev_token_score": sums["prev"] / prev_rows,
        "pattern_entropy": sums["ent"] / rows,
        "qk_distance": d1,
        "qk_distance_variance": sums["d2"] / rows - d1**2,
        "induction_score": sums["ind"] / ind_rows,
    }


def sequences_for(vocab: int, seed: int = 0) -> list[list[int]]:
    """Random sequences of different lengths with repeats (so induction pairs exist), one of a single token."""
    rng = np.random.default_rng(seed)
    out = []
    for length in (17, 9, 24, 1):
        half = rng.integers(3, min(vocab, 60), size=max(1, length // 2)).tolist()
        out.append((half + half)[:length])
    return out


def attnlab_metrics(model, sequences, **kw):
    ps = PromptSet(name="headvis-parity", token_ids=sequences)
    res = attnlab.scan(model, HeadVisMetrics(), ps, batch_size=3, progress=False, **kw)
    return {name: res[name].scores for name in METRICS}


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
def test_headvis_metrics_equal_neuronpedias_definitions(loaded, checkpoint_dir, arch):
    from transformers import AutoModelForCausalLM

    model = loaded(arch)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir / arch, attn_implementation="eager").eval()
    seqs = sequences_for(model.tokenizer.vocab_size)
    want = reference_metrics(hf, seqs, model.pad_token_id)
    for attention in ("eager", "fused"):
        got = attnlab_metrics(model, seqs, attention=attention)
        for name in METRICS:
            np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-5, err_msg=f"{name} {attention}")


@pytest.mark.skipif(bundled_path("organism-induction") is None, reason="organism-induction not bundled")
def test_headvis_induction_score_finds_organism_inductions_heads():
    """On repeated random tokens the HeadVis induction score's top heads are the organism's known induction heads
    (L1H0, L1H3, L1H4: the heads whose ablation most hurts copying, MODEL_CARD) and it equals the reference."""
    from transformers import AutoModelForCausalLM

    model = attnlab.load("organism-induction")
    rng = np.random.default_rng(1)
    bos = model.tokenizer.bos_token_id
    seqs = []
    for _ in range(4):
        half = rng.integers(5, model.tokenizer.vocab_size, size=20).tolist()
        seqs.append([bos, *half, *half])
    got = attnlab_metrics(model, seqs)
    hf = AutoModelForCausalLM.from_pretrained(model.path, attn_implementation="eager").eval()
    want = reference_metrics(hf, seqs, model.pad_token_id)
    np.testing.assert_allclose(got["induction_score"], want["induction_score"], atol=2e-5)
    top = np.argsort(-got["induction_score"].ravel())[:3]
    assert {(int(i) // model.n_heads, int(i) % model.n_heads) for i in top} == {(1, 0), (1, 3), (1, 4)}


def test_planted_patterns_give_closed_form_metrics():
    """A head that always attends to the previous token (row 0 to itself) and a uniform head, planted through the
    probe's attention handler: self, prev, entropy and distance moments are known exactly."""
    from types import SimpleNamespace

    from attnlab.models.loading import Batch
    from attnlab.probes.base import ProbeContext

    t = 6
    prev = torch.zeros(t, t)
    prev[0, 0] = 1.0
    prev[torch.arange(1, t), torch.arange(t - 1)] = 1.0
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    rows = torch.stack([prev, uniform])[None]  # [1, 2, t, t]
    batch = Batch(torch.tensor([[1, 2, 3, 1, 2, 3]]), torch.ones(1, t, dtype=torch.long), [0])
    model = SimpleNamespace(n_layers=1, n_heads=2, name="planted", n_kv_heads=2)
    probe = HeadVisMetrics()
    capture = SimpleNamespace(on=lambda site, fn, **kw: setattr(capture, "fn", fn))
    probe.attach(capture, ProbeContext(model=model))
    from attnlab.lse import AttentionView, ScoreSpec

    qk = torch.zeros(1, 2, t, 4)
    capture.fn(0, AttentionView(qk, qk, ScoreSpec(1.0), pattern=rows), batch)  # the eager view of a planted pattern
    g = probe.grids()
    n = np.arange(1, t + 1)
    assert g["self_attention_score"][0, 0] == pytest.approx(1 / t)
    assert g["self_attention_score"][0, 1] == pytest.approx(np.mean(1 / n))
    assert g["prev_token_score"][0, 0] == pytest.approx(1.0)
    assert g["pattern_entropy"][0, 0] == pytest.approx(0.0, abs=1e-6)
    assert g["pattern_entropy"][0, 1] == pytest.approx(np.mean(np.log(n)), rel=1e-6)
    assert g["qk_distance"][0, 0] == pytest.approx((t - 1) / t)
    assert g["qk_distance_variance"][0, 0] == pytest.approx((t - 1) / t - ((t - 1) / t) ** 2)
    assert g["qk_distance"][0, 1] == pytest.approx(np.mean(np.arange(t) / 2))
    # tokens 1 2 3 1 2 3: queries 3, 4, 5 repeat; pairs (3,1) (4,2) (5,3): the previous-token head puts 0 there,
    # the uniform head 1/4 + 1/5 + 1/6 over 3 queries
    assert g["induction_score"][0, 0] == pytest.approx(0.0)
    assert g["induction_score"][0, 1] == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3)


def test_induction_pairs_matched_in_row_chunks_equal_the_whole_match():
    """Long sequences match query rows a chunk at a time (no T x T mask): same pairs, same order."""
    from attnlab.probes.headvis import batch_induction_pairs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (3, 300), generator=g)
    first, length = torch.tensor([0, 5, 0]), torch.tensor([300, 200, 1])
    whole = batch_induction_pairs(ids, first, length)
    chunked = batch_induction_pairs(ids, first, length, chunk=64)
    assert len(whole[0]) > 1000
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
