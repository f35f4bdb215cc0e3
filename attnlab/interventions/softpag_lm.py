"""SoftPAG perturbation-guided decoding for causal LMs, with a HeadHunter head search against a text objective.

See ``docs/methods/headhunter_softpag.md`` §3-4 (Ahn et al., arXiv 2506.10978), carried from diffusion to next-token
logits (issue 5)::

    logits_guided = logits + s * (logits - logits_perturbed)

``logits_perturbed`` comes from a second forward pass of the same inputs in which the selected ``(layer, head)``
attention maps are replaced, post-softmax at ``blocks.{l}.attn.hook_pattern``, by the SoftPAG map of strength
``u`` (`attnlab.interventions.softpag.soft_perturb`, any of its `VARIANTS`; default ``identity``: each query
attends to itself, ``(1 - u) A + u I``). Heads are *query* heads (under GQA the pattern has one map per query
head; their shared KV head is untouched). Every target is causal-valid: the identity is the diagonal, ``uniform``
is uniform over each row's causally visible non-padding keys, ``mean-query`` uses the running mean of the queries
up to the row, read from the pre-softmax scores' mask and ``hook_rot_q``/``hook_rot_k`` (``hook_q``/``hook_k``
without rotary). Editing the post-softmax map **needs eager attention** (what `attnlab.load` gives).

How guidance is installed (the cleanest of the options): ``apply(model)`` registers one plain torch forward hook
(``with_kwargs=True``) on the bridge module. After the bridge's ordinary pass it re-runs the bridge on the same
arguments inside a bridge ``hooks()`` context that perturbs the selected maps (a guard flag stops the hook from
re-entering itself) and returns the guided logits in place of the output. So ``model.forward``, the evaluation
harness (`attnlab.interventions.evaluate`) and its greedy decoding work unchanged and other interventions nested
around it act in both passes. Each guided forward costs two passes. Cached decoding (a KV cache) is
refused: the perturbed pass would need a KV cache of its own.

Identity: ``s = 0`` or an empty head set returns the bridge's output unchanged (the perturbed pass is skipped);
``u = 0`` runs the perturbed pass with the maps unchanged, so ``logits_perturbed == logits`` and the guided logits
equal the model's.

Search (``heads=None``; `attnlab.interventions.headhunter.greedy_head_search`, Alg. 1): ``rounds`` x ``k`` heads
from a candidate pool (all heads, or those of ``layers``; optionally ``n_candidates`` drawn per round), scored by
the mean over fit items of the guided log-probability of the item's answer (``" " + label`` tokens after the prompt,
teacher-forced). The clean logits are computed once and reused by every candidate, so a candidate costs one
perturbed pass over the fit data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from attnlab.errors import InputError, InvalidParameterError
from attnlab.hooks import attn_hook, kv_cache
from attnlab.interventions.base import Intervention, heads_by_layer, real_keys_from_scores, validate_heads
from attnlab.interventions.headhunter import greedy_head_search
from attnlab.interventions.softpag import VARIANTS, soft_perturb
from attnlab.models.answers import TeacherForced
from attnlab.params import HEADS, INTEGERS, Interval, Options

OBJECTIVES = ("logprob",)


def _qk_sites(model) -> tuple[str, str]:
    """Query/key hook sites whose dot product gives the attention scores (post-rotary where the model has it)."""
    has_rot = any(n.endswith("attn.hook_rot_q") for n in model.bridge.hook_dict)
    return ("hook_rot_q", "hook_rot_k") if has_rot else ("hook_q", "hook_k")


def _score_scale(model, d_head: int) -> float:
    cfg = getattr(model.bridge, "cfg", None)
    div = getattr(cfg, "attn_scale", None)
    return 1.0 / float(div) if div else d_head**-0.5


def perturbation_hooks(model, heads: Sequence[tuple[int, int]], u: float, variant: str = "identity") -> list:
    """Bridge hooks that replace the selected heads' post-softmax maps with the SoftPAG map (the perturbed pass).

    Per perturbed layer: an observer on ``hook_attn_scores`` (masked pre-softmax scores -> the visible keys and
    the real tokens), for ``mean-query`` observers on the q/k sites, and the editing hook on ``hook_pattern``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    seen: dict[tuple[int, str], torch.Tensor] = {}
    q_site, k_site = _qk_sites(model)
    out = []
    for layer, hs in heads_by_layer(heads).items():

        def observe(x, hook=None, layer=layer, what="scores"):
            seen[(layer, what)] = x
            return None

        def edit(pattern, hook=None, layer=layer, hs=hs):
            idx = torch.tensor(hs, device=pattern.device)
            scores = seen.get((layer, "scores"))
            if scores is None or scores.shape != pattern.shape:
                raise RuntimeError(f"layer {layer}: no pre-softmax scores matching the pattern were seen")
            visible = scores[:, idx] > torch.finfo(scores.dtype).min / 2
            kw: dict[str, Any] = {}
            if variant == "mean-query":
                q, k = seen[(layer, "q")], seen[(layer, "k")]  # [batch, pos, heads or kv heads, d]
                k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
                real = real_keys_from_scores(scores)  # [batch, pos]
                kw = dict(
                    q=q[:, :, idx].transpose(1, 2),
                    k=k[:, :, idx].transpose(1, 2),
                    scale=_score_scale(model, q.shape[-1]),
                    causal=True,
                    query_valid=real[:, None, -pattern.shape[-2] :],
                )
            new = pattern.clone()
            new[:, idx] = soft_perturb(pattern[:, idx], u, variant, visible=visible, **kw).to(pattern.dtype)
            return new

        out.append((attn_hook(layer, "hook_attn_scores"), observe))
        if variant == "mean-query":
            out.append((attn_hook(layer, q_site), lambda x, hook=None, layer=layer: observe(x, layer=layer, what="q")))
            out.append((attn_hook(layer, k_site), lambda x, hook=None, layer=layer: observe(x, layer=layer, what="k")))
        out.append((attn_hook(layer, "hook_pattern"), edit))
    return out


