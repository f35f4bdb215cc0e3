"""What every probe shares: the ``Probe`` interface and per-prompt accumulators.

A probe is an object with explicit parameters (set in ``__init__``) that ``attach``es handlers to a ``Capture``
and, after the batches have run, returns typed results (``HeadScores`` / ``TokenScores``). Several probes attach
to one Capture so that one forward pass per batch serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from attnlab.heads.results import HeadScores, TokenScores


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


class Probe:
    """Base class. Subclasses set ``name``, keep parameters as attributes, implement ``attach`` and ``results``."""

    name: ClassVar[str] = ""
    needs_patterns: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        """The probe's parameters (its public, non-underscore attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def attach(self, capture, ctx: ProbeContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

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
    ) -> HeadScores:
        return HeadScores(
            scores=scores,
            name=name,
            probe=self.name,
            params=self.params(),
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
            params=self.params(),
            model=ctx.model.name,
            dataset=ctx.dataset,
            prompt_index=prompt_index,
            description=description,
            summary=summary or {},
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


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
        nums = torch.cat([p[2] for p in self._parts]).double().cpu()
        dens = torch.cat([p[3] for p in self._parts]).double().cpu()
        row = 0
        for prompts, layer, _, _ in self._parts:
            for p in prompts:
                if p not in self.num:
                    self.num[p] = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
                    self.den[p] = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
                self.num[p][layer] += nums[row]
                self.den[p][layer] += dens[row]
                row += 1
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

    def mean(self) -> np.ndarray:
        per = self.per_prompt()
        if per.shape[0] == 0:
            return np.full((self.n_layers, self.n_heads), np.nan)
        with np.errstate(invalid="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(per, axis=0)


def require_images(probe: Probe, model) -> None:
    """Vision probes score image tokens: on a text model they are refused (one line) rather than run to all-NaN."""
    if getattr(model, "modality", None) == "text":
        from attnlab.errors import AttnlabError

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
