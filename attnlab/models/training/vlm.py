"""Train ``organism-vlm``: a tiny LLaVA trained on procedural shape scenes (its run time: ``attnlab.models.vlm``).

Exact commands (from the repository root)::

    # the shipped model (one H100: about 6 minutes of training, 7 in all with data and final evaluation)
    PYTHONPATH=. python -m attnlab.models.train vlm --preset gpu --device cuda --seed 0 --out OUT/vlm
    # the same without the dispatcher
    PYTHONPATH=. python -c "import sys; from attnlab.models.training import vlm; sys.exit(vlm.main(sys.argv[1:]))" \
        --preset gpu --device cuda --seed 0 --out OUT/vlm
    # a few steps on CPU, for tests (seconds)
    ... --preset smoke --device cpu --out /tmp/vlm-smoke

What it builds is an ordinary Hugging Face LLaVA checkpoint:

- ``LlavaForConditionalGeneration``: a small CLIP vision tower (64x64 images, 8x8 patches, so 64
  image tokens after the CLS token is dropped, ``vision_feature_select_strategy="default"``), the
  two-layer GELU projector, and a small Llama language model (RMSNorm, RoPE, SwiGLU, GQA).
- A closed word-level tokenizer (``tokenizers`` ``WordLevel``, lower-casing, BOS prepended) with
  ``<image>``, ``<s>``, ``</s>``, ``<pad>`` and ``<unk>``, left padding for batched generation.
- A ``LlavaProcessor`` with the slow PIL image processor (``CLIPImageProcessorPil``; in transformers
  5.x ``CLIPImageProcessor`` is the torchvision one) and a llava-1.5 style chat template, so that
  ``AutoProcessor.from_pretrained(d)(images=pil, text="USER: <image>\\nIs there a red circle in the
  image? ASSISTANT:")`` expands ``<image>`` to 64 tokens exactly as for ``llava-hf`` models.

Training data come from ``attnlab.datasets.shapes``: a pool of rendered scenes (built by worker
processes) with pre-sampled questions; the loss is on the answer tokens and ``</s>`` only. The scene
distribution has a deliberate co-occurrence bias (``--cooccur-p``), which makes the model claim
absent partners of present objects; POPE-style evaluation measures it.

Checkpoint selection (``--select target``, the default): a validation set (its own seed) is scored
every ``eval_every`` steps, and the saved weights are those of the evaluation that meets the
behaviour targets with margin (random-split accuracy >= 0.93 and co-occurrence hallucination rate
>= 0.15) with the best attribute/count/position accuracy, or, if none does, the one closest to them.
``--select last`` saves the final weights. The learning-rate schedule runs on
``progress = max(step / steps, elapsed / max_minutes)`` so it finishes its decay even when the
wall-clock cap binds first; with ``--max-minutes 0`` the run is step-based and deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from attnlab.datasets import shapes
from attnlab.heads.io import write_text
from attnlab.models.vlm import (
    PROMPT_TEMPLATE,
    SCENE_CONFIG,
    evaluate,
    pope_metrics,
    prompt_for,
)

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Seeds of the data streams: training pool, validation (checkpoint selection), test (evaluate()).
_TRAIN_STREAM, _VAL_STREAM = 0, 1  # (the test stream: models.vlm.TEST_SEED_OFFSET)
_HEADLINE = ("accuracy", "yes_ratio", "cooccur_halluc_rate")
# Selection margins over the behaviour targets (accuracy >= 0.90, hallucination >= 0.10).
SELECT_MIN_ACC, SELECT_MIN_HALLUC = 0.93, 0.15


@dataclass(frozen=True)
class Preset:
    """Architecture, data and optimisation settings of one training preset."""

    vision_layers: int
    vision_hidden: int
    vision_heads: int
    vision_ffn: int
    text_layers: int
    text_hidden: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    weight_decay: float
    pool_scenes: int
    questions_per_scene: int
    eval_every: int
    val_scenes: int
    final_eval_scenes: int  # POPE scenes per split in the final evaluation (about 5 questions each)
    final_eval_questions: int  # attribute / count / position questions in the final evaluation
    max_minutes: float
    workers: int
    log_every: int


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        vision_layers=1,
        vision_hidden=32,
        vision_heads=2,
        vision_ffn=64,
        text_layers=2,
        text_hidden=32,
        text_heads=4,
        text_kv_heads=2,
        text_ffn=64,
        batch_size=8,
        steps=6,
        lr=1e-3,
        warmup=2,
        weight_decay=0.1,
        pool_scenes=32,
        questions_per_scene=4,
        eval_every=3,
        val_scenes=4,
        final_eval_scenes=4,
        final_eval_questions=8,
        max_minutes=1.0,
        workers=1,
        log_every=1,
    ),
    "cpu": Preset(
        vision_layers=2,
        vision_hidden=96,
        vision_heads=4,
        vision_ffn=384,
        text_layers=3,
        text_hidden=128,
        text_heads=4,
        text_kv_heads=2,
        text_ffn=384,
        batch_size=32,
        steps=3000,
        lr=2e-3,
        warmup=100,
        weight_decay=0.1,
        pool_scenes=6000,
        questions_per_scene=12,
        eval_every=150,
        val_scenes=60,
        final_eval_scenes=100,
        final_eval_questions=200,
        max_minutes=60.0,
        workers=2,
        log_every=25,
    ),
    "gpu": Preset(
        vision_layers=4,
        vision_hidden=192,
        vision_heads=6,
        vision_ffn=768,
        text_layers=6,
        text_hidden=256,
        text_heads=8,
        text_kv_heads=4,
        text_ffn=768,
        batch_size=256,
        steps=12_000,
        lr=1.5e-3,
        warmup=300,
        weight_decay=0.1,
        pool_scenes=160_000,
        questions_per_scene=12,
        eval_every=400,
        val_scenes=300,
        final_eval_scenes=500,
        final_eval_questions=1000,
        max_minutes=6.0,
        workers=8,
        log_every=50,
    ),
}


# ----------------------------------------------------------------------------------------------
# tokenizer, processor, model
# ----------------------------------------------------------------------------------------------


def build_tokenizer():
    """Closed word-level tokenizer over the shapes vocabulary (lower-cased, BOS prepended, left padding)."""
    words = ["user", "assistant", *shapes.vocabulary()]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(tokenizer, image_size: int, patch_size: int):
    """``LlavaProcessor`` with the PIL CLIP image processor sized for the vision tower."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(preset: Preset, tokenizer, image_size: int = 64, patch_size: int = 8):
    """A randomly initialised ``LlavaForConditionalGeneration`` of the preset's size."""
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_ffn,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_ffn,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pixel_tensor(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float, matching the saved image processor."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class QATable:
    """Encodes (question, answer) pairs once: expanded prompt ids plus answer ids and ``</s>``.

    ``ids[k]`` is the right-padded sequence of pair ``k`` and ``labels[k]`` holds the answer tokens
    (and ``</s>``) at their positions, -100 elsewhere, so a batch is two gathers.
    """

    def __init__(self, tokenizer, n_image_tokens: int):
        self.tokenizer = tokenizer
        self.n_image_tokens = n_image_tokens
        self.index: dict[tuple[str, str], int] = {}
        self._rows: list[tuple[list[int], int]] = []  # (token ids, prompt length)

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the prompt with ``<image>`` expanded (what the processor produces)."""
        text = prompt_for(question).replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def add(self, question: str, answer: str) -> int:
        key = (question, answer)
        if key not in self.index:
            prompt = self.encode_prompt(question)
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.index[key] = len(self._rows)
            self._rows.append((prompt + answer_ids + [self.tokenizer.eos_token_id], len(prompt)))
        return self.index[key]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, lengths) for every pair added so far."""
        width = max(len(ids) for ids, _ in self._rows)
        ids = torch.full((len(self._rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(self._rows), width), -100, dtype=torch.long)
        lengths = torch.zeros(len(self._rows), dtype=torch.long)
        for k, (row, n_prompt) in enumerate(self._rows):
            ids[k, : len(row)] = torch.tensor(row)
            labels[k, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
            lengths[k] = len(row)
        return ids, labels, lengths


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def build_pool(n_scenes: int, questions_per_scene: int, seed: int, cfg: shapes.SceneConfig, workers: int):
    """Render ``n_scenes`` training scenes with pre-sampled questions, in chunks of fixed seeds.

    Chunks are seeded by (seed, stream, chunk index), so the pool does not depend on ``workers``.
    Returns (uint8 images (N, H, W, 3), list of per-scene (question, answer) lists, scene key sets).
    """
    chunk = 2000
    jobs = [
        (seed, _TRAIN_STREAM, i, min(chunk, n_scenes - i * chunk), questions_per_scene, cfg)
        for i in range(math.ceil(n_scenes / chunk))
    ]
    if workers <= 1 or len(jobs) == 1:
        parts = [shapes.training_chunk(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(shapes.training_chunk, jobs)
    images = np.concatenate([p[0] for p in parts])
    questions = [q for p in parts for q in p[1]]
    return images, questions


def encode_eval_set(pairs, table: QATable, cfg: shapes.SceneConfig):
    """Render (scene, question) pairs and encode them: (uint8 images, qa indices, question list)."""
    images = np.stack([shapes.render_array(scene, cfg) for scene, _ in pairs])
    idx = np.array([table.add(q.text, q.answer) for _, q in pairs])
    return images, idx, [q for _, q in pairs]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def lr_at(progress: float, step: int, preset: Preset, lr: float) -> float:
    """Linear warm-up over ``preset.warmup`` steps, then cosine decay to 10% as progress goes 0 -> 1."""
    if step < preset.warmup:
        return lr * (step + 1) / preset.warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_loss(model, pixels, ids, labels, lengths, autocast: bool):
    """Mean cross-entropy over answer tokens of a right-padded batch."""
    width = int(lengths.max())
    ids, labels = ids[:, :width], labels[:, :width]
    attn = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).long()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=attn).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@torch.no_grad()
def teacher_forced(model, pixels, ids, labels, lengths, autocast: bool, batch_size: int = 256):
    """Per example: (all answer tokens and ``</s>`` are the argmax under teacher forcing, first predicted token).

    The first flag equals greedy decoding producing exactly the answer and stopping, in one forward pass;
    the first token is what greedy decoding would emit first (for POPE's yes/no parsing).
    """
    ok_all, first_all = [], []
    for s in range(0, ids.shape[0], batch_size):
        sl = slice(s, s + batch_size)
        width = int(lengths[sl].max())
        b_ids, b_lab = ids[sl, :width], labels[sl, :width]
        attn = (torch.arange(width, device=ids.device)[None, :] < lengths[sl, None]).long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b_ids, pixel_values=pixels[sl], attention_mask=attn).logits
        pred = logits[:, :-1].argmax(-1)
        tgt = b_lab[:, 1:]
        ok_all.append(((pred == tgt) | (tgt == -100)).all(-1))
        first_pos = (tgt != -100).int().argmax(-1)
        first_all.append(pred.gather(1, first_pos[:, None])[:, 0])
    return torch.cat(ok_all), torch.cat(first_all)


class Validator:
    """Fixed validation sets (their own seed) scored in one forward pass each, for logging and selection."""

    def __init__(self, table: QATable, cfg: shapes.SceneConfig, n_scenes: int, seed: int, device):
        self.device = device
        self.no_id = table.tokenizer.convert_tokens_to_ids(shapes.ANSWER_NO)
        self.sets = {}
        vseed = seed * 1000 + 500 + _VAL_STREAM
        for split in ("random", "adversarial"):
            self.sets[f"pope_{split}"] = encode_eval_set(shapes.pope_questions(split, n_scenes, vseed, cfg), table, cfg)
        for kind in ("attribute", "count", "position"):
            self.sets[kind] = encode_eval_set(shapes.task_questions(kind, n_scenes, vseed, cfg), table, cfg)

    def __call__(self, model, table_tensors, autocast: bool) -> dict[str, float]:
        ids_all, labels_all, lengths_all = table_tensors
        model.eval()
        out: dict[str, float] = {}
        for name, (images, idx, questions) in self.sets.items():
            ii = torch.as_tensor(idx, device=self.device)
            pixels = pixel_tensor(torch.as_tensor(images, device=self.device))
            ok, first = teacher_forced(model, pixels, ids_all[ii], labels_all[ii], lengths_all[ii], autocast)
            ok = ok.cpu().tolist()
            if name.startswith("pope"):
                pred_yes = [t != self.no_id for t in first.cpu().tolist()]
                m = pope_metrics(pred_yes, questions)
                out[f"{name}_accuracy"] = m["accuracy"]
                if name == "pope_adversarial":
                    out["pope_adversarial_cooccur_halluc_rate"] = m["cooccur_halluc_rate"]
            else:
                out[f"{name}_accuracy"] = sum(ok) / len(ok)
        model.train()
        return out


def selection_score(m: dict[str, float]) -> tuple[int, float]:
    """Sort key of a validation result: meets the targets with margin first, then skill or closeness."""
    acc, hal = m["pope_random_accuracy"], m["pope_adversarial_cooccur_halluc_rate"] or 0.0
    if acc >= SELECT_MIN_ACC and hal >= SELECT_MIN_HALLUC:
        return (1, (m["attribute_accuracy"] + m["count_accuracy"] + m["position_accuracy"]) / 3)
    return (0, min((acc - 0.90) / 0.10, (hal - 0.10) / 0.10))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="attnlab.models.train vlm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (save_pretrained files, logs, metrics, card)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap of the training loop (0 = none)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--pool-scenes", type=int, default=None, help="override the number of pre-rendered scenes")
    p.add_argument("--workers", type=int, default=None, help="processes rendering the scene pool")
    p.add_argument("--cooccur-p", type=float, default=0.95, help="P(partner present | trigger present)")
    p.add_argument(
        "--faint-p",
        type=float,
        default=0.5,
        help="P(a partner that comes with its trigger is drawn small and semi-transparent)",
    )
    p.add_argument("--select", default="target", choices=["target", "last"], help="which weights to save")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-final-eval", action="store_true", help="skip evaluate() on the saved model")
    return p.parse_args(argv)


def _command_args(argv: list[str] | None, args: argparse.Namespace) -> list[str]:
    """The CLI arguments of this run, with preset, device and seed always spelled out."""
    given = list(argv if argv is not None else sys.argv[1:])
    for flag, value in (("--preset", args.preset), ("--device", args.device), ("--seed", args.seed)):
        if not any(a == flag or a.startswith(flag + "=") for a in given):
            given += [flag, str(value)]
    return given


def main(argv: list[str] | None = None) -> int:
    """Train organism-vlm and write the checkpoint, ``train_log.jsonl``, ``metrics.json`` and ``MODEL_CARD.md``."""
    args = parse_args(argv)
    t_start = time.time()
    preset = PRESETS[args.preset]
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "pool_scenes": args.pool_scenes,
            "workers": args.workers,
            "max_minutes": args.max_minutes,
        }.items()
        if v is not None
    }
    preset = replace(preset, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = shapes.SceneConfig(cooccur_p=args.cooccur_p, faint_p=args.faint_p)

    # Data first (before CUDA is touched): the pool of scenes and their questions.
    images, pool_questions = build_pool(preset.pool_scenes, preset.questions_per_scene, args.seed, cfg, preset.workers)
    t_data = time.time() - t_start
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, cfg.image_size, 8)
    model = build_model(preset, tokenizer, cfg.image_size, 8).to(device)
    n_image_tokens = model.config.image_seq_length
    table = QATable(tokenizer, n_image_tokens)
    pairs = np.array([(s, table.add(q, a)) for s, qs in enumerate(pool_questions) for q, a in qs], dtype=np.int64)
    validator = Validator(table, cfg, preset.val_scenes, args.seed, device)
    ids_all, labels_all, lengths_all = (t.to(device) for t in table.tensors())
    pool_images = torch.as_tensor(images, device=device)
    pairs_t = torch.as_tensor(pairs, device=device)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    budget_s = preset.max_minutes * 60 if preset.max_minutes else float("inf")
    best: tuple | None = None  # (score, step, metrics, state_dict)
    evals: list[dict] = []
    t_train = time.time()
    step, loss_ema = 0, None
    model.train()
    while step < preset.steps:
        elapsed = time.time() - t_train
        if elapsed >= budget_s:
            break
        progress = max(step / preset.steps, elapsed / budget_s)
        lr = lr_at(progress, step, preset, preset.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(0, pairs_t.shape[0], (preset.batch_size,), generator=gen).to(device)
        scene_idx, qa_idx = pairs_t[pick, 0], pairs_t[pick, 1]
        loss = batch_loss(
            model,
            pixel_tensor(pool_images[scene_idx]),
            ids_all[qa_idx],
            labels_all[qa_idx],
            lengths_all[qa_idx],
            autocast,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % preset.log_every == 0 or step == 1:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            log.write(
                json.dumps(
                    {"step": step, "loss": round(value, 5), "lr": lr, "elapsed": round(time.time() - t_start, 2)}
                )
                + "\n"
            )
            log.flush()
        if step % preset.eval_every == 0 or step == preset.steps:
            metrics = validator(model, (ids_all, labels_all, lengths_all), autocast)
            evals.append({"step": step, **metrics})
            log.write(json.dumps({"step": step, "elapsed": round(time.time() - t_start, 2), "val": metrics}) + "\n")
            log.flush()
            score = selection_score(metrics)
            if args.select == "target" and (best is None or score >= best[0]):
                best = (score, step, metrics, {k: v.detach().clone() for k, v in model.state_dict().items()})
    train_seconds = time.time() - t_train
    if not evals or evals[-1]["step"] != step:
        metrics = validator(model, (ids_all, labels_all, lengths_all), autocast)
        evals.append({"step": step, **metrics})
        log.write(json.dumps({"step": step, "elapsed": round(time.time() - t_start, 2), "val": metrics}) + "\n")
        score = selection_score(metrics)
        if args.select == "target" and (best is None or score >= best[0]):
            best = (score, step, metrics, None)
    log.close()
    selected_step = step
    if args.select == "target" and best is not None:
        selected_step = best[1]
        if best[3] is not None:
            model.load_state_dict(best[3])
    model.to(torch.float16).cpu().save_pretrained(out)
    processor.save_pretrained(out)
    write_text(out / SCENE_CONFIG, json.dumps(shapes.config_to_dict(cfg), indent=1) + "\n", mode=0o644)

    run_info = {
        "preset": args.preset,
        "preset_settings": asdict(preset),
        "seed": args.seed,
        "device": args.device,
        "cooccur_p": args.cooccur_p,
        "faint_p": args.faint_p,
        "select": args.select,
        "steps_run": step,
        "selected_step": selected_step,
        "train_seconds": round(train_seconds, 1),
        "data_seconds": round(t_data, 1),
        "n_params": n_params,
        "n_pool_scenes": int(images.shape[0]),
        "n_pool_questions": int(pairs.shape[0]),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "command": "PYTHONPATH=. python -m attnlab.models.train vlm " + " ".join(_command_args(argv, args)),
    }
    final: dict[str, dict] = {}
    if not args.no_final_eval:
        for task in ("pope", "attribute", "count", "position", "sink"):
            n = preset.final_eval_scenes if task == "pope" else preset.final_eval_questions
            if task == "sink":
                n = min(64, preset.final_eval_questions)
            final[task] = evaluate(str(out), task, device=args.device, n=n, seed=args.seed)
    result = {
        "run": run_info,
        "validation": evals,
        "selected_validation": next((e for e in evals if e["step"] == selected_step), None),
        "test": final,
        "total_seconds": round(time.time() - t_start, 1),
    }
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n", mode=0o644)
    write_text(out / "MODEL_CARD.md", model_card(model.config, run_info, result), mode=0o644)
    summary = {"out": str(out), "steps": step, "selected_step": selected_step, "total_seconds": result["total_seconds"]}
    for task, d in final.items():
        summary.update(
            {
                f"{task}/{k}": round(v, 4)
                for k, v in d.items()
                if isinstance(v, float) and (task != "pope" or k.split("_", 1)[1] in _HEADLINE)
            }
        )
    print(json.dumps(summary))
    return 0


def model_card(config, run: dict, result: dict) -> str:
    """Markdown model card: architecture, data, training, selection, measured metrics, the retraining command."""
    v, t = config.vision_config, config.text_config
    test = result.get("test", {})
    pope = test.get("pope", {})

    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    rows = []
    for split in shapes.POPE_SPLITS:
        if f"{split}_accuracy" in pope:
            rows.append(
                f"| {split} | "
                + " | ".join(
                    fmt(pope[f"{split}_{k}"])
                    for k in (
                        "accuracy",
                        "precision",
                        "recall",
                        "f1",
                        "yes_ratio",
                        "halluc_rate",
                        "cooccur_halluc_rate",
                        "n",
                    )
                )
                + " |"
            )
    pope_table = (
        "| split | accuracy | precision | recall | F1 | yes-ratio | yes-rate on negatives | "
        "yes-rate on absent co-occurring | n |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        if rows
        else "(final evaluation skipped)"
    )
    tasks = ", ".join(
        f"{k} {fmt(test[k]['accuracy'])} (n={test[k]['n']})" for k in ("attribute", "count", "position") if k in test
    )
    sink = test.get("sink", {})
    sel = result.get("selected_validation") or {}
    return f"""# organism-vlm

A tiny LLaVA (`LlavaForConditionalGeneration`) trained from scratch by `attnlab.models.training.vlm` on
procedural shape scenes (`attnlab.datasets.shapes`). It answers existence, colour, count and position
questions about 64x64 images and, by design, sometimes claims an absent object that usually co-occurs
with a present one: the object hallucination that VHR and VAR try to fix.

## Use

```python
from transformers import AutoProcessor, LlavaForConditionalGeneration
processor = AutoProcessor.from_pretrained(d)
model = LlavaForConditionalGeneration.from_pretrained(d, dtype="float32")
inputs = processor(images=pil_image, text="USER: <image>\\nIs there a red circle in the image? ASSISTANT:", \
return_tensors="pt")
model.generate(**inputs, max_new_tokens=4)  # -> "yes" / "no"
```
Prompt template `{PROMPT_TEMPLATE!r}` (also the chat template). Answers: `yes`/`no`, a colour, a digit, or a
cell name (`top left`, `top`, ..., `center`, ..., `bottom right`). Weights are stored in float16; load in float32.

## Architecture ({run["n_params"] / 1e6:.2f}M parameters)
- Vision tower: CLIP ViT, {v.num_hidden_layers} layers, d={v.hidden_size}, {v.num_attention_heads} heads, \
image {v.image_size}, patch {v.patch_size}
  -> {config.image_seq_length} image tokens (CLS dropped, `vision_feature_select_strategy="default"`, \
`vision_feature_layer={config.vision_feature_layer}`).
- Projector: Linear-GELU-Linear ({v.hidden_size} -> {t.hidden_size}).
- Language model: Llama, {t.num_hidden_layers} layers, d={t.hidden_size}, {t.num_attention_heads} query / \
{t.num_key_value_heads} KV heads,
  SwiGLU {t.intermediate_size}, RoPE, RMSNorm, tied embeddings, vocabulary {t.vocab_size} \
(closed word-level tokenizer, BOS prepended).
- Processor: `LlavaProcessor` + `CLIPImageProcessorPil` (mean/std 0.5) + the tokenizer; `<image>` expands to \
{config.image_seq_length} tokens.

## Data
Scenes of 1-4 sampled objects plus co-occurring partners (5 shapes x 6 colours, Zipf popularity), \
one per cell of a 3x3 grid, dark random background.
Co-occurrence bias: P(partner present | trigger present) = {run["cooccur_p"]} for the pairs
{", ".join(f"{a[0]} {a[1]} -> {b[0]} {b[1]}" for a, b in shapes.DEFAULT_PAIRS)}; a partner that comes with its
trigger is drawn small and semi-transparent with probability {run["faint_p"]} (weak evidence, strong prior).
The full scene distribution is in `scene_config.json`.
Questions: 50% existence (half present, half uniformly drawn absent objects), 15% colour, 15% count, 20% position.
Pool: {run["n_pool_scenes"]} scenes x {run["preset_settings"]["questions_per_scene"]} questions \
({run["n_pool_questions"]} pairs); loss on answer tokens only.

## Training
Preset `{run["preset"]}`, seed {run["seed"]}, device {run["device"]}: AdamW (betas 0.9/0.98, \
weight decay {run["preset_settings"]["weight_decay"]}),
lr {run["preset_settings"]["lr"]} with {run["preset_settings"]["warmup"]} warm-up steps and cosine decay to 10%, \
batch {run["preset_settings"]["batch_size"]},
bf16 autocast on CUDA; {run["steps_run"]} steps in {run["train_seconds"]} s \
(cap {run["preset_settings"]["max_minutes"]} min).
Checkpoint selection `{run["select"]}`: saved weights are from step {run["selected_step"]}
(validation at that step: {", ".join(f"{k} {fmt(x)}" for k, x in sel.items() if k != "step")}).
torch {run["torch"]}, transformers {run["transformers"]}.

## Measured (test seeds, through AutoProcessor + generate)
{pope_table}

Other tasks (exact match): {tasks or "(skipped)"}.
Attention to the image (mean over LM layers and text rows): {fmt(sink.get("image_attention_mean", "n/a"))};
to BOS: {fmt(sink.get("bos_attention_mean", "n/a"))}; visual sink tokens \
(phi >= {sink.get("tau", 20)} on dims {sink.get("sink_dims", [])}) per image, max over layers: \
{fmt(sink.get("visual_sinks_per_image_max", "n/a"))}.

## Retrain
```
{run["command"]}
```
"""


if __name__ == "__main__":
    sys.exit(main())
