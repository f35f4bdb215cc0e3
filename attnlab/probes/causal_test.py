"""Causal test of a head detector: ablate its top-k heads vs k random heads (several seeds).

Protocol (``docs/methods/ablation_scoring.md`` §5, causal test): T_k = the top-k heads of a ``HeadScores``; controls are
``n_seeds`` random sets of k heads drawn uniformly from the model's real head grid *excluding T_k* (optionally
layer-matched: same count per layer as T_k), reproducible from the seed. Every set is ablated with the same mode
on the same evaluation items; the table reports the baseline, the top-k value, the random sets' mean with a
bootstrap confidence interval, and the empirical p-value ``(1 + #{random drop >= top-k drop}) / (1 + n_seeds)``.

``evaluate(heads) -> float`` is any metric of the model with those heads ablated; ``ablation_evaluator`` and
``niah_evaluator`` build the usual ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from attnlab.errors import AttnlabError
from attnlab.heads.results import HeadScores
from attnlab.interventions.ablation import HeadAblation, as_batch
from attnlab.interventions.base import validate_heads
from attnlab.probes.ablation_metrics import AnswerTokens, as_metric


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


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (a single value gives a zero-width interval)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


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
    from attnlab.progress import bar

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


def ablation_evaluator(
    model,
    prompts,
    metric,
    *,
    images=None,
    mode: str = "zero",
    reference=None,
    reference_images=None,
    batch_size: int = 16,
) -> Callable[[list[tuple[int, int]]], object]:
    """``evaluate(heads)``: mean ``metric`` over ``prompts`` with ``heads`` ablated (``HeadAblation``).

    One code path for text and vision-language models: ``images`` (one PIL image per prompt, or the images of a
    ``PromptSet`` passed as ``prompts``) go to the metric's ``encode`` through ``ImagePrompts``, and every
    sub-batch keeps its rows' ``pixel_values``, so image questions always run with their own images.
    ``metric`` is one metric (``evaluate`` returns a float) or a dict of metrics that encode the prompts to the
    same ids (``evaluate`` returns ``{name: float}`` from one forward per sub-batch, e.g. answer exact match and
    answer log-prob). Mean and resample modes fit every layer once on ``reference`` (default: the prompts;
    ``reference_images`` beside it for VLMs) and reuse that fit. Results are memoised by head set.
    """
    prompts, images = _split_images(prompts, images)
    view = ImagePrompts(model, images) if images is not None else model
    metrics = {k: as_metric(m) for k, m in metric.items()} if isinstance(metric, dict) else {"": as_metric(metric)}
    if not metrics:
        raise ValueError("no metric given")
    batches = [m.encode(view, list(prompts)) for m in metrics.values()]
    batch = batches[0]
    for other in batches[1:]:
        if not (other.input_ids.shape == batch.input_ids.shape and torch.equal(other.input_ids, batch.input_ids)):
            raise ValueError("metrics evaluated together must encode the prompts to the same token ids")
    ref = _reference_batch(model, mode, reference, reference_images, batch)
    fitted: dict[str, HeadAblation] = {}
    cache: dict[tuple, object] = {}

    @torch.no_grad()
    def evaluate(heads):
        key = tuple(sorted((int(l), int(h)) for l, h in heads))
        if key in cache:
            return cache[key]
        abl = _fitted_ablation(model, key, mode, ref, fitted)
        values: dict[str, list] = {name: [] for name in metrics}
        for s in range(0, batch.size, batch_size):
            sub = _rows(batch, s, s + batch_size)
            with abl.apply(model, sub):
                logits = model.forward(sub)
            for name, m in metrics.items():
                values[name].append(m(logits, sub).float().cpu())
        out = {name: float(torch.cat(v).mean()) for name, v in values.items()}
        cache[key] = out[""] if "" in out else out
        return cache[key]

    return evaluate


def _split_images(prompts, images):
    """(prompts, images) from a list of prompts (+ images) or a ``PromptSet`` carrying its images."""
    texts = getattr(prompts, "texts", None)
    if texts is not None and hasattr(prompts, "images"):  # a PromptSet
        if images is None:
            images = prompts.images
        prompts = texts
    prompts = list(prompts)
    if images is not None:
        images = list(images)
        if len(images) != len(prompts):
            raise AttnlabError(f"{len(prompts)} prompts but {len(images)} images")
    return prompts, images


def _reference_batch(model, mode: str, reference, reference_images, batch):
    """The batch mean / resample ablations are fitted on (None for zero and uniform)."""
    if mode in ("zero", "uniform"):
        return None
    if reference is None:
        return batch
    texts, images = _split_images(reference, reference_images)
    return model.encode(texts, images=images) if images is not None else as_batch(model, texts)


def _fitted_ablation(model, heads: tuple, mode: str, ref, fitted: dict) -> HeadAblation:
    """``HeadAblation(heads)`` fitted; mean / resample share one fit of every layer on ``ref`` (same values as
    fitting the ablated layers alone: each layer's statistics come from the same clean forward)."""
    if ref is None:
        return HeadAblation(heads, mode=mode).fit(model, None)
    if "all" not in fitted:
        fitted["all"] = HeadAblation((), mode=mode).fit(model, ref, layers=range(model.n_layers))
    full = fitted["all"]
    abl = HeadAblation(heads, mode=mode, seed=full.seed)
    abl.__dict__.update({k: v for k, v in full.__dict__.items() if k.endswith("_")})
    abl.heads_ = validate_heads(model, heads)
    return abl


class ImagePrompts:
    """A model seen through one image per prompt: what metrics call to encode prompts gets the images too.

    Metrics encode with ``model.token_ids(prompt, index=i)`` + ``model.batch_from_ids(ids, indices)`` or with
    ``model.encode(prompts)``. Through this view, ``token_ids`` returns prompt i's ids as the processor expands
    them with image i (the image placeholder becomes the image's patch tokens), and every Batch carries the
    ``pixel_values`` of its rows' prompts (``prompt_indices``). Anything else is the model's own attribute.
    """

    def __init__(self, model, images):
        if getattr(model, "processor", None) is None:
            raise AttnlabError(f"{model.name} is a text model; it takes no images")
        self.model = model
        self.images = list(images)
        self.pixel_values_ = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _pixels(self) -> torch.Tensor:
        if self.pixel_values_ is None:
            self.pixel_values_ = self.model.processor.image_processor(self.images, return_tensors="pt")["pixel_values"]
        return self.pixel_values_

    def _image(self, index: int):
        if not 0 <= index < len(self.images):
            raise AttnlabError(f"prompt {index} has no image ({len(self.images)} images)")
        return self.images[index]

    def token_ids(self, prompt: str, *, truncate: bool = False, index: int = 0) -> list[int]:
        b = self.model.encode([prompt], images=[self._image(index)], truncate=truncate, start_index=index)
        return b.input_ids[0, b.real_slice(0)].tolist()

    def batch_from_ids(self, ids, prompt_indices, **kw):
        b = self.model.batch_from_ids(ids, prompt_indices, **kw)
        for i in prompt_indices:
            self._image(int(i))
        b.pixel_values = self._pixels()[torch.as_tensor(list(prompt_indices), dtype=torch.long)]
        return b

    def encode(self, prompts, *, images=None, **kw):
        start = kw.get("start_index", 0)
        if images is None:
            images = [self._image(start + i) for i in range(len(prompts))]
        return self.model.encode(prompts, images=images, **kw)


def _rows(batch, start: int, stop: int):
    """Rows [start, stop) of a Batch, with their image rows (``pixel_values``: one image per row) and image mask."""
    from attnlab.models.loading import Batch

    sl = slice(start, stop)
    pix = batch.pixel_values
    if pix is not None:
        if pix.shape[0] != batch.size:
            raise AttnlabError(
                f"the batch has {batch.size} rows but {pix.shape[0]} images; sub-batching needs one image per row"
            )
        pix = pix[sl]
    image_mask = None if batch.image_mask is None else batch.image_mask[sl]
    return Batch(batch.input_ids[sl], batch.attention_mask[sl], batch.prompt_indices[sl], pix, image_mask)


def niah_evaluator(
    model,
    *,
    lengths: Sequence[int] = (160, 320),
    depths: Sequence[float] = (10, 50, 90),
    trials_per_cell: int = 2,
    seed: int = 1,
    mode: str = "zero",
    batch_size: int = 8,
) -> Callable[[list[tuple[int, int]]], float]:
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
    run_dir, sep, name = spec.rpartition(":")
    if not sep or not run_dir or not name:
        raise AttnlabError(f"--heads must be RUN_DIR:result_name, got {spec!r}")
    return run_dir, name


TEXT_METRICS = ("niah", "logprob")
IMAGE_METRICS = ("shapes", "shapes-logprob")
METRICS = TEXT_METRICS + IMAGE_METRICS


def check_metric_modality(model, metric: str) -> None:
    """One-line AttnlabError when a text metric meets a vision-language model or an image metric a text model."""
    if metric not in METRICS:
        raise AttnlabError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    is_vlm = getattr(model, "processor", None) is not None
    if metric in TEXT_METRICS and is_vlm:
        raise AttnlabError(
            f"metric {metric} scores text-only NIAH prompts but {model.name} is a vision-language model; "
            "use --metric shapes or shapes-logprob (image questions)"
        )
    if metric in IMAGE_METRICS and not is_vlm:
        raise AttnlabError(
            f"metric {metric} scores image questions but {model.name} is a text model; use --metric niah or logprob"
        )


def prompts_evaluator(
    model, items: Sequence[tuple[str, str | None]], *, truncate: bool = False, mode: str = "zero"
) -> Callable[[list[tuple[int, int]]], float]:
    """``evaluate(heads)`` on a user's own prompts: the mean summed log-prob of each prompt's answer (teacher
    forced, appended to the prompt with a leading space unless either side has one), or, for a prompt given
    without an answer, of its last token given the rest. ``truncate`` cuts prompts longer than the context
    (keeping room for the answer) instead of refusing them."""
    from attnlab.probes.ablation_metrics import TailLogProb

    if not items:
        raise AttnlabError("no prompts to ablate on")
    pairs = []
    for i, (prompt, answer) in enumerate(items):
        if answer:
            text = answer if (answer[:1].isspace() or prompt[-1:].isspace()) else " " + answer
            ans = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ans:
                raise AttnlabError(f"the answer of prompt {i} ({answer[:40]!r}) has no tokens")
            ids = model.token_ids(prompt, truncate=truncate, index=i)
            if len(ids) + len(ans) > model.n_ctx:
                if not truncate:
                    raise AttnlabError(
                        f"prompt {i} with its answer has {len(ids) + len(ans)} tokens, more than {model.name}'s "
                        f"context of {model.n_ctx}; shorten it or pass --truncate"
                    )
                ids = ids[: model.n_ctx - len(ans)]
            pairs.append((ids + ans, len(ids)))
        else:
            ids = model.token_ids(prompt, truncate=truncate, index=i)
            if len(ids) < 2:
                raise AttnlabError(f"prompt {i} is one token long: no last token to predict from the rest")
            pairs.append((ids, len(ids) - 1))
    return ablation_evaluator(model, pairs, TailLogProb(), mode=mode)


def metric_evaluator(model, metric: str, *, seed: int, n_trials: int = 2, mode: str = "zero"):
    """``evaluate(heads)`` for a named ``attnlab ablate`` metric, on items held out from detection by ``seed + 1``.

    ``niah`` / ``logprob``: NIAH accuracy / answer log-prob on NIAH trials (2 lengths x 3 depths x ``n_trials``).
    ``shapes`` / ``shapes-logprob``: teacher-forced answer exact match / log-prob of ``24 * n_trials`` shape-scene
    questions (existence, attribute, count, position; ``vhd_causal.shape_question_items``), each asked with its
    own image.
    """
    from attnlab.datasets.niah import build_niah_trials

    check_metric_modality(model, metric)
    if metric == "niah":
        return niah_evaluator(model, trials_per_cell=n_trials, seed=seed + 1, mode=mode)
    if metric == "logprob":
        trials = build_niah_trials(model.tokenizer, (160, 320), (10, 50, 90), trials_per_cell=n_trials, seed=seed + 1)
        return ablation_evaluator(
            model, [t.prompt for t in trials], AnswerTokens([" " + t.answer for t in trials]), mode=mode
        )
    from attnlab.probes.vhd_causal import image_question_evaluator, shape_question_items

    items = shape_question_items(24 * n_trials, seed + 1)
    evaluate = image_question_evaluator(model, items, mode=mode, reference_items=items)
    key = "accuracy" if metric == "shapes" else "logprob"
    return lambda heads: evaluate(heads)[key]


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
    from attnlab.heads.io import write_json
    from attnlab.heads.runs import Run

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
    import os
    from pathlib import Path

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"causal_test_{name}_k{k}_{metric}"
    tmp = d / f".{stem}.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, d / f"{stem}.csv")
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
