"""Evaluators for causal tests: ``evaluate(heads) -> metric`` with ``heads`` ablated (``HeadAblation``).

``ablation_evaluator`` is the one code path for text and vision-language models (each prompt's image travels with
it through ``ImagePrompts``); ``niah_evaluator`` (NIAH accuracy), ``image_question_evaluator`` (shape-scene image
questions) and ``metric_evaluator`` (the named metrics of ``attnlab ablate``) build the usual ones on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnlab.ablation.head_ablation import HeadAblation, as_batch
from attnlab.ablation.metrics import AnswerTokens, as_metric
from attnlab.datasets import SHAPE_TEMPLATE
from attnlab.datasets.niah import build_niah_trials
from attnlab.datasets.shapes import render_scene, shape_question_items
from attnlab.errors import AttnlabError
from attnlab.interventions.base import validate_heads
from attnlab.models.loading import Batch


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
    greedy decoding starts with the code (``attnlab.models.lm.eval_niah`` also requires no further
    digit; the two agree whenever the model stops after the code).
    """
    trials = build_niah_trials(model.tokenizer, lengths, depths, trials_per_cell=trials_per_cell, seed=seed)
    metric = AnswerTokens([" " + t.answer for t in trials], reduce="exact_match")
    return ablation_evaluator(model, [t.prompt for t in trials], metric, mode=mode, batch_size=batch_size)


def image_question_evaluator(
    model, items: Sequence, *, mode: str = "zero", reference_items: Sequence | None = None, batch_size: int = 48
):
    """``evaluate(heads) -> {"accuracy": ..., "logprob": ...}``: teacher-forced answer metrics with ``heads`` ablated.

    The shared ablation path (``ablation_evaluator``): each question ``USER: <image>\\n{q} ASSISTANT:`` with its
    scene's image, the answer appended as ``AnswerTokens``; exact match and log-prob come from one forward. Mean
    mode fits one all-layer mean per head on ``reference_items`` (prompts without answers, with their images) and
    reuses it. Results are memoised by head set.
    """
    if mode in ("mean", "resample") and not reference_items:
        raise ValueError(f"mode {mode!r} needs reference_items")
    texts = [SHAPE_TEMPLATE.format(question=q.text) for _, q in items]
    answers = [" " + q.answer for _, q in items]
    metrics = {"accuracy": AnswerTokens(answers, reduce="exact_match"), "logprob": AnswerTokens(answers)}
    ref = ref_images = None
    if mode in ("mean", "resample"):
        ref = [SHAPE_TEMPLATE.format(question=q.text) for _, q in reference_items]
        ref_images = [render_scene(s) for s, _ in reference_items]
    return ablation_evaluator(
        model,
        texts,
        metrics,
        images=[render_scene(s) for s, _ in items],
        mode=mode,
        reference=ref,
        reference_images=ref_images,
        batch_size=batch_size,
    )


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
    return ablation_evaluator(model, pairs, AnswerTokens(), mode=mode)


def metric_evaluator(model, metric: str, *, seed: int, n_trials: int = 2, mode: str = "zero"):
    """``evaluate(heads)`` for a named ``attnlab ablate`` metric, on items held out from detection by ``seed + 1``.

    ``niah`` / ``logprob``: NIAH accuracy / answer log-prob on NIAH trials (2 lengths x 3 depths x ``n_trials``).
    ``shapes`` / ``shapes-logprob``: teacher-forced answer exact match / log-prob of ``24 * n_trials`` shape-scene
    questions (existence, attribute, count, position; ``datasets.shapes.shape_question_items``), each asked with its
    own image.
    """
    check_metric_modality(model, metric)
    if metric == "niah":
        return niah_evaluator(model, trials_per_cell=n_trials, seed=seed + 1, mode=mode)
    if metric == "logprob":
        trials = build_niah_trials(model.tokenizer, (160, 320), (10, 50, 90), trials_per_cell=n_trials, seed=seed + 1)
        return ablation_evaluator(
            model, [t.prompt for t in trials], AnswerTokens([" " + t.answer for t in trials]), mode=mode
        )
    items = shape_question_items(24 * n_trials, seed + 1)
    evaluate = image_question_evaluator(model, items, mode=mode, reference_items=items)
    key = "accuracy" if metric == "shapes" else "logprob"
    return lambda heads: evaluate(heads)[key]
