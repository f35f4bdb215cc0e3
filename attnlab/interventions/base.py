"""The shape every fitted attention intervention shares, plus the label-word scoring that fitting uses.

An intervention is an object with explicit parameters in ``__init__`` (sklearn style), a ``fit(model, data)`` that
learns what the method needs and stores it in attributes ending in ``_``, and an ``apply(model)`` context manager
that installs bridge hooks (``attnlab.hooks`` names) for the forward passes run inside it and always removes them,
also when the body raises. Several interventions compose by nesting::

    with zt.apply(model), act.apply(model):
        logits = model.forward(batch)

``save(dir)`` writes ``intervention.json`` (class, parameters, JSON-able fitted state) and
``arrays.safetensors`` (array-valued fitted state), both atomically; ``Intervention.load(dir)`` restores it.
No pickle anywhere.

Fit/test hygiene: ``fit`` records which prompts it saw (``fit_split_``: a name plus SHA-256 digests of the
prompts); ``check_disjoint(prompts)`` raises when a test set shares a prompt with the fit set.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.errors import AttnlabError, InputError, InvalidParameterError
from attnlab.heads.io import read_arrays, read_json, write_arrays, write_json
from attnlab.notebook import html_escape, table_html
from attnlab.params import Parameterized
from attnlab.progress import bar

JSON_NAME = "intervention.json"
ARRAYS_NAME = "arrays.safetensors"


class NotFittedError(RuntimeError):
    """An intervention was applied (or saved) before ``fit`` (a programming error, not a user error)."""


# ---- labelled prompts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt whose answer is one of ``labels``, read from the next-token logits of each label's first token."""

    prompt: str
    label: str | None
    labels: tuple[str, ...]
    image: Any = None  # PIL image of a VLM prompt (its text holds the image placeholder)


def as_labeled(items: Sequence[Any]) -> list[LabeledPrompt]:
    """``LabeledPrompt``s from ``ClsPrompt``-like objects or dicts with ``prompt``, ``label`` (optional), ``labels``."""
    out = []
    for it in items:
        get = it.get if isinstance(it, dict) else (lambda k, d=None, it=it: getattr(it, k, d))
        prompt, labels = get("prompt"), get("labels")
        if prompt is None or not labels:
            raise InputError(f"a labelled prompt needs 'prompt' and 'labels', got {it!r}")
        out.append(LabeledPrompt(str(prompt), get("label"), tuple(labels), get("image")))
    return out


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def label_token_ids(model, labels: Sequence[str]) -> list[int]:
    """First token id of each label word as it follows ``"Label:"`` (with a leading space)."""
    return [int(model.tokenizer(" " + lab, add_special_tokens=False)["input_ids"][0]) for lab in labels]


@torch.no_grad()
def label_logits(
    model, items: Sequence[LabeledPrompt], *, batch_size: int = 32, desc: str | None = None
) -> list[torch.Tensor]:
    """Next-token logits of each item's label tokens at its last real position (right padding), float32 on CPU.
    With ``desc``, a progress bar over the batches."""
    out: list[torch.Tensor] = []
    ids_cache: dict[tuple[str, ...], list[int]] = {}
    for s in bar(range(0, len(items), batch_size), desc=desc, unit="batch", disable=desc is None):
        chunk = items[s : s + batch_size]
        images = [it.image for it in chunk] if any(it.image is not None for it in chunk) else None
        batch = model.encode([it.prompt for it in chunk], images=images, padding_side="right")
        logits = model.forward(batch)
        last = batch.lengths.to(logits.device) - 1
        final = logits[torch.arange(len(chunk), device=logits.device), last].float().cpu()
        for row, it in zip(final, chunk):
            ids = ids_cache.setdefault(it.labels, label_token_ids(model, it.labels))
            out.append(row[ids])
    return out


