"""Input generators: each makes a ``PromptSet`` (or task data) procedurally from a seed; nothing is downloaded.

``DATASETS`` maps the names ``attnlab scan --dataset NAME`` accepts to builders ``f(model, n_prompts, seed)``:

- ``prose``, ``repeated-random``, ``niah``: text prompts for any language model;
- ``shapes`` (= ``shapes-attribute``), ``shapes-count``, ``shapes-position``: a rendered shape scene plus one
  question each, in the LLaVA-1.5 template (vision-language models; ``vision`` probes). The run's dataset name
  ``shapes-<kind>(n=N,seed=S)`` lets the app regenerate the images;
- ``bigram-backcopy``: sequences of the Bigram-Backcopy task a model was trained on (organism-sink; the task is
  read from the checkpoint directory), with the trigger positions in ``meta`` for the ``domain_sink`` probe;
- ``arithmetic``: step-by-step word problems with their worked solution appended as the response
  (``meta["prompt_len"]``), for the ``preplan_anchor`` probe. The response is the reference solution,
  teacher-forced, not a sample of the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from attnlab.datasets.arithmetic import build_eval_problems
from attnlab.datasets.base import PromptSet, fingerprint
from attnlab.datasets.bigram_backcopy import bigram_backcopy_prompts
from attnlab.datasets.niah_set import niah_dataset
from attnlab.datasets.prose import prose_paragraphs
from attnlab.datasets.reasoning import reasoning_prompt_set
from attnlab.datasets.repeated import repeated_random_tokens
from attnlab.datasets.shapes import render_scene, task_questions
from attnlab.errors import AttnlabError


def _prose(model, n_prompts: int, seed: int) -> PromptSet:
    """Paragraphs of the standard library's docstrings (any language model)."""
    paras = [p for p in prose_paragraphs() if len(p) > 200]
    rng = random.Random(seed)
    picked = rng.sample(paras, min(n_prompts, len(paras)))
    return PromptSet(name=f"prose(n={len(picked)},seed={seed})", texts=picked, seed=seed)


def _repeated(model, n_prompts: int, seed: int) -> PromptSet:
    """Random tokens repeated once, for induction heads (any language model)."""
    return repeated_random_tokens(model, n_prompts=n_prompts, seed=seed)


def _niah(model, n_prompts: int, seed: int) -> PromptSet:
    """Needle-in-a-haystack prompts with their answers, for retrieval and streaming heads."""
    return niah_dataset(model, n_prompts, seed)


SHAPE_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def shape_prompt_set(kind: str, n_prompts: int, seed: int) -> PromptSet:
    """``n_prompts`` shape scenes with one ``kind`` question each (``attribute``, ``count`` or ``position``).

    Images are PIL renders of ``attnlab.datasets.shapes`` scenes; ``meta`` holds each question's kind, text and
    answer. The name ``shapes-<kind>(n=N,seed=S)`` is what the app parses to regenerate the scenes.
    """
    items = task_questions(kind, n_prompts, seed)
    return PromptSet(
        name=f"shapes-{kind}(n={n_prompts},seed={seed})",
        texts=[SHAPE_TEMPLATE.format(question=q.text) for _, q in items],
        images=[render_scene(s) for s, _ in items],
        meta=[{"kind": q.kind, "question": q.text, "answer": q.answer} for _, q in items],
        seed=seed,
    )


def _shapes(kind: str) -> Callable[..., PromptSet]:
    def build(model, n_prompts: int, seed: int) -> PromptSet:
        if getattr(model, "processor", None) is None:
            raise AttnlabError(
                f"dataset shapes-{kind} is image + question prompts; {model.name} is not a vision-language model"
            )
        return shape_prompt_set(kind, n_prompts, seed)

    build.__doc__ = f"A rendered shape scene with one {kind} question (vision-language models)."
    return build


def _arithmetic(model, n_prompts: int, seed: int) -> PromptSet:
    """Arithmetic word problems with their worked solution as the response, for preplan_anchor."""
    problems = build_eval_problems(n_prompts, split="test", seed=seed)
    ps = reasoning_prompt_set(
        model, [(p.prompt, p.solution) for p in problems], name=f"arithmetic(n={n_prompts},seed={seed})"
    )
    ps.seed = seed
    return ps


def _bigram_backcopy(model, n_prompts: int, seed: int) -> PromptSet:
    """Bigram-Backcopy sequences of the model's own task (models trained on it: organism-sink, organism-sink-sgd)."""
    return bigram_backcopy_prompts(model, n_prompts, seed)


DATASETS: dict[str, Callable[..., PromptSet]] = {
    "prose": _prose,
    "repeated-random": _repeated,
    "niah": _niah,
    "shapes": _shapes("attribute"),
    "shapes-attribute": _shapes("attribute"),
    "shapes-count": _shapes("count"),
    "shapes-position": _shapes("position"),
    "arithmetic": _arithmetic,
    "bigram-backcopy": _bigram_backcopy,
}


def describe_datasets() -> dict[str, str]:
    """``--dataset`` name -> the first line of its builder's docstring (what the CLI's help lists)."""
    return {name: (build.__doc__ or "").strip().splitlines()[0] for name, build in DATASETS.items()}


__all__ = ["PromptSet", "fingerprint", "DATASETS", "describe_datasets", "shape_prompt_set"]
