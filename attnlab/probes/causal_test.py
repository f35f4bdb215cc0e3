"""Causal test of a head detector: ablate its top-k heads vs k random heads (several seeds).

Protocol (``shared/methods/ablation_scoring.md`` §4): T_k = the top-k heads of a ``HeadScores``; controls are
``n_seeds`` random sets of k heads drawn uniformly from the model's real head grid *excluding T_k* (optionally
layer-matched: same count per layer as T_k), reproducible from the seed. Every set is ablated with the same mode
on the same evaluation items; the table reports the baseline, the top-k value, the random sets' mean with a
bootstrap confidence interval, and the empirical p-value ``(1 + #{random drop >= top-k drop}) / (1 + n_seeds)``.

``evaluate(heads) -> float`` is any metric of the model with those heads ablated; ``ablation_evaluator`` and
``niah_evaluator`` build the usual ones.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from attnlab.heads.results import HeadScores
from attnlab.interventions.ablation import HeadAblation, as_batch
from attnlab.probes.ablation_metrics import AnswerTokens, as_metric


def random_head_sets(n_layers: int, n_heads: int, k: int, exclude: Sequence[tuple[int, int]], *, n_seeds: int, seed: int = 0, layer_matched: bool = False) -> list[list[tuple[int, int]]]:
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
                    raise ValueError(f"layer {layer} has only {len(cands)} heads outside the top set; cannot layer-match {count}")
                chosen += [cands[i] for i in rng.choice(len(cands), count, replace=False)]
        else:
            chosen = [pool[i] for i in rng.choice(len(pool), k, replace=False)]
        sets.append(sorted((int(l), int(h)) for l, h in chosen))
    return sets


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (a single value gives a zero-width interval)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def causal_test(scores: HeadScores, k: int, evaluate: Callable[[list[tuple[int, int]]], float], *, n_seeds: int = 5, seed: int = 0, layer_matched: bool = False, level: float = 0.95) -> pd.DataFrame:
    """Ablate the top-k heads of ``scores`` vs ``n_seeds`` random k-sets; one row per condition.

    Columns: condition (baseline / top_k / random), k, n_sets, metric (mean over sets), ci_low, ci_high,
    drop (baseline - metric), p_value (top_k row), heads (the sets, as text).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = scores.top_heads(k)
    if len(top) < k:
        raise ValueError(f"{scores.name} has only {len(top)} scored heads; cannot take the top {k}")
    randoms = random_head_sets(scores.n_layers, scores.n_heads, k, top, n_seeds=n_seeds, seed=seed, layer_matched=layer_matched)
    base = float(evaluate([]))
    top_value = float(evaluate(top))
    rand_values = [float(evaluate(s)) for s in randoms]
    lo, hi = bootstrap_ci(rand_values, level=level, seed=seed)
    top_drop = base - top_value
    p = (1 + sum(base - v >= top_drop for v in rand_values)) / (1 + n_seeds)
    fmt = lambda hs: " ".join(f"L{l}H{h}" for l, h in hs)
    rows = [
        {"condition": "baseline", "k": 0, "n_sets": 1, "metric": base, "ci_low": base, "ci_high": base, "drop": 0.0, "p_value": np.nan, "heads": ""},
        {"condition": "top_k", "k": k, "n_sets": 1, "metric": top_value, "ci_low": top_value, "ci_high": top_value, "drop": top_drop, "p_value": p, "heads": fmt(top)},
        {"condition": "random", "k": k, "n_sets": n_seeds, "metric": float(np.mean(rand_values)), "ci_low": lo, "ci_high": hi,
         "drop": base - float(np.mean(rand_values)), "p_value": np.nan, "heads": " | ".join(fmt(s) for s in randoms)},
    ]
    table = pd.DataFrame(rows)
    table.attrs["random_values"] = rand_values
    table.attrs["source"] = scores.name
    return table


def ablation_evaluator(model, prompts: Sequence[str], metric, *, mode: str = "zero", reference=None, batch_size: int = 16) -> Callable[[list[tuple[int, int]]], float]:
    """``evaluate(heads)``: mean ``metric`` over ``prompts`` with ``heads`` ablated (``HeadAblation``)."""
    metric = as_metric(metric)
    batch = metric.encode(model, list(prompts))
    ref = None if mode in ("zero", "uniform") else as_batch(model, reference) if reference is not None else batch

    @torch.no_grad()
    def evaluate(heads):
        abl = HeadAblation(heads, mode=mode).fit(model, ref)
        values = []
        for s in range(0, batch.size, batch_size):
            sub = _rows(batch, s, s + batch_size)
            with abl.apply(model, sub):
                values.append(metric(model.forward(sub), sub).float().cpu())
        return float(torch.cat(values).mean())

    return evaluate