@contextlib.contextmanager
def perturbed_lm(model, heads: Sequence[tuple[int, int]], u: float, variant: str = "identity") -> Iterator:
    """Forward passes inside are the *perturbed* model (no guidance): selected maps replaced by SoftPAG maps."""
    heads = validate_heads(model, heads)
    with model.bridge.hooks(fwd_hooks=perturbation_hooks(model, heads, u, variant)):
        yield model


# ---- the text objective -----------------------------------------------------------------------------------------


class AnswerLogprob:
    """Mean (over items) summed log-probability of each item's answer under guided logits; clean logits cached.

    Items need ``prompt`` and ``label`` (``GenerationPrompt`` or labelled prompts); the answer tokens are
    ``" " + label`` without special tokens, scored teacher-forced after the prompt's own tokens
    (``attnlab.models.answers.TeacherForced``).
    """

    def __init__(self, model, items: Sequence[Any], *, batch_size: int = 16):
        self.model = model
        prompts, answers = [], []
        for it in items:
            prompt, label = (it["prompt"], it["label"]) if isinstance(it, dict) else (it.prompt, it.label)
            if label is None:
                raise InputError("the log-prob objective needs labelled items (prompt + label)")
            prompts.append(prompt)
            answers.append(" " + str(label))
        self.answers = TeacherForced.from_answers(model, prompts, answers)
        self.n = len(prompts)
        self.batches = []
        with torch.no_grad():
            for s in range(0, self.n, batch_size):
                batch = self.answers.batch(model, range(s, min(s + batch_size, self.n)), padding_side="right")
                self.batches.append((batch, self._answer_logits(batch)))

    def _answer_logits(self, batch) -> torch.Tensor:
        return self.answers.answer_logits(self.model.forward(batch), batch).cpu()

    def per_item(
        self, heads: Sequence[tuple[int, int]] = (), u: float = 1.0, scale: float = 1.0, variant: str = "identity"
    ) -> np.ndarray:
        """Per-item answer log-probability with guidance on ``heads`` (the clean model when none or ``scale == 0``)."""
        out = []
        with torch.no_grad():
            for batch, clean in self.batches:
                guided = clean
                if heads and scale != 0.0:
                    with perturbed_lm(self.model, heads, u, variant):
                        pert = self._answer_logits(batch)
                    guided = clean + scale * (clean - pert)
                out.append(self.answers.logprob(guided, batch).numpy())
        return np.concatenate(out).astype(np.float64)

    def __call__(self, heads=(), u: float = 1.0, scale: float = 1.0, variant: str = "identity") -> float:
        return float(self.per_item(heads, u, scale, variant).mean())


