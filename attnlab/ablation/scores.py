"""Exact single-head ablation scores for every head, batched, and the attribution-patching approximation.

Exact scores (``ablation_scores``): for every query head (l, h), the drop ``m_clean - m_ablated`` of a metric
averaged over prompts, where ``m_ablated`` runs the prompts with that one head ablated (``HeadAblation`` modes).
TransformerLens' ``patching.py`` runs one forward pass per head; here each forward carries many single-head
ablations, one per batch row (the prompts are repeated and a hook on ``hook_z``/``hook_pattern`` indexes the
ablated head by batch row), and the unchanged prefix is reused: layers < L are run once (the clean pass), and
the ablations of layer L's heads start from the cached residual entering block L.

Prefix reuse uses the bridge's ``forward(resid, start_at_layer=L, attention_mask=...)``. That forward still
executes blocks 0..L-1 internally and discards their output (documented in TransformerLens 4.x), so it alone
saves nothing; while it runs, those blocks are temporarily replaced by identity functions (``_skip_blocks``).
Checked on Llama (RoPE, GQA) and GPT-2 (learned positions), with padding masks: scores equal the
full-forward loop to float tolerance (``tests/test_ablation.py``).

Two more savings leave the scores unchanged (CPU: the batched scorer's process time fell by ~40%):
- z-replacing modes (zero, mean, resample) run on fused SDPA attention where the model's HF attention calls
  ``transformers``' attention interface (``attnlab.fused``, the engine the capture engine's fused path uses: the
  bridge's eager attention wrappers are swapped for the HF modules, and the edit, ``FusedForward.z_edits``, is
  applied to the SDPA output, which has ``hook_z``'s layout); no ``[rows, heads, seq, seq]`` pattern is built.
  The uniform mode edits patterns and stays on the eager path.
- metrics that declare the positions they read (``read_positions``: ``AnswerTokens``, ``LogitDifference``): the
  last block's MLP and the unembedding run only at those positions (``_only_positions``); the vocabulary
  projection alone costs about one layer on small models.
Two further exact savings on the fused path (``reuse_attention=True``, the default; ``_clean_attention_forward``):
- the ablated layer's attention is not recomputed: with z replaced, layer L's attention output for a row is
  the clean one plus ``(z~ - z)[h] @ W_O[h]`` (the output projection is linear, the other heads unchanged, its
  bias cancels), so the row starts from the clean residual entering L with that output in place of the
  attention module (``_FixedAttention``) and runs only L's MLP, then L+1.. in full. Applies where every
  layer's clean attention output is checked to be ``W_O``-linear in z (pre-norm Llama/Qwen2, GPT-2); BERT's
  post-norm ``BertAttention`` (``LayerNorm(dense(z) + x)``) and batches with ``pixel_values`` keep the path above.
- the last layer's attention computes queries only at the metric's read positions (keys/values everywhere;
  ``FusedForward.query_positions``, ``fused.attention_at_queries``, ``_query_projections``), which with the
  restricted MLP/unembedding makes the last layer cost a few positions.
The per-head loop (``loop_ablation_grid``) stays the plain reference: eager bridge, hook on ``hook_z``, one full
forward per head, as TransformerLens' ``patching.get_act_patch_attn_head_out_all_pos`` does (its equality with
that function is tested too).

Attribution patching (``attribution_scores``, Nanda 2023; Kramar et al. 2024, AtP): one forward and one
backward on the clean prompts give ``dm/dz`` for every head; the estimated drop is
``-sum_{t,d} (z~ - z) * dm/dz``. A first-order pre-screen only (saturation and cancellation make it miss
heads); ``ablation_scores(..., attribution=True)`` records its Spearman correlation with the exact scores.

See ``docs/methods/ablation_scoring.md`` §3 (exact single-head scores) and §4 (attribution patching).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.ablation.head_ablation import MODES, HeadAblation
from attnlab.ablation.metrics import as_metric
from attnlab.capture import read_positions as logit_positions
from attnlab.fused import (
    FusedForward,
    at_positions,
    attention_slots,
    fused_attention,
    replaced_forwards,
    supports_fused,
    swapped_child,
)
from attnlab.heads.results import HeadScores
from attnlab.hooks import attn_hook, block_hook
from attnlab.models.loading import Batch
from attnlab.progress import bar as progress_bar
from attnlab.stats import spearman


def _repeat(batch: Batch, n: int) -> Batch:
    """The batch repeated n times (row i*P + p is prompt p)."""
    return Batch(batch.input_ids.repeat(n, 1), batch.attention_mask.repeat(n, 1), list(batch.prompt_indices) * n)


def _skip_blocks(bridge, upto: int, returns_tuple: bool):
    """Blocks 0..upto-1 become identities (their output is discarded by ``start_at_layer`` anyway)."""

    def passthrough(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) if returns_tuple else x

    return replaced_forwards(list(bridge.blocks)[:upto], lambda block: passthrough)


@contextlib.contextmanager
def _only_positions(bridge, positions: torch.Tensor | None):
    """The last block's MLP and the unembedding run only at ``positions`` (the metric's); elsewhere they output 0.

    Both act position-wise after the last attention layer, so the logits at ``positions`` are unchanged and
    the metric too; this removes most of the last layer's MLP and the vocabulary projection (as large as a
    whole layer for small models) from every ablation forward.
    """
    if positions is None:
        yield
        return
    targets = [
        t
        for t in (getattr(bridge.blocks[len(bridge.blocks) - 1], "mlp", None), getattr(bridge, "unembed", None))
        if t is not None
    ]
    with replaced_forwards(targets, lambda t: at_positions(t, positions)):
        yield


def sdpa_capable(model, mode: str) -> bool:
    """Whether z-replacing ablations of this model can run on fused SDPA attention instead of the bridge's eager
    path."""
    return mode in ("zero", "mean", "resample") and supports_fused(model)


_O_PROJ_NAMES = ("o_proj", "c_proj", "out_proj")  # Llama/Qwen2/Mistral, GPT-2 (Conv1D), OPT-style


def _output_projection(attention: torch.nn.Module, n_heads: int, d_head: int) -> torch.Tensor | None:
    """``W_O`` ``[n_heads, d_head, d_model]`` of an HF attention module whose output is its output projection
    applied to the concatenated z, or None (no such direct child, e.g. BERT's ``BertAttention``, whose output
    is ``LayerNorm(dense(z) + x)`` and so not linear in z)."""
    for name in _O_PROJ_NAMES:
        proj = getattr(attention, name, None)
        w = getattr(proj, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        w = w if type(proj).__name__ == "Conv1D" else w.t()  # GPT-2's Conv1D stores [in, out], Linear [out, in]
        if w.shape[0] == n_heads * d_head:
            return w.reshape(n_heads, d_head, w.shape[1])
    return None


def _attention_reuse_weights(model, z: list[torch.Tensor], out: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Per-layer ``W_O`` when every layer's clean attention output is ``W_O``-linear in its z (checked), else None.

    The check (``out - z @ W_O`` constant over rows and positions: the output projection's bias) guards the
    rank-one update of ``_clean_attention_forward`` against architectures whose attention module does more
    after the projection (post-norm blocks, gates); those keep the previous path.
    """
    originals = {slot.layer: slot.original for slot in attention_slots(model)}
    weights = []
    for layer in range(model.n_layers):
        if layer not in originals:
            return None
        w = _output_projection(originals[layer], model.n_heads, model.d_head)
        if w is None or z[layer].shape[-2:] != w.shape[:2] or out[layer].shape[-1] != w.shape[-1]:
            return None
        lin = torch.einsum("bshd,hdm->bsm", z[layer].float(), w.float())
        rest = out[layer].float() - lin
        scale = 1e-4 * (1.0 + out[layer].float().abs().max())
        if (rest - rest[:1, :1]).abs().max() > scale:
            return None
        weights.append(w.detach())
    return weights