def _rows(batch, start: int, stop: int):
    from attnlab.models.loading import Batch

    return Batch(batch.input_ids[start:stop], batch.attention_mask[start:stop], batch.prompt_indices[start:stop])


def niah_evaluator(model, *, lengths: Sequence[int] = (160, 320), depths: Sequence[float] = (10, 50, 90), trials_per_cell: int = 2, seed: int = 1, mode: str = "zero", batch_size: int = 8) -> Callable[[list[tuple[int, int]]], float]:
    """``evaluate(heads)``: NIAH accuracy (teacher-forced exact match of the code) with ``heads`` ablated.

    Exact match here = every code token is the argmax given the prompt and the earlier code tokens, i.e.
    greedy decoding starts with the code (``attnlab.models.training.lm.eval_niah`` also requires no further
    digit; the two agree whenever the model stops after the code).
    """
    from attnlab.datasets.niah import build_niah_trials

    trials = build_niah_trials(model.tokenizer, lengths, depths, trials_per_cell=trials_per_cell, seed=seed)
    metric = AnswerTokens([" " + t.answer for t in trials], reduce="exact_match")
    return ablation_evaluator(model, [t.prompt for t in trials], metric, mode=mode, batch_size=batch_size)


def parse_heads_spec(spec: str) -> tuple[str, str]:
    """``RUN_DIR:result_name`` -> (run directory, result name); the last colon splits."""
    from attnlab.errors import AttnlabError

    run_dir, sep, name = spec.rpartition(":")
    if not sep or not run_dir or not name:
        raise AttnlabError(f"--heads must be RUN_DIR:result_name, got {spec!r}")
    return run_dir, name


def run_causal_test(model, heads_spec: str, *, k: int, metric: str, out: str, mode: str = "zero", n_seeds: int = 5, seed: int = 0, n_trials: int = 2) -> pd.DataFrame:
    """The ``attnlab ablate`` command: causal test of a saved HeadScores on NIAH accuracy or answer log-prob.

    Both metrics run on NIAH trials (held out from detection by ``seed + 1``); the table is written atomically
    to ``OUT/causal_test_<result>_k<k>_<metric>.csv`` and ``.json``.
    """
    from attnlab.datasets.niah import build_niah_trials
    from attnlab.errors import AttnlabError
    from attnlab.heads.io import write_json
    from attnlab.heads.runs import Run

    run_dir, name = parse_heads_spec(heads_spec)
    result = Run.open(run_dir)[name]
    if not isinstance(result, HeadScores):
        raise AttnlabError(f"{name} in {run_dir} is not a head-score result")
    if result.scores.shape != (model.n_layers, model.n_heads):
        raise AttnlabError(f"{name} has a {result.scores.shape} grid but {model.name} has {model.n_layers} x {model.n_heads} heads")
    if metric == "niah":
        evaluate = niah_evaluator(model, trials_per_cell=n_trials, seed=seed + 1, mode=mode)
    elif metric == "logprob":
        trials = build_niah_trials(model.tokenizer, (160, 320), (10, 50, 90), trials_per_cell=n_trials, seed=seed + 1)
        evaluate = ablation_evaluator(model, [t.prompt for t in trials], AnswerTokens([" " + t.answer for t in trials]), mode=mode)
    else:
        raise AttnlabError(f"--metric must be niah or logprob, got {metric!r}")
    table = causal_test(result, k, evaluate, n_seeds=n_seeds, seed=seed)
    from pathlib import Path
    import os

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"causal_test_{name}_k{k}_{metric}"
    tmp = d / f".{stem}.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, d / f"{stem}.csv")
    write_json(d / f"{stem}.json", {"source": f"{run_dir}:{name}", "model": model.name, "k": k, "metric": metric, "mode": mode, "n_seeds": n_seeds, "seed": seed,
                                    "random_values": table.attrs["random_values"], "rows": table.to_dict(orient="records")})
    return table
