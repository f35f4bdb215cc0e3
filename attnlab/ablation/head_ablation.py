"""Head ablation: replace chosen heads' outputs and see what the model does without them.

A head's output is ``z_{l,h}`` (``blocks.{l}.attn.hook_z``, ``[batch, pos, n_heads, d_head]``: the slice of the
``o_proj`` input that belongs to query head h). ``HeadAblation`` replaces it, for every position, by

- ``"zero"``: 0 (simple, off-distribution; can overstate importance);
- ``"mean"``: its mean over a reference set (``fit``), over all real positions, or per position when
  ``per_position=True`` (aligned templates only; with the reference = the prompt itself this is the identity);
- ``"uniform"``: the retrieval-head paper's masking (Wu et al. 2024, ``needle_in_haystack_with_mask.py``):
  the head's attention pattern (``hook_pattern``, eager path) becomes uniform over the causally visible real
  keys, so it outputs the mean of its visible values instead of selecting one;
- ``"resample"``: z of another prompt from the reference set (causal scrubbing), drawn by a seeded
  permutation; reference and input must have the same padded length.

GQA is explicit: the unit is a *query* head, and ablating it touches only its own z slice (or pattern row); the
other query heads of its KV group are untouched.

Usage (sklearn-style: parameters in ``__init__``, learned state ending in ``_`` set by ``fit``)::

    abl = HeadAblation([(3, 1), (5, 7)], mode="mean").fit(model, reference_prompts)
    with abl.apply(model, batch):
        logits = model.forward(batch)

See ``docs/methods/ablation_scoring.md`` §1 (ablation modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from attnlab.errors import InputError
from attnlab.hooks import attn_hook, layer_of
from attnlab.interventions.base import NotFittedError, validate_heads
from attnlab.models.loading import Batch
from attnlab.params import BOOLEAN, HEADS, Interval, Options, Parameterized

MODES = ("zero", "mean", "uniform", "resample")


def as_batch(model, prompts):
    """A ``Batch`` from a Batch or a list of prompt strings."""
    if isinstance(prompts, Batch):
        return prompts
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or a Batch, not one string")
    return model.encode(list(prompts))


def uniform_pattern(
    attention_mask: torch.Tensor | None, n_rows: int, seq: int, *, causal: bool = True, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Uniform attention ``[rows, seq_q, seq_k]`` over visible real keys (causal, padding excluded).

    Padded *queries* get a row over their causally visible real keys too (their output is never read); a row
    with no visible real key (left padding) is all zeros.
    """
    visible = torch.ones(seq, seq, dtype=torch.bool, device=device)
    if causal:
        visible = torch.tril(visible)
    visible = visible.unsqueeze(0).expand(n_rows, seq, seq)
    if attention_mask is not None:
        visible = visible & attention_mask.to(device=device).bool()[:, None, :]
    w = visible.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def collect_z(model, batch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Clean ``z`` ``[batch, pos, n_heads, d_head]`` of the given layers (float32, on the model's device)."""
    batch = batch.to(model.device)
    store: dict[int, torch.Tensor] = {}

    def keeper(layer):
        def hook(z, hook=None):
            store[layer] = z.detach().float().clone()

        return hook

    hooks = [(attn_hook(l, "hook_z"), keeper(l)) for l in sorted(set(layers))]
    with model.bridge.hooks(fwd_hooks=hooks):
        model.forward(batch)
    return store


class HeadAblation(Parameterized):
    """Ablate a set of query heads (zero, mean, uniform attention or resample), as a context manager.

    Parameters
    ----------
    heads : sequence of (layer, head), default=()
        Query heads to ablate. The empty set is the identity.
    mode : {"zero", "mean", "uniform", "resample"}, default="zero"
    per_position : bool, default=False
        Mean mode only: position-specific means ``mu[t]`` (reference prompts must share one padded length).
    seed : int, default=0
        Resample mode: seed of the permutation that assigns a reference prompt to each input row
        (row b of the input takes reference ``perm_[b % n_ref]``).

    Attributes
    ----------
    heads_ : tuple of (layer, head)
        Validated heads, sorted.
    means_ : dict layer -> Tensor of shape (n_heads, d_head) or (n_heads, seq, d_head)
        Mean mode: reference means of every head of the ablated layers.
    reference_z_ : dict layer -> Tensor of shape (n_ref, seq, n_heads, d_head)
        Resample mode: the reference prompts' z.
    perm_ : ndarray of shape (n_ref,)
        Resample mode: which reference each input row uses.
    """

    _parameter_constraints = {
        "heads": [HEADS],
        "mode": [Options(MODES)],
        "per_position": [BOOLEAN],
        "seed": [Interval(int, None, None)],
    }

    def __init__(
        self, heads: Sequence[tuple[int, int]] = (), *, mode: str = "zero", per_position: bool = False, seed: int = 0
    ):
        self.heads = heads
        self.mode = mode
        self.per_position = per_position
        self.seed = seed

    # ---- fitting ---------------------------------------------------------------------------------------------

    def fit(self, model, prompts=None, *, layers: Sequence[int] | None = None) -> HeadAblation:
        """Validate parameters against the model and learn what the mode needs from the reference ``prompts``.

        ``layers`` (default: the ablated heads' layers) lets a scorer fit replacement values for every layer.
        Zero and uniform modes learn nothing and accept ``prompts=None``.
        """
        self._validate_params()
        self.heads_ = validate_heads(model, self.heads)
        self.n_heads_ = model.n_heads
        self.causal_ = bool(model.causal)
        fit_layers = sorted(set(layers) if layers is not None else {l for l, _ in self.heads_})
        for attr in ("means_", "reference_z_", "perm_"):
            self.__dict__.pop(attr, None)  # a second fit starts over
        if self.mode in ("mean", "resample"):
            if prompts is None:
                raise InputError(f"mode {self.mode!r} needs reference prompts: call fit(model, prompts)")
            batch = as_batch(model, prompts).to(model.device)
            zs = collect_z(model, batch, fit_layers) if fit_layers else {}
            if self.mode == "mean":
                self.means_ = {l: self._means(z, batch.attention_mask) for l, z in zs.items()}
            else:
                self.reference_z_ = zs
                self.perm_ = np.random.default_rng(self.seed).permutation(batch.size)
        self.fitted_layers_ = tuple(fit_layers)
        return self

    def _means(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.to(z.device).float()[:, :, None, None]  # [b, s, 1, 1]
        if self.per_position:
            return ((z * w).sum(0) / w.sum(0).clamp_min(1.0)).transpose(0, 1)  # [h, s, d]
        return (z * w).sum((0, 1)) / w.sum().clamp_min(1.0)  # [h, d]

    def _check_fitted(self) -> None:
        if not hasattr(self, "heads_"):
            raise NotFittedError("HeadAblation is not fitted; call fit(model, prompts) first")

    # ---- replacement values -------------------------------------------------------------------------------------

    def replacement(self, layer: int, heads: torch.Tensor, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Replacement z ``[len(rows), seq, d_head]`` for head ``heads[i]`` in batch row ``rows[i]`` of ``z``.

        ``rows`` are prompt indices (resample picks reference ``perm_[row % n_ref]``); ``z`` is the current
        ``[batch, seq, n_heads, d_head]`` activation (only its shape, device and dtype are used). Not used by the
        uniform mode, which edits patterns instead.
        """
        n, seq, d = len(rows), z.shape[1], z.shape[-1]
        if self.mode == "zero":
            return z.new_zeros(n, seq, d)
        if self.mode == "mean":
            mu = self._fitted(self.means_, layer).to(device=z.device, dtype=z.dtype)
            if self.per_position:
                if mu.shape[1] != seq:
                    raise ValueError(f"per-position means were fitted on {mu.shape[1]} positions, input has {seq}")
                return mu[heads]
            return mu[heads][:, None, :].expand(n, seq, d)
        if self.mode == "resample":
            ref = self._fitted(self.reference_z_, layer).to(device=z.device, dtype=z.dtype)
            if ref.shape[1] != seq:
                raise ValueError(
                    f"resample references have {ref.shape[1]} positions, input has {seq}: pad them to the same length"
                )
            src = torch.as_tensor(self.perm_, device=z.device)[rows % ref.shape[0]]
            return ref[src, :, heads]
        raise ValueError(f"mode {self.mode!r} has no z replacement (uniform edits the attention pattern)")

    def _fitted(self, table: dict, layer: int) -> torch.Tensor:
        if layer not in table:
            raise NotFittedError(f"layer {layer} was not in the layers this ablation was fitted on ({sorted(table)})")
        return table[layer]

    # ---- hooks -------------------------------------------------------------------------------------------------

    def row_hooks(
        self,
        layer: int,
        heads_of_rows: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_of_rows: torch.Tensor | None = None,
    ) -> list:
        """Hooks that ablate head ``heads_of_rows[b]`` in batch row b of ``layer`` (a negative head = none).

        This is the batched-scoring primitive: one different single-head ablation per batch row.
        ``prompt_of_rows[b]`` (default b) is the prompt a row repeats; resample picks its reference from it.
        """
        self._check_fitted()
        mode = self.mode

        def select(x):
            hr = heads_of_rows.to(x.device)
            rows = torch.nonzero(hr >= 0).flatten()
            return rows, hr[rows]

        def prompts_of(rows):
            return rows if prompt_of_rows is None else prompt_of_rows.to(rows.device)[rows]

        if mode == "uniform":

            def pattern_hook(pattern, hook=None):
                rows, heads = select(pattern)
                out = pattern.clone()  # never modify a tensor we did not allocate
                mask = None if attention_mask is None else attention_mask.to(pattern.device)[rows]
                out[rows, heads] = uniform_pattern(
                    mask, len(rows), pattern.shape[-1], causal=self.causal_, device=pattern.device, dtype=pattern.dtype
                )
                return out

            return [(attn_hook(layer, "hook_pattern"), pattern_hook)]

        def z_hook(z, hook=None):
            rows, heads = select(z)
            out = z.clone()
            out[rows, :, heads] = self.replacement(layer, heads, prompts_of(rows), z)
            return out

        return [(attn_hook(layer, "hook_z"), z_hook)]

    def hooks(self, batch_size: int, attention_mask: torch.Tensor | None = None) -> list:
        """``(hook name, fn)`` pairs that ablate ``heads_`` in every row of a batch of ``batch_size``."""
        self._check_fitted()
        out = []
        by_layer: dict[int, list[int]] = {}
        for l, h in self.heads_:
            by_layer.setdefault(l, []).append(h)
        for layer, heads in by_layer.items():
            for h in heads:  # one hook per head: each replaces its own slice of every row
                out += self.row_hooks(layer, torch.full((batch_size,), h, dtype=torch.long), attention_mask)
        return out

    @contextlib.contextmanager
    def apply(self, model, batch=None) -> Iterator:
        """Context manager: forward passes inside it run with the heads ablated; hooks removed on exit.

        ``batch`` (the Batch about to run) is needed by the uniform mode to exclude padded keys and by every
        mode to size the per-row hooks; without it, hooks are sized at the first forward pass and all keys are
        treated as real.
        """
        self._check_fitted()
        if not self.heads_:
            yield model
            return
        if batch is not None:
            hooks = self.hooks(batch.size, batch.attention_mask)
        else:
            hooks = [(name, _any_batch(self, name)) for name in sorted({n for n, _ in self.hooks(1)})]
        with model.bridge.hooks(fwd_hooks=hooks):
            yield model


def _any_batch(abl: HeadAblation, name: str):
    """A hook for ``name`` that ablates ``abl.heads_`` of that layer in every row, whatever the batch size."""
    layer = layer_of(name)
    heads = [h for l, h in abl.heads_ if l == layer]

    def hook(x, hook=None):
        for h in heads:
            ((_, fn),) = abl.row_hooks(layer, torch.full((x.shape[0],), h, dtype=torch.long))
            x = fn(x, hook=hook)
        return x

    return hook
