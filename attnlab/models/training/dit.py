"""organism-dit training: a small class-conditional diffusion transformer on scikit-learn's handwritten digits.

Exact commands (from the repository root)::

    # shipping run (one H100, ~7 minutes including the final evaluation)
    PYTHONPATH=. python -m attnlab.models.train dit --preset gpu --device cuda --seed 0 --out $OUT/dit
    # CPU fallback (~10 minutes of training on 2 cores), and the test smoke run (< 60 s)
    PYTHONPATH=. python -m attnlab.models.train dit --preset cpu --device cpu --seed 0 --out runs/dit-cpu
    PYTHONPATH=. python -m attnlab.models.train dit --preset smoke --device cpu --out /tmp/dit-smoke
    # evaluation of a trained directory (the organism's run time: attnlab.models.dit)
    python -c "from attnlab.models.dit import evaluate; print(evaluate('DIR', 'classify'))"

What it is
----------
* Model: diffusers `DiTTransformer2DModel` (adaLN-Zero blocks, patch 2, one input channel, 16x16 images,
  so 64 image tokens; no text tokens). ``num_embeds_ada_norm = 10`` digit classes; diffusers' label
  embedding then has an 11th row, index `NULL_CLASS` = 10, which is the "no class" label used for
  classifier-free guidance (CFG), exactly as the DiT pipeline uses label 1000 for ImageNet.
* Noise: `DDPMScheduler`, 1,000 steps, cosine (``squaredcos_cap_v2``) betas, epsilon prediction,
  ``timestep_spacing = "trailing"`` so that few-step samplers start from pure noise, ``clip_sample`` on.
  Sampling uses `DDIMScheduler` (eta = 0, deterministic, ``use_clipped_model_output=True``) built from the
  same config; ``"dpm"`` selects `DPMSolverMultistepScheduler` (DPM-Solver++, x0 thresholding) instead.
* CFG training: the label is replaced by `NULL_CLASS` with probability ``p_uncond`` (0.1), once per
  example. diffusers' own label dropout is switched off during training because it draws a separate
  coin per block (each block owns a label embedding), which would mix conditional and unconditional
  embeddings inside one forward pass. Guided noise: ``eps = eps_null + s * (eps_class - eps_null)``;
  ``s = 1`` is the plain conditional model ("no guidance"), ``s = 0`` the unconditional one.
* Loss: epsilon MSE with Min-SNR-5 weighting; class embeddings initialised with std 1 rather than DiT's
  0.02. Together they make class conditioning appear within a few hundred steps (see `TrainConfig`).
* EMA of the weights (what is saved), AdamW, warm-up then cosine decay. Progress for the schedule is
  ``max(step / steps, elapsed / max_minutes)``, so a run stopped by the wall-clock cap still ends with a
  decayed learning rate (such a run is then not bit-reproducible: its step count depends on speed).
* Scorer (`DigitScorer`): multinomial logistic regression on 8x8 features, refit at load time from the
  bundled digits (train split, originals plus their 16x16 -> 8x8 round trip), deterministic, no pickle.
  Generated images are area-averaged to 8x8 before scoring. Style scores (`style_scores`): ``ink`` (mean
  intensity), ``thickness`` (fraction of pixels >= 0.5) and ``slant`` (ink-weighted shear, > 0 leans right).

Saved layout (``--out DIR``)::

    DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}   # EMA weights
    DIR/scheduler/scheduler_config.json                                  # DDPMScheduler
    DIR/train_log.jsonl  DIR/metrics.json  DIR/MODEL_CARD.md  DIR/samples.png

Reload::

    from diffusers import DiTTransformer2DModel, DDIMScheduler
    model = DiTTransformer2DModel.from_pretrained(DIR, subfolder="transformer")
    sched = DDIMScheduler.from_pretrained(DIR, subfolder="scheduler")

Only torch, numpy, scikit-learn, safetensors, pillow and diffusers are imported (diffusers lazily), so the
module runs on the GPU machine with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from attnlab.datasets import digits as digits_data
from attnlab.heads.io import write_text
from attnlab.models.dit import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    NULL_CLASS,
    NUM_CLASSES,
    STYLE_NAMES,
    DiTOrganism,
    balanced_labels,
    evaluate,
    get_scorer,
    load,
    real_digits_01,
    sample,
    save_grid,
)

# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of one training run; recorded in metrics.json and the model card."""

    sample_size: int = 16  # image side; 8 = native digits, 16 = 2x bilinear upsampling
    patch_size: int = 2  # tokens = (sample_size / patch_size) ** 2
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32  # hidden width = num_heads * head_dim
    steps: int = 3000  # optimizer steps (the wall-clock cap may stop earlier)
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_frac: float = 0.05  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # probability of training on the NULL_CLASS label
    # DiT initialises class embeddings with std 0.02; with std 1 the class signal reaches the zero-initialised
    # adaLN layers at once. Measured (8x8 digits, 800 CPU steps, guided / unguided accuracy): 0.02 -> 0.42 / 0.32,
    # 1.0 -> 0.95 / 0.83, 1.0 + Min-SNR-5 -> 0.99 / 0.89 (Min-SNR alone: 0.64 / 0.58).
    label_init_std: float = 1.0
    min_snr_gamma: float = 5.0  # > 0: Min-SNR loss weight min(SNR, gamma) / SNR (Hang et al. 2023); 0 = plain MSE
    max_minutes: float = 10.0  # hard wall-clock cap for the training loop
    eval_every: int = 0  # steps between in-training classify evals; 0 = never
    eval_n: int = 5  # digits per class in in-training evals
    final_eval_n: int = 20  # digits per class in the final metrics
    log_every: int = 50


