"""Causal test of a head detector: ablate its top-k heads vs k random heads (several seeds).

Protocol (``docs/methods/ablation_scoring.md`` §5, causal test): T_k = the top-k heads of a ``HeadScores``;
controls are ``n_seeds`` random sets of k heads drawn uniformly from the model's real head grid *excluding T_k*
(optionally layer-matched: same count per layer as T_k), reproducible from the seed. Every set is ablated with the
same mode on the same evaluation items; the table reports the baseline, the top-k value, the random sets' mean with a
bootstrap confidence interval, and the empirical p-value ``(1 + #{random drop >= top-k drop}) / (1 + n_seeds)``.

``evaluate(heads) -> float`` is any metric of the model with those heads ablated; ``attnlab.ablation.evaluators``
builds the usual ones. ``run_causal_test`` is the ``attnlab ablate`` command; ``vhd_causal_tables`` the causal check of
the vision-aware-head detector (``scripts/vhd_causal.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from attnlab.ablation.evaluators import (
    check_metric_modality,
    image_question_evaluator,
    metric_evaluator,
    prompts_evaluator,
)
from attnlab.datasets import SHAPE_TEMPLATE
from attnlab.datasets.base import PromptSet
from attnlab.datasets.shapes import render_scene, shape_question_items
from attnlab.errors import AttnlabError
from attnlab.heads.io import write_json, write_text
from attnlab.heads.results import HeadScores
from attnlab.heads.runs import Run
from attnlab.probes.scan import scan
from attnlab.probes.vision_aware_heads import VisionAwareHeads
from attnlab.progress import bar
from attnlab.stats import bootstrap_ci


def random_head_sets(
    n_layers: int,
    n_heads: int,
    k: int,
    exclude: Sequence[tuple[int, int]],
    *,
    n_seeds: int,
    seed: int = 0,
    layer_matched: bool = False,
) -> list[list[tuple[int, int]]]:
    """``n_seeds`` random sets of k heads from the grid minus ``exclude`` (seeded; optionally layer-matched)."""
    excluded = set(map(tuple, exclude))
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
    if len(pool) < k:
        raise ValueError(f"only {len(pool)} heads outside the top set; cannot draw {k}")
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n_seeds):
        if layer_matched:
            chosen = []
            for layer, count in pd.Series([l for l, _ in excluded]).value_counts().items():
                cands = [p for p in pool if p[0] == layer]
                if len(cands) < count:
                    raise ValueError(
                        f"layer {layer} has only {len(cands)} heads outside the top set; cannot layer-match {count}"
                    )
                chosen += [cands[i] for i in rng.choice(len(cands), count, replace=False)]
        else:
            chosen = [pool[i] for i in rng.choice(len(pool), k, replace=False)]
        sets.append(sorted((int(l), int(h)) for l, h in chosen))
    return sets


def causal_test(
    scores: HeadScores,
    k: int,
    evaluate: Callable[[list[tuple[int, int]]], float],
    *,
    n_seeds: int = 5,
    seed: int = 0,
    layer_matched: bool = False,
    level: float = 0.95,
) -> pd.DataFrame:
    """Ablate the top-k heads of ``scores`` vs ``n_seeds`` random k-sets; one row per condition.

    Columns: condition (baseline / top_k / random), k, n_sets, metric (mean over sets), ci_low, ci_high,
    drop (baseline - metric), p_value (top_k row), heads (the sets, as text).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = scores.top_heads(k)
    if len(top) < k:
        raise ValueError(f"{scores.name} has only {len(top)} scored heads; cannot take the top {k}")
    randoms = random_head_sets(
        scores.n_layers, scores.n_heads, k, top, n_seeds=n_seeds, seed=seed, layer_matched=layer_matched
    )
    with bar(total=2 + len(randoms), desc=f"ablate top-{k} vs {len(randoms)} random sets", unit="set") as pbar:
        base = float(evaluate([]))
        pbar.update()
        top_value = float(evaluate(top))
        pbar.update()
        rand_values = []
        for s in randoms:
            rand_values.append(float(evaluate(s)))
            pbar.update()
    lo, hi = bootstrap_ci(rand_values, level=level, seed=seed)
    top_drop = base - top_value
    p = (1 + sum(base - v >= top_drop for v in rand_values)) / (1 + n_seeds)
    fmt = lambda hs: " ".join(f"L{l}H{h}" for l, h in hs)
    rows = [
        {
            "condition": "baseline",
            "k": 0,
            "n_sets": 1,
            "metric": base,
            "ci_low": base,
            "ci_high": base,
            "drop": 0.0,
            "p_value": np.nan,
            "heads": "",
        },
        {
            "condition": "top_k",
            "k": k,
            "n_sets": 1,
            "metric": top_value,
            "ci_low": top_value,
            "ci_high": top_value,
            "drop": top_drop,
            "p_value": p,
            "heads": fmt(top),
        },
        {
            "condition": "random",
            "k": k,
            "n_sets": n_seeds,
            "metric": float(np.mean(rand_values)),
            "ci_low": lo,
            "ci_high": hi,
            "drop": base - float(np.mean(rand_values)),
            "p_value": np.nan,
            "heads": " | ".join(fmt(s) for s in randoms),
        },
    ]
    table = pd.DataFrame(rows)
    table.attrs["random_values"] = rand_values
    table.attrs["source"] = scores.name
    return table


