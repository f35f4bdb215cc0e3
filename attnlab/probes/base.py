"""What every probe shares: the ``Probe`` interface and per-prompt accumulators.

A probe is an object with explicit parameters (stored by ``__init__``, checked against ``_parameter_constraints``
when it is attached: ``attnlab.params``) that ``attach``es handlers to a ``Capture`` and, after the batches have
run, returns typed results (``HeadScores`` / ``TokenScores``). Several probes attach to one Capture so that one
forward pass per batch serves them all.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from attnlab.errors import AttnlabError
from attnlab.heads.results import HeadScores, TokenScores
from attnlab.params import Parameterized


@dataclass
class ProbeContext:
    """Facts about a scan that results record: model id and dataset fingerprint.

    ``meta`` is the PromptSet's per-prompt metadata (indexed like ``Batch.prompt_indices``); probes that need
    ground truth per prompt (e.g. the retrieval probe's answer and needle span) read it from here.
    """

    model: Any  # LoadedModel
    dataset: str = ""
    n_prompts: int = 0
    meta: list = field(default_factory=list)


class NoCapture:
    """A capture that takes handlers and never runs them: ``Probe.restore`` sets a probe's state up through its own
    ``attach`` (so restored state is built exactly as a run builds it), then loads the merged partial into it."""

    chunk_size = 256

    def on(self, *args, **kwargs) -> NoCapture:
        return self


class Probe(Parameterized):
    """Base class. Subclasses set ``name``, store their ``__init__`` parameters under the same names, declare
    ``_parameter_constraints``, and implement ``_attach`` (register handlers) and ``results``.

    Probes whose reduced state merges exactly across prompt shards (``mergeable = True``; ``attnlab.sweep`` runs
    them shard by shard) also give that state as a *partial* and take it back:

    - ``partial() -> {"arrays": {name: ndarray}, "meta": json-able}``: the state after the batches seen so far;
    - ``merge_partials(parts) -> partial`` (classmethod): the state after all their batches, parts in prompt order;
    - ``restore(ctx, partial)``: after it, ``results(ctx)`` gives what one run over all those prompts gives.

    The base handles the ``PerPromptRatio`` attributes named in ``_ratios``; probes with more state extend the
    three methods.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "probe"
    needs_patterns: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    _ratios: ClassVar[tuple[str, ...]] = ()  # PerPromptRatio attributes merged by the base

    def attach(self, capture, ctx: ProbeContext) -> None:
        """Check the parameters, then register this probe's handlers on ``capture`` (one scan's state is reset)."""
        self._validate_params()
        self._attach(capture, ctx)

    def _attach(self, capture, ctx: ProbeContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def record_params(self) -> dict[str, Any]:
        """The parameters as results and the run index record them (JSON values): ``get_params()`` unless a probe
        has a parameter JSON cannot hold (a callable is recorded by name)."""
        return self.get_params()

    def results(self, ctx: ProbeContext) -> list[HeadScores | TokenScores]:  # pragma: no cover - interface
        raise NotImplementedError

    def head_scores(
        self,
        ctx: ProbeContext,
        name: str,
        scores: np.ndarray,
        *,
        description: str = "",
        higher_is: str = "more",
        extra=None,
        summary=None,
        params: dict[str, Any] | None = None,
    ) -> HeadScores:
        """A ``HeadScores`` with this probe's provenance (``params``: the parameters to record, default its own)."""
        return HeadScores(
            scores=scores,
            name=name,
            probe=self.name,
            params=self.record_params() if params is None else params,
            model=ctx.model.name,
            dataset=ctx.dataset,
            n_kv_heads=ctx.model.n_kv_heads,
            higher_is=higher_is,
            description=description,
            extra=extra or {},
            summary=summary or {},
        )

    def token_scores(
        self,
        ctx: ProbeContext,
        name: str,
        prompt_index: int,
        tokens: list[str],
        values: np.ndarray,
        row_labels: list[str],
        *,
        marks=None,
        description: str = "",
        summary=None,
    ) -> TokenScores:
        """A ``TokenScores`` of one prompt with this probe's provenance (the token-level twin of ``head_scores``)."""
        return TokenScores(
            tokens=tokens,
            values=values,
            name=name,
            probe=self.name,
            row_labels=row_labels,
            marks=marks or {},
            params=self.record_params(),
            model=ctx.model.name,
            dataset=ctx.dataset,
            prompt_index=prompt_index,
            description=description,
            summary=summary or {},
        )

    # ---- exact merging across prompt shards (attnlab.sweep) -------------------------------------------------------

    def partial(self) -> dict[str, Any]:
        """This probe's reduced state so far: ``{"arrays": {name: ndarray}, "meta": json-able}``."""
        if not self.mergeable:
            raise NotImplementedError(f"probe {self.name!r} keeps no exactly mergeable state")
        arrays: dict[str, np.ndarray] = {}
        for attr in self._ratios:
            arrays.update(getattr(self, attr).state(attr))
        return {"arrays": arrays, "meta": {}}

    @classmethod
    def merge_partials(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One partial from several (in prompt order), as if one run had seen all their prompts."""
        if not cls.mergeable:
            raise NotImplementedError(f"probe {cls.name!r} keeps no exactly mergeable state")
        arrays: dict[str, np.ndarray] = {}
        for attr in cls._ratios:
            arrays.update(PerPromptRatio.merge_states([p["arrays"] for p in parts], attr))
        return {"arrays": arrays, "meta": {}}

    def restore(self, ctx: ProbeContext, partial: dict[str, Any]) -> None:
        """Set this probe up for ``ctx`` (as ``attach`` does, on no capture) holding the state ``partial``."""
        if not self.mergeable:
            raise NotImplementedError(f"probe {self.name!r} keeps no exactly mergeable state")
        self.attach(NoCapture(), ctx)
        for attr in self._ratios:
            getattr(self, attr).load_state(partial["arrays"], attr)


def pairs(counter) -> list[list]:
    """A Counter (or dict) as ``[[key, count], ...]`` in insertion order: JSON keeps non-string keys and the order
    that ``Counter.most_common`` uses to break ties."""
    return [[k, v] for k, v in counter.items()]


def merged_counter(lists) -> Counter:
    """A Counter of several ``pairs()`` lists, added in order (first-seen order kept, as one run would have it)."""
    out: Counter = Counter()
    for items in lists:
        for k, v in items:
            out[k] += v
    return out


@dataclass
class PerPromptRatio:
    """Accumulates ``numerator / denominator`` per (prompt, layer, head), then averages over prompts.

    The per-prompt ratio is formed first (so every prompt weighs the same, as TransformerLens' head detector
    does for a list of prompts); prompts with a zero denominator in a head are left out of that head's mean.
    Partial sums stay on their device until the ratios are asked for (no host transfer per layer).
    """

    n_layers: int
    n_heads: int
    num: dict[int, torch.Tensor] = field(default_factory=dict)
    den: dict[int, torch.Tensor] = field(default_factory=dict)
    _parts: list = field(default_factory=list, repr=False)

    def add(self, layer: int, prompt_indices: list[int], num: torch.Tensor, den: torch.Tensor) -> None:
        """``num``/``den``: ``[batch, n_heads]`` (den may be ``[batch]``) partial sums for this layer."""
        wide = torch.float32 if num.device.type == "mps" else torch.float64  # MPS has no float64
        num = num.detach().to(wide, copy=True)
        den = den.detach().to(wide, copy=True).to(num.device)
        if den.dim() == 1:
            den = den[:, None].expand_as(num)
        self._parts.append((list(prompt_indices), layer, num, den))

    def _settle(self) -> None:
        """Move the pending partial sums to the host in one transfer and fold them into the per-prompt grids."""
        if not self._parts:
            return
        nums = torch.cat([p[2] for p in self._parts]).double().cpu()  # [rows, H]: a row per (part, prompt)
        dens = torch.cat([p[3] for p in self._parts]).double().cpu()
        prompts = [p for part in self._parts for p in part[0]]
        layers = torch.tensor([part[1] for part in self._parts for _ in part[0]], dtype=torch.long)
        keys = list(dict.fromkeys([*self.num, *prompts]))
        where = {p: i for i, p in enumerate(keys)}
        rows = torch.tensor([where[p] for p in prompts], dtype=torch.long)
        zeros = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
        grids = []
        for sums, part_sums in ((self.num, nums), (self.den, dens)):  # one scatter-add for all rows
            grid = torch.stack([sums.get(p, zeros) for p in keys])
            grids.append(grid.index_put_((rows, layers), part_sums, accumulate=True))
        self.num, self.den = (dict(zip(keys, g.unbind(0), strict=True)) for g in grids)
        self._parts.clear()

    def per_prompt(self) -> np.ndarray:
        """Array ``[n_prompts, n_layers, n_heads]`` of ratios (NaN where the denominator is zero)."""
        self._settle()
        if not self.num:
            return np.full((0, self.n_layers, self.n_heads), np.nan)
        keys = sorted(self.num)
        num = torch.stack([self.num[k] for k in keys]).numpy()
        den = torch.stack([self.den[k] for k in keys]).numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        """The per-prompt sums as arrays: ``{prefix}.prompts`` (global prompt indices, sorted), ``{prefix}.num``
        and ``{prefix}.den`` (``[n_prompts, n_layers, n_heads]``, float64)."""
        self._settle()
        keys = sorted(self.num)
        shape = (0, self.n_layers, self.n_heads)
        return {
            f"{prefix}.prompts": np.asarray(keys, dtype=np.int64),
            f"{prefix}.num": torch.stack([self.num[k] for k in keys]).numpy() if keys else np.zeros(shape),
            f"{prefix}.den": torch.stack([self.den[k] for k in keys]).numpy() if keys else np.zeros(shape),
        }

    @staticmethod
    def merge_states(parts: list[dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
        """The ``state`` of one accumulator that saw every part's prompts (a prompt in several parts adds up)."""
        prompts = np.concatenate([p[f"{prefix}.prompts"] for p in parts]).astype(np.int64)
        num = np.concatenate([p[f"{prefix}.num"] for p in parts]).astype(np.float64)
        den = np.concatenate([p[f"{prefix}.den"] for p in parts]).astype(np.float64)
        keys, inverse = np.unique(prompts, return_inverse=True)
        if len(keys) == len(prompts):  # disjoint shards: just sorted
            order = np.argsort(prompts, kind="stable")
            return {f"{prefix}.prompts": keys, f"{prefix}.num": num[order], f"{prefix}.den": den[order]}
        out_num = np.zeros((len(keys),) + num.shape[1:])
        out_den = np.zeros((len(keys),) + den.shape[1:])
        np.add.at(out_num, inverse, num)
        np.add.at(out_den, inverse, den)
        return {f"{prefix}.prompts": keys, f"{prefix}.num": out_num, f"{prefix}.den": out_den}

    def load_state(self, arrays: dict[str, np.ndarray], prefix: str) -> None:
        """Replace the sums with a ``state``."""
        self._parts.clear()
        prompts, num, den = (arrays[f"{prefix}.{k}"] for k in ("prompts", "num", "den"))
        self.num = {int(p): torch.from_numpy(np.array(num[i], dtype=np.float64)) for i, p in enumerate(prompts)}
        self.den = {int(p): torch.from_numpy(np.array(den[i], dtype=np.float64)) for i, p in enumerate(prompts)}

    def mean(self) -> np.ndarray:
        per = self.per_prompt()
        if per.shape[0] == 0:
            return np.full((self.n_layers, self.n_heads), np.nan)
        with np.errstate(invalid="ignore"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(per, axis=0)


def require_images(probe: Probe, model) -> None:
    """Vision probes score image tokens: on a text model they are refused (one line) rather than run to all-NaN."""
    if getattr(model, "modality", None) == "text":
        raise AttnlabError(
            f"{probe.name}: not scored: text model ({model.name} has no image tokens); vision probes need a "
            "vision-language model and image prompts (e.g. --dataset shapes)"
        )


def query_validity(batch, q_pos: torch.Tensor, *, skip_first: int = 0) -> torch.Tensor:
    """``[batch, chunk]`` bool: query position is a real token at least ``skip_first`` tokens into its prompt."""
    first = batch.first_real.to(q_pos.device)[:, None]
    end = first + batch.lengths.to(q_pos.device)[:, None]
    q = q_pos[None, :]
    return (q >= first + skip_first) & (q < end)


def lower_median(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., b, s]``'s lower median over each prompt's real positions (``real`` ``[b, s]`` bool): the
    ``((n - 1) // 2)``-th smallest of its ``n`` real entries, as ``torch.median`` gives it. Shape ``[..., b]``."""
    ranked = x.masked_fill(~real, torch.inf).sort(-1).values
    mid = ((real.sum(-1) - 1).clamp(min=0) // 2)[:, None].expand(*ranked.shape[:-1], 1)
    return ranked.gather(-1, mid)[..., 0]