PRESETS: dict[str, dict[str, Any]] = {
    # a few steps of a tiny model: exercises every code path in < 60 s on one core
    "smoke": dict(
        num_layers=2,
        num_heads=2,
        head_dim=16,
        steps=20,
        batch_size=32,
        warmup_steps=5,
        ema_decay=0.9,
        max_minutes=1.0,
        eval_every=10,
        eval_n=1,
        final_eval_n=2,
        log_every=5,
    ),
    # CPU fallback: 10 minutes of training (~0.3 s/step on one busy core, faster on a free machine)
    "cpu": dict(
        num_layers=4,
        num_heads=4,
        head_dim=24,
        steps=4000,
        batch_size=64,
        lr=1e-3,
        ema_decay=0.998,
        max_minutes=10.0,
        eval_every=1000,
        eval_n=3,
        final_eval_n=20,
    ),
    # shipping run: same family, wider/deeper and much longer (batch 256, ~25k steps on an H100)
    "gpu": dict(
        num_layers=8,
        num_heads=8,
        head_dim=16,
        steps=25000,
        batch_size=256,
        lr=6e-4,
        warmup_steps=500,
        ema_decay=0.9995,
        max_minutes=6.0,
        eval_every=2500,
        eval_n=10,
        final_eval_n=100,
        log_every=250,
    ),
}


def build_config(preset: str, **overrides: Any) -> TrainConfig:
    """TrainConfig for a preset with explicit overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------------
# Model and scheduler construction (diffusers imported lazily: it is optional for the rest of attnlab)
# --------------------------------------------------------------------------------------------------------


def build_transformer(cfg: TrainConfig):
    """A freshly initialised `DiTTransformer2DModel` for 1-channel digits with DiT's adaLN-Zero init."""
    from diffusers import DiTTransformer2DModel  # optional (the dit extra): loaded on use

    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=cfg.num_layers,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )
    _dit_init(model, label_init_std=cfg.label_init_std)
    return model


