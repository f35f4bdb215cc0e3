"""Interventions view: one prompt run on a live model without and with an attention intervention, side by side.

``compare(model, intervention, prompt, answer=None, head=(l, h))`` -> ``ComparisonResult``: both greedy outputs
(a few tokens), the probability of the answer's first token as the next token after the prompt in both runs, and
the selected head's attention pattern in both runs (``plot()`` draws intervened minus baseline with
``figures.attention_difference``, the figure the app shows). Pure: no Dash, usable in a notebook.

Which interventions run live (``prepare``): methods come from ``attnlab.interventions.registry.INTERVENTIONS``
(read on every call, so new methods appear without touching the app), built with ``registry.build`` from ``k=v``
parameters. **A method is fitted with no data** (``fit(model, None)``): methods with fixed parameters (ACT without
head filtering, ZeroTuning with a given ``gamma``) run; methods that need fitting data or images the live model
cannot provide here (VAR and VHR need image prompts, soft injection task data, ZeroTuning without ``gamma`` its
gamma search) are **shown as unavailable with a one-line reason** ("cannot run here: " + their own ``fit`` error,
also used for parameter values that ``fit`` rejects); the app never fits on a data set behind the user's back. Fit
them with ``attnlab intervene --fit`` instead.

Fitted interventions (``load_fitted``): the directories of the app's runs directory that ``attnlab intervene --out
NAME`` wrote (``NAME/intervention/``, ``RunCatalog.fitted_names``) are offered too, as the dropdown value
``"fitted:NAME"`` (label ``"METHOD (fitted: NAME)"``). One is loaded with its registry class's ``load`` (JSON +
safetensors; the class the JSON names must be the registry's class of the method it names, so no other module is
imported), must have been fitted on the selected run's model (by name; otherwise a one-line message), and runs the
same comparison with the parameters it was fitted with. A directory that cannot be read gives a one-line message
naming the run, never its path.

Answer token: the expected answer's first token as it follows the prompt (a space is put in front of the answer
unless the prompt ends in whitespace or the answer starts with it, the convention of ``base.label_token_ids``);
without an answer, the unintervened model's top next token. Greedy decoding re-runs prompt + generated tokens
(no KV cache, like the evaluation harness), so every intervention sees plain prefill passes; the pattern is read
at ``blocks.{l}.attn.hook_pattern`` of the first pass, after the intervention's own hooks, i.e. the attention the
intervened model used. If an intervention runs the model more than once per forward (SoftPAG guidance: a clean and
a head-perturbed pass), the last pass is shown, i.e. the perturbed map that guidance contrasts with the clean one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab import figures
from attnlab.errors import AttnlabError
from attnlab.hooks import attn_hook
from attnlab.interventions.registry import INTERVENTIONS, build, registry_class
from attnlab.models.decoding import greedy_decode

MAX_NEW_TOKENS = 6
MAX_PARAMS_CHARS = 2000
FITTED_PREFIX = "fitted:"  # dropdown value of a fitted intervention: FITTED_PREFIX + run name
MAX_FITTED_JSON_BYTES = 16 * 2**20  # intervention.json larger than this is refused unread
# parameters filled in when a method is picked: what it needs to run without fit data (ZeroTuning's gamma)
DEFAULT_PARAMS = {"zerotuning": "gamma=2.0", "softpag": "heads=[[1,0],[1,1]] u=1 scale=1"}


def methods() -> list[str]:
    """Method names of the registry, read now (methods registered later show up)."""
    return list(INTERVENTIONS)


def method_summary(method: str) -> str:
    """First line of the method class's docstring and its parameter names, for the page."""
    cls = INTERVENTIONS.get(method)
    if cls is None:
        raise AttnlabError(f"unknown method {str(method)[:40]!r}; available: {', '.join(INTERVENTIONS)}")
    doc = (cls.__doc__ or "").strip().splitlines()
    names = cls._param_names() if hasattr(cls, "_param_names") else []
    return f"{doc[0] if doc else method} Parameters: {', '.join(names) or 'none'}."


# ---- fitted interventions of the runs directory ------------------------------------------------------------------


def fitted_name(method: Any) -> str | None:
    """The run name of a ``"fitted:NAME"`` dropdown value; None for a registry method name."""
    return method[len(FITTED_PREFIX) :] if isinstance(method, str) and method.startswith(FITTED_PREFIX) else None