def score_labels(model, items: Sequence[LabeledPrompt], *, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy (when labels are known), mean label-restricted entropy and the predicted-label histogram."""
    rows = label_logits(model, items, batch_size=batch_size)
    preds = [it.labels[int(r.argmax())] for r, it in zip(rows, items)]
    ent = [float(-(torch.softmax(r, -1) * torch.log_softmax(r, -1)).sum()) for r in rows]
    labelled = [(p, it.label) for p, it in zip(preds, items) if it.label is not None]
    hist: dict[str, int] = {}
    for p in preds:
        hist[p] = hist.get(p, 0) + 1
    return {
        "accuracy": float(np.mean([p == g for p, g in labelled])) if labelled else float("nan"),
        "entropy": float(np.mean(ent)) if ent else float("nan"),
        "n": len(items),
        "predicted": hist,
    }


# ---- hook helpers ----------------------------------------------------------------------------------------------


def real_keys_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Which keys are real (not padding) ``[batch, seq_k]``, read from masked pre-softmax scores.

    Padding keys are masked with a huge negative value in every query row, so a key is real when the last query
    row (a real token under left padding; the causally widest row) leaves it unmasked. For right padding the
    last row is a padded query that still sees every real key.
    """
    last = scores[:, 0, -1, :]
    return last > torch.finfo(scores.dtype).min / 2


def first_real_key(valid: torch.Tensor) -> torch.Tensor:
    """Index of the first real key per row ``[batch]`` (0 when a row has none)."""
    return valid.long().argmax(-1)


def heads_by_layer(heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, h in heads:
        out.setdefault(int(l), []).append(int(h))
    return {l: sorted(set(hs)) for l, hs in sorted(out.items())}


def validate_heads(model, heads: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Heads as sorted unique ``(layer, head)`` int pairs inside the model's grid."""
    out = set()
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"a head must be a (layer, head) pair, got {item!r}") from None
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise InvalidParameterError(
                f"head {(layer, head)} outside {model.name}'s grid of {model.n_layers} layers x {model.n_heads} heads"
            )
        out.add((layer, head))
    return tuple(sorted(out))


# ---- the base class --------------------------------------------------------------------------------------------


class Intervention(Parameterized):
    """Base of fitted, hook-applied attention interventions (the parameter contract: ``attnlab.params``).

    Subclasses store their ``__init__`` parameters, declare ``_parameter_constraints`` and implement
    ``_fit(model, data)`` (set fitted attributes ending in ``_``) and ``hooks(model) -> list[(hook name, fn)]``;
    optionally ``_fit_data(model, data)`` (what ``_fit`` gets, e.g. task data read from a spec),
    ``_fit_split(data, split)`` (the record of the fit data) and ``_reset_state()`` for per-forward state (e.g.
    sink sets remembered between a prefill and its cached decoding steps), cleared when hooks are removed.
    Fitted attributes listed in ``_head_fields`` are tuples of ``(layer, head)`` pairs (restored as such by
    ``load``).
    """

    name = "intervention"
    _head_fields: tuple[str, ...] = ()

    def _repr_html_(self) -> str:
        params = table_html([{"parameter": k, "value": repr(v)} for k, v in self.get_params().items()])
        if not self.is_fitted():
            return f"<div><b>{html_escape(type(self).__name__)}</b> (not fitted){params}</div>"
        heads = self.edited_heads()
        shown = "not per head" if heads is None else (", ".join(f"L{l}H{h}" for l, h in heads[:24]) or "none")
        more = f" … ({len(heads)} heads)" if heads is not None and len(heads) > 24 else ""
        note = self.does_nothing()
        fit = self.fit_split_
        return (
            f"<div><b>{html_escape(type(self).__name__)}</b> fitted on {html_escape(fit.get('name'))} "
            f"(n={fit.get('n')}) for {html_escape(self.model_.get('name'))}<br>edits: {html_escape(shown)}{more}"
            + (f"<br><b>note:</b> {html_escape(note)}" if note else "")
            + f"{params}</div>"
        )

    # ---- fitting ---------------------------------------------------------------------------------------------

    def fit(self, model, data=None, *, split: str | None = None) -> Intervention:
        """Check the parameters, learn what the method needs from ``data``; returns ``self``.

        The template every intervention shares: parameters are validated (``_parameter_constraints``), fitted
        state from an earlier fit is dropped, ``data`` is read (``_fit_data``), recorded in ``fit_split_`` with
        ``split`` as its name (default ``"fit"``) and the prompts' SHA-256 digests, so a report can say which data
        fitted the intervention and ``check_disjoint`` can refuse a test set that overlaps it; then ``_fit``.
        """
        self._validate_params()
        for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, k)  # a second fit starts over
        data = self._fit_data(model, data)
        self.fit_split_ = self._fit_split(data, split)
        self.model_ = {"name": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads}
        self._fit(model, data)
        return self

    def _fit_data(self, model, data):
        """What ``_fit`` learns from (by default ``data`` as given: labelled prompts, or None)."""
        return data

    def _fit_split(self, data, split: str | None) -> dict[str, Any]:
        """``fit_split_``: the fit data's name, size and prompt digests."""
        prompts = _prompt_texts(data)
        return {"name": split or "fit", "n": len(prompts), "digests": [prompt_digest(p) for p in prompts]}

    def _fit(self, model, data) -> None:
        raise NotImplementedError

    def is_fitted(self) -> bool:
        return hasattr(self, "fit_split_")

    def edited_heads(self) -> tuple[tuple[int, int], ...] | None:
        """The ``(layer, head)`` pairs the fitted intervention edits (``heads_``, or the heads of
        ``selected_heads_``), or None for a method that does not work per head. An empty tuple: it edits none,
        so the intervened model is the baseline."""
        self._check_fitted()
        heads = getattr(self, "heads_", None)
        if heads is None and getattr(self, "selected_heads_", None) is not None:
            heads = [(h[0], h[1]) for h in self.selected_heads_]
        return None if heads is None else tuple((int(l), int(h)) for l, h in heads)

    def does_nothing(self) -> str | None:
        """One line saying why the fitted intervention leaves the model unchanged (it edits no heads), else None."""
        heads = self.edited_heads()
        if heads is None or heads:
            return None
        candidates = getattr(self, "candidates_", None)
        if candidates is not None and len(candidates) == 0:
            why = "it has no candidate heads: none were given and its default layers hold none in this model"
        elif getattr(self, "head_scores_", None) is not None:
            why = f"head filtering kept none of its {len(candidates or ())} candidate heads: none beat the baseline"
        else:
            why = "no head was selected"
        return f"{self.name} edits no heads ({why}); the intervened model is the baseline"

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(model, data) first")

    def check_disjoint(self, prompts: Sequence[Any]) -> None:
        """Raise ``InputError`` (a ValueError) if any of ``prompts`` (strings or labelled prompts) was in the
        fit split."""
        self._check_fitted()
        texts = _prompt_texts(prompts)
        seen = set(self.fit_split_["digests"])
        shared = sum(prompt_digest(t) in seen for t in texts)
        if shared:
            raise InputError(f"{shared} of {len(texts)} test prompts were in the fit split {self.fit_split_['name']!r}")

    # ---- applying --------------------------------------------------------------------------------------------

    def hooks(self, model) -> list:
        raise NotImplementedError

    def _reset_state(self) -> None:
        """Forget per-forward state (called when hooks are installed and when they are removed)."""

    def _check_model(self, model) -> None:
        """Refuse to run before ``fit`` or on another model than the fitted one."""
        self._check_fitted()
        if self.model_["n_layers"] != model.n_layers or self.model_["n_heads"] != model.n_heads:
            raise InputError(
                f"{type(self).__name__} was fitted on {self.model_['name']} "
                f"({self.model_['n_layers']}x{self.model_['n_heads']}), not {model.name}"
            )

    @contextlib.contextmanager
    def _hooked(self, model, hooks: list) -> Iterator:
        """Forward passes inside run with ``hooks``; per-forward state is fresh inside and cleared on exit."""
        self._reset_state()
        try:
            with model.bridge.hooks(fwd_hooks=hooks):
                yield model
        finally:
            self._reset_state()

    @contextlib.contextmanager
    def apply(self, model) -> Iterator:
        """Forward passes inside run with the intervention; its hooks are removed on exit, whatever happens."""
        self._check_model(model)
        with self._hooked(model, self.hooks(model)):
            yield model

    # ---- persistence -----------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``intervention.json`` + ``arrays.safetensors`` into ``directory`` (atomically); returns it."""
        self._check_fitted()
        d = Path(directory)
        fitted, arrays = {}, {}
        for k, v in vars(self).items():
            if not k.endswith("_") or k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):
                arrays[k] = v.detach().cpu().numpy()
            elif isinstance(v, np.ndarray):
                arrays[k] = v
            else:
                fitted[k] = v
        meta = {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "method": self.name,
            "params": self.get_params(),
            "fitted": fitted,
            "arrays": sorted(arrays),
        }
        write_arrays(d / ARRAYS_NAME, arrays)
        write_json(d / JSON_NAME, meta)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Intervention:
        """Restore a saved intervention (of this class, or of the class it names when called on the base).

        Only classes of the registry (``attnlab.interventions.registry.INTERVENTIONS``) are loaded: the class
        the JSON names must be one of the registry's classes (``registered_class``); no module named by a file is
        imported.
        """
        d = Path(directory)
        meta = read_json(d / JSON_NAME)
        klass = registered_class(meta.get("class") if isinstance(meta, dict) else None, d)
        if not isinstance(meta.get("params"), dict) or not isinstance(meta.get("fitted"), dict):
            raise AttnlabError(f"{d / JSON_NAME} is malformed: params and fitted must be objects")
        if not isinstance(meta.get("arrays"), list) or not all(isinstance(a, str) for a in meta["arrays"]):
            raise AttnlabError(f"{d / JSON_NAME} is malformed: arrays must be a list of names")
        if not issubclass(klass, cls):
            raise InputError(f"{d} holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass(**{k: _tuplify(v) for k, v in meta["params"].items()})
        for k, v in meta["fitted"].items():
            setattr(obj, k, tuple(tuple(int(x) for x in p) for p in v) if k in klass._head_fields else v)
        arrays = read_arrays(d / ARRAYS_NAME) if meta["arrays"] else {}
        for k in meta["arrays"]:
            setattr(obj, k, arrays[k])
        return obj


def registered_class(name: Any, where: Path) -> type[Intervention]:
    """The intervention class a saved ``intervention.json`` names, if it is one of the registry's
    (``attnlab.interventions.registry.INTERVENTIONS``); anything else is refused before any module is imported."""
    # Not at the top: the registry imports every method's module, and each of those imports this one.
    from attnlab.interventions.registry import INTERVENTIONS

    known = {f"{c.__module__}.{c.__qualname__}": c for c in INTERVENTIONS.values()}
    if not isinstance(name, str) or name not in known:
        raise AttnlabError(
            f"{where / JSON_NAME} names class {str(name)[:120]!r}, not a registered intervention "
            f"({', '.join(INTERVENTIONS)}); refused"
        )
    return known[name]


def _prompt_texts(data) -> list[str]:
    """Prompt strings of ``data`` (None, strings, or labelled prompts)."""
    if data is None:
        return []
    items = list(data)
    return [
        it if isinstance(it, str) else it.prompt
        for it in (items if all(isinstance(i, str) for i in items) else as_labeled(items))
    ]


def _tuplify(v: Any) -> Any:
    """JSON lists back to tuples (parameters such as head lists are tuples of pairs)."""
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


__all__ = [
    "Intervention",
    "NotFittedError",
    "LabeledPrompt",
    "as_labeled",
    "score_labels",
    "label_logits",
    "validate_heads",
    "heads_by_layer",
    "real_keys_from_scores",
    "first_real_key",
]
