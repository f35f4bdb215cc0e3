"""Ablation scoring for the app: a head set (the selected head, or the top-k of a probe result) against k random
heads over a few seeds (``attnlab.ablation.causal_test``), on a metric of the run's model.

Metrics:
- ``logprob``: mean summed log-prob of each run prompt's answer tokens (teacher forced): the appended reference
  answer for NIAH runs (``meta["prompt_len"]``), the prompt's last token otherwise; for vision-language runs on
  shape scenes (``shapes-<kind>``), each question's answer (``meta["answer"]``) asked with its own image
  (``evaluators.ablation_evaluator`` carries the pixel values). The metric is the ablation metric
  ``AnswerTokens`` on ``(token ids, answer start)`` pairs. The prompts are regenerated from the run's dataset
  record and checked against its fingerprint.
- ``niah``: NIAH accuracy (exact match of the code) on fresh trials (``niah_evaluator``, seed = run seed + 1),
  offered for runs whose dataset is ``niah`` (organism-lm style runs).
Runs through ``LiveModels.exclusive``: one live computation at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlab.ablation.causal_test import causal_test
from attnlab.ablation.evaluators import ImagePrompts, ablation_evaluator, niah_evaluator
from attnlab.ablation.metrics import AnswerTokens
from attnlab.apps.live import check_regenerable
from attnlab.apps.run_inputs import model_to_load
from attnlab.datasets import DATASETS, fingerprint
from attnlab.errors import AttnlabError
from attnlab.heads.results import HeadScores
from attnlab.probes.scan import prompt_token_ids

METRICS = {"logprob": "answer log-prob (run prompts)", "niah": "NIAH accuracy"}
MAX_K = 16
MAX_SEEDS = 10


def dataset_key(info: dict) -> str:
    return str(info.get("dataset", {}).get("name", "")).split("(")[0]


def metrics_for(info: dict, inputs=None) -> list[str]:
    """The metrics a run offers: log-prob for runs whose prompts it kept (or can regenerate), NIAH accuracy for
    NIAH runs."""
    if unavailable_reason(info, inputs):
        return []
    return ["logprob", "niah"] if dataset_key(info) == "niah" else ["logprob"]


def unavailable_reason(info: dict, inputs=None) -> str:
    """Why ablation scoring cannot run on this run ("" when it can): it needs the run's prompts, kept in the run
    (``inputs``, ``Run.inputs()``) or regenerable from its dataset record; on a vision-language run, image
    questions with their answers."""
    key, name = dataset_key(info), str(info.get("dataset", {}).get("name", ""))[:60]
    vision = info.get("model", {}).get("modality") == "vision-language"
    if inputs is not None:
        if not vision:
            return "" if any(len(x) >= 2 for x in inputs.token_ids) else "the run's prompts are one token long"
        answered = (
            inputs.has_images
            and len(inputs.meta) == len(inputs)
            and all(isinstance(m, dict) and "answer" in m for m in inputs.meta)
        )
        return (
            ""
            if answered
            else "ablation scoring on a vision-language run needs image questions with answers (a shapes dataset)"
        )
    if key not in DATASETS:
        what = "its prompts and images" if vision else "its prompts"
        return (
            f"ablation scoring needs the run's prompts, but {what} ({name!r}) cannot be regenerated; "
            f"scan a built-in dataset ({'shapes' if vision else 'niah, prose'}) to score ablations"
        )
    if vision and not key.startswith("shapes"):
        return (
            "ablation scoring on a vision-language run needs image questions with answers (a shapes dataset), "
            f"not {name!r}"
        )
    return ""


def run_prompts(model, info: dict, inputs=None) -> tuple[list[tuple[list[int], int]], list | None]:
    """The run's prompts as ``(token ids, answer start)`` pairs, and its images: read from the run's kept
    ``inputs``, else regenerated from its dataset record and fingerprint-checked.

    Text runs: the answer is the appended reference (``meta["prompt_len"]``) or the last token. Vision-language
    runs: each prompt's ids as the processor expands them with its image, plus the tokens of ``meta["answer"]``;
    the images come back beside the pairs (``None`` for text runs).
    """
    ds = info.get("dataset", {})
    why = unavailable_reason(info, inputs)
    if why:
        raise AttnlabError(why)
    if inputs is not None:
        return _kept_prompts(model, inputs)
    n_prompts = check_regenerable(int(ds.get("n_prompts", 1)))
    prompts = DATASETS[dataset_key(info)](model, n_prompts, int(ds.get("seed", 0) or 0))
    images = list(prompts.images) if prompts.images is not None else None
    if images is not None:
        view = ImagePrompts(model, images)
        ids = [view.token_ids(t, index=i) for i, t in enumerate(prompts.texts)]
    else:
        ids = prompt_token_ids(model, prompts, truncate=True)
    if fingerprint(ids) != ds.get("fingerprint"):
        raise AttnlabError(f"regenerating {ds.get('name')} gave other prompts than the run used (fingerprint differs)")
    meta = list(prompts.meta) or [{}] * len(ids)
    if images is not None:
        answers = [list(model.tokenizer(" " + str(m["answer"]), add_special_tokens=False)["input_ids"]) for m in meta]
        return [(x + a, len(x)) for x, a in zip(ids, answers)], images
    return [
        (x, int(m.get("prompt_len", len(x) - 1)) if isinstance(m, dict) else len(x) - 1) for x, m in zip(ids, meta)
    ], None


def _answer_start(ids: list[int], meta) -> int:
    return int(meta.get("prompt_len", len(ids) - 1)) if isinstance(meta, dict) else len(ids) - 1


def _kept_prompts(model, inputs) -> tuple[list[tuple[list[int], int]], list | None]:
    """``run_prompts`` from a run's kept inputs: the token ids the scan saw (one-token prompts left out)."""
    meta = inputs.meta if len(inputs.meta) == len(inputs) else [{}] * len(inputs)
    if inputs.has_images:
        answers = [list(model.tokenizer(" " + str(m["answer"]), add_special_tokens=False)["input_ids"]) for m in meta]
        return [(list(x) + a, len(x)) for x, a in zip(inputs.token_ids, answers)], inputs.images()
    return [(list(x), _answer_start(x, m)) for x, m in zip(inputs.token_ids, meta) if len(x) >= 2], None


