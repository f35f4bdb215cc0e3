"""Head direct logit attribution: how much each attention head, reading each source position, writes towards the
answer's logit at the prediction position.

For a pre-norm decoder the residual stream at the last layer is a sum of parts: the embeddings, every head's output,
every MLP's output and the biases. The final norm divides the whole stream by one scale ``s_q`` (and, for
LayerNorm, subtracts its mean), so with that scale read from the actual forward pass the logit of token ``t`` at
query position ``q`` splits exactly into a sum over the parts (as TransformerLens's ``apply_ln_to_stack`` does):

    logit_t(q) = sum_parts  (w ⊙ center(part_q) / s_q) · W_U[:, t]  +  b_norm · W_U[:, t] + b_U[t]

Head ``h`` of layer ``l`` reads value ``v_j`` at source position ``j`` with weight ``A[q, j]`` and writes
``A[q, j] · v_j W_O^h``, so its part splits further over source positions:

    dla(l, h, j) = (w ⊙ center(A^{l,h}[q, j] · v^{l,g(h)}_j W_O^{l,h}) / s_q) · W_U[:, t]

with ``g(h)`` the KV head of query head ``h`` (grouped-query attention explicit). Summing ``dla`` over ``j`` gives the
head's direct effect; summing every part gives the logit (checked on every call; architectures whose attention
output is not linear in the heads, or whose blocks are not ``x + attn + mlp``, are refused). With a contrast token
``t'``, ``W_U[:, t] - W_U[:, t']`` gives the logit difference instead. Direct effects only: what a head changes
through later layers is not counted (ablate it for the total effect, ``attnlab.ablation.causal_test``).

Reference: Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits" (direct path of each head);
Wang et al. (2023), "Interpretability in the Wild" (IOI: direct logit attribution of name movers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from attnlab.errors import AttnlabError

_O_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


@dataclass
class HeadDLA:
    """Direct logit attribution of every head to one answer token, per source position.

    Attributes
    ----------
    values : ndarray of shape (n_layers, n_heads, n_tokens)
        ``values[l, h, j]``: what head L{l}H{h}, reading source position ``j``, adds to the answer's logit (or
        logit difference) at ``query``; summed over ``j`` it is the head's direct effect.
    tokens : list of str, the prompt's tokens
    answer, contrast : str, the answer token (and the contrast token, when a logit difference was asked for)
    query : int, the position whose prediction is attributed (default: the last token)
    logit : float, the model's logit (or logit difference) there
    parts : dict of str -> float, the other parts: ``embeddings``, ``mlp`` (all layers), ``attention_bias`` and
        ``norm_and_unembed_bias``; ``heads`` + these equal ``logit`` (``reconstruction_error`` says how closely)
    per_layer : dict of str -> ndarray (n_layers,), the MLP and attention-bias parts per layer
    """

    values: np.ndarray
    tokens: list[str]
    answer: str
    query: int
    logit: float
    model: str = ""
    contrast: str | None = None
    parts: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, np.ndarray] = field(default_factory=dict)
    n_kv_heads: int | None = None

    @property
    def n_layers(self) -> int:
        return self.values.shape[0]

    @property
    def n_heads(self) -> int:
        return self.values.shape[1]

    @property
    def target(self) -> str:
        return f"logit({self.answer!r})" + (f" - logit({self.contrast!r})" if self.contrast is not None else "")

    @property
    def reconstruction_error(self) -> float:
        """|heads + other parts - the model's logit|: zero up to float rounding (the decomposition is exact)."""
        return abs(float(self.values.sum()) + sum(self.parts.values()) - self.logit)

    def per_head(self):
        """Each head's direct effect (summed over source positions) as ``HeadScores`` (top = most positive)."""
        from attnlab.heads.results import HeadScores

        return HeadScores(
            scores=self.values.sum(-1),
            name="head_dla",
            probe="head_dla",
            params={"answer": self.answer, "contrast": self.contrast, "query": self.query},
            model=self.model,
            n_kv_heads=self.n_kv_heads,
            description=f"direct contribution of each head to {self.target} at position {self.query}",
        )

    def to_frame(self):
        """One row per (head, source position): layer, head, label, position, token, value."""
        import pandas as pd

        l, h, j = np.meshgrid(
            np.arange(self.n_layers), np.arange(self.n_heads), np.arange(len(self.tokens)), indexing="ij"
        )
        return pd.DataFrame(
            {
                "layer": l.ravel(),
                "head": h.ravel(),
                "label": [f"L{a}H{b}" for a, b in zip(l.ravel(), h.ravel())],
                "position": j.ravel(),
                "token": [self.tokens[x] for x in j.ravel()],
                "value": self.values.ravel(),
            }
        )

    def top(self, k: int = 10):
        """The k heads with the largest direct effect (by absolute value), strongest first."""
        df = self.per_head().to_frame()
        order = df["score"].abs().sort_values(ascending=False, kind="stable").index
        return df.loc[order].head(k).reset_index(drop=True)

    def plot(self, *, k: int = 8, title: str | None = None):
        """Head map of the direct effects (diverging) beside the per-position contributions of the top-k heads."""
        from attnlab.pattern_figures import dla_figure

        return dla_figure(self, k=k, title=title)

    def __repr__(self) -> str:
        top = ", ".join(f"{r.label} {r.score:+.3f}" for r in self.top(3).itertuples())
        return (
            f"HeadDLA({self.model}: {self.target} at position {self.query} = {self.logit:.3f}; "
            f"heads {float(self.values.sum()):+.3f}, top {top})"
        )

    def _repr_html_(self) -> str:
        from attnlab.notebook import head_table_html, html_escape

        parts = "".join(f"<li>{html_escape(k)}: {v:+.4f}</li>" for k, v in self.parts.items())
        return (
            f"<div><b>Head DLA</b> — {html_escape(self.model)}: {html_escape(self.target)} at position "
            f"{self.query} ({html_escape(self.tokens[self.query])!s}) = {self.logit:.4f}<br>"
            f"heads {float(self.values.sum()):+.4f}<ul style='margin:2px 0'>{parts}</ul>"
            f"{head_table_html(self.top(8), signed=True)}</div>"
        )


