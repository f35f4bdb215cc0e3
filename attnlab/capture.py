"""The capture engine: run batches through a model while per-layer reducers turn activations into statistics.

Every probe registers handlers here instead of caching activations. One forward pass per batch serves all probes.

Sites a handler can listen on (``Capture.on(site, fn)``):

- ``"rows"``: attention rows in query chunks, ``fn(layer, rows, q_pos, batch)`` with ``rows`` a float32 tensor
  ``[batch, n_heads, chunk, seq]`` (post-softmax, padding keys zero) and ``q_pos`` the chunk's query positions.
  This is the site for long inputs: in the *fused* path the forward pass runs a fused SDPA kernel and only the
  requested rows are recomputed, chunk by chunk, from the rotated q and k, so memory grows with chunk x seq.
- ``"attention"``: ``fn(layer, view, batch)`` with ``view`` an ``attnlab.lse.AttentionView`` of the layer: row
  entropies, distance moments, weights of listed (query, key) pairs, mass on key sets, column sums, the largest
  logit. On the eager path the view reads the materialised pattern; on the fused path it answers the same
  questions exactly from q, k and each row's log-sum-exp, without a ``seq x seq`` matrix (``attnlab.lse``).
- ``"pattern"``: the full ``[batch, n_heads, seq, seq]`` pattern of one layer at a time (eager path only).
- ``"q"``, ``"k"``: rotated queries / keys ``[batch, heads, seq, d_head]`` (k has n_kv_heads heads: GQA explicit).
- ``"v"``: value states ``[batch, n_kv_heads, seq, d_head]`` (per KV head, before any GQA repeat).
- ``"z"``: per-head attention output before the output projection ``[batch, seq, n_heads, d_head]``.
- ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``, ``"mlp_out"``: ``[batch, seq, d_model]``.
- ``"batch_end"``: ``fn(batch, logits)`` after each forward pass, for reducers that finish per-batch statistics.
  A handler that reads the logits at a few positions only says which (``logits=selector``, or ``logits=None`` for
  none); when every handler does and the model's forward takes ``logits_to_keep``, the unembedding runs only at
  those positions and ``logits`` is a ``KeptLogits`` indexed by absolute position like the full tensor. At long
  context this saves the ``[batch, seq, vocab]`` logits, the largest tensor of the forward pass (8 GB at 16k
  tokens for a 128k vocabulary in float32).

Handlers return nothing (observe only). At most one layer's attention pattern is alive at a time.

How attention is computed: TransformerLens' bridge re-implements attention eagerly (``softmax(QK^T/sqrt(d))``
materialised per layer, so ``hook_pattern`` can fire) even when the HF model is set to SDPA. For long inputs
(``attention="fused"``, or ``"auto"`` when the sequence is at least ``fused_min_len`` and no handler needs full
patterns) the forward runs inside ``attnlab.fused.fused_attention``: PyTorch's SDPA computes the output and a
``FusedForward`` hands each layer's q/k to the row reducers and its z to the ``"z"`` handlers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnlab.fused import FusedForward, fused_attention, supports_fused
from attnlab.hooks import attn_hook, block_hook
from attnlab.lse import AttentionView, ScoreSpec, Workspace
from attnlab.models.loading import Batch, LoadedModel
from attnlab.progress import bar

ATTENTION_SITES = ("rows", "pattern", "q", "k", "v", "z", "attention")
RESID_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITES = ATTENTION_SITES + RESID_SITES + ("batch_end",)

QuerySelector = Callable[[Batch], torch.Tensor]
ALL = "all"  # a batch_end handler's default: it may read the logits at any position


@dataclass
class _Handler:
    site: str
    fn: Callable
    layers: frozenset[int] | None
    queries: QuerySelector | None = None
    logits: QuerySelector | str | None = ALL

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


@dataclass
class Capture:
    """Runs batches through a model and feeds registered handlers.

    Parameters
    ----------
    model : LoadedModel
    attention : {"auto", "eager", "fused"}, default="auto"
        How attention rows are obtained; see the module docstring.
    chunk_size : int, default=256
        Query rows recomputed at once on the fused path (memory ~ batch x heads x chunk x seq x 4 bytes).
    fused_min_len : int, default=2048
        In ``"auto"`` mode, sequences at least this long take the fused path (when no handler needs patterns).
    progress : bool, default=True
        Show a tqdm progress bar over batches.
    """

    model: LoadedModel
    attention: Literal["auto", "eager", "fused"] = "auto"
    chunk_size: int = 256
    fused_min_len: int = 2048
    progress: bool = True
    handlers: list[_Handler] = field(default_factory=list)
    last_path: str = ""
    _qk: dict = field(default_factory=dict, repr=False)  # eager path: this forward's q / k per layer for views
    # fused path: buffers the layers' kept weight blocks reuse (lse.Workspace), emptied when a run ends
    _workspace: Workspace = field(default_factory=Workspace, repr=False)

    def on(
        self,
        site: str,
        fn: Callable,
        *,
        layers: Iterable[int] | None = None,
        queries: QuerySelector | None = None,
        logits: QuerySelector | str | None = ALL,
    ) -> Capture:
        """Register ``fn`` on ``site`` (optionally only some layers; ``queries`` picks query rows for ``"rows"``).

        ``logits`` (``"batch_end"`` only): the positions whose logits ``fn`` reads — ``"all"`` (default), a
        selector ``batch -> positions`` (absolute, shared by the batch's rows) or None (``fn`` ignores them).
        """
        if site not in SITES:
            raise ValueError(f"unknown capture site {site!r}; expected one of {SITES}")
        if queries is not None and site != "rows":
            raise ValueError("queries= applies to the 'rows' site only")
        if logits is not ALL and site != "batch_end":
            raise ValueError("logits= applies to the 'batch_end' site only")
        self.handlers.append(_Handler(site, fn, frozenset(layers) if layers is not None else None, queries, logits))
        return self

    # ---- running ---------------------------------------------------------------------------------------------

    def run(self, batches: Iterable[Batch], *, total: int | None = None, desc: str = "capture") -> None:
        """Run every batch once; handlers see each layer as it passes."""
        it = bar(batches, total=total, desc=desc, unit="batch", disable=not self.progress)
        try:
            with torch.inference_mode():
                for batch in it:
                    self.run_batch(batch, logit_positions=None)
        finally:
            self._workspace = Workspace()  # the buffers go with the run

    def run_batch(self, batch: Batch, *, logit_positions: torch.Tensor | str | None = ALL):
        """One forward pass of ``batch`` with all handlers attached; returns the logits.

        ``logit_positions``: the positions the caller reads from the returned logits (absolute; ``"all"``, the
        default, or None when the caller ignores them, as ``run`` does).
        When neither the caller nor any ``batch_end`` handler needs every position and the model supports it,
        only the needed positions are unembedded and a ``KeptLogits`` is returned (see the module docstring).
        """
        batch = batch.to(self.model.device)
        path = self._choose_path(batch)
        self.last_path = path
        hooks = self._resid_hooks(batch)
        if path == "eager":
            hooks += self._eager_attention_hooks(batch)
            ctx = contextlib.nullcontext()
        else:
            ctx = fused_attention(
                self.model,
                FusedForward(
                    observe_qk=lambda layer, q, k, scale, causal, **kw: self._fused_layer(
                        layer, q, k, scale, causal, batch, **kw
                    ),
                    observe_z=lambda layer, z: self._fused_z(layer, z, batch),
                ),
            )
        kept = self._kept_positions(batch, logit_positions)
        extra = (
            {"pixel_values": batch.pixel_values.to(self.model.torch_dtype)} if batch.pixel_values is not None else {}
        )
        if kept is not None:
            extra["logits_to_keep"] = kept
        with ctx:
            logits = self.model.bridge.run_with_hooks(
                batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks, **extra
            )
        if kept is not None:
            logits = KeptLogits(logits, kept, batch.seq_len)
        for h in self.handlers:
            if h.site == "batch_end":
                h.fn(batch, logits)
        return logits

    def _kept_positions(self, batch: Batch, caller) -> torch.Tensor | None:
        """Sorted positions to unembed, or None for all (someone reads every position, or the model can't keep).

        When nobody reads any logits, the last position alone is kept (the cheapest valid request).
        """
        if isinstance(caller, str) or not accepts_logits_to_keep(self.model):
            return None
        wanted = [h.logits for h in self.handlers if h.site == "batch_end" and h.logits is not None]
        pos = read_positions(wanted + ([lambda b: caller] if caller is not None else []), batch)
        if pos is None:
            return None
        if pos.numel() == 0:
            pos = torch.tensor([batch.seq_len - 1])
        return pos.to(self.model.device)

    def _choose_path(self, batch: Batch) -> str:
        needs_pattern = any(h.site == "pattern" for h in self.handlers)
        if self.attention == "eager":
            return "eager"
        if self.attention == "fused":
            if needs_pattern:
                raise ValueError(
                    "a handler needs full attention patterns ('pattern' site), which the fused path never builds"
                )
            if not supports_fused(self.model):
                raise ValueError(
                    f"{self.model.architecture} does not route attention through transformers' AttentionInterface; "
                    "use attention='eager'"
                )
            return "fused"
        if needs_pattern or batch.seq_len < self.fused_min_len or not supports_fused(self.model):
            return "eager"
        return "fused"

    # ---- hook builders -----------------------------------------------------------------------------------------

    def _resid_hooks(self, batch: Batch) -> list:
        hooks = []
        for h in self.handlers:
            if h.site in RESID_SITES:
                for layer in range(self.model.n_layers):
                    if h.wants(layer):
                        hooks.append((block_hook(layer, f"hook_{h.site}"), _observer(h.fn, layer, batch)))
        return hooks

    def _eager_attention_hooks(self, batch: Batch) -> list:
        hooks = []
        has_rot = any(n.endswith("attn.hook_rot_q") for n in self.model.bridge.hook_dict)
        for layer in range(self.model.n_layers):
            view_fns = [h for h in self.handlers if h.site == "attention" and h.wants(layer)]
            pattern_fns = [h for h in self.handlers if h.site in ("pattern", "rows") and h.wants(layer)]
            if pattern_fns or view_fns:
                hooks.append(
                    (attn_hook(layer, "hook_pattern"), self._pattern_hook(pattern_fns, layer, batch, view_fns))
                )
            for site in ("q", "k", "v"):
                fns = [h for h in self.handlers if h.site == site and h.wants(layer)]
                if fns or (view_fns and site != "v"):
                    name = attn_hook(layer, f"hook_rot_{site}" if has_rot and site != "v" else f"hook_{site}")
                    hooks.append((name, self._qk_hook(fns, layer, batch, site)))
            z_fns = [h for h in self.handlers if h.site == "z" and h.wants(layer)]
            if z_fns:
                hooks.append((attn_hook(layer, "hook_z"), self._z_hook(z_fns, layer, batch)))
        return hooks

    def _pattern_hook(self, handlers: list[_Handler], layer: int, batch: Batch, view_fns=()):
        def hook(pattern, hook=None):
            pattern = pattern.float()
            for h in handlers:
                if h.site == "pattern":
                    h.fn(layer, pattern, batch)
                else:
                    for q_pos in _query_chunks(h, batch, self.chunk_size, pattern.device):
                        h.fn(layer, _rows_of(pattern, q_pos, contiguous=h.queries is None), q_pos, batch)
            if view_fns:
                q, k = self._qk.pop((layer, "q")), self._qk.pop((layer, "k"))
                spec = layer_score_spec(self.model, layer, batch.attention_mask.to(pattern.device))
                view = AttentionView(q, k, spec, pattern=pattern, chunk=self.chunk_size)
                for h in view_fns:
                    h.fn(layer, view, batch)
            return None

        return hook

    def _qk_hook(self, handlers, layer, batch, site):
        n_heads = self.model.n_heads if site == "q" else self.model.n_kv_heads

        def hook(x, hook=None):
            x = _as_bhsd(x, n_heads, self.model.d_head)
            if any(h.site == "attention" and h.wants(layer) for h in self.handlers):
                self._qk[(layer, site)] = x  # for this layer's AttentionView, built at its pattern hook
            for h in handlers:
                h.fn(layer, x, batch)
            return None

        return hook

    def _z_hook(self, handlers, layer, batch):
        def hook(z, hook=None):
            if z.dim() == 3:
                z = z.view(z.shape[0], z.shape[1], self.model.n_heads, self.model.d_head)
            for h in handlers:
                h.fn(layer, z, batch)
            return None

        return hook

    # ---- the fused path's per-layer work (called from the registered attention function) ------------------

    def _fused_layer(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        scaling: float,
        causal: bool,
        batch: Batch,
        *,
        sliding_window: int | None = None,
        softcap: float | None = None,
        v: torch.Tensor | None = None,
        sdpa_mask=None,
    ) -> torch.Tensor | None:
        """Feed the layer's handlers; returns the layer's attention output when the view's kept weights block
        gives it exactly (``AttentionView.attention_output``), else None (the SDPA call runs)."""
        view_fns = [h for h in self.handlers if h.site == "attention" and h.wants(layer)]
        view = None
        if view_fns or any(h.site == "rows" and h.queries is None and h.wants(layer) for h in self.handlers):
            mask = batch.attention_mask.to(q.device)
            spec = ScoreSpec(scaling, causal, softcap, sliding_window, mask, right_padded=batch.right_padded)
            view = AttentionView(q, k, spec, chunk=self.chunk_size, workspace=self._workspace)
            for h in view_fns:
                h.fn(layer, view, batch)
        shared = []  # "rows" handlers that read every query: each chunk's rows are computed once for all of them
        for h in self.handlers:
            if not h.wants(layer):
                continue
            if h.site == "q":
                h.fn(layer, q, batch)
            elif h.site == "k":
                h.fn(layer, k, batch)
            elif h.site == "rows" and h.queries is None:
                shared.append(h)
            elif h.site == "v" and v is not None:
                h.fn(layer, v, batch)
            elif h.site == "rows":
                for q_pos in _query_chunks(h, batch, self.chunk_size, q.device):
                    h.fn(
                        layer,
                        attention_rows(q, k, q_pos, scaling=scaling, key_mask=batch.attention_mask, causal=causal),
                        q_pos,
                        batch,
                    )
        if shared:
            # a short batch's weights block, when the view keeps one, holds these rows already: the same softmax of
            # the same masked scores (attention_rows knows no window or soft cap: those layers compute them here)
            block = view._block() if view is not None and softcap is None and sliding_window is None else None
            for q_pos in _query_chunks(shared[0], batch, self.chunk_size, q.device):
                if block is not None:
                    rows = _rows_of(block, q_pos, contiguous=True)
                else:
                    rows = attention_rows(q, k, q_pos, scaling=scaling, key_mask=batch.attention_mask, causal=causal)
                for h in shared:
                    h.fn(layer, rows, q_pos, batch)
        if view is None or v is None or isinstance(sdpa_mask, str):
            return None
        return view.attention_output(v, sdpa_mask)

    def _fused_z(self, layer: int, z: torch.Tensor, batch: Batch) -> None:
        for h in self.handlers:
            if h.site == "z" and h.wants(layer):
                h.fn(layer, z, batch)


class KeptLogits:
    """Logits computed only at some positions, indexed like the full ``[batch, seq, vocab]`` tensor.

    ``logits[b, positions]`` (absolute positions, negative ones counted from the end; an int or a 1-D tensor)
    returns the kept rows; a position that was not kept raises ``IndexError``.
    """

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, seq_len: int):
        self.values, self.positions, self.seq_len = values, positions, seq_len

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __getitem__(self, index):
        b, pos = index
        scalar = isinstance(pos, int)
        pos = torch.as_tensor(pos, device=self.positions.device).flatten().to(torch.long)
        pos = torch.where(pos < 0, pos + self.seq_len, pos)
        idx = torch.searchsorted(self.positions, pos).clamp(max=len(self.positions) - 1)
        if not torch.equal(self.positions[idx], pos):
            raise IndexError(f"logits were kept only at positions {self.positions.tolist()}")
        rows = self.values[b, idx.to(self.values.device)]
        return rows[0] if scalar else rows


def read_positions(selectors, batch: Batch) -> torch.Tensor | None:
    """The positions whose logits ``selectors`` read: sorted, unique, absolute (negative ones count from the end).

    Each selector is ``batch -> positions`` (a tensor or sequence, shared by the batch's rows), or reads every
    position: the string ``"all"`` or a selector returning None. None when one of them reads every position.
    The capture engine keeps the logits of these positions only (``logits_to_keep``); the ablation scorer runs the
    last MLP and the unembedding there only (a metric's ``read_positions``).
    """
    parts = [torch.empty(0, dtype=torch.long)]
    for select in selectors:
        positions = None if isinstance(select, str) else select(batch)
        if positions is None:
            return None
        parts.append(torch.as_tensor(positions).flatten().to(torch.long).cpu())
    pos = torch.cat(parts)
    return torch.unique(torch.where(pos < 0, pos + batch.seq_len, pos))  # sorted


def accepts_logits_to_keep(model: LoadedModel) -> bool:
    """Whether the HF model's forward takes ``logits_to_keep`` (causal LMs and LLaVA in transformers 5; not BERT)."""
    hf = getattr(model.bridge, "original_model", None)
    return hf is not None and "logits_to_keep" in inspect.signature(hf.forward).parameters


def attention_scaling(model: LoadedModel, layer: int) -> float:
    """The scale the model's attention multiplies ``q . k`` by (its HF module's ``scaling``, else 1/sqrt(d_head))."""
    attn = model.bridge.blocks[layer].attn
    original = getattr(attn, "original_component", attn)
    for sub in original.modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, (int, float)):
            return float(scaling)
    return float(model.d_head) ** -0.5


def layer_score_spec(model: LoadedModel, layer: int, key_mask: torch.Tensor | None) -> ScoreSpec:
    """How layer ``layer`` scores keys on the eager path: its scale, causality, sliding window and soft cap, read
    from the HF attention module and config (the fused path takes them from the attention call itself)."""
    attn = model.bridge.blocks[layer].attn
    original = getattr(attn, "original_component", attn)
    cfg = getattr(original, "config", None)
    window = getattr(original, "sliding_window", None)
    softcap = getattr(cfg, "attn_logit_softcapping", None) if cfg is not None else None
    return ScoreSpec(
        attention_scaling(model, layer),
        bool(model.causal),
        float(softcap) if softcap else None,
        int(window) if isinstance(window, int) and window > 0 else None,
        key_mask,
    )


def _observer(fn, layer, batch):
    def hook(x, hook=None):
        fn(layer, x, batch)
        return None

    return hook


def _as_bhsd(x: torch.Tensor, n_heads: int, d_head: int) -> torch.Tensor:
    """Bring a q/k activation to ``[batch, heads, seq, d_head]`` whatever layout the hook used."""
    if x.dim() == 3:  # [b, s, h*d]
        return x.view(x.shape[0], x.shape[1], n_heads, d_head).transpose(1, 2)
    if x.dim() == 4 and x.shape[1] == n_heads and x.shape[-1] == d_head:
        return x
    if x.dim() == 4 and x.shape[2] == n_heads:  # [b, s, h, d]
        return x.transpose(1, 2)
    raise ValueError(f"unexpected q/k shape {tuple(x.shape)}")


def _rows_of(pattern: torch.Tensor, q_pos: torch.Tensor, *, contiguous: bool) -> torch.Tensor:
    """``pattern[:, :, q_pos, :]``: a view (no copy) when the chunk is a contiguous run of positions."""
    if contiguous and len(q_pos):
        start = int(q_pos[0])
        return pattern[:, :, start : start + len(q_pos), :]
    return pattern[:, :, q_pos, :]


def _query_chunks(h: _Handler, batch: Batch, chunk: int, device) -> list[torch.Tensor]:
    positions = h.queries(batch) if h.queries is not None else torch.arange(batch.seq_len)
    positions = torch.as_tensor(positions, dtype=torch.long, device=device)
    return [positions[i : i + chunk] for i in range(0, len(positions), chunk)]


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """Post-softmax attention rows ``[batch, n_heads, len(q_pos), seq_k]`` for chosen query positions.

    ``q``: ``[batch, n_heads, seq_q, d]``; ``k``: ``[batch, n_kv_heads, seq_k, d]`` (GQA: each KV head serves
    ``n_heads / n_kv_heads`` consecutive query heads). Computed in float32; keys masked by ``key_mask`` (1 = real)
    and, if ``causal``, keys after the query (query i sits at key position ``i + seq_k - seq_q``).
    """
    b, n_heads, seq_q, d = q.shape
    n_kv, seq_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    qc = q[:, :, q_pos, :].float().view(b, n_kv, group, len(q_pos), d)
    scores = torch.einsum("bkgcd,bksd->bkgcs", qc, k.float()).reshape(b, n_heads, len(q_pos), seq_k) * scaling
    allowed = torch.ones((b, 1, len(q_pos), seq_k), dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, -seq_k:]
    if causal:
        key_idx = torch.arange(seq_k, device=q.device)
        allowed = allowed & (key_idx[None, :] <= (q_pos[:, None] + (seq_k - seq_q)))[None, None]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * allowed