class _FixedAttention(torch.nn.Module):
    """Stands in for one layer's HF attention module: returns a precomputed output (and no weights); the HF
    block adds it to its residual input as it would the real attention output."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output, None


def _query_projections(original: torch.nn.Module, positions: torch.Tensor | None):
    """The last layer's query and output projections run only at ``positions`` (the metric's read positions).

    With ``FusedForward.query_positions`` naming the same positions for that layer (``attention_at_queries``), the
    last layer's attention computes queries only there (keys and values stay at all positions); elsewhere its
    output is 0. The last MLP and the unembedding are restricted too (``_only_positions``), so nothing at the
    other positions reaches the logits the metric reads.
    """
    if positions is None:
        return contextlib.nullcontext()
    w_o_name = next((n for n in _O_PROJ_NAMES if isinstance(getattr(original, n, None), torch.nn.Module)), None)
    targets = [
        getattr(original, n)
        for n in ("q_proj", w_o_name)
        if n is not None and isinstance(getattr(original, n, None), torch.nn.Module)
    ]
    return replaced_forwards(targets, lambda t: at_positions(t, positions))


@dataclass
class _CleanRun:
    """What the clean pass leaves for the ablation forwards.

    ``metric``: the clean metric per prompt; ``resid[l]``: the residual entering block l; ``returns_tuple``: the
    blocks' output kind; ``attention`` (clean attention reuse only): every layer's clean z, attention-module
    output and, once checked, ``W_O`` (``{"z": [...], "out": [...], "w_o": [...]}``), else None.
    """

    metric: torch.Tensor
    resid: list[torch.Tensor]
    returns_tuple: bool
    attention: dict | None = None

    def resid_for(self, rows: _AblationRows) -> torch.Tensor:
        """The residual entering ``rows.layer``, repeated for the rows of ``rows.batch``."""
        r = self.resid[rows.layer]
        return r.repeat(rows.batch.size // r.shape[0], 1, 1)


@dataclass
class _AblationRows:
    """One ablation forward: row r of ``batch`` (the prompts repeated) ablates head ``heads[r]`` of ``layer`` on
    prompt ``prompts[r]``."""

    layer: int
    batch: Batch
    heads: torch.Tensor
    prompts: torch.Tensor


def _clean_attention_forward(
    model, rows: _AblationRows, clean: _CleanRun, abl: HeadAblation, positions: torch.Tensor | None
) -> torch.Tensor:
    """Logits of ``rows``, each ablating its head of ``rows.layer``, reusing that layer's clean attention.

    With z replaced, the layer's attention output is the clean one plus ``(z~ - z)[h] @ W_O[h]`` (the output
    projection is linear, the other heads are unchanged, its bias cancels), so the row starts from the clean
    residual entering the layer and its attention module is replaced by that output (``_FixedAttention``):
    no q/k/v projections or attention for the ablated layer. The HF block adds it to its residual (pre-norm
    Llama/Qwen2 and GPT-2: ``resid_mid = resid_pre + attn_out``) and runs its MLP; later layers run in full on
    fused SDPA, the last one with queries only at ``positions`` (when the metric's positions are known).
    """
    layer, attn = rows.layer, clean.attention
    z = attn["z"][layer]
    hr, pr = rows.heads.to(z.device), rows.prompts.to(z.device)
    diff = abl.replacement(layer, hr, pr, z).to(z.dtype) - z[pr, :, hr]  # [rows, seq, d_head]
    output = attn["out"][layer][pr] + torch.bmm(diff, attn["w_o"][layer][hr].to(diff.dtype)).to(
        attn["out"][layer].dtype
    )
    slots = {slot.layer: slot for slot in attention_slots(model)}
    last = model.n_layers - 1
    last_positions = positions if layer < last else None
    forward = FusedForward(query_positions={} if last_positions is None else {last: last_positions})
    with (
        fused_attention(model, forward),
        swapped_child(slots[layer].parent, slots[layer].attr, _FixedAttention(output)),
        _query_projections(slots[last].original, last_positions),
        _only_positions(model.bridge, positions),
        _skip_blocks(model.bridge, layer, clean.returns_tuple),
    ):
        return model.bridge(clean.resid_for(rows), start_at_layer=layer, attention_mask=rows.batch.attention_mask)


@torch.no_grad()
def _clean_pass(model, batch: Batch, metric, *, attention: bool = False) -> _CleanRun:
    """The clean run: metric per prompt, the residual entering every block, the blocks' output kind, and
    (``attention=True``) every layer's clean z and attention-module output."""
    resid: dict[int, torch.Tensor] = {}
    zs: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    kinds: list[bool] = []

    def keep(store, layer):
        def hook(x, hook=None):
            store[layer] = x.detach().clone()

        return hook

    def keep_output(layer):
        def hook(module, args, output):
            outs[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    hooks = [(block_hook(l, "hook_resid_pre"), keep(resid, l)) for l in range(model.n_layers)]
    handles = [model.bridge.blocks[0].register_forward_hook(lambda mod, i, o: kinds.append(isinstance(o, tuple)))]
    if attention:
        hooks += [(attn_hook(l, "hook_z"), keep(zs, l)) for l in range(model.n_layers)]
        handles += [model.bridge.blocks[l].attn.register_forward_hook(keep_output(l)) for l in range(model.n_layers)]
    try:
        with model.bridge.hooks(fwd_hooks=hooks):
            logits = model.forward(batch)
    finally:
        for h in handles:
            h.remove()
    attn = None
    if attention and len(zs) == len(outs) == model.n_layers:
        attn = {"z": [zs[l] for l in range(model.n_layers)], "out": [outs[l] for l in range(model.n_layers)]}
    return _CleanRun(
        metric(logits, batch).float(), [resid[l] for l in range(model.n_layers)], bool(kinds and kinds[0]), attn
    )


@torch.inference_mode()
def _prefix_reuse_matches(model, batch: Batch, metric, clean: _CleanRun, atol: float = 1e-4) -> bool:
    """Whether the bridge, started at layer 1 from the cached residual, reproduces the clean metric.

    Prefix reuse relies on ``start_at_layer`` feeding the cached residual to block 1 exactly as the full forward
    does. That holds for the decoders we test (GPT-2, Llama, Qwen2); on BERT the bridge's ``start_at_layer`` path
    does not (its metric moves by ~1e-2 with no ablation at all), so there the scores must come from full forwards.
    One partial forward, checked once per grid."""
    if model.n_layers < 2:
        return True
    with _skip_blocks(model.bridge, 1, clean.returns_tuple):
        logits = model.bridge(clean.resid[1], start_at_layer=1, attention_mask=batch.attention_mask)
    again = metric(logits, batch).float()
    return bool(torch.allclose(again, clean.metric, atol=atol, rtol=1e-4))


def _fit(model, mode: str, batch: Batch, reference, seed: int) -> HeadAblation:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "resample" and reference is None:
        raise ValueError("resample ablation needs reference prompts (other prompts of the same padded length)")
    ref = batch if reference is None else reference
    return HeadAblation(mode=mode, seed=seed).fit(
        model, ref if mode in ("mean", "resample") else None, layers=range(model.n_layers)
    )


def _hooked_forward(
    model,
    rows: _AblationRows,
    clean: _CleanRun,
    abl: HeadAblation,
    positions: torch.Tensor | None,
    *,
    fused: bool,
    prefix_reuse: bool,
) -> torch.Tensor:
    """Logits of ``rows``, each ablating its head of ``rows.layer`` by a hook on its z (or pattern), recomputing
    the layer's attention; from the residual entering the layer when ``prefix_reuse`` (and the layer is > 0)."""
    ((name, fn),) = abl.row_hooks(rows.layer, rows.heads, rows.batch.attention_mask, rows.prompts)
    if fused:  # the z hook runs inside the SDPA attention function instead of on hook_z
        ctx = fused_attention(model, FusedForward(z_edits={rows.layer: fn}))
    else:
        ctx = model.bridge.hooks(fwd_hooks=[(name, fn)])
    with ctx, _only_positions(model.bridge, positions):
        if prefix_reuse and rows.layer > 0:
            with _skip_blocks(model.bridge, rows.layer, clean.returns_tuple):
                return model.bridge(
                    clean.resid_for(rows), start_at_layer=rows.layer, attention_mask=rows.batch.attention_mask
                )
        return model.forward(rows.batch)


@torch.inference_mode()
def exact_ablation_grid(
    model,
    prompts: Sequence[str],
    metric,
    *,
    mode: str = "zero",
    reference=None,
    layers: Sequence[int] | None = None,
    max_batch: int = 64,
    prefix_reuse: bool = True,
    read_positions: bool = True,
    attention: str = "auto",
    reuse_attention: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean metric over prompts with each single head ablated, ``(ablated [L, H], clean per prompt [P])``.

    Batched: ``max_batch`` rows per forward (heads x prompts). Layers not in ``layers`` stay NaN.
    ``read_positions``: when the metric declares the positions it reads (its ``read_positions``), the last MLP
    and the unembedding of the ablation forwards run only there (``prefix_reuse`` and this are the two savings;
    both leave the scores unchanged). ``attention``: ``"auto"`` runs z-replacing modes on fused SDPA attention
    where the model supports it (``attnlab.fused``; the uniform mode edits patterns and stays eager),
    ``"eager"`` always uses the bridge's hooked eager path, ``"sdpa"`` requires the fused one.
    ``reuse_attention`` (fused path with ``prefix_reuse``): rows ablating a head of layer L start from the clean
    residual entering L plus layer L's clean attention output corrected by ``(z~ - z)[h] @ W_O[h]``
    (``_clean_attention_forward``), and the last layer's attention computes only the read positions' queries.
    It applies where every attention module's output is checked to be ``W_O``-linear in z (pre-norm decoders:
    Llama, Qwen2, GPT-2); elsewhere (post-norm BERT, models fed ``pixel_values``, whose image rows
    ``_repeat`` does not carry) the previous path runs.
    """
    metric = as_metric(metric)
    batch = metric.encode(model, list(prompts)).to(model.device)
    abl = _fit(model, mode, batch, reference, seed)
    if attention not in ("auto", "eager", "sdpa"):
        raise ValueError(f"attention must be 'auto', 'eager' or 'sdpa', got {attention!r}")
    fused = attention == "sdpa" or (attention == "auto" and sdpa_capable(model, mode))
    if fused and not sdpa_capable(model, mode):
        raise ValueError(
            "attention='sdpa' needs a z-replacing mode (zero, mean, resample) and a model whose attention calls "
            "transformers' attention interface"
        )
    reuse = fused and prefix_reuse and reuse_attention and getattr(batch, "pixel_values", None) is None
    clean = _clean_pass(model, batch, metric, attention=reuse)
    if prefix_reuse and not _prefix_reuse_matches(model, batch, metric, clean):
        warnings.warn(
            f"{model.name}: a forward started at layer 1 from the cached residual does not reproduce the clean "
            "run; ablation scores use full forwards (slower)",
            stacklevel=2,
        )
        prefix_reuse, clean.attention = False, None
    if clean.attention is not None:
        clean.attention["w_o"] = _attention_reuse_weights(model, clean.attention["z"], clean.attention["out"])
        if clean.attention["w_o"] is None:
            clean.attention = None
    reads = getattr(metric, "read_positions", lambda b: None)  # a metric that does not say reads every position
    positions = logit_positions([reads], batch) if read_positions else None
    n_prompts, H = batch.size, model.n_heads
    per_fwd = max(1, max_batch // n_prompts)
    grid = np.full((model.n_layers, H), np.nan)
    todo = list(range(model.n_layers) if layers is None else layers)
    bar = progress_bar(total=len(todo) * H, desc="ablation", unit="head", disable=not progress)
    for layer in todo:
        for h0 in range(0, H, per_fwd):
            heads = torch.arange(h0, min(H, h0 + per_fwd))
            rows = _AblationRows(
                layer=layer,
                batch=_repeat(batch, len(heads)).to(model.device),
                heads=heads.repeat_interleave(n_prompts),
                prompts=torch.arange(n_prompts).repeat(len(heads)),
            )
            if clean.attention is not None:
                logits = _clean_attention_forward(model, rows, clean, abl, positions)
            else:
                logits = _hooked_forward(model, rows, clean, abl, positions, fused=fused, prefix_reuse=prefix_reuse)
            values = metric(logits, rows.batch).float().view(len(heads), n_prompts)
            grid[layer, heads.numpy()] = values.mean(1).cpu().numpy()
            bar.update(len(heads))
    bar.close()
    return grid, clean.metric.cpu().numpy()


@torch.no_grad()
def loop_ablation_grid(
    model,
    prompts: Sequence[str],
    metric,
    *,
    mode: str = "zero",
    reference=None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation: one full forward per head (all prompts in one batch), no prefix reuse."""
    metric = as_metric(metric)
    batch = metric.encode(model, list(prompts)).to(model.device)
    abl = _fit(model, mode, batch, reference, seed)
    clean = metric(model.forward(batch), batch).float().cpu().numpy()
    grid = np.full((model.n_layers, model.n_heads), np.nan)
    for layer in range(model.n_layers) if layers is None else layers:
        for h in range(model.n_heads):
            hooks = abl.row_hooks(layer, torch.full((batch.size,), h), batch.attention_mask)
            with model.bridge.hooks(fwd_hooks=hooks):
                grid[layer, h] = metric(model.forward(batch), batch).float().mean().item()
    return grid, clean


def attribution_grid(
    model, prompts: Sequence[str], metric, *, mode: str = "zero", reference=None, seed: int = 0
) -> np.ndarray:
    """AtP estimate of each head's drop ``m_clean - m_ablated`` (mean over prompts), ``[L, H]``.

    One forward + one backward: a zero tensor requiring grad is added to every layer's z, so ``dm/dz`` keeps
    the indirect paths through later heads; gradients are taken with ``torch.autograd.grad`` (parameters'
    ``.grad`` untouched). The uniform mode's z~ is the mean of the head's visible values (``hook_v``).
    """
    metric = as_metric(metric)
    batch = metric.encode(model, list(prompts)).to(model.device)
    abl = _fit(model, mode, batch, reference, seed)
    zs, deltas, vs = {}, {}, {}

    def z_hook(layer):
        def hook(z, hook=None):
            zs[layer] = z.detach().float()
            deltas[layer] = torch.zeros_like(z, requires_grad=True)
            return z + deltas[layer]

        return hook

    def v_hook(layer):
        def hook(v, hook=None):
            vs[layer] = v.detach().float()

        return hook

    hooks = [(attn_hook(l, "hook_z"), z_hook(l)) for l in range(model.n_layers)]
    if mode == "uniform":
        hooks += [(attn_hook(l, "hook_v"), v_hook(l)) for l in range(model.n_layers)]
    with torch.enable_grad(), model.bridge.hooks(fwd_hooks=hooks):
        logits = model.forward(batch)
        total = metric(logits, batch).float().sum()
        grads = torch.autograd.grad(total, [deltas[l] for l in range(model.n_layers)], allow_unused=True)
    out = np.zeros((model.n_layers, model.n_heads))
    rows = torch.arange(batch.size, device=model.device)
    for layer, g in enumerate(grads):
        z = zs[layer]
        if g is None:
            continue
        g = g.float()
        tilde = (
            _uniform_z(vs[layer], batch.attention_mask, model)
            if mode == "uniform"
            else torch.stack(
                [
                    abl.replacement(layer, torch.full((batch.size,), h, device=z.device), rows, z).float()
                    for h in range(model.n_heads)
                ],
                dim=2,
            )
        )
        effect = ((tilde - z) * g).sum(dim=(1, 3))  # [P, H]: first-order m_do - m_clean per prompt
        out[layer] = (-effect.mean(0)).detach().cpu().numpy()
    return out


def _uniform_z(v: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor:
    """Mean of visible values per query position ``[P, S, n_heads, d]`` from ``v`` ``[P, S, n_kv, d]`` (GQA)."""
    if not model.causal:
        raise ValueError("uniform attention AtP is implemented for causal models only")
    w = mask.to(v.device).float()[:, :, None, None]
    mean = (v * w).cumsum(1) / w.cumsum(1).clamp_min(1.0)
    return mean.repeat_interleave(model.n_heads // v.shape[2], dim=2)


def ablation_scores(
    model,
    prompts: Sequence[str],
    metric,
    *,
    mode: str = "zero",
    reference=None,
    layers: Sequence[int] | None = None,
    max_batch: int = 64,
    prefix_reuse: bool = True,
    attention: str = "auto",
    reuse_attention: bool = True,
    attribution: bool = False,
    seed: int = 0,
    name: str | None = None,
    progress: bool = False,
) -> HeadScores:
    """Exact single-head ablation scores for all heads as ``HeadScores`` (score = drop of the metric).

    Parameters
    ----------
    model : LoadedModel
    prompts : sequence of str
    metric : metric object (``attnlab.ablation.metrics``) or callable ``fn(logits, batch) -> Tensor[rows]``
    mode : {"zero", "mean", "uniform", "resample"}, default="zero"
    reference : sequence of str or Batch, optional
        Reference set of the mean (default: the prompts themselves) and resample (required) modes.
    layers : sequence of int, optional
        Layers to score (others NaN); default all.
    max_batch : int, default=64
        Rows per forward pass (heads x prompts).
    prefix_reuse : bool, default=True
        Start layer L's ablations from the cached residual entering block L.
    attention : {"auto", "eager", "sdpa"}, default="auto"
        Attention path of the ablation forwards (``exact_ablation_grid``); scores agree to float tolerance.
    reuse_attention : bool, default=True
        Reuse the ablated layer's clean attention output (rank-one correction) and compute the last layer's
        queries only where the metric reads (fused path; ``exact_ablation_grid``); scores unchanged.
    attribution : bool, default=False
        Also compute AtP estimates (``extra["atp"]``) and their Spearman correlation with the exact scores
        (``summary["atp_spearman"]``).
    progress : bool, default=False
        A progress bar (with an ETA) over the heads ablated.

    Returns
    -------
    HeadScores with ``scores`` = mean over prompts of ``m_clean - m_ablated``; ``extra["ablated"]`` the
    ablated metric; ``summary`` the clean metric, mode, unit and timing.
    """
    metric = as_metric(metric)
    t0 = time.perf_counter()
    ablated, clean = exact_ablation_grid(
        model,
        prompts,
        metric,
        mode=mode,
        reference=reference,
        layers=layers,
        max_batch=max_batch,
        prefix_reuse=prefix_reuse,
        attention=attention,
        reuse_attention=reuse_attention,
        seed=seed,
        progress=progress,
    )
    scores = clean.mean() - ablated
    summary = {
        "metric": metric.name,
        "baseline": float(clean.mean()),
        "mode": mode,
        "unit": "query head",
        "positions": "all",
        "n_prompts": len(prompts),
        "seconds_exact": time.perf_counter() - t0,
    }
    extra = {"ablated": ablated, "baseline_per_prompt": clean[None, :]}
    if attribution:
        t1 = time.perf_counter()
        atp = attribution_grid(model, prompts, metric, mode=mode, reference=reference, seed=seed)
        atp[np.isnan(scores)] = np.nan
        extra["atp"] = atp
        summary["atp_spearman"] = spearman(atp, scores)
        summary["seconds_atp"] = time.perf_counter() - t1
    return HeadScores(
        scores=scores,
        name=name or f"ablation_{mode}_{metric.name}",
        probe="ablation_scores",
        params={
            "mode": mode,
            "metric": metric.name,
            "max_batch": max_batch,
            "prefix_reuse": prefix_reuse,
            "reuse_attention": reuse_attention,
            "seed": seed,
        },
        model=model.name,
        n_kv_heads=model.n_kv_heads,
        description=f"drop of {metric.name} when one head is {mode}-ablated",
        extra=extra,
        summary=summary,
    )
