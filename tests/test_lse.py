"""attnlab.lse: every statistic computed from q, k and the row log-sum-exp equals the same statistic read off the
eager softmax pattern (float64 reference), under GQA, left padding, causal and bidirectional masks, a sliding
window and a soft cap."""

from __future__ import annotations

import pytest
import torch

from attnlab import lse as L


def eager(q, k, spec):
    """The reference: the full masked softmax pattern in float64, ``[b, H, Tq, Tk]``."""
    s = L.score_rows(q.double(), k.double(), spec, torch.arange(q.shape[2]), dtype=torch.float64)
    return torch.softmax(s, -1) * (s > L.NEG / 2)


CASES = {
    "causal-gqa-padded": dict(causal=True, key_mask=True),
    "bidirectional": dict(causal=False, key_mask=True),
    "sliding-window": dict(causal=True, key_mask=False, sliding_window=3),
    "softcap": dict(causal=True, key_mask=True, softcap=5.0),
}


def make(case, seed=0, b=2, h=4, kv=2, t=9, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g) * 1.5
    k = torch.randn(b, kv, t, d, generator=g) * 1.5
    v = torch.randn(b, kv, t, d, generator=g)
    cfg = dict(CASES[case])
    mask = None
    if cfg.pop("key_mask"):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, :3] = 0  # prompt 1 is left-padded by 3
    spec = L.ScoreSpec(scaling=d**-0.5, key_mask=mask, **cfg)
    return q, k, v, spec, mask


def real_rows(mask, b, t):
    return torch.ones(b, t, dtype=torch.bool) if mask is None else mask.bool()


