"""Independent reference computations for the parity tests (tests/test_parity_*.py).

Everything here runs on plain ``transformers`` models loaded with eager attention, reads attention maps from
``output_attentions=True`` and hidden states from ``output_hidden_states=True``, and edits attention through a
registered attention function (``transformers.AttentionInterface``) that recomputes eager attention and hands the
post-softmax map to an edit callback: the reference code's way of changing attention, not attnlab's hooks. Nothing
here imports attnlab's probes or interventions.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch

_COUNTER = itertools.count()


def load_hf(path, *, vlm: bool = False):
    """A plain Hugging Face model in float32 with eager attention, in eval mode."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    cls = LlavaForConditionalGeneration if vlm else AutoModelForCausalLM
    return cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()


@torch.no_grad()
def run(model, ids: list[int], **kw):
    """One unpadded sequence: the HF output with attentions and hidden states."""
    x = torch.tensor([ids])
    return model(input_ids=x, output_attentions=True, output_hidden_states=True, use_cache=False, **kw)


def attentions(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the ``[heads, seq, seq]`` post-softmax attention of one unpadded sequence (float64)."""
    return [a[0].double() for a in run(model, ids).attentions]


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


@contextlib.contextmanager
def edited_attention(model, edit: Callable, *, before_softmax: Callable | None = None):
    """Forward passes inside run eager attention whose post-softmax map ``p`` ``[b, H, q, k]`` of layer ``l`` is
    replaced by ``edit(l, p, module)`` (and the masked scores by ``before_softmax(l, s, module)`` where given).

    Implemented as a registered attention function (plus the eager mask), installed on the model's config and
    restored on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name = f"parity_ref_{next(_COUNTER)}"

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = _repeat_kv(key, groups), _repeat_kv(value, groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            s = s + attention_mask[:, :, :, : k.shape[-2]]
        layer = int(getattr(module, "layer_idx", -1))
        if before_softmax is not None:
            s = before_softmax(layer, s, module)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
        p = edit(layer, p, module)
        out = torch.matmul(p, v).transpose(1, 2).contiguous()
        return out, p

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    configs = [c for c in _configs(model)]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield model
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def _configs(model):
    """The config objects whose ``_attn_implementation`` the attention modules read (text config of a VLM too)."""
    out = [model.config]
    for attr in ("text_config", "vision_config"):
        sub = getattr(model.config, attr, None)
        if sub is not None:
            out.append(sub)
    return out


@torch.no_grad()
def logits(model, ids: list[int], **kw) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0].float()


def head_outputs(model, ids: list[int], layer_module: Callable, n_heads: int, **kw) -> dict[int, torch.Tensor]:
    """Per layer, the input of its attention output projection (``o_proj``), ``[seq, heads, d_head]``: the heads'
    outputs before ``W_O`` (what VHD, function vectors and SITE read)."""
    got: dict[int, torch.Tensor] = {}
    handles = []
    for l, mod in enumerate(layer_module(model)):

        def pre(m, args, l=l):
            x = args[0][0]
            got[l] = x.reshape(x.shape[0], n_heads, -1).detach().double()

        handles.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False, **kw)
    finally:
        for h in handles:
            h.remove()
    return got


def o_projs(model) -> list:
    """The ``o_proj`` module of every decoder layer (Llama-family models and LLaVA's language model)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn.o_proj for layer in lm.layers]