def _read_meta(catalog, name: str) -> dict[str, Any]:
    """``NAME/intervention/intervention.json`` as a dict, or a one-line AttnlabError (no path in it)."""
    path = catalog.fitted_dir(name) / "intervention.json"
    try:
        if path.stat().st_size > MAX_FITTED_JSON_BYTES:
            raise AttnlabError(
                f"fitted intervention {name!r}: intervention.json is larger than {MAX_FITTED_JSON_BYTES >> 20} MiB"
            )
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except AttnlabError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AttnlabError(
            f"fitted intervention {name!r} cannot be read: intervention.json is not valid JSON ({type(e).__name__})"
        ) from None
    if not isinstance(meta, dict):
        raise AttnlabError(f"fitted intervention {name!r} cannot be read: intervention.json is not an object")
    return meta


def _registry_class(meta: dict[str, Any], name: str):
    """The registry class of the method ``meta`` names, checked to be the class it records and its keys to be the
    ones ``Intervention.save`` writes (parameters of the class, fitted names ending in ``_``)."""
    method = meta.get("method")
    cls = registry_class(meta)
    if cls is None:
        raise AttnlabError(
            f"fitted intervention {name!r} does not hold an intervention of the registry "
            f"(method {str(method)[:40]!r}, class {str(meta.get('class'))[:80]!r})"
        )
    params, fitted, arrays = meta.get("params"), meta.get("fitted"), meta.get("arrays")
    if not (isinstance(params, dict) and isinstance(fitted, dict) and isinstance(arrays, list)):
        raise AttnlabError(
            f"fitted intervention {name!r} cannot be read: intervention.json lacks params, fitted or arrays"
        )
    unknown = sorted(set(params) - set(cls._param_names()))
    bad = [k for k in [*fitted, *arrays] if not (isinstance(k, str) and k.endswith("_") and not k.startswith("_"))]
    if unknown or bad:
        raise AttnlabError(
            f"fitted intervention {name!r} cannot be read: "
            f"unexpected entries {', '.join(map(str, (unknown + bad)[:5]))}"
        )
    if not isinstance(fitted.get("model_"), dict) or "fit_split_" not in fitted:
        raise AttnlabError(f"fitted intervention {name!r} cannot be read: it records no fitted model")
    return cls


def fitted_method(catalog, name: str) -> str:
    """The method a fitted run holds (for its dropdown label); ``"?"`` when its JSON cannot be read."""
    try:
        return str(_registry_class(_read_meta(catalog, name), name).name)
    except AttnlabError:
        return "?"


def _model_label(name: Any) -> str:
    """A model name for the page: a local checkpoint path shows as its directory name only."""
    text = str(name)
    return os.path.basename(text.rstrip("/\\")) if os.path.isabs(text) else text


def load_fitted(catalog, name: str, model_name: str | None = None):
    """The intervention saved under the run ``name`` of ``catalog`` (``attnlab intervene --out``), loaded with its
    registry class's ``load``; with ``model_name``, checked to have been fitted on that model. Every failure is a
    one-line ``AttnlabError`` naming the run, never a path."""
    meta = _read_meta(catalog, name)
    cls = _registry_class(meta, name)
    try:
        iv = cls.load(catalog.fitted_dir(name))
    except Exception as e:  # malformed safetensors, wrong parameter types, missing arrays ...
        text = str(e).replace(str(catalog.runs_dir), "").strip().splitlines()
        raise AttnlabError(
            f"fitted intervention {name!r} cannot be read: {type(e).__name__}{': ' + text[0][:200] if text else ''}"
        ) from None
    fitted_on = iv.model_.get("name")
    if model_name is not None and fitted_on != model_name:
        raise AttnlabError(
            f"fitted intervention {name!r} was fitted on {_model_label(fitted_on)}, "
            f"not on this run's model {_model_label(model_name)}"
        )
    return iv


def fitted_summary(iv, name: str) -> str:
    """One line about a fitted intervention: method, fit data, model and parameters."""
    split = getattr(iv, "fit_split_", {}) or {}
    params = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in iv.get_params().items()
    )  # a str may hold "\n"
    return (
        f"{iv.name} fitted by 'attnlab intervene' (run {name}) on {split.get('name', '?')} "
        f"(n={split.get('n', '?')}) for {_model_label(iv.model_.get('name'))}; parameters: {params}."
    )


