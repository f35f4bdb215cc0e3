"""Parity: WAAD and FAI (the preplan-and-anchor paper, arXiv 2510.13554; no official code) against an independent
computation from plain ``transformers`` attentions, following the paper's definitions and the spec's recommended
choices: heads ranked per sequence by mean backward distance ``d`` over response rows, local / global groups the
bottom / top ``ceil(q_h n)``, ``WAAD_t = sum_s A_loc[t, s] min(t - s, W)``, ``Delta_t = |WAAD_t - WAAD_{t+1}|``,
``FAI_s`` the mean of ``A_glob[t, s]`` over response rows ``s + H_lo <= t <= s + H_hi`` (NaN where none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from parity_ref import attentions, load_hf

import attnlab
from attnlab.datasets.reasoning import reasoning_prompt_set
from attnlab.probes.preplan_anchor import PreplanAnchor

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = [
    ("Q: two plus three? A:", " Two plus three is five. So the answer is five, and five is the answer."),
    ("Paris is", " the capital of France; Berlin is the capital of Germany. Rome is in Italy!"),
]
W, H_LO, H_HI, Q_H = 3, 2, 6, 0.3


def reference(maps, start: int) -> dict[str, np.ndarray]:
    a = torch.stack(maps)  # [L, H, N, N]
    n = a.shape[-1]
    t = torch.arange(n, dtype=torch.float64)
    dist = (t[:, None] - t[None, :]).clamp(min=0)
    d = (a[:, :, start:] * dist[start:]).sum(-1).mean(-1)  # [L, H]
    flat = d.flatten().numpy()
    k = math.ceil(round(Q_H * len(flat), 9))
    loc = np.argsort(flat, kind="stable")[:k]
    glob = np.argsort(-flat, kind="stable")[:k]
    maps_flat = a.flatten(0, 1)
    a_loc, a_glob = maps_flat[loc].mean(0), maps_flat[glob].mean(0)
    waad = np.array([float((a_loc[i] * dist[i].clamp(max=W)).sum()) for i in range(start, n)])
    delta = np.append(np.abs(waad[:-1] - waad[1:]), np.nan)
    fai = []
    for s in range(start, n):
        rows = [i for i in range(start, n) if s + H_LO <= i <= s + H_HI]
        fai.append(float(np.mean([float(a_glob[i, s]) for i in rows])) if rows else np.nan)
    return {"d": d.numpy(), "waad": waad, "delta": delta, "fai": np.array(fai)}


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_waad_fai_and_distances_equal_the_reference(loaded, checkpoint_dir, arch):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    ps = reasoning_prompt_set(m, PAIRS)
    probe = PreplanAnchor(layers="all", q_h=Q_H, window=W, h_lo=H_LO, h_hi=H_HI, n_examples=2)
    res = attnlab.scan(m, probe, ps, batch_size=2, progress=False)
    refs = [reference(attentions(hf, ids), meta["prompt_len"]) for ids, meta in zip(ps.token_ids, ps.meta)]
    np.testing.assert_allclose(
        res["preplan_anchor_distance"].scores, np.mean([r["d"] for r in refs], 0), rtol=1e-6, atol=1e-6
    )
    for p, ref in enumerate(refs):
        rows = res[f"preplan_anchor_tokens_{p}"].values  # WAAD, Delta, FAI, gamma over the response tokens
        np.testing.assert_allclose(rows[0], ref["waad"], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(rows[1], ref["delta"], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(rows[2], ref["fai"], rtol=1e-5, atol=1e-6)
        assert np.isnan(rows[2][-H_LO:]).all()  # no future window for the last H_lo tokens