def selected_scores(model, heads: Sequence[tuple[int, int]]):
    """A ``HeadScores`` whose only scored heads are ``heads`` (so its top-k is that set, for ``causal_test``)."""
    grid = np.full((model.n_layers, model.n_heads), np.nan)
    for layer, head in heads:
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise AttnlabError(f"{model.name} has no head L{layer}H{head}")
        grid[layer, head] = 1.0
    return HeadScores(scores=grid, name="selected heads", probe="app", model=model.name, n_kv_heads=model.n_kv_heads)


def evaluator(model, info: dict, metric: str, inputs=None):
    if metric == "logprob":
        pairs, images = run_prompts(model, info, inputs)
        return ablation_evaluator(model, pairs, AnswerTokens(), images=images, mode="zero")
    if metric == "niah":
        if dataset_key(info) != "niah":
            raise AttnlabError("NIAH accuracy is offered for runs on the niah dataset only")
        seed = int(info.get("dataset", {}).get("seed", 0) or 0) + 1
        return niah_evaluator(model, lengths=(160, 320), depths=(10, 50, 90), trials_per_cell=1, seed=seed, mode="zero")
    raise AttnlabError(f"unknown metric {str(metric)[:40]!r}; choose one of {', '.join(METRICS)}")


def run_ablation(
    live,
    info: dict,
    *,
    source: str,
    selected: dict | None,
    scores=None,
    k: Any = 3,
    metric: str = "logprob",
    n_seeds: Any = 3,
    seed: int = 0,
    inputs=None,
):
    """Causal test of a head set on the run's model -> the ``causal_test`` table (``attrs`` hold the metric).

    ``source="selected"``: the selected head (k = 1); ``source="top"``: the top-k heads of ``scores``.
    ``inputs``: the run's kept inputs (``Run.inputs()``), read instead of regenerating its prompts.
    """
    try:
        k, n_seeds = int(k), int(n_seeds)
    except (TypeError, ValueError):
        raise AttnlabError("k and seeds must be whole numbers") from None
    if not 1 <= n_seeds <= MAX_SEEDS:
        raise AttnlabError(f"seeds must be between 1 and {MAX_SEEDS}")
    if unavailable_reason(info, inputs):
        raise AttnlabError(unavailable_reason(info, inputs))
    if metric not in metrics_for(info, inputs):
        raise AttnlabError(
            f"metric {str(metric)[:40]!r} is not available for this run "
            f"(available: {', '.join(metrics_for(info, inputs)) or 'none'})"
        )
    with live.exclusive(model_to_load(info)) as model:
        if source == "selected":
            if not selected:
                raise AttnlabError("select a head on the head map first")
            result, k = selected_scores(model, [(int(selected["layer"]), int(selected["head"]))]), 1
        elif source == "top":
            if scores is None:
                raise AttnlabError("pick a head score on the head map to take its top-k")
            if not 1 <= k <= MAX_K:
                raise AttnlabError(f"k must be between 1 and {MAX_K}")
            if scores.scores.shape != (model.n_layers, model.n_heads):
                raise AttnlabError(
                    f"{scores.name} has a {scores.scores.shape} grid "
                    f"but {model.name} has {model.n_layers} x {model.n_heads} heads"
                )
            result = scores
        else:
            raise AttnlabError(f"unknown head source {str(source)[:40]!r}")
        table = causal_test(result, k, evaluator(model, info, metric, inputs), n_seeds=n_seeds, seed=seed)
    table.attrs["metric"] = METRICS[metric]
    table.attrs["model"] = info["model"]["name"]
    return table