def method_options(catalog=None) -> list[dict[str, str]]:
    """Dropdown options: the registry's methods (read now), then one per fitted intervention of ``catalog``'s runs
    directory, labelled ``"METHOD (fitted: NAME)"``."""
    opts = [{"label": n, "value": n} for n in methods()]
    if catalog is not None:
        opts += [
            {"label": f"{fitted_method(catalog, n)} (fitted: {n})", "value": FITTED_PREFIX + n}
            for n in catalog.fitted_names()
        ]
    return opts


def split_params(text: str | None) -> list[str]:
    """``"beta=0.4 heads=[[3, 0], [3, 1]]"`` -> ``["beta=0.4", "heads=[[3, 0], [3, 1]]"]``: pairs are separated by
    whitespace, ``;`` or newlines outside brackets and quotes (so JSON lists may contain spaces)."""
    text = text or ""
    if len(text) > MAX_PARAMS_CHARS:
        raise AttnlabError(f"the parameters have {len(text)} characters; the limit is {MAX_PARAMS_CHARS}")
    out, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch.isspace() or ch == ";"):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def prepare(model, method: str, params: str | Sequence[str] | None = None):
    """A fitted intervention of ``method`` for ``model``: ``registry.build`` with the ``k=v`` pairs, then
    ``fit(model, None)``. Raises ``AttnlabError`` with one line when a parameter is wrong or the method cannot run
    without fit data (the reason is the method's own)."""
    pairs = split_params(params) if params is None or isinstance(params, str) else list(params)
    iv = build(method, pairs)  # unknown method / parameter name: AttnlabError
    try:
        iv.fit(model, None, split="none (fixed parameters, app)")
    except (ValueError, TypeError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AttnlabError(f"{method} cannot run here: {first}") from None
    return iv


@dataclass
class ComparisonResult:
    """Baseline and intervened runs of one prompt. Patterns are ``[query, key]`` float32 of head ``(layer, head)``."""

    model: str
    method: str
    params: dict[str, Any]
    tokens: list[str]
    layer: int
    head: int
    answer: str
    answer_token: str
    answer_given: bool
    p_baseline: float
    p_intervened: float
    output_baseline: str
    output_intervened: str
    top_baseline: str
    top_intervened: str
    pattern_baseline: np.ndarray = field(repr=False)
    pattern_intervened: np.ndarray = field(repr=False)
    touched_heads: tuple[tuple[int, int], ...] | None = None
    note: str = ""  # e.g. the method edits no heads, or the asked head is not one it edits

    @property
    def delta_p(self) -> float:
        """Intervened minus baseline probability of the answer token."""
        return self.p_intervened - self.p_baseline

    @property
    def pattern_difference(self) -> np.ndarray:
        return self.pattern_intervened - self.pattern_baseline

    @property
    def head_touched(self) -> bool | None:
        """Whether the shown head is one the intervention edits directly (None: the method lists no heads)."""
        return None if self.touched_heads is None else (self.layer, self.head) in set(self.touched_heads)

    def to_frame(self):
        """One row per run: greedy output, next top token, answer-token probability (and its change)."""
        return pd.DataFrame(
            [
                {
                    "run": "baseline",
                    "output": self.output_baseline,
                    "top_token": self.top_baseline,
                    "answer_token": self.answer_token,
                    "p_answer": self.p_baseline,
                    "delta_p": 0.0,
                },
                {
                    "run": f"{self.method}",
                    "output": self.output_intervened,
                    "top_token": self.top_intervened,
                    "answer_token": self.answer_token,
                    "p_answer": self.p_intervened,
                    "delta_p": self.delta_p,
                },
            ]
        )

    def plot(self, *, max_size: int = 192):
        """Intervened minus baseline attention of the head (``figures.attention_difference``)."""
        return figures.attention_difference(
            self.pattern_baseline,
            self.pattern_intervened,
            self.tokens,
            layer=self.layer,
            head=self.head,
            model=self.model,
            method=self.method,
            max_size=max_size,
        )


def answer_token_id(model, prompt: str, answer: str) -> int:
    """First token of ``answer`` as it follows ``prompt`` (leading space added unless either side has one)."""
    text = answer if (answer[:1].isspace() or prompt[-1:].isspace()) else " " + answer
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AttnlabError(f"the answer {answer[:40]!r} has no tokens")
    return int(ids[0])


@contextlib.contextmanager
def _also_in_nested_hooks(bridge, name: str, keep):
    """While inside, hook contexts that an intervention opens *during* a forward (SoftPAG guidance's perturbed
    pass) get ``keep`` on ``name`` after their own hooks, so the pattern read there is the edited one."""
    original = bridge.hooks

    def hooks(*args, **kwargs):
        args = list(args)
        fwd = list(args.pop(0) if args else kwargs.pop("fwd_hooks", []) or [])
        if any(n == name for n, _ in fwd):
            fwd.append((name, keep))
        return original(fwd, *args, **kwargs)

    bridge.hooks = hooks  # instance attribute: shadows the method for this bridge only
    try:
        yield
    finally:
        del bridge.hooks


def _greedy(model, ids: list[int], layer: int, n_new: int) -> tuple[list[int], Any, np.ndarray]:
    """Greedy tokens, next-token probabilities after the prompt (1-D tensor) and head patterns ``[heads, q, k]``
    of ``layer`` on the first pass (read after any hooks installed before this call)."""

    seen: list = []
    first: dict = {}

    def keep(pattern, hook=None):
        seen.append(pattern[0].detach().float().cpu().clone())

    name = attn_hook(layer, "hook_pattern")

    def step(batch, index):
        if index:
            return model.forward(batch)
        with model.bridge.hooks(fwd_hooks=[(name, keep)]), _also_in_nested_hooks(model.bridge, name, keep):
            logits = model.forward(batch)
        first["probs"] = logits[0, -1].float().softmax(-1).cpu()
        return logits

    with torch.inference_mode():  # one step at least, for the probabilities; the tokens are cut to n_new
        (run,) = greedy_decode(
            model, [ids], max_new_tokens=max(1, n_new), stop_at_newline=False, max_len=model.n_ctx, forward=step
        )
    if not seen:
        raise AttnlabError(f"layer {layer}'s attention pattern was not produced (the model must run eager attention)")
    return run.tokens[:n_new], first["probs"], seen[-1].numpy()


def compare(
    model,
    intervention,
    prompt: str,
    answer: str | None = None,
    head: tuple[int, int] | None = None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_tokens: int | None = None,
) -> ComparisonResult:
    """Run ``prompt`` without and with the fitted ``intervention`` (``intervention.apply(model)``).

    Parameters
    ----------
    model : LoadedModel (a causal LM; text prompts)
    intervention : fitted ``Intervention`` (e.g. from ``prepare``)
    prompt : str
    answer : str or None
        Expected answer; its first token's probability is compared. None: the baseline's top next token.
    head : (layer, head) or None
        Head whose pattern is compared. None: the first head the intervention edits (``edited_heads()``), else
        L0H0. When the intervention edits no heads, ``note`` says the intervened run is the baseline.
    max_new_tokens : int, greedy tokens generated in each run
    max_tokens : int or None, longest prompt accepted (tokens), besides the model's context
    """
    if not model.causal:
        raise AttnlabError(f"{model.name} is not a causal language model; the interventions view runs decoders")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AttnlabError("the prompt is empty")
    if hasattr(intervention, "edited_heads"):
        touched = intervention.edited_heads()
    else:
        touched = getattr(intervention, "heads_", None)
        touched = tuple((int(l), int(h)) for l, h in touched) if touched is not None else None
    note = intervention.does_nothing() if hasattr(intervention, "does_nothing") else None
    if head is None:
        head = touched[0] if touched else (0, 0)
    layer, h = int(head[0]), int(head[1])
    if not (0 <= layer < model.n_layers and 0 <= h < model.n_heads):
        raise AttnlabError(f"{model.name} has no head L{layer}H{h} ({model.n_layers} layers x {model.n_heads} heads)")
    ids = model.token_ids(prompt)
    if max_tokens is not None and len(ids) > max_tokens:
        raise AttnlabError(f"the prompt has {len(ids)} tokens; the limit is {max_tokens}")
    new_b, probs_b, pat_b = _greedy(model, ids, layer, max_new_tokens)
    with intervention.apply(model):
        new_i, probs_i, pat_i = _greedy(model, ids, layer, max_new_tokens)
    given = bool(answer and answer.strip())
    target = answer_token_id(model, prompt, answer) if given else int(probs_b.argmax())
    if target >= probs_b.shape[0]:
        raise AttnlabError(f"the answer token {target} is outside the model's vocabulary")
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return ComparisonResult(
        model=model.name,
        method=getattr(intervention, "name", type(intervention).__name__),
        params=intervention.get_params() if hasattr(intervention, "get_params") else {},
        tokens=model.tokens_as_text(ids),
        layer=layer,
        head=h,
        answer=answer.strip() if given else decode([target]),
        answer_token=model.tokens_as_text([target])[0],
        answer_given=given,
        p_baseline=float(probs_b[target]),
        p_intervened=float(probs_i[target]),
        output_baseline=decode(new_b),
        output_intervened=decode(new_i),
        top_baseline=model.tokens_as_text([int(probs_b.argmax())])[0],
        top_intervened=model.tokens_as_text([int(probs_i.argmax())])[0],
        pattern_baseline=pat_b[h],
        pattern_intervened=pat_i[h],
        touched_heads=touched,
        note=note or "",
    )


def _fitted_for(catalog, name: str, model_name: str, params: str | None):
    """A fitted run's intervention for ``model_name``; the parameters box must be empty (it runs as fitted)."""
    if catalog is None:
        raise AttnlabError("fitted interventions need the app's runs directory")
    if split_params(params):
        raise AttnlabError(
            f"fitted intervention {name!r} runs with the parameters it was fitted with; clear the parameters box"
        )
    return load_fitted(catalog, name, model_name)


def run_comparison(
    live,
    model_name: str,
    method: str,
    params: str | None,
    prompt: str | None,
    answer: str | None,
    head: tuple[int, int] | None,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    catalog=None,
) -> ComparisonResult:
    """``prepare`` + ``compare`` on a model of the app's ``LiveModels``: prompt size limits checked first, then the
    live-run lock held (one live run at a time; "busy" after ``live.wait_s``). ``method`` ``"fitted:NAME"``: the
    intervention saved in ``catalog``'s run ``NAME`` (``load_fitted``, checked against ``model_name`` before the
    lock), shown as ``"METHOD (fitted: NAME)"``."""
    if not prompt or not prompt.strip():
        raise AttnlabError("type a prompt first")
    if len(prompt) > live.max_chars:
        raise AttnlabError(f"the prompt has {len(prompt)} characters; the limit is {live.max_chars}")
    if answer is not None and len(answer) > 200:
        raise AttnlabError("the expected answer is longer than 200 characters")
    name = fitted_name(method)
    if name is not None:
        iv = _fitted_for(catalog, name, model_name, params)
        with live.exclusive(model_name) as model:
            result = compare(model, iv, prompt, answer, head, max_new_tokens=max_new_tokens, max_tokens=live.max_tokens)
        return dataclasses.replace(result, method=f"{result.method} (fitted: {name})")
    if method not in methods():
        raise AttnlabError(f"unknown method {str(method)[:40]!r}; available: {', '.join(methods())}")
    split_params(params)  # length and shape checked before waiting for the lock
    with live.exclusive(model_name) as model:
        iv = prepare(model, method, params)
        return compare(model, iv, prompt, answer, head, max_new_tokens=max_new_tokens, max_tokens=live.max_tokens)


def availability(live, model_name: str, method: str, params: str | None, *, catalog=None) -> str:
    """One line for the page: ``"available"`` or why not (fit without data, on the live model; holds the lock).
    A fitted intervention (``"fitted:NAME"``) is read and checked against ``model_name`` only (no lock)."""
    name = fitted_name(method)
    if name is not None:
        _fitted_for(catalog, name, model_name, params)
        return "available on this model"
    with live.exclusive(model_name) as model:
        prepare(model, method, params)
    return "available on this model"


__all__ = [
    "ComparisonResult",
    "compare",
    "prepare",
    "run_comparison",
    "availability",
    "methods",
    "method_summary",
    "split_params",
    "answer_token_id",
    "DEFAULT_PARAMS",
    "FITTED_PREFIX",
    "fitted_name",
    "load_fitted",
    "fitted_summary",
    "method_options",
]