def _token_id(model, prompt: str, answer: str | int) -> tuple[int, str]:
    """The first token of ``answer`` as it follows ``prompt`` (a leading space unless either side has one)."""
    if isinstance(answer, (int, np.integer)):
        tid = int(answer)
    else:
        if not answer or not str(answer).strip():
            raise AttnlabError("the answer is empty")
        text = answer if (answer[:1].isspace() or prompt[-1:].isspace()) else " " + answer
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AttnlabError(f"the answer {answer!r} has no tokens")
        tid = int(ids[0])
    return tid, model.tokens_as_text([tid])[0]


def _output_projection(attention, n_heads: int, d_head: int):
    """``(W_O [n_heads, d_head, d_model], b_O [d_model] or None)`` of an HF attention module, or None."""
    import torch

    for name in _O_PROJ_NAMES:
        proj = getattr(attention, name, None)
        w = getattr(proj, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        w = w if type(proj).__name__ == "Conv1D" else w.t()  # GPT-2's Conv1D stores [in, out]
        if w.shape[0] == n_heads * d_head:
            bias = getattr(proj, "bias", None)
            w = w.detach().reshape(n_heads, d_head, w.shape[1]).float()
            return w, (None if bias is None else bias.detach().float())
    return None


def _final_norm(model):
    """``(weight, bias or None, centers)`` of the model's final norm (LayerNorm centers, RMSNorm does not)."""
    norm = getattr(model.bridge.ln_final, "original_component", None)
    if norm is None:
        raise AttnlabError(f"head DLA: cannot find {model.name}'s final norm")
    w = getattr(norm, "weight", None)
    if w is None:
        raise AttnlabError(f"head DLA: {model.name}'s final norm has no weight")
    bias = getattr(norm, "bias", None)
    centers = "rms" not in type(norm).__name__.lower()
    return w.detach().float(), (None if bias is None else bias.detach().float()), centers


def head_dla(
    model,
    prompt: str | list[int],
    answer: str | int,
    *,
    contrast: str | int | None = None,
    position: int = -1,
    atol: float = 1e-3,
) -> HeadDLA:
    """Direct logit attribution of every head to ``answer`` at ``position`` (default the last token), per source
    position. ``contrast``: attribute the logit difference ``answer - contrast`` instead.

    Parameters
    ----------
    model : LoadedModel (a pre-norm causal decoder: GPT-2, Llama, Qwen2, Mistral, ...)
    prompt : str or list of token ids
    answer : str (its first token as it follows the prompt) or a token id
    contrast : str, token id or None
    position : int, the query position whose prediction is attributed (negative counts from the end)
    atol : float, default=1e-3
        Largest accepted gap between the sum of all parts and the model's logit (relative to the logit's size);
        beyond it the architecture does not decompose this way and an ``AttnlabError`` says so.
    """
    import torch

    if not model.causal:
        raise AttnlabError(f"head DLA attributes a next-token logit; {model.name} is a bidirectional encoder")
    ids = (
        model.token_ids(prompt)
        if isinstance(prompt, str)
        else model.check_length([int(t) for t in prompt], truncate=False, index=0)
    )
    n = len(ids)
    q = position + n if position < 0 else position
    if not 0 <= q < n:
        raise AttnlabError(f"position {position} is outside the prompt's {n} tokens")
    text = prompt if isinstance(prompt, str) else model.tokenizer.decode(ids)
    t, t_text = _token_id(model, text, answer)
    c, c_text = _token_id(model, text, contrast) if contrast is not None else (None, None)
    unembed = model.hf_model.get_output_embeddings()
    W_U, b_U = unembed.weight.detach().float(), getattr(unembed, "bias", None)
    b_U = None if b_U is None else b_U.detach().float()
    if t >= W_U.shape[0] or (c is not None and c >= W_U.shape[0]):
        raise AttnlabError("the answer token is outside the model's vocabulary")
    direction = W_U[t] - (W_U[c] if c is not None else 0.0)  # [d_model]
    bias_u = 0.0 if b_U is None else float(b_U[t] - (b_U[c] if c is not None else 0.0))
    attn_modules = {}
    for layer, block in enumerate(model.bridge.blocks):
        module = getattr(block.attn, "original_component", None)
        proj = _output_projection(module, model.n_heads, model.d_head) if module is not None else None
        if proj is None:
            raise AttnlabError(f"head DLA: {model.name}'s attention output is not a projection of its heads")
        attn_modules[layer] = proj

    keep: dict[str, torch.Tensor] = {}

    def grab(tensor, hook):
        name = hook.name
        if name.endswith("attn.hook_pattern"):
            keep[name] = tensor[0, :, q, :].detach().float()  # the query row only: [heads, seq]
        elif name.endswith("attn.v.hook_out"):
            keep[name] = tensor[0].detach().float()  # [seq, kv heads, d_head]
        else:
            keep[name] = tensor[0, q].detach().float()

    names = {"ln_final.hook_scale"}
    for layer in range(model.n_layers):
        sites = ("hook_in", "hook_out", "attn.hook_out", "mlp.hook_out", "attn.hook_pattern", "attn.v.hook_out")
        names |= {f"blocks.{layer}.{site}" for site in sites}
    batch = model.batch_from_ids([ids], [0]).to(model.device)
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(
            batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=[(lambda name: name in names, grab)]
        )
    missing = sorted(names - set(keep))
    if missing:
        raise AttnlabError(f"head DLA: {model.name} does not expose {missing[0]} (and {len(missing) - 1} more hooks)")
    logit = float(logits[0, q, t].float() - (logits[0, q, c].float() if c is not None else 0.0))
    w_norm, b_norm, centers = _final_norm(model)
    scale = float(keep["ln_final.hook_scale"].reshape(-1)[0]) if "ln_final.hook_scale" in keep else None
    if scale is None:
        raise AttnlabError(f"head DLA: {model.name}'s final norm does not expose its scale")

    def project(vec):  # part of the residual at q -> its share of the target logit
        v = vec - vec.mean(-1, keepdim=True) if centers else vec
        return (v / scale * w_norm) @ direction

    group = model.n_heads // model.n_kv_heads
    values = np.zeros((model.n_layers, model.n_heads, n))
    mlp, abias = np.zeros(model.n_layers), np.zeros(model.n_layers)
    resid = keep["blocks.0.hook_in"].clone()
    for layer in range(model.n_layers):
        W_O, b_O = attn_modules[layer]
        pattern = keep[f"blocks.{layer}.attn.hook_pattern"]  # [heads, seq]
        v = keep[f"blocks.{layer}.attn.v.hook_out"]  # [seq, kv, d]
        out = torch.zeros_like(resid)
        for h in range(model.n_heads):
            per_src = pattern[h][:, None] * (v[:, h // group, :] @ W_O[h])  # [seq, d_model]
            out += per_src.sum(0)
            centred = per_src - per_src.mean(-1, keepdim=True) if centers else per_src
            values[layer, h] = ((centred / scale * w_norm) @ direction).cpu().numpy()
        if b_O is not None:
            out += b_O
            abias[layer] = float(project(b_O))
        attn_out = keep[f"blocks.{layer}.attn.hook_out"]
        if not torch.allclose(out, attn_out, atol=1e-3 * (1 + float(attn_out.abs().max())), rtol=1e-3):
            raise AttnlabError(f"head DLA: {model.name}'s layer {layer} attention output is not the sum of its heads")
        mlp_out = keep[f"blocks.{layer}.mlp.hook_out"]
        mlp[layer] = float(project(mlp_out))
        resid = resid + attn_out + mlp_out
        post = keep[f"blocks.{layer}.hook_out"]
        if not torch.allclose(resid, post, atol=1e-3 * (1 + float(post.abs().max())), rtol=1e-3):
            raise AttnlabError(f"head DLA: {model.name}'s blocks are not x + attention + MLP (layer {layer})")
    parts = {
        "embeddings": float(project(keep["blocks.0.hook_in"])),
        "mlp": float(mlp.sum()),
        "attention_bias": float(abias.sum()),
        "norm_and_unembed_bias": (float(b_norm @ direction) if b_norm is not None else 0.0) + bias_u,
    }
    result = HeadDLA(
        values=values,
        tokens=model.tokens_as_text(ids),
        answer=t_text,
        contrast=c_text,
        query=q,
        logit=logit,
        model=model.name,
        parts=parts,
        per_layer={"mlp": mlp, "attention_bias": abias},
        n_kv_heads=model.n_kv_heads,
    )
    if result.reconstruction_error > atol * (1.0 + abs(logit)):
        raise AttnlabError(
            f"head DLA: the parts sum to {logit - result.reconstruction_error:.4f} but the logit is {logit:.4f}; "
            f"{model.name}'s final norm does not decompose this way"
        )
    return result


__all__ = ["HeadDLA", "head_dla"]
