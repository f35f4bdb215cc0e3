"""organism-dit at run time: load it, sample digits (optionally with guidance), score them, evaluate it.

The model is a small class-conditional diffusion transformer on scikit-learn's handwritten digits, trained by
``attnlab.models.training.dit`` (``python -m attnlab.models.train dit``; its docstring describes the recipe).

* Model: diffusers `DiTTransformer2DModel` (adaLN-Zero blocks, patch 2, one input channel, 16x16 images,
  so 64 image tokens; no text tokens). ``num_embeds_ada_norm = 10`` digit classes; diffusers' label
  embedding then has an 11th row, index `NULL_CLASS` = 10, which is the "no class" label used for
  classifier-free guidance (CFG), exactly as the DiT pipeline uses label 1000 for ImageNet.
* Sampling uses `DDIMScheduler` (eta = 0, deterministic, ``use_clipped_model_output=True``) built from the saved
  DDPM config; ``"dpm"`` selects `DPMSolverMultistepScheduler` (DPM-Solver++, x0 thresholding) instead. Guided
  noise: ``eps = eps_null + s * (eps_class - eps_null)``; ``s = 1`` is the plain conditional model ("no
  guidance"), ``s = 0`` the unconditional one. ``sample(..., noise_fn=...)`` takes another guidance (SoftPAG).
* Scorer (`DigitScorer`): multinomial logistic regression on 8x8 features, refit at load time from the
  bundled digits (train split, originals plus their 16x16 -> 8x8 round trip), deterministic, no pickle.
  Generated images are area-averaged to 8x8 before scoring. Style scores (`style_scores`): ``ink`` (mean
  intensity), ``thickness`` (fraction of pixels >= 0.5) and ``slant`` (ink-weighted shear, > 0 leans right).

Evaluation of a saved directory::

    python -c "from attnlab.models.dit import evaluate; print(evaluate('DIR', 'classify'))"

Only torch, numpy, scikit-learn, safetensors, pillow and diffusers are imported (diffusers lazily: it is an
optional dependency), so the module runs on the GPU machine with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attnlab.datasets import digits as digits_data
from attnlab.heads.io import atomic_write
from attnlab.progress import bar

NUM_CLASSES = digits_data.NUM_CLASSES
NULL_CLASS = NUM_CLASSES
"""Label index of the unconditional ("no class") embedding used for classifier-free guidance."""
DEFAULT_GUIDANCE = 3.0
DEFAULT_STEPS = 25
EVAL_TASKS: tuple[str, ...] = ("classify", "style")
EVAL_N: dict[str, str] = {  # what evaluate's n counts (the CLI's eval --n help is made from this)
    "classify": "generated digits per class (default 20)",
    "style": "generated digits per class (default 20)",
}
STYLE_NAMES: tuple[str, ...] = ("ink", "thickness", "slant")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def make_sampling_scheduler(config: dict, kind: str = "ddim"):
    """A fresh sampling scheduler from a saved scheduler config: ``"ddim"`` (eta 0) or ``"dpm"`` (DPM-Solver++)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # optional (the dit extra): loaded on use

    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "dpm":
        # x0 thresholding at 1.0 plays the role of DDIM's clip_sample: the first step from pure noise
        # divides by a tiny alpha and would otherwise blow up.
        return DPMSolverMultistepScheduler.from_config(
            config, thresholding=True, sample_max_value=1.0, algorithm_type="dpmsolver++"
        )
    raise ValueError(f"scheduler kind must be 'ddim' or 'dpm', got {kind!r}")