def _dit_init(model: torch.nn.Module, *, label_init_std: float = 1.0) -> None:
    """Initialisation of the DiT paper (Peebles & Xie 2023): xavier linears, zeroed modulations and output.

    Zeroing every adaLN modulation makes each block the identity at step 0 (gates are zero), which is what
    makes DiT train stably; diffusers' constructor does not do this itself. One deliberate change: class
    embeddings start at ``label_init_std`` (default 1, DiT uses 0.02), see `TrainConfig.label_init_std`.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    conv = model.pos_embed.proj
    torch.nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    torch.nn.init.zeros_(conv.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=label_init_std)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def _set_label_dropout(model: torch.nn.Module, prob: float) -> None:
    """Set diffusers' built-in per-block label dropout (we drop labels ourselves, once per example)."""
    for module in model.modules():
        if module.__class__.__name__ == "LabelEmbedding":
            module.dropout_prob = prob


def build_train_scheduler():
    """The DDPM noise schedule the model is trained with (and saved as ``scheduler/``)."""
    from diffusers import DDPMScheduler  # optional (the dit extra): loaded on use

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="trailing",
    )


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Learning rate: (1) linear warm-up over ``warmup_steps``; (2) cosine from lr to lr * min_lr_frac."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _save_dir_atomically(path: Path, save) -> None:
    """``save(tmp_dir)`` then swap the directory into place (a crashed save leaves the old one intact)."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _dir_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def train(cfg: TrainConfig, out: Path, *, device: str, seed: int, log=print) -> dict[str, Any]:
    """Train, save the EMA model + scheduler into ``out``, and return a summary of the run."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    x_np, y_np = digits_data.load_digit_images("train", size=cfg.sample_size)
    data_x = torch.from_numpy(x_np).to(dev)
    data_y = torch.from_numpy(y_np).to(dev)
    n_data = len(data_y)

    model = build_transformer(cfg).to(dev)
    _set_label_dropout(model, 0.0)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ema_params = [p for p in ema.parameters()]
    n_params = sum(p.numel() for p in params)
    noise_sched = build_train_scheduler()
    alphas = noise_sched.alphas_cumprod.to(dev)
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=dev.type == "cuda"
    )
    # All training randomness except the init comes from this generator. It lives on the training device
    # so that a CUDA step never waits for a host-to-device copy (runs are reproducible per device type).
    gen = torch.Generator(device=dev).manual_seed(seed)

    log_path = out / "train_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w", encoding="utf-8")
    budget_s = cfg.max_minutes * 60.0
    t0 = time.time()
    step, loss_acc, loss_count, last_loss = 0, 0.0, 0, float("nan")
    try:
        while step < cfg.steps:
            elapsed = time.time() - t0
            if elapsed >= budget_s:
                log(f"[dit] wall-clock cap reached after {step} steps ({elapsed:.0f} s)")
                break
            lr = lr_at(max(step / cfg.steps, elapsed / budget_s), step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            b = cfg.batch_size
            idx = torch.randint(n_data, (b,), generator=gen, device=dev)
            t = torch.randint(noise_sched.config.num_train_timesteps, (b,), generator=gen, device=dev)
            noise = torch.randn((b, 1, cfg.sample_size, cfg.sample_size), generator=gen, device=dev)
            drop = torch.rand(b, generator=gen, device=dev) < cfg.p_uncond
            x0, y = data_x[idx], data_y[idx]
            y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = model(xt, timestep=t, class_labels=y).sample
            if cfg.min_snr_gamma > 0:
                snr = a.view(-1) / (1 - a.view(-1))
                weight = torch.clamp(cfg.min_snr_gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR, finite at SNR 0
                loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            else:
                loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
            loss_acc += loss.detach()  # stays on device: no sync per step
            loss_count += 1
            is_eval = cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps
            if step % cfg.log_every == 0 or is_eval or step == cfg.steps:
                last_loss = float(loss_acc / loss_count)  # CPU-GPU sync point, once per log interval
                loss_acc, loss_count = 0.0, 0
                rec = {"step": step, "loss": last_loss, "lr": lr, "elapsed": round(time.time() - t0, 2)}
                if is_eval:
                    ev = evaluate(
                        DiTOrganism(ema, dict(noise_sched.config)),
                        "classify",
                        device=device,
                        n=cfg.eval_n,
                        seed=10_000 + step,
                        num_steps=20,
                        include_unguided=False,
                    )
                    rec["acc_guided"] = ev["acc_guided"]
                    rec["p_intended_guided"] = ev["p_intended_guided"]
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                log(f"[dit] {json.dumps(rec)}")
    finally:
        log_file.close()
    train_seconds = time.time() - t0

    _set_label_dropout(ema, 0.1)  # restore diffusers' default (inactive in eval mode; not in config)
    ema.to("cpu")
    _save_dir_atomically(out / "transformer", lambda p: ema.save_pretrained(p, safe_serialization=True))
    _save_dir_atomically(out / "scheduler", lambda p: noise_sched.save_pretrained(p))
    return {
        "steps_done": step,
        "final_loss": last_loss,
        "train_seconds": round(train_seconds, 1),
        "n_params": int(n_params),
        "n_train_images": int(n_data),
        "stopped_by_time_cap": step < cfg.steps,
    }


# --------------------------------------------------------------------------------------------------------
# Model card and CLI
# --------------------------------------------------------------------------------------------------------


def _model_card(cfg: TrainConfig, summary: dict, metrics: dict, command: str, seed: int, device: str) -> str:
    cls = metrics.get("classify", {})
    sty = metrics.get("style", {})
    width = cfg.num_heads * cfg.head_dim
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    style_rows = "\n".join(
        f"| {k} | {sty.get(f'{k}_mean', float('nan')):.4f} ± {sty.get(f'{k}_std', float('nan')):.4f} "
        f"| {sty.get(f'real_{k}_mean', float('nan')):.4f} ± {sty.get(f'real_{k}_std', float('nan')):.4f} |"
        for k in STYLE_NAMES
    )
    return f"""# organism-dit

A small class-conditional diffusion transformer trained on scikit-learn's bundled handwritten digits, made by
`attnlab/models/training/dit.py`. It is the test subject for head-level perturbation guidance (HeadHunter /
SoftPAG): every attention head is a standard diffusers `Attention` module whose processor can be swapped.

## Architecture
- diffusers `DiTTransformer2DModel`: {cfg.num_layers} layers x {cfg.num_heads} heads x head dim {cfg.head_dim}
  (width {width}), adaLN-Zero, patch {cfg.patch_size}, 1 channel, {cfg.sample_size}x{cfg.sample_size} images
  = {tokens} image tokens, {summary["n_params"]:,} parameters (EMA weights, float32, safetensors).
- Classes: `num_embeds_ada_norm = 10`; label 10 is the null class for classifier-free guidance
  (eps = eps_null + s (eps_class - eps_null); s = 1 means no guidance).
- Scheduler (`scheduler/`): DDPM, 1000 steps, cosine betas, epsilon prediction, trailing spacing, clip_sample.
  Sample with DDIM (eta 0, `use_clipped_model_output=True`) built from it:
  `attnlab.models.dit.sample(dir, labels, guidance_scale, num_steps, seed)`.

## Data
`sklearn.datasets.load_digits` (1,797 digits, 8x8, 0-16), mapped to [-1, 1] and upsampled 2x bilinearly to
16x16 (`attnlab/datasets/digits.py`); fixed stratified split, {summary["n_train_images"]} training digits, 360 held out.
Label dropped to the null class with probability {cfg.p_uncond}. Loss: epsilon MSE with Min-SNR weighting
(gamma {cfg.min_snr_gamma}); class embeddings initialised with std {cfg.label_init_std}.

## Training
AdamW lr {cfg.lr} (warm-up {cfg.warmup_steps}, cosine to {cfg.min_lr_frac}x), batch {cfg.batch_size},
{summary["steps_done"]} steps of {cfg.steps} planned in {summary["train_seconds"]} s on `{device}`
(stopped by time cap: {summary["stopped_by_time_cap"]}), EMA {cfg.ema_decay}, seed {seed}, final loss
{summary["final_loss"]:.4f}. Loss curve: `train_log.jsonl`.

## Measured metrics
Scorer: logistic regression on 8x8 pixels refit from the bundled train split (held-out accuracy
{metrics.get("scorer_test_accuracy", float("nan")):.3f}). {cls.get("n_per_class", "?")} digits per class, DDIM
{cls.get("num_steps", "?")} steps, seed {cls.get("seed", "?")}:

| setting | classified as intended | mean p(intended) | worst class |
|---|---|---|---|
| guided (s = {cls.get("guidance_scale", "?")}) | {cls.get("acc_guided", float("nan")):.3f} | \
{cls.get("p_intended_guided", float("nan")):.3f} | {cls.get("acc_guided_min_class", float("nan")):.3f} |
| unguided (s = 1) | {cls.get("acc_unguided", float("nan")):.3f} | \
{cls.get("p_intended_unguided", float("nan")):.3f} | {cls.get("acc_unguided_min_class", float("nan")):.3f} |

Style scores of guided samples vs. real held-out digits (mean ± std):

| score | generated | real |
|---|---|---|
{style_rows}

Sample grid (rows = classes 0-9, guided): `samples.png`.

## Retrain
```
{command}
```
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="attnlab.models.train dit", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap of the training loop")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--final-eval-n", type=int, default=None, help="generated digits per class in metrics.json")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    return p.parse_args(argv)


def write_results(
    out: Path, cfg: TrainConfig, summary: dict, *, preset: str, seed: int, device: str, command: str
) -> dict[str, Any]:
    """Evaluate the model saved in ``out`` and (re)write metrics.json, samples.png and MODEL_CARD.md."""
    t0 = time.time()
    org = load(out, device)
    scorer = get_scorer()
    real_x, real_y = real_digits_01("test", size=cfg.sample_size)
    metrics: dict[str, Any] = {
        "organism": "organism-dit",
        "preset": preset,
        "seed": seed,
        "device": device,
        "config": asdict(cfg),
        "train": summary,
        "scorer_test_accuracy": float((scorer.predict(real_x) == real_y).mean()),
    }
    metrics["classify"] = evaluate(org, "classify", device=device, n=cfg.final_eval_n, seed=seed)
    metrics["style"] = evaluate(org, "style", device=device, n=cfg.final_eval_n, seed=seed)
    grid = sample(org, balanced_labels(10), DEFAULT_GUIDANCE, DEFAULT_STEPS, seed, device)
    save_grid(grid, out / "samples.png")
    metrics["checkpoint_mb"] = round(_dir_megabytes(out / "transformer"), 2)
    metrics["eval_seconds"] = round(time.time() - t0, 1)
    metrics["command"] = command
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n", mode=0o644)
    write_text(out / "MODEL_CARD.md", _model_card(cfg, summary, metrics, command, seed, device), mode=0o644)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Train organism-dit, then evaluate it and write metrics.json, samples.png and MODEL_CARD.md."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[dit] --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = build_config(
        args.preset,
        max_minutes=args.max_minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        final_eval_n=args.final_eval_n,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "PYTHONPATH=. python -m attnlab.models.train dit " + " ".join(argv_list)
    t0 = time.time()
    summary = train(cfg, out, device=args.device, seed=args.seed)
    metrics = write_results(out, cfg, summary, preset=args.preset, seed=args.seed, device=args.device, command=command)
    cls = metrics["classify"]
    print(
        f"[dit] done in {time.time() - t0:.1f} s: acc_guided={cls['acc_guided']:.3f} "
        f"acc_unguided={cls['acc_unguided']:.3f} checkpoint={metrics['checkpoint_mb']} MB -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
