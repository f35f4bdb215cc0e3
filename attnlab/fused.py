"""Fused attention: a bridge model's attention on PyTorch's SDPA kernel, with per-layer work from a context object.

TransformerLens' bridge re-implements attention eagerly (``softmax(QK^T/sqrt(d))`` materialised per layer, so
``hook_pattern`` can fire). Inside ``fused_attention(model, forward)`` each bridge attention component is swapped
for its original Hugging Face module and the configs name ``FUSED_IMPL``, an attention function registered with
``transformers.AttentionInterface`` (``fused_attention_fn``): it calls PyTorch's SDPA, so no
``[batch, heads, seq, seq]`` pattern is ever built, and does what the ``FusedForward`` of that forward asks of
each layer:

- ``observe_qk(layer, q, k, scaling, causal, sliding_window=..., softcap=..., v=..., sdpa_mask=...)`` before the
  kernel (the capture engine recomputes attention rows and builds attention views from the rotated q and k there,
  and passes the value states to its ``"v"`` handlers), ``observe_z(layer, z)`` after it. ``observe_qk`` may
  return the layer's output ``[batch, seq, heads, d_head]``, which then replaces the SDPA call: the capture does
  when it scored the layer's whole weights block anyway (a short batch) and its mask is exactly ``sdpa_mask``,
  the boolean mask SDPA is handed (None: SDPA's own causal / full mask). Where the call is more than plain SDPA
  (dropout, a position bias, a cache, a soft cap, restricted query rows) ``sdpa_mask`` is the string
  ``_NOT_PLAIN`` and the output must not be replaced;
- ``z_edits[layer](z) -> z`` replaces the layer's per-head output (``[batch, seq, heads, d_head]``, the layout
  of ``hook_z``; the ablation scorer's head ablations);
- ``query_positions[layer]``: only those query rows are computed (keys and values at all positions), the other
  rows of the output are 0 (``attention_at_queries``; the last layer of an ablation forward whose metric reads
  a few positions).

The context lives on the HF attention modules themselves for the duration of the ``with`` block (an attribute
naming the ``FusedForward`` and the layer), so nothing is kept in module-level state and nested or concurrent
models do not see each other's. Attention modules outside the language model (a VLM's vision tower sharing the
config) are not tagged and run plain SDPA.

``replaced_forwards`` is the one place that overrides module forwards for a block (used to restrict the last
layer's MLP and the unembedding to the read positions, and to skip blocks whose output is discarded).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# transformers' attention integration is imported in the functions below, on the first fused forward: the probes,
# the capture engine and the CLI import this module, and transformers alone takes seconds to import.

FUSED_IMPL = "attnlab_fused"
_NOT_PLAIN = "not plain SDPA"  # observe_qk's sdpa_mask where the call does more than SDPA: no output to reuse
_TAG = "_attnlab_fused"  # attribute on a tagged HF attention module: (FusedForward, layer)


@dataclass
class FusedForward:
    """What the fused attention function does, layer by layer, in the forward passes of one ``with`` block."""

    observe_qk: Callable[..., None] | None = None  # (layer, q, k, scaling, causal, *, sliding_window, softcap, v)
    observe_z: Callable[[int, torch.Tensor], None] | None = None
    z_edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    query_positions: dict[int, torch.Tensor] = field(default_factory=dict)


def fused_attention_fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """``transformers`` attention function: SDPA plus the per-layer work of the module's ``FusedForward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # (see the note at the top)

    tag = getattr(module, _TAG, None)
    if tag is None:  # attention outside the language model (e.g. a VLM's vision tower sharing the config)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    forward, layer = tag
    pos = forward.query_positions.get(layer)
    out = None
    if forward.observe_qk is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
        # plain SDPA: softmax(q k^T scale + mask) v and nothing else, which an observer holding the whole weights
        # block may answer itself (see FusedForward)
        extra = ("position_bias", "cache", "softcap")
        plain = pos is None and not dropout and all(kwargs.get(x) is None for x in extra)
        out = forward.observe_qk(
            layer, query, key, scale, causal, sliding_window=window, softcap=softcap, v=value,
            sdpa_mask=attention_mask if plain else _NOT_PLAIN,
        )  # fmt: skip
    if out is None and pos is not None:
        out = attention_at_queries(
            module, query, key, value, attention_mask, pos.to(query.device), dropout=dropout, scaling=scaling, **kwargs
        )
    elif out is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    edit = forward.z_edits.get(layer)
    if edit is not None:
        out = edit(out)  # out: [batch, seq, heads, d_head], the layout of hook_z
    if forward.observe_z is not None:
        forward.observe_z(layer, out)
    return out, None


