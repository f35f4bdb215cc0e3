"""Exact attention statistics without a ``T x T`` pattern: everything from q, k, v and each row's log-sum-exp.

A post-softmax attention weight is ``A[i, j] = exp(s[i, j] - lse[i])`` with ``s[i, j]`` the masked, scaled score
(``q_i . k_j * scale``, optionally soft-capped) and ``lse[i] = log sum_j exp(s[i, j])`` the row's log-sum-exp.
Given ``lse`` (which fused kernels compute anyway), these are exact and never build a ``T x T`` matrix:

==========================  ============================================  ===========================
statistic                   formula                                       cost per head
==========================  ============================================  ===========================
mass on a key set S         ``sum_{j in S} exp(s[i, j] - lse[i])``        O(T |S| d)
weight of chosen pairs      ``exp(s[i, j] - lse[i])`` for listed (i, j)   O(pairs d)
expectation of key values   ``sum_j A[i, j] f(j)`` = SDPA with values f   one fused attention call
row entropy                 ``lse[i] - sum_j A[i, j] s[i, j]``            one fused attention call
                            ``= lse[i] - scale * q_i . (sum_j A k_j)``    (values = keys)
mean and 2nd moment of      ``E[j]``, ``E[j^2]`` as expectations of key   one fused attention call
the attended position       positions (``i - E[j]`` is the mean distance)
==========================  ============================================  ===========================

Statistics that need whole rows (an argmax, a maximum logit, column sums) use ``score_rows`` in query chunks:
memory ``chunk x T`` per head, compute ``T^2 d`` like attention itself.

Short batches: when a layer's whole score block has at most ``DENSE_BUDGET`` entries (``b x heads x T x T``; 2^26,
256 MiB of float32 -- one streamed chunk's ``ROW_BUDGET``), ``AttentionView`` scores it once, keeps its
scores and weights, and answers every statistic from them (sums and gathers: no further products, kernel calls or
exponentials). The formulas are then the eager ones, so the numbers agree with the row-free formulas to float
rounding (a test runs the fused view both ways against the eager pattern). Where it pays: on CPU, at prompts of a
few hundred tokens, many small products and exponentials cost more than one block; on a GPU, where streamed rows
cost many small kernels, blocks of up to ``DENSE_BUDGET_CUDA`` entries are kept. Long rows never take it. A kept
block also gives the layer's attention output on the CPU (``AttentionView.attention_output``: ``A @ v``, where its
mask is exactly the one SDPA is handed), so the model's own attention call is not made a second time; on a GPU the
flash kernel, which reads only q, k and v, moves a seventh of the bytes of reading the float32 block again
(``OUTPUT_FROM_BLOCK``; ``benchmarks/census_traffic.py``).

Shapes: ``q`` ``[batch, n_heads, Tq, d]``; ``k``, ``v`` ``[batch, n_kv_heads, Tk, d]`` (grouped-query attention:
KV head ``g`` serves query heads ``g * group ... (g + 1) * group - 1``, consecutive, as in every HF model);
``key_mask`` ``[batch, Tk]`` (1 = real key). Queries sit at the last ``Tq`` key positions (``Tq == Tk`` for a
prefill). Score products run in the model's own dtype when it is a half type (bfloat16 / float16 matrix
products accumulate in float32 on the tensor cores, as the model's attention does) and in float32 otherwise;
softmax statistics, sums and the log-sum-exp are float32 (float64 on request).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ROW_BUDGET = 1 << 26  # score entries per chunk of rows (256 MiB of float32) before the chunk shrinks
# score entries (b x heads x T x T) up to which a view keeps the whole block (see above): 8 prompts x 12 heads x 512^2
# fit; on CPU a census at 512 tokens takes 2.2x a plain forward with it, 3.0x with a 2^24 budget (benchmarks/)
DENSE_BUDGET = 1 << 26
# on a GPU: HeadVis's workload (16 sequences x 32 heads x 512^2) in one block, 512 MiB of float32 per kept tensor;
# there the block turns a few dozen small kernels per statistic into a few (launches, not arithmetic, bound it)
DENSE_BUDGET_CUDA = 1 << 27
# device types on which a kept block's ``A @ v`` replaces the model's SDPA call (where one product beats a second
# attention kernel: the CPU's flash kernel recomputes every score; a GPU's reads q, k, v, ~0.17 GB per 8B-shaped
# layer of 16 x 512 tokens, against ~1.2 GB to convert and read the float32 block)
OUTPUT_FROM_BLOCK = frozenset({"cpu"})
NEG = -1e30  # masked score: exp(NEG - lse) == 0 exactly in float32, and no inf - inf NaN


class Workspace:
    """Reused buffers for the blocks a capture scores layer after layer (``AttentionView``'s kept block).

    A fresh tensor of tens of MB per layer pays its page faults every time: on CPU, a matrix product or a softmax
    into a new buffer takes 1.7-1.9x as long as into a reused one. The buffers grow to the largest block seen and
    live as long as the workspace (one capture run); whatever a view hands out of them is transient, like the
    ``"rows"`` site's rows. Reuse only within one autograd mode (an inference-mode buffer cannot be written
    outside inference mode)."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}
        self._memo: dict[tuple, tuple] = {}

    def release(self) -> None:
        """Drop the buffers (and remembered masks); the next ``take`` allocates afresh."""
        self._bufs.clear()
        self._memo.clear()

    def memo(self, key: tuple, make):
        """``make()`` computed once while ``key`` holds: its tensors the same objects (a batch's masks, which every
        layer of a forward is handed again), its other entries equal. A few entries are kept (layers of two kinds:
        sliding-window and global)."""
        ids = tuple(id(x) if isinstance(x, torch.Tensor) else x for x in key)
        hit = self._memo.get(ids)
        if hit is not None and all(a is b for a, b in zip(hit[0], key, strict=True) if isinstance(a, torch.Tensor)):
            return hit[1]
        if len(self._memo) >= 8:
            self._memo.clear()
        value = make()
        self._memo[ids] = (key, value)
        return value

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A ``shape`` view of buffer ``name`` (contents undefined)."""
        n = 1
        for x in shape:
            n *= int(x)
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.numel() < n
            or buf.dtype != dtype
            or buf.device != torch.device(device)
            or buf.is_inference() != torch.is_inference_mode_enabled()
        ):
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def remembered(workspace: Workspace | None, key: tuple, make):
    """``workspace.memo(key, make)``, or ``make()`` where there is no workspace to remember it in."""
    return make() if workspace is None else workspace.memo(key, make)


@dataclass(frozen=True)
class ScoreSpec:
    """How one layer turns q, k into masked scores: the pieces a model's attention function was called with."""

    scaling: float
    causal: bool = True
    softcap: float | None = None  # Gemma-2: s -> softcap * tanh(s / softcap)
    sliding_window: int | None = None  # keys older than the window are masked (Mistral, Gemma-2 local layers)
    key_mask: torch.Tensor | None = None  # [batch, Tk] 1 = real key
    # every key_mask row is ones then zeros (right padding): known once per batch, None = look at key_mask
    right_padded: bool | None = None