@pytest.mark.parametrize("case", CASES)
def test_lse_and_statistics_equal_the_eager_pattern(case):
    q, k, v, spec, mask = make(case)
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    a = eager(q, k, spec)
    lse = L.row_lse(q, k, spec, chunk=4)
    rows = real_rows(mask, b, t)[:, None, :].expand(b, h, t)

    # mass on a key set: each prompt's first real token and one more key
    first = torch.tensor([0, 3])
    keys = torch.stack([first, first + 2], 1)
    got = L.mass_on_columns(q, k, lse, spec, keys)
    want = torch.stack([a[i, :, :, keys[i]].sum(-1) for i in range(b)])
    torch.testing.assert_close(got[rows].double(), want[rows], atol=1e-5, rtol=0)

    # listed pairs: every (prompt, query, key) of the grid, masked ones included (they weigh 0)
    bi, qi, ki = torch.meshgrid(torch.arange(b), torch.arange(t), torch.arange(t), indexing="ij")
    w = L.pair_weights(q, k, lse, spec, bi.flatten(), qi.flatten(), ki.flatten())
    want_pairs = a.permute(0, 2, 3, 1).reshape(-1, h)
    keep = real_rows(mask, b, t)[bi.flatten(), qi.flatten()]
    torch.testing.assert_close(w[keep].double(), want_pairs[keep], atol=1e-5, rtol=0)

    # expectation of values, entropy, distance moments
    vv = L.expand_kv(v, h).double()
    torch.testing.assert_close(L.expectation(q, k, v, spec)[rows].double(), (a @ vv)[rows], atol=1e-5, rtol=0)
    ent = -(a * torch.log(a.clamp_min(1e-300))).sum(-1)
    torch.testing.assert_close(L.entropy(q, k, lse, spec)[rows].double(), ent[rows], atol=1e-4, rtol=0)
    pos = torch.arange(t, dtype=torch.float64)
    dist = (pos[:, None] - pos[None, :]).abs()
    d1, d2 = L.distance_moments(q, k, spec)
    torch.testing.assert_close(d1[rows].double(), (a * dist).sum(-1)[rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(d2[rows].double(), (a * dist.square()).sum(-1)[rows], atol=1e-3, rtol=0)

    # the largest raw score over visible pairs of real rows
    raw = L.ScoreSpec(spec.scaling, spec.causal, None, spec.sliding_window, spec.key_mask)
    s = L.score_rows(q.double(), k.double(), raw, torch.arange(t), dtype=torch.float64)
    s = s.masked_fill(~real_rows(mask, b, t)[:, None, :, None], L.NEG)
    torch.testing.assert_close(
        L.max_logit(q, k, spec, chunk=4, real_queries=real_rows(mask, b, t)).double(),
        s.amax(dim=(-2, -1)),
        atol=1e-5,
        rtol=0,
    )


def test_planted_rows():
    """One head that attends only to key 0 and one uniform head: mass, entropy and distances known in closed form."""
    t, d = 6, 4
    q = torch.zeros(1, 2, t, d)
    k = torch.zeros(1, 2, t, d)
    q[0, 0, :, 0] = 100.0  # head 0: a huge score on key 0 only
    k[0, 0, 0, 0] = 1.0
    spec = L.ScoreSpec(scaling=1.0)
    lse = L.row_lse(q, k, spec)
    mass = L.mass_on_columns(q, k, lse, spec, torch.tensor([[0]]))
    torch.testing.assert_close(mass[0, 0], torch.ones(t))
    n = torch.arange(1, t + 1, dtype=torch.float32)
    torch.testing.assert_close(mass[0, 1], 1 / n)  # uniform over the i + 1 visible keys
    ent = L.entropy(q, k, lse, spec)
    torch.testing.assert_close(ent[0, 0], torch.zeros(t), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[0, 1], torch.log(n), atol=1e-5, rtol=0)
    d1, _ = L.distance_moments(q, k, spec)
    torch.testing.assert_close(d1[0, 0], torch.arange(t, dtype=torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(d1[0, 1], torch.arange(t, dtype=torch.float32) / 2, atol=1e-5, rtol=0)
    assert L.max_logit(q, k, spec)[0, 0] == pytest.approx(100.0)


def test_workspace_reuses_its_buffer_and_grows_only_when_needed():
    ws = L.Workspace()
    with torch.inference_mode():
        a = ws.take("scores", (2, 3, 4), torch.float32, "cpu")
        b = ws.take("scores", (4, 5), torch.float32, "cpu")  # smaller: the same storage
        assert b.data_ptr() == a.data_ptr() and b.shape == (4, 5)
        c = ws.take("scores", (10, 10), torch.float32, "cpu")  # larger: a new buffer
        assert c.numel() == 100 and c.is_inference()
        d = ws.take("weights", (2, 2), torch.float32, "cpu")  # another name: its own buffer
        assert d.data_ptr() != c.data_ptr()
    e = ws.take("scores", (10, 10), torch.float32, "cpu")  # outside inference mode: not an inference buffer
    assert not e.is_inference()
    e.fill_(1.0)  # writable here


def _sdpa_mask(spec, b, t, *, window=True):
    """The boolean mask a model hands SDPA for ``spec`` (optionally forgetting the window)."""
    pos = torch.arange(t)
    ok = (pos[None, :] <= pos[:, None]) if spec.causal else torch.ones(t, t, dtype=torch.bool)
    if window and spec.sliding_window is not None:
        ok = ok & (pos[:, None] - pos[None, :] < spec.sliding_window)
    ok = ok[None, None].expand(b, 1, t, t)
    if spec.key_mask is not None:
        ok = ok & spec.key_mask.bool()[:, None, None, :]
    return ok


@pytest.mark.parametrize("case", ["causal", "bidirectional", "sliding-window", "left-padded", "softcap"])
def test_kept_block_gives_sdpa_output_only_where_its_mask_is_sdpas(case, monkeypatch):
    """``AttentionView.attention_output``: ``A @ v`` from the kept block equals SDPA's output under the same mask
    (GQA, a window, a key mask); None where SDPA would see another mask, a fully masked query row or a soft cap."""
    base = {"causal": "causal-gqa-padded", "left-padded": "causal-gqa-padded"}.get(case, case)
    q, k, v, spec, mask = make(base if base in CASES else "causal-gqa-padded")
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    if case == "causal":  # no padding: the model hands SDPA no mask (its own causal one)
        spec = L.ScoreSpec(spec.scaling, causal=True)
    if case == "bidirectional":  # right padding: every query row sees a key
        km = torch.ones(b, t, dtype=torch.long)
        km[1, -3:] = 0
        spec = L.ScoreSpec(spec.scaling, causal=False, key_mask=km, right_padded=True)
    view = L.AttentionView(q, k, spec, workspace=L.Workspace())
    view.entropy()  # a statistic that keeps the block
    sdpa_mask = None if case == "causal" else _sdpa_mask(spec, b, t)
    out = view.attention_output(v, sdpa_mask)
    if case in ("left-padded", "softcap"):
        assert out is None
        return
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, is_causal=sdpa_mask is None, enable_gqa=True, scale=spec.scaling
    ).transpose(1, 2)
    assert out is not None and out.shape == (b, t, h, v.shape[-1])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    if case == "sliding-window":  # a mask without the window is not the view's: no output
        assert view.attention_output(v, _sdpa_mask(spec, b, t, window=False)) is None
    # without a kept block there is nothing to reuse
    assert L.AttentionView(q, k, spec).attention_output(v, sdpa_mask) is None
    # on a device whose attention kernel is cheaper than reading the block again (a GPU), SDPA is left to run
    monkeypatch.setattr(L, "OUTPUT_FROM_BLOCK", frozenset())
    assert view.attention_output(v, sdpa_mask) is None


def test_workspace_memo_remembers_per_tensor_object_not_per_value():
    ws = L.Workspace()
    calls = []
    mask = torch.ones(2, 5)

    def make():
        calls.append(1)
        return len(calls)

    assert ws.memo(("m", mask, 3), make) == 1
    assert ws.memo(("m", mask, 3), make) == 1  # the same batch's mask again: remembered
    assert ws.memo(("m", mask.clone(), 3), make) == 2  # an equal mask of another batch: made afresh
    assert ws.memo(("m", mask, 4), make) == 3  # another setting
    ws.release()
    assert ws.memo(("m", mask, 3), make) == 4  # released: made afresh
    for i in range(20):  # bounded: old entries go
        ws.memo(("m", torch.ones(1), i), make)
    assert len(ws._memo) <= 8


@pytest.mark.parametrize("case", ["causal-gqa-padded", "bidirectional", "sliding-window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_scaled_and_masked_in_one_pass_equal_the_three_step_reference(case, dtype):
    """Half-precision q, k (a bf16 / fp16 model): the product runs in the half type, and ``score_rows`` with the
    block's additive mask widens, scales and masks it in one addition -- bit for bit the scores of widening, then
    scaling, then filling the masked entries with NEG; with and without a workspace buffer."""
    q, k, _, spec, _ = make(case, t=11)
    q, k = q.to(dtype), k.to(dtype)
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    g = h // k.shape[1]
    raw = torch.matmul(q.reshape(b, k.shape[1], g * t, -1), k.transpose(-1, -2)).reshape(b, h, t, t)
    allowed = L.mask_bias(spec, t, "cpu").allowed
    want = (raw.float() * spec.scaling).masked_fill(~allowed, L.NEG)
    ws = L.Workspace()
    for workspace in (None, ws, ws):  # (the second buffered call reuses the first's buffer)
        bias = L.mask_bias(spec, t, "cpu", workspace).bias
        got = L.score_rows(q, k, spec, slice(0, t), workspace=workspace, bias=bias)
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
    # the streamed path (a boolean mask filled after the product) gives the same scores
    assert torch.equal(L.score_rows(q, k, spec, slice(0, t)), want)