def attention_at_queries(module, query, key, value, attention_mask, pos: torch.Tensor, **kwargs) -> torch.Tensor:
    """Causal SDPA for the query rows ``pos`` only, scattered into zeros ``[batch, seq, heads, d_head]``.

    The mask is made explicit (``sdpa_attention_forward`` would otherwise pass ``is_causal=True``, which aligns a
    shorter query block top-left instead of at ``pos``): the model's mask rows at ``pos``, or ``key <= pos``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # (see the note at the top)

    seq = query.shape[2]
    if attention_mask is None:
        mask = (torch.arange(key.shape[2], device=query.device)[None, :] <= pos[:, None])[None, None]
    else:
        mask = attention_mask[:, :, pos] if attention_mask.shape[2] == seq else attention_mask
    bias = kwargs.get("position_bias")
    if bias is not None and bias.shape[2] == seq:
        kwargs["position_bias"] = bias[:, :, pos]
    part, _ = sdpa_attention_forward(module, query[:, :, pos], key, value, mask, is_causal=False, **kwargs)
    out = part.new_zeros(part.shape[0], seq, *part.shape[2:])
    out[:, pos] = part
    return out


# ---- the bridge's attention slots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSlot:
    """Where one bridged attention module sits: ``getattr(parent, attr)`` is the bridge wrapper of ``original``
    (the HF attention module) for ``layer``."""

    parent: torch.nn.Module
    attr: str
    original: torch.nn.Module
    layer: int


def attention_slots(model) -> list[AttentionSlot]:
    """The slot of each bridged attention module of a ``LoadedModel``, in module order."""
    bridged = {id(model.bridge.blocks[l].attn): l for l in range(model.n_layers)}
    slots = []
    for parent in model.hf_model.modules():
        if type(parent).__module__.startswith("transformer_lens"):
            continue  # bridge wrappers: the HF module that calls attention is the one to rewire
        for attr, child in list(parent.named_children()):
            if id(child) in bridged:
                original = getattr(child, "original_component", None)
                if original is not None:
                    slots.append(AttentionSlot(parent, attr, original, bridged[id(child)]))
    return slots


def supports_fused(model) -> bool:
    """True if the model's HF attention modules call ``transformers``' attention interface (and so can be fused)."""
    original = getattr(model.bridge.blocks[0].attn, "original_component", None)
    if original is None:
        return False
    for sub in original.modules():
        try:
            src = inspect.getsource(type(sub).forward)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in src:
            return True
    return False


def _hf_modules(original: torch.nn.Module) -> list[torch.nn.Module]:
    """``original`` and its submodules that are plain HF modules (one of them calls the attention interface)."""
    return [m for m in original.modules() if not type(m).__module__.startswith("transformer_lens")]


@contextlib.contextmanager
def fused_attention(
    model, forward: FusedForward | None = None, *, implementation: str = FUSED_IMPL
) -> Iterator[list[AttentionSlot]]:
    """Inside, the model's attention runs on SDPA through ``fused_attention_fn`` and does ``forward``'s work.

    Every bridge attention wrapper is swapped for its original HF module and the configs name ``FUSED_IMPL``;
    the HF attention modules carry ``forward`` and their layer. Yields the slots; everything is restored on exit.
    ``implementation``: another attention function registered with transformers (e.g. ``"sdpa"``, the HF model's
    own kernel, for a plain baseline); then ``forward`` is not used.
    """
    from transformers import AttentionInterface  # (see the note at the top)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FUSED_IMPL, fused_attention_fn)
    AttentionMaskInterface.register(FUSED_IMPL, sdpa_mask)
    forward = forward if forward is not None else FusedForward()
    slots = attention_slots(model)
    if len(slots) != model.n_layers:
        raise ValueError(f"found {len(slots)} of {model.n_layers} attention modules to fuse")
    subs = [sub for slot in slots for sub in slot.original.modules()]
    configs = [getattr(x, "config", None) for x in subs] + [
        model.hf_model.config,
        getattr(model.hf_model.config, "text_config", None),
    ]
    configs = list({id(c): c for c in configs if c is not None}.values())
    saved_impl = [(c, getattr(c, "_attn_implementation", None)) for c in configs]
    swapped = [(slot.parent, slot.attr, getattr(slot.parent, slot.attr)) for slot in slots]
    tagged = [(m, slot.layer) for slot in slots for m in _hf_modules(slot.original)]
    saved_tags = [(m, m.__dict__.get(_TAG)) for m, _ in tagged]
    try:
        for slot in slots:
            setattr(slot.parent, slot.attr, slot.original)
        for c, _ in saved_impl:
            c._attn_implementation = implementation
        for m, layer in tagged:
            setattr(m, _TAG, (forward, layer))
        yield slots
    finally:
        for m, tag in saved_tags:
            if tag is None:
                m.__dict__.pop(_TAG, None)
            else:
                setattr(m, _TAG, tag)
        for parent, attr, bridged in swapped:
            setattr(parent, attr, bridged)
        for c, impl in saved_impl:
            c._attn_implementation = impl


# ---- forward surgery ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def replaced_forwards(modules: list[torch.nn.Module], make_forward: Callable[[torch.nn.Module], Callable]):
    """Each module's forward is ``make_forward(module)`` inside the block, restored after it.

    Set as an instance attribute in ``__dict__``: the bridge components' ``__setattr__`` forwards attributes.
    """
    saved = [m.__dict__.get("forward") for m in modules]
    for m in modules:
        m.__dict__["forward"] = make_forward(m)
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = old


def at_positions(module: torch.nn.Module, positions: torch.Tensor) -> Callable:
    """A forward for a position-wise ``module`` that runs it only at ``positions`` (dim 1) and outputs 0 elsewhere."""
    inner = type(module).forward.__get__(module)

    def forward(x, *args, **kwargs):
        pos = positions.to(x.device)
        y = inner(x[:, pos], *args, **kwargs)
        out = y.new_zeros(x.shape[:-1] + y.shape[-1:])
        out[:, pos] = y
        return out

    return forward


@contextlib.contextmanager
def swapped_child(parent: torch.nn.Module, attr: str, module: torch.nn.Module):
    """``parent.attr`` is ``module`` inside the block."""
    saved = getattr(parent, attr)
    setattr(parent, attr, module)
    try:
        yield
    finally:
        setattr(parent, attr, saved)