def parse_heads_spec(spec: str) -> tuple[str, str]:
    """``RUN_DIR:result_name`` -> (run directory, result name); the last colon splits."""
    run_dir, sep, name = spec.rpartition(":")
    if not sep or not run_dir or not name:
        raise AttnlabError(f"--heads must be RUN_DIR:result_name, got {spec!r}")
    return run_dir, name


def run_causal_test(
    model,
    heads_spec: str,
    *,
    k: int,
    metric: str,
    out: str,
    mode: str = "zero",
    n_seeds: int = 5,
    seed: int = 0,
    n_trials: int = 2,
    prompts: Sequence[tuple[str, str | None]] | None = None,
    truncate: bool = False,
) -> pd.DataFrame:
    """The ``attnlab ablate`` command: causal test of a saved HeadScores on a named metric (``metric_evaluator``),
    or on the user's own ``prompts`` (``(prompt, answer or None)`` pairs, metric ``logprob``:
    ``prompts_evaluator``; ``truncate`` cuts prompts longer than the context).

    Text models: NIAH accuracy or answer log-prob; vision-language models: image-question accuracy or answer
    log-prob on shape scenes. The table is written atomically to ``OUT/causal_test_<result>_k<k>_<metric>.csv``
    and ``.json``.
    """
    check_metric_modality(model, metric)
    run_dir, name = parse_heads_spec(heads_spec)
    try:
        result = Run.open(run_dir)[name]
    except KeyError as e:  # a missing result: a user error, with the names the run has
        raise AttnlabError(str(e.args[0]) if e.args else f"no result {name!r} in {run_dir}") from None
    if not isinstance(result, HeadScores):
        raise AttnlabError(f"{name} in {run_dir} is not a head-score result")
    if result.scores.shape != (model.n_layers, model.n_heads):
        raise AttnlabError(
            f"{name} has a {result.scores.shape} grid but {model.name} has {model.n_layers} x {model.n_heads} heads"
        )
    if prompts is not None:
        if metric != "logprob":
            raise AttnlabError(
                f"on your own prompts the metric is their answer log-prob (--metric logprob), not {metric}"
            )
        evaluate = prompts_evaluator(model, prompts, truncate=truncate, mode=mode)
    else:
        evaluate = metric_evaluator(model, metric, seed=seed, n_trials=n_trials, mode=mode)
    table = causal_test(result, k, evaluate, n_seeds=n_seeds, seed=seed)
    d = Path(out)
    stem = f"causal_test_{name}_k{k}_{metric}"
    write_text(d / f"{stem}.csv", table.to_csv(index=False), mode=0o644)
    write_json(
        d / f"{stem}.json",
        {
            "source": f"{run_dir}:{name}",
            "model": model.name,
            "k": k,
            "metric": metric,
            "prompts": None if prompts is None else len(prompts),
            "mode": mode,
            "n_seeds": n_seeds,
            "seed": seed,
            "random_values": table.attrs["random_values"],
            "rows": table.to_dict(orient="records"),
        },
    )
    return table


def vhd_causal_tables(
    model,
    *,
    k: int = 4,
    mode: str = "zero",
    n_seeds: int = 8,
    n_detect: int = 32,
    n_eval: int = 96,
    detect_seed: int = 101,
    eval_seed: int = 202,
    layer_matched: bool = False,
    variants: dict | None = None,
) -> dict:
    """Causal-test tables (accuracy and log-prob) for each VHD variant: ``{variant: {metric: DataFrame}}``.

    Vision-aware heads (``VisionAwareHeads``) are detected on ``n_detect`` shape questions (``detect_seed``) and
    tested on ``n_eval`` others (``eval_seed``) with ``image_question_evaluator``. ``variants`` maps a label to
    ``VisionAwareHeads`` keyword arguments (default: the spec, no outlier filter, layer-normalised, all text
    positions).
    """
    variants = variants or {
        "spec": {},
        "unfiltered": {"outlier_filter": False},
        "layer_mean": {"normalize": "layer_mean"},
        "text_positions": {"positions": "text"},
    }
    det = shape_question_items(n_detect, detect_seed)
    ps = PromptSet(
        name="vhd-detect",
        texts=[SHAPE_TEMPLATE.format(question=q.text) for _, q in det],
        images=[render_scene(s) for s, _ in det],
    )
    evaluate = image_question_evaluator(model, shape_question_items(n_eval, eval_seed), mode=mode, reference_items=det)
    out = {}
    for label, kw in variants.items():
        scores = scan(model, VisionAwareHeads(**kw), ps, progress=False)["vhd"]
        out[label] = {
            m: causal_test(
                scores, k, lambda hs, m=m: evaluate(hs)[m], n_seeds=n_seeds, seed=0, layer_matched=layer_matched
            )
            for m in ("accuracy", "logprob")
        }
    return out
