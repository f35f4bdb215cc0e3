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
gamma search) are **shown as unavailable with a one-line reason** ("cannot run here: " + their own ``fit`` error, also used
for parameter values that ``fit`` rejects); the app never fits
on a data set behind the user's back. Fit them with ``attnlab intervene --fit`` instead.

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
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from attnlab.errors import AttnlabError

MAX_NEW_TOKENS = 6
MAX_PARAMS_CHARS = 2000
# parameters filled in when a method is picked: what it needs to run without fit data (ZeroTuning's gamma)
DEFAULT_PARAMS = {"zerotuning": "gamma=2.0", "softpag": "heads=[[1,0],[1,1]] u=1 scale=1"}


def methods() -> list[str]:
    """Method names of the registry, read now (methods registered later show up)."""
    from attnlab.interventions.registry import INTERVENTIONS

    return list(INTERVENTIONS)


def method_summary(method: str) -> str:
    """First line of the method class's docstring and its parameter names, for the page."""
    from attnlab.interventions.registry import INTERVENTIONS

    cls = INTERVENTIONS.get(method)
    if cls is None:
        raise AttnlabError(f"unknown method {str(method)[:40]!r}; available: {', '.join(INTERVENTIONS)}")
    doc = (cls.__doc__ or "").strip().splitlines()
    names = cls._param_names() if hasattr(cls, "_param_names") else []
    return f"{doc[0] if doc else method} Parameters: {', '.join(names) or 'none'}."


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
    from attnlab.interventions.registry import build

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
        import pandas as pd

        return pd.DataFrame(
            [
                {"run": "baseline", "output": self.output_baseline, "top_token": self.top_baseline, "answer_token": self.answer_token, "p_answer": self.p_baseline, "delta_p": 0.0},
                {"run": f"{self.method}", "output": self.output_intervened, "top_token": self.top_intervened, "answer_token": self.answer_token, "p_answer": self.p_intervened, "delta_p": self.delta_p},
            ]
        )

    def plot(self, *, max_size: int = 192):
        """Intervened minus baseline attention of the head (``figures.attention_difference``)."""
        from attnlab.apps import figures

        return figures.attention_difference(self.pattern_baseline, self.pattern_intervened, self.tokens, layer=self.layer, head=self.head, model=self.model, method=self.method, max_size=max_size)


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
    import torch

    from attnlab.hooks import attn_hook

    seen: list = []

    def keep(pattern, hook=None):
        seen.append(pattern[0].detach().float().cpu().clone())

    new: list[int] = []
    eos = model.tokenizer.eos_token_id
    probs = None
    name = attn_hook(layer, "hook_pattern")
    with torch.inference_mode():
        for step in range(max(1, n_new)):
            batch = model.batch_from_ids([ids + new], [0])
            if step == 0:
                with model.bridge.hooks(fwd_hooks=[(name, keep)]), _also_in_nested_hooks(model.bridge, name, keep):
                    logits = model.forward(batch)
                probs = logits[0, -1].float().softmax(-1).cpu()
            else:
                logits = model.forward(batch)
            nxt = int(logits[0, -1].argmax())
            if step >= n_new or (eos is not None and nxt == eos):
                break
            new.append(nxt)
            if len(ids) + len(new) >= model.n_ctx:
                break
    if not seen:
        raise AttnlabError(f"layer {layer}'s attention pattern was not produced (the model must run eager attention)")
    return new, probs, seen[-1].numpy()


def compare(model, intervention, prompt: str, answer: str | None = None, head: tuple[int, int] | None = None, *, max_new_tokens: int = MAX_NEW_TOKENS, max_tokens: int | None = None) -> ComparisonResult:
    """Run ``prompt`` without and with the fitted ``intervention`` (``intervention.apply(model)``).

    Parameters
    ----------
    model : LoadedModel (a causal LM; text prompts)
    intervention : fitted ``Intervention`` (e.g. from ``prepare``)
    prompt : str
    answer : str or None
        Expected answer; its first token's probability is compared. None: the baseline's top next token.
    head : (layer, head) or None
        Head whose pattern is compared. None: the first head the intervention edits (``heads_``), else L0H0.
    max_new_tokens : int, greedy tokens generated in each run
    max_tokens : int or None, longest prompt accepted (tokens), besides the model's context
    """
    if not model.causal:
        raise AttnlabError(f"{model.name} is not a causal language model; the interventions view runs decoders")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AttnlabError("the prompt is empty")
    touched = getattr(intervention, "heads_", None)
    touched = tuple((int(l), int(h)) for l, h in touched) if touched is not None else None
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
    )


def run_comparison(live, model_name: str, method: str, params: str | None, prompt: str | None, answer: str | None, head: tuple[int, int] | None, *, max_new_tokens: int = MAX_NEW_TOKENS) -> ComparisonResult:
    """``prepare`` + ``compare`` on a model of the app's ``LiveModels``: prompt size limits checked first, then the
    live-run lock held (one live run at a time; "busy" after ``live.wait_s``)."""
    if not prompt or not prompt.strip():
        raise AttnlabError("type a prompt first")
    if len(prompt) > live.max_chars:
        raise AttnlabError(f"the prompt has {len(prompt)} characters; the limit is {live.max_chars}")
    if answer is not None and len(answer) > 200:
        raise AttnlabError("the expected answer is longer than 200 characters")
    if method not in methods():
        raise AttnlabError(f"unknown method {str(method)[:40]!r}; available: {', '.join(methods())}")
    split_params(params)  # length and shape checked before waiting for the lock
    with live.exclusive(model_name) as model:
        iv = prepare(model, method, params)
        return compare(model, iv, prompt, answer, head, max_new_tokens=max_new_tokens, max_tokens=live.max_tokens)


def availability(live, model_name: str, method: str, params: str | None) -> str:
    """One line for the page: ``"available"`` or why not (fit without data, on the live model; holds the lock)."""
    with live.exclusive(model_name) as model:
        prepare(model, method, params)
    return "available on this model"


__all__ = ["ComparisonResult", "compare", "prepare", "run_comparison", "availability", "methods", "method_summary", "split_params", "answer_token_id", "DEFAULT_PARAMS"]