@dataclass
class DiTOrganism:
    """A loaded organism: the transformer (eval mode) and its saved scheduler config."""

    transformer: Any
    scheduler_config: dict

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DiTOrganism:
    """Load ``model_dir/transformer`` and ``model_dir/scheduler`` with diffusers' `from_pretrained`."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel  # optional (the dit extra): loaded on use

    model = DiTTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    sched = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
    model.to(device).eval()
    return DiTOrganism(model, dict(sched.config))


def as_organism(model_dir_or_objects: Any, device: str | torch.device) -> DiTOrganism:
    """Accept a directory, a `DiTOrganism`, or a ``(transformer, scheduler_or_config)`` pair."""
    if isinstance(model_dir_or_objects, (str, os.PathLike)):
        return load(model_dir_or_objects, device)
    if isinstance(model_dir_or_objects, DiTOrganism):
        return model_dir_or_objects
    if isinstance(model_dir_or_objects, (tuple, list)) and len(model_dir_or_objects) == 2:
        model, sched = model_dir_or_objects
        config = dict(sched) if isinstance(sched, dict) else dict(sched.config)
        return DiTOrganism(model, config)
    raise TypeError(
        "expected a model directory, a DiTOrganism or a (transformer, scheduler) pair, "
        f"got {type(model_dir_or_objects).__name__}"
    )


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


def guided_noise(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction ``eps_null + s * (eps_class - eps_null)``.

    ``s == 1`` runs only the conditional pass, ``s == 0`` only the unconditional one; otherwise both run in
    one batch of 2N.
    """
    n = x.shape[0]
    tt = t.expand(n) if t.ndim else t.repeat(n)
    null = torch.full_like(labels, NULL_CLASS)
    if guidance_scale == 1.0:
        return model(x, timestep=tt, class_labels=labels).sample
    if guidance_scale == 0.0:
        return model(x, timestep=tt, class_labels=null).sample
    out = model(torch.cat([x, x]), timestep=torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
    eps_cond, eps_null = out[:n], out[n:]
    return eps_null + guidance_scale * (eps_cond - eps_null)


@torch.no_grad()
def sample(
    model_dir_or_objects: Any,
    class_labels: Sequence[int] | torch.Tensor,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    scheduler: str = "ddim",
    batch_size: int = 1000,
    noise_fn: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate one digit per label; returns a float32 CPU tensor (N, 1, S, S) with values in [0, 1].

    Deterministic for a given seed and device: the initial noise comes from a CPU generator seeded with
    ``seed`` (so it is identical on every device), and DDIM with eta = 0 adds no further noise. Labels in
    0-9 select a class; `NULL_CLASS` (10) samples unconditionally.

    ``noise_fn(transformer, x_t, t, labels) -> eps`` replaces the classifier-free-guidance prediction
    (`guided_noise` with ``guidance_scale``) when given, e.g. to add perturbed-attention guidance; the
    scheduler loop, seeding and output format stay the same.
    """
    org = as_organism(model_dir_or_objects, device)
    model = org.transformer
    dev = org.device
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
        raise ValueError(f"class labels must lie in 0..{NULL_CLASS}, got {labels.tolist()}")
    cfg = model.config
    shape = (labels.numel(), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
    was_training = model.training
    model.eval()
    # DDIM clips its x0 prediction to [-1, 1] (clip_sample); recomputing eps from the clipped x0 keeps the
    # update consistent. Without it, guided samples drift into speckle noise: on the CPU-preset model the
    # classify rate at s = 3 fell from 1.00 to 0.69 (25 steps) and 0.16 (50 steps).
    step_kwargs = {"use_clipped_model_output": True} if scheduler == "ddim" else {}
    outs = []
    for start in bar(range(0, labels.numel(), batch_size), desc="sample", unit="batch"):
        sched = make_sampling_scheduler(org.scheduler_config, scheduler)
        sched.set_timesteps(num_steps)  # timesteps stay on the CPU, as in diffusers' DiTPipeline
        x = noise[start : start + batch_size].to(dev)
        y = labels[start : start + batch_size].to(dev)
        for t in sched.timesteps:
            if noise_fn is None:
                eps = guided_noise(model, x, t.to(dev), y, guidance_scale)
            else:
                eps = noise_fn(model, x, t.to(dev), y)
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
        outs.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(shape)


def save_grid(
    images: torch.Tensor | np.ndarray, path: str | os.PathLike, *, ncol: int = 10, scale: int = 4, pad: int = 2
) -> None:
    """Write (N, 1, S, S) images in [0, 1] as a PNG grid (white digits on black, ``ncol`` per row)."""
    arr = _as_numpy_batch(images)
    n, s = arr.shape[0], arr.shape[1]
    nrow = max(1, math.ceil(n / ncol))
    cell = s * scale + pad
    canvas = np.full((nrow * cell + pad, ncol * cell + pad), 64, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = np.kron(arr[i], np.ones((scale, scale)))
        canvas[pad + r * cell : pad + r * cell + s * scale, pad + c * cell : pad + c * cell + s * scale] = (
            (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)
        )
    atomic_write(Path(path), lambda p: Image.fromarray(canvas, mode="L").save(p, format="PNG"), mode=0o644)


# --------------------------------------------------------------------------------------------------------
# Scorer: classifier + style scores
# --------------------------------------------------------------------------------------------------------


def _as_numpy_batch(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, S, S) float64 numpy view of (N, 1, S, S) or (N, S, S) images."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {arr.shape}")
        arr = arr[:, 0]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected images of shape (N, 1, S, S) or (N, S, S), got {arr.shape}")
    return arr.astype(np.float64)


class DigitScorer:
    """Probability that an image in [0, 1] shows a given digit; a logistic regression on 8x8 pixels.

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 strength of `sklearn.linear_model.LogisticRegression`.
    roundtrip_size : int, default=16
        The train split is augmented with its ``8 -> roundtrip_size -> 8`` round trip (bilinear up, area
        down), the exact distortion a generated 16x16 digit goes through before scoring.

    Attributes
    ----------
    classifier_ : LogisticRegression
        Fitted on the fixed train split (refit deterministically; never pickled).
    """

    def __init__(self, *, C: float = 1.0, roundtrip_size: int = 16):
        self.C = C
        self.roundtrip_size = roundtrip_size

    def fit(self) -> DigitScorer:
        from sklearn.linear_model import LogisticRegression  # scikit-learn loads with the scorer (start-up)

        x, y = digits_data.load_digit_features("train")
        side = digits_data.NATIVE_SIZE
        rt = digits_data.downsample(digits_data.upsample(x.reshape(-1, side, side), self.roundtrip_size))
        feats = np.concatenate([x, rt.reshape(len(rt), -1)])
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        with threadpool_limits(1):  # a 64-feature fit gains nothing from threads and suffers on busy hosts
            self.classifier_ = LogisticRegression(C=self.C, max_iter=5000).fit(feats, np.concatenate([y, y]))
        return self

    @staticmethod
    def features(images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, 64) features: images in [0, 1] area-averaged to 8x8."""
        arr = _as_numpy_batch(images)
        small = digits_data.downsample(arr.astype(np.float32), digits_data.NATIVE_SIZE)
        return small.reshape(len(small), -1)

    def predict_proba(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, 10) class probabilities."""
        if not hasattr(self, "classifier_"):
            raise RuntimeError("DigitScorer is not fitted; call fit() first")
        return self.classifier_.predict_proba(self.features(images))

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def prob_of(self, images: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray) -> np.ndarray:
        """(N,) probability of the intended class of each image."""
        labels = np.asarray(labels, dtype=np.int64)
        return self.predict_proba(images)[np.arange(len(labels)), labels]


@functools.lru_cache(maxsize=1)
def get_scorer() -> DigitScorer:
    """The shared, fitted default scorer (fit once per process, < 1 s)."""
    return DigitScorer().fit()


def style_scores(images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-image style scores of images in [0, 1], computed at their own resolution.

    * ``ink``: mean intensity (ink mass per pixel);
    * ``thickness``: fraction of pixels with intensity >= 0.5 (bolder strokes -> larger);
    * ``slant``: ink-weighted ``-cov(col, row) / var(row)``; > 0 when the digit leans right (like "/").
    """
    arr = _as_numpy_batch(images)
    s = arr.shape[1]
    rows, cols = np.meshgrid(np.arange(s, dtype=np.float64), np.arange(s, dtype=np.float64), indexing="ij")
    w = np.clip(arr, 0.0, 1.0)
    mass = w.sum(axis=(1, 2)) + 1e-8
    mr = (w * rows).sum(axis=(1, 2)) / mass
    mc = (w * cols).sum(axis=(1, 2)) / mass
    dr = rows[None] - mr[:, None, None]
    dc = cols[None] - mc[:, None, None]
    var_r = (w * dr * dr).sum(axis=(1, 2)) / mass
    cov = (w * dr * dc).sum(axis=(1, 2)) / mass
    return {
        "ink": w.mean(axis=(1, 2)),
        "thickness": (arr >= 0.5).mean(axis=(1, 2)).astype(np.float64),
        "slant": -cov / (var_r + 1e-8),
    }


def real_digits_01(split: str = "test", size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Real digits of a split in the model's output format: (N, 1, size, size) in [0, 1], labels."""
    x, y = digits_data.load_digit_images(split, size=size)
    return (x + 1.0) / 2.0, y


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def balanced_labels(n_per_class: int) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)


def eval_footprint(model_dir: str, task: str, n: int | None) -> int:
    """Estimated peak bytes ``evaluate(model_dir, task, n=n)`` holds, for refusing a ``--n`` that cannot fit: every
    generated digit is kept (with its starting noise and the scorer's features, about 4 copies of the image) for
    ``n`` digits per class."""
    cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    per_image = cfg.get("in_channels", 1) * cfg.get("sample_size", 16) ** 2 * 4 * 4
    settings = 2 if task == "classify" else 1  # guided and unguided
    return NUM_CLASSES * (20 if n is None else n) * per_image * settings


def evaluate(
    model_dir: str | os.PathLike | DiTOrganism,
    task: str,
    *,
    device: str = "cpu",
    n: int | None = None,
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_steps: int = DEFAULT_STEPS,
    include_unguided: bool = True,
) -> dict[str, Any]:
    """Measure a trained organism; ``n`` is the number of generated digits per class (default 20).

    Tasks
    -----
    ``classify``
        Fraction of generated digits the scorer classifies as the intended class, with guidance
        (``acc_guided`` at ``guidance_scale``) and without (``acc_unguided``, s = 1), plus the mean
        probability of the intended class and per-class accuracies.
    ``style``
        Mean / std of each style score over guided samples, next to the same statistics of the real
        test digits (``real_*``) for reference.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    n = 20 if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    org = as_organism(model_dir, device)
    labels = balanced_labels(n)
    scorer = get_scorer()
    out: dict[str, Any] = {
        "task": task,
        "n_per_class": n,
        "n_total": int(labels.numel()),
        "guidance_scale": guidance_scale,
        "num_steps": num_steps,
        "seed": seed,
    }
    if task == "classify":
        settings = [("guided", guidance_scale)] + ([("unguided", 1.0)] if include_unguided else [])
        for name, scale in settings:
            imgs = sample(org, labels, scale, num_steps, seed, device)
            pred = scorer.predict(imgs)
            correct = pred == labels.numpy()
            out[f"acc_{name}"] = float(correct.mean())
            out[f"p_intended_{name}"] = float(scorer.prob_of(imgs, labels.numpy()).mean())
            per_class = [float(correct[labels.numpy() == c].mean()) for c in range(NUM_CLASSES)]
            out[f"acc_{name}_per_class"] = per_class
            out[f"acc_{name}_min_class"] = float(min(per_class))
        return out
    imgs = sample(org, labels, guidance_scale, num_steps, seed, device)
    gen = style_scores(imgs)
    real_x, _ = real_digits_01("test", size=org.transformer.config.sample_size)
    real = style_scores(real_x)
    for name in STYLE_NAMES:
        out[f"{name}_mean"] = float(gen[name].mean())
        out[f"{name}_std"] = float(gen[name].std())
        out[f"real_{name}_mean"] = float(real[name].mean())
        out[f"real_{name}_std"] = float(real[name].std())
    return out