# ---- the intervention -------------------------------------------------------------------------------------------


class SoftPAGDecoding(Intervention):
    """Perturbation-guided decoding: ``logits + scale * (logits - logits with SoftPAG on heads)``.

    Parameters
    ----------
    heads : sequence of (layer, head) or None, default=None
        Query heads to perturb. None: found by the HeadHunter search on the fit data.
    u : float, default=1.0
        SoftPAG strength in [0, 1] (0 = perturbed pass equals the model, 1 = the variant's target map).
    scale : float, default=1.0
        Guidance weight ``s`` (0 = no guidance).
    variant : one of `attnlab.interventions.softpag.VARIANTS`, default="identity"
    rounds, k : int, default=1, 3
        Search: greedy rounds and heads added per round (``|heads_| = rounds * k``).
    layers : sequence of int or None, default=None
        Search pool: all heads of these layers (None = every layer).
    n_candidates : int or None, default=None
        Search: heads scored per round, drawn with ``candidate_seed`` and the round (None = the whole pool).
    candidate_seed : int, default=0
    objective : {"logprob"}, default="logprob"
        Mean summed log-probability of the fit items' answers under the guided logits (higher is better).
    search_u, search_scale : float or None, default=None
        ``u`` / ``scale`` used during the search (None = ``u`` / ``scale``; the paper searches at u = 1).
    batch_size : int, default=16

    Attributes
    ----------
    heads_ : tuple of (layer, head)
        Perturbed heads (search order when searched).
    history_ : list of dict
        Per search round: ``scores`` ``[layer, head, objective]`` best first, ``chosen``.
    baseline_score_ : float
        Objective of the unguided model on the fit data (searched fits only).
    pool_ : tuple of (layer, head)
    fit_split_ : dict
    """

    name = "softpag"
    _head_fields = ("heads_", "pool_")
    _parameter_constraints = {
        "heads": [HEADS, None],
        "u": [Interval(float, 0, 1)],
        "scale": [Interval(float, None, None)],
        "variant": [Options(VARIANTS)],
        "rounds": [Interval(int, 1, None)],
        "k": [Interval(int, 1, None)],
        "layers": [INTEGERS, None],
        "n_candidates": [Interval(int, 1, None), None],
        "candidate_seed": [Interval(int, None, None)],
        "objective": [Options(OBJECTIVES)],
        "search_u": [Interval(float, 0, 1), None],
        "search_scale": [Interval(float, None, None), None],
        "batch_size": [Interval(int, 1, None)],
    }

    def __init__(
        self,
        heads: Sequence[tuple[int, int]] | None = None,
        u: float = 1.0,
        scale: float = 1.0,
        variant: str = "identity",
        *,
        rounds: int = 1,
        k: int = 3,
        layers: Sequence[int] | None = None,
        n_candidates: int | None = None,
        candidate_seed: int = 0,
        objective: str = "logprob",
        search_u: float | None = None,
        search_scale: float | None = None,
        batch_size: int = 16,
    ):
        self.heads = heads
        self.u = u
        self.scale = scale
        self.variant = variant
        self.rounds = rounds
        self.k = k
        self.layers = layers
        self.n_candidates = n_candidates
        self.candidate_seed = candidate_seed
        self.objective = objective
        self.search_u = search_u
        self.search_scale = search_scale
        self.batch_size = batch_size
        self._inside = False

    # ---- fitting ---------------------------------------------------------------------------------------------

    def pool(self, model) -> list[tuple[int, int]]:
        """Candidate heads of the search: every head of ``layers`` (all layers when None)."""
        layers = range(model.n_layers) if self.layers is None else sorted({int(l) for l in self.layers})
        if any(not 0 <= l < model.n_layers for l in layers):
            raise InvalidParameterError(
                f"SoftPAGDecoding parameter layers must lie in [0, {model.n_layers}), got {list(layers)}"
            )
        return [(l, h) for l in layers for h in range(model.n_heads)]

    def _fit(self, model, data) -> None:
        if self.heads is not None:
            self.heads_ = validate_heads(model, self.heads)
            self.history_ = []
            return
        items = list(data or [])
        if not items:
            raise InputError(
                "heads=None is found by the HeadHunter search: call fit(model, data) with labelled prompts"
            )
        pool = self.pool(model)
        su = self.u if self.search_u is None else self.search_u
        ss = self.scale if self.search_scale is None else self.search_scale
        scorer = AnswerLogprob(model, items, batch_size=self.batch_size)
        self.baseline_score_ = scorer()
        chosen, history = greedy_head_search(
            pool,
            lambda hs: scorer(hs, su, ss, self.variant),
            rounds=int(self.rounds),
            k=int(self.k),
            n_candidates=self.n_candidates,
            candidate_seed=int(self.candidate_seed),
        )
        self.heads_ = tuple(chosen)
        self.history_ = history
        self.pool_ = tuple(pool)

    # ---- applying --------------------------------------------------------------------------------------------

    def is_identity(self) -> bool:
        """True when guidance is a no-op without running the perturbed pass (``scale == 0`` or no heads)."""
        self._check_fitted()
        return float(self.scale) == 0.0 or not self.heads_

    def hooks(self, model) -> list:
        """No hooks in the guided pass itself; the perturbed pass's hooks are `perturbation_hooks`."""
        return []

    def _guide(self, model):
        hooks = perturbation_hooks(model, self.heads_, float(self.u), self.variant)

        def hook(module, args, kwargs, output):
            if self._inside or self.is_identity():
                return None
            if (
                kv_cache(kwargs) is not None
                or kwargs.get("return_type", "logits") != "logits"
                or not isinstance(output, torch.Tensor)
            ):
                raise NotImplementedError(
                    "SoftPAGDecoding guides plain logits passes without a KV cache "
                    "(the perturbed pass needs its own cache)"
                )
            self._inside = True
            try:
                with module.hooks(fwd_hooks=hooks):
                    pert = module(*args, **kwargs)
            finally:
                self._inside = False
            return output + float(self.scale) * (output - pert)

        return hook

    @contextlib.contextmanager
    def apply(self, model) -> Iterator:
        """``model.forward`` (the bridge's call) inside returns guided logits; the forward hook is removed on exit."""
        self._check_model(model)
        handle = model.bridge.register_forward_hook(self._guide(model), with_kwargs=True)
        self._inside = False
        try:
            yield model
        finally:
            handle.remove()
            self._inside = False

    def summary(self) -> dict[str, Any]:
        """What was fitted, for reports."""
        self._check_fitted()
        out = {
            "method": self.name,
            "heads": [list(p) for p in self.heads_],
            "u": self.u,
            "scale": self.scale,
            "variant": self.variant,
            "searched": self.heads is None,
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }
        if self.heads is None:
            out["fit_baseline_logprob"] = self.baseline_score_
            out["round_best_logprob"] = [r["scores"][0][2] for r in self.history_]
            out["pool_size"] = len(self.pool_)
        return out


__all__ = ["SoftPAGDecoding", "AnswerLogprob", "perturbation_hooks", "perturbed_lm", "OBJECTIVES"]