def _mm_dtype(x: torch.Tensor, dtype) -> torch.dtype:
    """The dtype score products run in: the tensors' own half type (tensor cores), else ``dtype``."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32 else dtype


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[b, n_kv, T, d]`` -> ``[b, n_heads, T, d]``: each KV head repeated for its group of query heads."""
    n_kv = x.shape[1]
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} KV heads evenly")
    return x.repeat_interleave(n_heads // n_kv, dim=1)


def _allowed(spec: ScoreSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, batch: int, tq: int, tk: int, device):
    """``[batch or 1, 1, len(q_pos), len(k_pos)]`` bool: key ``k_pos`` is visible to query ``q_pos``."""
    qa = q_pos.to(device)[:, None] + (tk - tq)  # absolute key index of each query
    ka = k_pos.to(device)[None, :]
    ok = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=device)
    if spec.causal:
        ok = ok & (ka <= qa)
    if spec.sliding_window is not None:
        ok = ok & (qa - ka < spec.sliding_window)
    ok = ok[None, None]
    if spec.key_mask is not None:
        ok = ok & spec.key_mask.to(device).bool()[:, None, None, -tk:][..., k_pos.to(device)]
    return ok


def _row_positions(q_pos, device) -> torch.Tensor:
    """Query rows as a tensor of indices (a ``slice`` becomes an ``arange`` made on the device: no copy)."""
    if isinstance(q_pos, slice):
        return torch.arange(q_pos.start, q_pos.stop, device=device)
    return q_pos.to(device)


def score_rows(
    q: torch.Tensor, k: torch.Tensor, spec: ScoreSpec, q_pos, *, dtype=torch.float32, workspace=None, bias=None
) -> torch.Tensor:
    """Masked scores ``[b, n_heads, len(q_pos), Tk]`` of chosen query rows (masked entries ``NEG``).

    ``q_pos``: a tensor of row indices, or a ``slice`` of consecutive rows (read as a view, not gathered). The
    query heads of a KV group multiply its keys as one ``[group * rows, d] x [d, Tk]`` product: no copy of the
    keys per query head. ``workspace``: a ``Workspace`` whose ``"scores"`` buffer receives the product.
    ``bias``: the rows' mask as an additive ``[b or 1, 1, rows, Tk]`` float32 tensor (0 or ``NEG``; ``mask_bias``),
    added in place instead of building and filling a boolean mask (on CPU a masked fill of the block costs ~5x an
    addition). ``s + NEG == NEG`` exactly in float32 for any score of ordinary size."""
    b, n_heads, tq, d = q.shape
    n_kv, tk = k.shape[1], k.shape[2]
    mm = _mm_dtype(q, dtype)
    rows = q[:, :, q_pos] if isinstance(q_pos, slice) else q[:, :, q_pos.to(q.device)]
    c = rows.shape[2]
    # full-precision products take the scale on the queries (a T x d pass, not a T x T one); half types after
    prescale = mm in (torch.float32, torch.float64)
    qc = rows.to(mm) * spec.scaling if prescale else rows.to(mm)
    qc = qc.reshape(b, n_kv, (n_heads // n_kv) * c, d)
    shape = (b, n_kv, (n_heads // n_kv) * c, tk)
    out = workspace.take("scores", shape, mm, q.device) if workspace is not None else None
    s = torch.matmul(qc, k.to(mm).transpose(-1, -2), out=out).reshape(b, n_heads, c, tk)
    if not prescale and spec.softcap is None and bias is not None:  # a half-type product: one pass, not three:
        # bias + scale * s in ``dtype`` equals (s in dtype) * scale + bias exactly, the bias being 0 or NEG
        wide = workspace.take("scores_wide", s.shape, dtype, q.device) if workspace is not None else None
        return torch.add(bias, s, alpha=spec.scaling, out=wide)
    s = s.to(dtype) if s.dtype != dtype else s
    if not prescale:
        s.mul_(spec.scaling)
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None:
        return s.add_(bias)
    ok = _allowed(spec, _row_positions(q_pos, q.device), torch.arange(tk, device=q.device), b, tq, tk, q.device)
    return s.masked_fill_(~ok, NEG)


@dataclass(frozen=True)
class BlockMask:
    """A whole prefill block's mask in the forms the kept block uses (``mask_bias``)."""

    allowed: torch.Tensor  # [b or 1, 1, T, T] bool
    bias: torch.Tensor  # the same as 0 / NEG float32
    every_row_sees_a_key: bool  # no query row is fully masked (no left-padding query)


def mask_bias(spec: ScoreSpec, t: int, device, workspace: Workspace | None = None) -> BlockMask:
    """The ``T x T`` prefill mask of ``spec`` (causality, window, key mask); made once per batch where a
    ``workspace`` remembers it (every layer of a forward is handed the same key mask)."""

    def make():
        pos = torch.arange(t, device=device)
        ok = _allowed(spec, pos, pos, 1, t, t, device)
        bias = torch.zeros(ok.shape, device=device).masked_fill_(~ok, NEG)
        return BlockMask(ok, bias, bool(ok.any(-1).all()))

    return remembered(workspace, ("mask", spec.key_mask, spec.causal, spec.sliding_window, t, str(device)), make)


def row_lse(q: torch.Tensor, k: torch.Tensor, spec: ScoreSpec, *, chunk: int = 256, dtype=torch.float32):
    """``lse[b, h, i] = log sum_j exp(s[i, j])`` in query chunks; rows with no visible key get ``NEG``."""
    tq = q.shape[2]
    out = []
    for start in range(0, tq, chunk):
        q_pos = slice(start, min(start + chunk, tq))
        out.append(torch.logsumexp(score_rows(q, k, spec, q_pos, dtype=dtype), dim=-1))
    return torch.cat(out, dim=-1)


def pair_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    spec: ScoreSpec,
    b_idx: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    *,
    dtype=torch.float32,
) -> torch.Tensor:
    """Attention weights ``[n_pairs, n_heads]`` of listed (prompt ``b_idx``, query ``q_idx``, key ``k_idx``) pairs.

    ``q_idx`` indexes ``q``'s rows; ``k_idx`` absolute key positions. Masked pairs (a key after its query, padding,
    outside the window) weigh exactly 0.
    """
    n_heads = q.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    dev = q.device
    b_idx, q_idx, k_idx = (t.to(dev).long() for t in (b_idx, q_idx, k_idx))
    if b_idx.numel() == 0:
        return torch.zeros(0, n_heads, dtype=dtype, device=dev)
    group = n_heads // k.shape[1]
    qv = q[b_idx, :, q_idx].to(dtype)  # [P, H, d]
    kv = k[b_idx, :, k_idx].to(dtype).repeat_interleave(group, dim=1)  # [P, H, d]
    s = (qv * kv).sum(-1) * spec.scaling
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    qa = q_idx + (tk - tq)
    ok = torch.ones_like(q_idx, dtype=torch.bool)
    if spec.causal:
        ok &= k_idx <= qa
    if spec.sliding_window is not None:
        ok &= qa - k_idx < spec.sliding_window
    if spec.key_mask is not None:
        ok &= spec.key_mask.to(dev).bool()[b_idx, k_idx - tk + spec.key_mask.shape[1]]
    w = torch.exp(s - lse[b_idx, :, q_idx].to(dtype))
    return torch.where(ok[:, None], w, torch.zeros_like(w))


def mass_on_columns(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, spec: ScoreSpec, keys: torch.Tensor, *, dtype=torch.float32
) -> torch.Tensor:
    """``[b, n_heads, Tq]``: each row's attention mass on the key positions ``keys`` (``[b, m]``, one set per
    prompt, e.g. its first real token; entries ``-1`` are ignored)."""
    b, n_heads, tq, _ = q.shape
    tk = k.shape[2]
    keys = keys.to(q.device).long()
    valid = keys >= 0
    kk = keys.clamp(min=0)
    group = n_heads // k.shape[1]
    mm = _mm_dtype(q, dtype)
    kx = torch.gather(k, 2, kk[:, None, :, None].expand(b, k.shape[1], kk.shape[1], k.shape[3]))
    kx = kx.repeat_interleave(group, dim=1).to(mm)  # [b, H, m, d]
    s = torch.einsum("bhqd,bhmd->bhqm", q.to(mm), kx).to(dtype) * spec.scaling
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    qa = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    ok = valid[:, None, None, :].expand(b, 1, tq, kk.shape[1])
    if spec.causal:
        ok = ok & (kk[:, None, None, :] <= qa[None, None])
    if spec.sliding_window is not None:
        ok = ok & (qa[None, None] - kk[:, None, None, :] < spec.sliding_window)
    if spec.key_mask is not None:
        ok = ok & torch.gather(spec.key_mask.to(q.device).bool()[:, -tk:], 1, kk)[:, None, None, :]
    w = torch.exp(s - lse.to(dtype)[..., None]).masked_fill(~ok, 0.0)
    return w.sum(-1)


def _causal_suffices(spec: ScoreSpec, tq: int, tk: int) -> bool:
    """True when a plain causal mask gives every *real* query row its exact visible keys: causal, no window, a
    prefill, and padding (if any) only after each prompt's tokens (right padding). Such rows can run on the fused
    kernels' ``is_causal`` path, with no materialised mask."""
    if not spec.causal or spec.sliding_window is not None or tq != tk:
        return False
    if spec.key_mask is None:
        return True
    if spec.right_padded is not None:
        return spec.right_padded
    return is_right_padded(spec.key_mask[:, -tk:])


def is_right_padded(key_mask: torch.Tensor) -> bool:
    """Each row of ``key_mask`` ``[b, T]`` is ones, then zeros (reads the device once)."""
    m = key_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def expectation(
    q: torch.Tensor,
    k: torch.Tensor,
    values: torch.Tensor,
    spec: ScoreSpec,
    *,
    dtype=torch.float32,
    native: bool = False,
) -> torch.Tensor:
    """``sum_j A[i, j] values[j]`` for every row, ``[b, n_heads, Tq, c]``, by one fused SDPA call.

    ``values``: ``[b, n_kv_heads or 1, Tk, c]`` (broadcast over heads when 1). ``native``: run the kernel in the
    model's half dtype (tensor cores; the model's own attention precision) instead of ``dtype``. Rows with no
    visible key give 0. Softcapped scores have no fused kernel: they go through ``score_rows`` in chunks.
    """
    b, n_heads, tq, _ = q.shape
    tk = k.shape[2]
    run = _mm_dtype(q, dtype) if native else dtype
    vals = values.to(run)
    n_kv = k.shape[1]
    if vals.shape[1] == 1:
        vals = vals.expand(b, n_kv, tk, vals.shape[-1])
    if spec.softcap is not None:
        vals = expand_kv(vals, n_heads).to(dtype)
        out = []
        for start in range(0, tq, 256):
            q_pos = slice(start, min(start + 256, tq))
            a = torch.softmax(score_rows(q, k, spec, q_pos, dtype=dtype), -1)
            out.append(a @ vals)
        return torch.cat(out, dim=2)
    if _causal_suffices(spec, tq, tk):
        mask, causal = None, True
    else:
        mask = _allowed(spec, torch.arange(tq, device=q.device), torch.arange(tk, device=q.device), b, tq, tk, q.device)
        causal = False
    keys, gqa, width = k.to(run), n_kv != n_heads, vals.shape[-1]
    if width < q.shape[-1]:  # the fused kernels want values as wide as the keys (else PyTorch falls back to its
        vals = torch.nn.functional.pad(vals, (0, q.shape[-1] - width))  # T x T math path); zero columns, dropped below
    if q.device.type == "cuda" and gqa and run == torch.float32:  # float32's fused kernel takes no grouped KV
        keys, vals, gqa = expand_kv(keys, n_heads), expand_kv(vals, n_heads), False
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(run), keys, vals, attn_mask=mask, is_causal=causal, scale=spec.scaling, enable_gqa=gqa
    )
    return torch.nan_to_num(out[..., :width].to(dtype))  # a row with no visible key (a padding query) gives 0


def entropy(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, spec: ScoreSpec, *, dtype=torch.float32):
    """Row entropy ``-sum_j A log A = lse - E_A[s]`` ``[b, n_heads, Tq]``; ``E_A[s] = scale * q . E_A[k]``.

    With a soft cap, ``s`` is not linear in ``k`` and the rows are recomputed in chunks.
    """
    if spec.softcap is not None:
        out = []
        for start in range(0, q.shape[2], 256):
            q_pos = slice(start, min(start + 256, q.shape[2]))
            s = score_rows(q, k, spec, q_pos, dtype=dtype)
            a = torch.softmax(s, -1)
            out.append(-(a * torch.log(a.clamp_min(torch.finfo(dtype).tiny))).sum(-1))
        return torch.cat(out, dim=-1)
    mean_k = expectation(q, k, k, spec, dtype=dtype, native=True)  # [b, H, Tq, d], the model's precision
    return lse.to(dtype) - (q.to(dtype) * mean_k).sum(-1) * spec.scaling


def distance_moments(q: torch.Tensor, k: torch.Tensor, spec: ScoreSpec, *, dtype=torch.float32):
    """Per row, the attention-weighted mean of ``|i - j|`` and of ``|i - j|^2``: two ``[b, n_heads, Tq]``.

    Causal rows attend to ``j <= i``, so ``|i - j| = i - j`` and both follow from ``E[j]``, ``E[j^2]`` (one fused
    call with the key positions as values). Bidirectional rows need ``E|i - j|``: chunked rows.
    """
    b, n_heads, tq, _ = q.shape
    tk = k.shape[2]
    pos = torch.arange(tk, device=q.device, dtype=dtype)
    qa = torch.arange(tq, device=q.device, dtype=dtype) + (tk - tq)
    if not spec.causal:
        d1, d2 = [], []
        for start in range(0, tq, 256):
            q_pos = slice(start, min(start + 256, tq))
            a = torch.softmax(score_rows(q, k, spec, q_pos, dtype=dtype), -1)
            dist = (qa[q_pos][:, None] - pos[None, :]).abs()
            d1.append((a * dist).sum(-1))
            d2.append((a * dist.square()).sum(-1))
        return torch.cat(d1, -1), torch.cat(d2, -1)
    m = expectation(q, k, torch.stack([pos, pos.square()], -1)[None, None], spec, dtype=dtype)
    e1, e2 = m[..., 0], m[..., 1]
    return qa - e1, qa.square() - 2 * qa * e1 + e2


def max_logit(q: torch.Tensor, k: torch.Tensor, spec: ScoreSpec, *, chunk: int = 256, real_queries=None):
    """Largest pre-softmax score ``q . k * scale`` (before any soft cap) per head over visible pairs: ``[b, H]``.

    ``real_queries`` ``[b, Tq]`` bool limits the rows (padding queries excluded).
    """
    raw = replace(spec, softcap=None)
    b, n_heads, tq, _ = q.shape
    best = torch.full((b, n_heads), NEG, device=q.device)
    for start in range(0, tq, chunk):
        q_pos = slice(start, min(start + chunk, tq))
        s = score_rows(q, k, raw, q_pos)
        if real_queries is not None:
            s = s.masked_fill(~real_queries.to(q.device)[:, None, q_pos, None], NEG)
        best = torch.maximum(best, s.amax(dim=(-2, -1)))
    return best


# ---- one layer's attention, as the probes see it ---------------------------------------------------------------


class AttentionView:
    """One layer's attention in one forward pass, as the ``"attention"`` capture site hands it to probes.

    The same questions are answered on both capture paths: on the eager path from the materialised pattern
    (``pattern`` given), on the fused path from q, k and each row's log-sum-exp, exactly and without a ``T x T``
    matrix (``pattern`` None). Positions are absolute batch positions; keys and queries of a prefill coincide.

    Parameters
    ----------
    q : ``[b, n_heads, T, d]`` rotated queries; k : ``[b, n_kv_heads, T, d]`` rotated keys
    spec : ScoreSpec (scale, causality, window, soft cap, key mask)
    pattern : ``[b, n_heads, T, T]`` post-softmax weights, or None (fused path)
    chunk : int, query rows per chunk where whole rows are streamed (a block over ``DENSE_BUDGET``)
    workspace : Workspace, optional; buffers the kept block reuses (the capture's, across its layers)
    """

    def __init__(self, q, k, spec: ScoreSpec, *, pattern=None, chunk: int = 256, workspace: Workspace | None = None):
        self.q, self.k, self.spec, self.pattern = q, k, spec, pattern
        self.workspace = workspace
        b, h, t = q.shape[0], q.shape[1], k.shape[2]  # long rows get fewer per chunk: memory stays ~ROW_BUDGET
        self.chunk = min(int(chunk), max(16, ROW_BUDGET // max(1, b * h * t)))
        self._lse = None
        self._max = None
        self._weights = self._scores = self._row_max = None  # a short batch's kept block (see ``_block``)
        budget = DENSE_BUDGET_CUDA if q.device.type == "cuda" else DENSE_BUDGET
        self._dense = pattern is None and b * h * q.shape[2] * t <= budget

    @property
    def fused(self) -> bool:
        return self.pattern is None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(batch, n_heads, T)``."""
        return self.q.shape[0], self.q.shape[1], self.q.shape[2]

    def _kernel_lse(self) -> torch.Tensor | None:
        """Every row's log-sum-exp from PyTorch's flash-attention kernel (which computes it anyway), where the
        kernel's plain causal mask gives every real row its exact keys (``_causal_suffices``); else None."""
        if self.spec.softcap is not None or not _causal_suffices(self.spec, self.q.shape[2], self.k.shape[2]):
            return None
        q, k = self.q, expand_kv(self.k, self.q.shape[1])
        try:
            if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
                out = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, k, 0.0, True, False, scale=self.spec.scaling
                )
            elif q.device.type == "cpu":
                out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, k, 0.0, True, scale=self.spec.scaling
                )
            else:
                return None
        except (RuntimeError, AttributeError, TypeError):  # no such kernel for this shape / build: recompute
            return None
        return out[1].float()

    def _block(self) -> torch.Tensor | None:
        """``[b, n_heads, Tq, Tk]`` float32 weights when the view has them whole: the eager pattern, or on the fused
        path a short batch's single chunk, scored once (``_dense_pass``); None when rows must be streamed."""
        if self.pattern is not None:
            return self.pattern.float()
        if not self._dense:
            return None
        if self._weights is None:
            try:
                self._dense_pass()
            except torch.OutOfMemoryError:  # no room for the block on this device: stream rows instead
                self._dense, self._scores, self._weights, self._row_max, self._max = False, None, None, None, None
                if self.workspace is not None:
                    self.workspace.release()
                return None
        return self._weights

    def _dense_pass(self) -> None:
        """Score every row once (a short batch: one chunk holds them all) and keep what every statistic reads: the
        masked scores, the weights ``softmax(s)`` (exactly 0 on masked keys; a row with no visible key -- a
        left-padding query -- is all 0, as ``capture.attention_rows`` gives it) and each head's largest raw score.

        ``torch.softmax`` rather than ``exp(s - lse)``: on CPU, ``torch.exp`` of the masked entries' huge negative
        arguments runs 5-8x slower than softmax's own exponential (measured: benchmarks/census_speed.py)."""
        t = self.q.shape[2]
        ws = self.workspace
        raw = replace(self.spec, softcap=None)
        bias = mask_bias(raw, t, self.q.device, ws).bias if self.k.shape[2] == t else None
        s = score_rows(self.q, self.k, raw, slice(0, t), workspace=ws, bias=bias)  # masked: NEG
        row_max = s.amax(dim=-1)
        self._max = self._head_max(row_max, slice(0, t))
        if self.spec.softcap is not None:
            s = torch.where(s > NEG / 2, self.spec.softcap * torch.tanh(s / self.spec.softcap), s)
            row_max = s.amax(dim=-1)
        out = ws.take("weights", s.shape, s.dtype, s.device) if ws is not None else None
        self._scores, self._weights, self._row_max = s, torch.softmax(s, dim=-1, out=out), row_max
        if self.spec.key_mask is not None and self.spec.right_padded is not True:  # left padding: rows with no
            self._weights.mul_((row_max > NEG / 2)[..., None])  # visible key (padding queries) weigh 0 everywhere

    def attention_output(self, v: torch.Tensor, sdpa_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The layer's attention output ``A @ v`` ``[b, T, n_heads, d]`` (the layout SDPA's caller returns) from a
        kept weights block -- one product instead of a second attention call -- or None on a device not in
        ``OUTPUT_FROM_BLOCK``, where the view holds no block, or where the block is not exactly what SDPA computes:
        ``sdpa_mask`` is the boolean mask SDPA is given (None: its plain causal or full mask) and must equal the
        view's, with every query row seeing a key (a fully masked row is left to SDPA's own convention), and no soft
        cap (SDPA has none)."""
        if self._weights is None or self.spec.softcap is not None or self.q.device.type not in OUTPUT_FROM_BLOCK:
            return None  # (the eager path keeps no weights block)
        b, h, t = self.shape
        if self.k.shape[2] != t or (sdpa_mask is not None and sdpa_mask.dtype != torch.bool):
            return None
        mask = mask_bias(replace(self.spec, softcap=None), t, self.q.device, self.workspace)

        def same() -> bool:
            if not mask.every_row_sees_a_key:
                return False
            if sdpa_mask is None:
                pos = torch.arange(t, device=self.q.device)
                theirs = (pos[None, :] <= pos[:, None]) if self.spec.causal else torch.ones(t, t, dtype=torch.bool)
                theirs = theirs.to(self.q.device)[None, None]
            else:
                theirs = sdpa_mask.to(self.q.device)
            try:
                shape = torch.broadcast_shapes(theirs.shape, mask.allowed.shape)
            except RuntimeError:
                return False
            return shape[-2:] == (t, t) and torch.equal(theirs.expand(shape), mask.allowed.expand(shape))

        key = ("same", sdpa_mask, self.spec.key_mask, self.spec.causal, self.spec.sliding_window, t)
        if not remembered(self.workspace, key, same):
            return None
        n_kv = v.shape[1]
        p = self._weights.reshape(b, n_kv, (h // n_kv) * t, t)
        out = torch.matmul(p.to(v.dtype), v).reshape(b, h, t, v.shape[-1])
        return out.transpose(1, 2).contiguous()

    def _head_max(self, row_max: torch.Tensor, q_pos: slice) -> torch.Tensor:
        """``[b, h]`` largest of the rows' maxima ``row_max`` ``[b, h, c]`` over the real queries among ``q_pos``."""
        if self.spec.key_mask is not None:  # padding queries are not rows of the prompt
            real = self.spec.key_mask.to(self.q.device).bool()[:, -self.q.shape[2] :][:, q_pos]
            row_max = row_max.masked_fill(~real[:, None], NEG)
        return row_max.amax(dim=-1)

    def _scores_pass(self, colsum_queries: torch.Tensor | None = None) -> torch.Tensor | None:
        """One chunked pass of score products for whatever is still missing: each row's log-sum-exp, each head's
        largest raw score, and (``colsum_queries`` ``[b, T]`` float) the attention each key receives from those
        queries. Returns the column sums (or None). A log-sum-exp still missing comes from the same pass:
        ``lse = max - log(top weight)`` (``lse()`` asks the flash kernel first)."""
        b, h, t = self.shape
        need_lse, need_max = self._lse is None, self._max is None
        raw = replace(self.spec, softcap=None)
        cap = self.spec.softcap
        lses, best = [], torch.full((b, h), NEG, device=self.q.device) if need_max else None
        colsum = None if colsum_queries is None else torch.zeros(b, h, t, device=self.q.device)
        for start in range(0, t, self.chunk):
            q_pos = slice(start, min(start + self.chunk, t))
            s = score_rows(self.q, self.k, raw, q_pos)  # raw scores, masked entries NEG
            row_max = s.amax(dim=-1) if need_max or need_lse else None  # [b, h, c] (a column-sums pass needs none)
            if need_max:
                best = torch.maximum(best, self._head_max(row_max, q_pos))
            if cap is not None:
                s = torch.where(s > NEG / 2, cap * torch.tanh(s / cap), s)
                row_max = s.amax(dim=-1) if need_lse else None
            if need_lse or colsum is not None:
                w = torch.softmax(s, dim=-1)  # whole rows: the weights themselves (see _dense_pass on exp)
            if need_lse:  # the row's top weight is exp(max - lse): lse = max - log(top weight)
                lses.append(row_max - torch.log(w.amax(dim=-1)))
            if colsum is not None:
                colsum += torch.matmul(colsum_queries[:, None, None, q_pos], w)[:, :, 0]
            s = w = None  # the chunk's blocks go before the next chunk's are made (else three are alive at once)
        if need_lse:
            self._lse = torch.cat(lses, dim=-1)
        if need_max:
            self._max = best
        return colsum

    def lse(self) -> torch.Tensor:
        """``[b, n_heads, T]`` log-sum-exp of each row's masked scores (fused path; computed once per layer: from a
        short batch's kept block, else from the flash kernel where it can, else in the chunked pass, which then
        gives the maximum logits too)."""
        if self._lse is None:
            if self._dense and self._block() is not None:  # the row's top weight is exp(max - lse)
                top = self._weights.amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)  # (0 on empty rows)
                self._lse = self._row_max - torch.log(top)
            else:  # the flash kernel's where it has one; maximum logits and column sums asked for later then
                self._lse = self._kernel_lse()  # share one chunked pass
                if self._lse is None:
                    self._scores_pass()
        return self._lse

    def max_logit(self) -> torch.Tensor:
        """``[b, n_heads]`` largest raw score ``q . k * scale`` over real queries and visible keys."""
        if self._max is None and not (self._dense and self._block() is not None):  # (kept block: has it)
            self._scores_pass()
        return self._max

    def pairs(self, b_idx, q_idx, k_idx) -> torch.Tensor:
        """Weights ``[n_pairs, n_heads]`` of listed (prompt, query, key) pairs; masked pairs weigh 0."""
        p = self._block()
        if p is not None:
            b_idx, q_idx, k_idx = (x.to(p.device).long() for x in (b_idx, q_idx, k_idx))
            return p[b_idx, :, q_idx, k_idx]
        return pair_weights(self.q, self.k, self.lse(), self.spec, b_idx, q_idx, k_idx)

    def band(self, offsets: range) -> torch.Tensor:
        """``[b, n_heads, T, len(offsets)]``: each row's weight on the keys ``i - o`` for ``o`` in ``offsets``
        (0 where that key does not exist or is masked). One product per (row, offset): ``O(T |offsets| d)``."""
        b, h, t = self.shape
        dev = self.q.device
        offs = torch.arange(offsets.start, offsets.stop, offsets.step, device=dev, dtype=torch.long)
        key = torch.arange(t, device=dev)[:, None] - offs[None, :]  # [T, r] absolute key of each band entry
        inside = (key >= 0) & (key < t)
        key_c = key.clamp(0, t - 1)
        p = self._block()
        if p is not None:
            w = p.gather(-1, key_c[None, None].expand(b, p.shape[1], t, len(offs)))
            return w * inside[None, None].to(w.dtype)
        n_kv = self.k.shape[1]
        g = h // n_kv
        lse = self.lse()
        key_ok = self.spec.key_mask.to(dev).bool()[:, -t:] if self.spec.key_mask is not None else None
        out = []
        mm = _mm_dtype(self.q, torch.float32)
        lo_off, hi_off = int(min(offsets)), int(max(offsets))
        for start in range(0, t, self.chunk):  # query chunks bound the [b, kv, c, r, d] gather / key block
            rows = slice(start, min(start + self.chunk, t))
            kc = key_c[rows]
            if len(offs) <= 4:  # a few diagonals: gather their keys, one product per (row, offset)
                kx = self.k.to(mm)[:, :, kc]  # [b, kv, c, r, d]
                qc = self.q.to(mm)[:, :, rows].reshape(b, n_kv, g, -1, self.q.shape[-1])
                s = torch.einsum("bkgcd,bkcrd->bkgcr", qc, kx).reshape(b, h, -1, len(offs)).float()
            else:  # a window: score the chunk's contiguous key block (a matrix product), then pick the band
                k_lo = max(0, start - hi_off)
                k_hi = min(t, rows.stop - lo_off)
                if k_hi <= k_lo:  # no key of this chunk's band exists
                    out.append(torch.zeros(b, h, rows.stop - start, len(offs), device=dev))
                    continue
                block = score_rows(self.q, self.k[:, :, k_lo:k_hi], ScoreSpec(1.0, causal=False), rows)
                idx = (kc - k_lo).clamp(0, k_hi - k_lo - 1)
                s = block.gather(-1, idx[None, None].expand(b, h, -1, len(offs)))
            s = s * self.spec.scaling
            if self.spec.softcap is not None:
                s = self.spec.softcap * torch.tanh(s / self.spec.softcap)
            ok = inside[rows][None, None]
            if self.spec.causal:
                ok = ok & (offs >= 0)[None, None, None, :]
            if self.spec.sliding_window is not None:
                ok = ok & (offs < self.spec.sliding_window)[None, None, None, :]
            if key_ok is not None:
                ok = ok & key_ok[:, kc][:, None]
            w = torch.exp(s - lse[:, :, rows, None])
            out.append(torch.where(ok, w, torch.zeros_like(w)))
        return torch.cat(out, dim=2)

    def diagonal(self, offset: int = 0) -> torch.Tensor:
        """``[b, n_heads, T]``: each row's weight on key ``i - offset`` (0 where that key does not exist)."""
        return self.band(range(offset, offset + 1))[..., 0]

    def mass_on(self, keys: torch.Tensor) -> torch.Tensor:
        """``[b, n_heads, T]``: each row's mass on the key positions ``keys`` ``[b, m]`` (-1 entries ignored)."""
        p = self._block()
        if p is not None:
            keys = keys.to(p.device).long()
            valid = (keys >= 0).float()
            idx = keys.clamp(min=0)[:, None, None, :].expand(-1, p.shape[1], p.shape[2], -1)
            return (p.gather(-1, idx) * valid[:, None, None, :]).sum(-1)
        return mass_on_columns(self.q, self.k, self.lse(), self.spec, keys)

    def band_mass(self, offsets: range) -> torch.Tensor:
        """``[b, n_heads, T]``: each row's mass on the keys ``i - o`` for ``o`` in ``offsets`` (a window)."""
        p = self._block()
        if p is not None and len(offsets) > 4:  # a wide window: one product with the band's indicator

            def indicator():
                t = p.shape[-1]
                off = torch.arange(t, device=p.device)[:, None] - torch.arange(t, device=p.device)[None, :]  # i - j
                inside = (off >= offsets.start) & (off < offsets.stop) & ((off - offsets.start) % offsets.step == 0)
                return inside.to(p.dtype)[..., None]

            key = ("window", p.shape[-1], offsets.start, offsets.stop, offsets.step, str(p.device))
            # masked keys weigh 0 in the block
            return self._row_products(p, remembered(self.workspace, key, indicator))[..., 0]
        return self.band(offsets).sum(-1)

    @staticmethod
    def _row_products(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """``[b, h, T, n]``: ``sum_j p[b, h, i, j] f[i, j, :]`` for a block ``p`` and a per-(query, key) table ``f``
        ``[T, T, n]``: one batched product over the query rows (the block read in place, heads as rows)."""
        b, h, t, _ = p.shape
        out = torch.bmm(p.reshape(b * h, t, t).transpose(0, 1), f)  # [T, b h, n]
        return out.permute(1, 0, 2).reshape(b, h, t, f.shape[-1])

    def entropy(self) -> torch.Tensor:
        """``[b, n_heads, T]`` row entropy (nats)."""
        p = self._block()
        if p is not None and self._scores is not None:  # the kept block: H = lse - sum_j A s (no log of A)
            return self.lse() - torch.einsum("bhqk,bhqk->bhq", p, self._scores)
        if p is not None:
            return -torch.xlogy(p, p).sum(-1)
        return entropy(self.q, self.k, self.lse(), self.spec)

    def distance_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the attention-weighted mean of ``|i - j|`` and of ``|i - j|^2``: two ``[b, n_heads, T]``."""
        p = self._block()
        if p is not None:

            def table():
                pos = torch.arange(p.shape[-1], device=p.device, dtype=torch.float32)
                dist = (pos[:, None] - pos[None, :]).abs()
                return torch.stack([dist, dist.square()], -1)

            key = ("distance", p.shape[-1], str(p.device))
            m = self._row_products(p, remembered(self.workspace, key, table))
            return m[..., 0], m[..., 1]  # one product for both
        return distance_moments(self.q, self.k, self.spec)

    def column_sums(self, real_queries: torch.Tensor) -> torch.Tensor:
        """``[b, n_heads, T]``: attention each key receives, summed over the real queries ``[b, T]`` bool (fused
        path: in the same chunked pass as the maximum logits when those are still to come)."""
        rq = real_queries.to(self.q.device).float()
        p = self._block()
        if p is not None:  # a batched vector-matrix product (einsum's route here is ~10x slower on CPU)
            return torch.matmul(rq[:, None, None, :], p)[:, :, 0]
        return self._scores_pass(rq)
