"""organism-vlm at run time: load it through the public Hugging Face path, ask it shape questions, evaluate it.

The model is a tiny LLaVA (``LlavaForConditionalGeneration``) trained by ``attnlab.models.training.vlm`` on
procedural shape scenes (``attnlab.datasets.shapes``; the trainer's docstring describes the recipe).
``attnlab eval organism-vlm --task TASK`` runs ``evaluate``: POPE-style existence questions (accuracy,
yes-ratio, hallucination rates), attribute / count / position accuracy, and the attention-sink statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from attnlab.datasets import shapes
from attnlab.models.decoding import generate_greedy
from attnlab.progress import bar

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
EVAL_TASKS: tuple[str, ...] = (
    "pope",
    "pope_random",
    "pope_popular",
    "pope_adversarial",
    "attribute",
    "count",
    "position",
    "sink",
)
# What ``evaluate``'s ``n`` counts in each task (the CLI's ``eval --n`` help is made from this).
EVAL_N: dict[str, str] = {
    "pope": "scenes per POPE split, about 5 questions each (default 500)",
    "pope_random": "scenes (default 500)",
    "pope_popular": "scenes (default 500)",
    "pope_adversarial": "scenes (default 500)",
    "attribute": "questions (default 1000)",
    "count": "questions (default 1000)",
    "position": "questions (default 1000)",
    "sink": "prompts (default 64)",
}
TEST_SEED_OFFSET = 10_000  # test scenes: seeds offset from the training (0) and validation (1) streams
SCENE_CONFIG = "scene_config.json"  # the scene distribution, saved next to the weights for evaluate()
_DEFAULT_SCENES = shapes.SceneConfig()  # the default scene distribution (frozen, so one shared instance is safe)


def prompt_for(question: str) -> str:
    """The llava-1.5 style prompt the organism is trained on (identical to its chat template)."""
    return PROMPT_TEMPLATE.format(question=question)


def pope_metrics(pred_yes: list[bool], questions: list[shapes.Question]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes = positive), yes-ratio, and hallucination (yes) rates on negatives."""
    gold = [q.answer == shapes.ANSWER_YES for q in questions]
    tp = sum(p and g for p, g in zip(pred_yes, gold))
    fp = sum(p and not g for p, g in zip(pred_yes, gold))
    fn = sum((not p) and g for p, g in zip(pred_yes, gold))
    tn = sum((not p) and (not g) for p, g in zip(pred_yes, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    co = [p for p, q in zip(pred_yes, questions) if q.negative == "cooccur"]
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "halluc_rate": fp / (fp + tn) if fp + tn else 0.0,
        "cooccur_halluc_rate": sum(co) / len(co) if co else None,
        "n": n,
        "n_cooccur": len(co),
    }


# ----------------------------------------------------------------------------------------------
# evaluation through the public Hugging Face path
# ----------------------------------------------------------------------------------------------


def load(model_dir: str, device: str = "cpu", attn_implementation: str | None = None):
    """(processor, model) through ``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained`` (fp32, eval)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, **kwargs).to(device).eval()
    return processor, model


@torch.no_grad()
def generate_answers(
    processor, model, pairs, cfg: shapes.SceneConfig, batch_size: int = 128, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers for (scene, question) pairs, through the processor and ``generate``."""
    answers: list[str] = []
    for s in bar(range(0, len(pairs), batch_size), desc=f"generate ({len(pairs)} questions)", unit="batch"):
        chunk = pairs[s : s + batch_size]
        images = [shapes.render_scene(scene, cfg) for scene, _ in chunk]
        texts = [prompt_for(q.text) for _, q in chunk]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
        answers.extend(t.strip() for t in generate_greedy(model, inputs, processor, max_new_tokens=max_new_tokens))
    return answers


def scene_config(model_dir: str) -> shapes.SceneConfig:
    """The scene distribution a checkpoint was trained on (``scene_config.json``; defaults if absent)."""
    path = Path(model_dir) / SCENE_CONFIG
    return shapes.config_from_dict(json.loads(path.read_text())) if path.exists() else shapes.SceneConfig()


def pope_answer_is_yes(text: str) -> bool:
    """POPE parsing: first sentence, commas removed; "no" if any word is No/no/not, else "yes"."""
    first = text.split(".")[0].replace(",", "")
    return not any(w in ("No", "no", "not") for w in first.split())


def eval_footprint(model_dir: str, task: str, n: int | None) -> int:
    """Estimated peak bytes ``evaluate(model_dir, task, n=n)`` holds, for refusing a ``--n`` that cannot fit.

    ``sink`` runs its ``n`` prompts in one forward with every layer's attention kept
    (``layers x heads x T^2`` floats a prompt, T = image tokens + about 40 text tokens); the answer tasks keep a
    (scene, question) pair and an answer per question (about 2 kB)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text, vision = cfg.get("text_config", {}), cfg.get("vision_config", {})
    if task == "sink":
        tokens = (vision.get("image_size", 64) // vision.get("patch_size", 8)) ** 2 + 40
        layers, heads = text.get("num_hidden_layers", 6), text.get("num_attention_heads", 8)
        per_prompt = 4 * (layers * heads * tokens**2 + (layers + 1) * tokens * text.get("hidden_size", 256)) * 2
        return (n or 64) * per_prompt
    if task.startswith("pope"):
        splits = len(shapes.POPE_SPLITS) if task == "pope" else 1
        return splits * (n or 500) * 6 * 2048
    return (n or 1000) * 2048


def evaluate(model_dir: str, task: str, *, device: str = "cpu", n: int | None = None, seed: int = 0) -> dict:
    """Evaluate a saved organism-vlm on one task of ``EVAL_TASKS``; returns metric name -> value (plus counts).

    Test scenes come from seeds offset by 10,000 from training/validation. ``n`` is the number of
    scenes per POPE split (about 5 questions each, default 500 as in POPE), of questions for
    attribute/count/position (default 1000), of prompts for ``sink`` (default 64).
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {EVAL_TASKS}")
    cfg = scene_config(model_dir)
    test_seed = TEST_SEED_OFFSET + seed
    if task == "sink":
        return sink_stats(model_dir, device=device, n=n or 64, seed=test_seed, cfg=cfg)
    processor, model = load(model_dir, device)
    if task.startswith("pope"):
        splits = shapes.POPE_SPLITS if task == "pope" else (task.split("_", 1)[1],)
        out: dict = {}
        for split in splits:
            pairs = shapes.pope_questions(split, n or 500, test_seed, cfg)
            answers = generate_answers(processor, model, pairs, cfg)
            m = pope_metrics([pope_answer_is_yes(a) for a in answers], [q for _, q in pairs])
            out.update({(f"{split}_{k}" if task == "pope" else k): v for k, v in m.items()})
        return out
    pairs = shapes.task_questions(task, n or 1000, test_seed, cfg)
    answers = generate_answers(processor, model, pairs, cfg)
    correct = [a == q.answer for a, (_, q) in zip(answers, pairs)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct)}


@torch.no_grad()
def sink_stats(
    model_dir: str,
    *,
    device: str = "cpu",
    n: int = 64,
    seed: int = 0,
    cfg: shapes.SceneConfig = _DEFAULT_SCENES,
    tau: float = 20.0,
) -> dict:
    """Attention to the image and candidate sink tokens, per language-model layer (eager attention).

    Over ``n`` existence prompts, for the text query rows after the image span: mean attention mass
    on the image tokens and on BOS; the largest share of the image mass taken by a single image token
    (1/64 would be uniform). Massive activations (``attention_sinks.md`` 3-4): for the hidden state
    entering each layer, ``phi = max_d |x_d| / RMS(x)``; the sink dimensions are the top dimensions by
    that ratio on BOS, and a visual sink is an image token whose ``phi`` over those dimensions is >= ``tau``.
    """
    processor, model = load(model_dir, device, attn_implementation="eager")
    pairs = shapes.pope_questions("random", max(1, n // 4), seed, cfg)[:n]
    images = [shapes.render_scene(scene, cfg) for scene, _ in pairs]
    texts = [prompt_for(q.text) for _, q in pairs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
    outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    ids = inputs["input_ids"]
    is_img = ids == model.config.image_token_id
    is_bos = ids == processor.tokenizer.bos_token_id
    last_img = torch.where(is_img.any(0))[0].max()
    text_rows = (torch.arange(ids.shape[1], device=ids.device) > last_img)[None, :] & inputs["attention_mask"].bool()
    per_layer = []
    hidden = outputs.hidden_states  # embeddings, then after each layer: hidden[l] enters layer l
    bos_ratio = (
        torch.stack(
            [(h[is_bos].abs() / h[is_bos].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).mean(0) for h in hidden[1:-1]]
        ).mean(0)
        if len(hidden) > 2
        else None
    )
    sink_dims = torch.topk(bos_ratio, 2).indices.tolist() if bos_ratio is not None else []
    for layer, attn in enumerate(outputs.attentions):
        a = attn.float()  # (B, H, Q, K)
        rows = text_rows[:, None, :, None].float()
        n_rows = rows.sum() * a.shape[1]
        img_mass = (a * is_img[:, None, None, :]).sum(-1, keepdim=True)
        bos_mass = (a * is_bos[:, None, None, :]).sum(-1, keepdim=True)
        top_img = (a * is_img[:, None, None, :]).amax(-1, keepdim=True) / img_mass.clamp_min(1e-9)
        h = hidden[layer].float()
        rms = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        ratio = h.abs() / rms
        phi = ratio[..., sink_dims].amax(-1) if sink_dims else torch.zeros_like(ratio[..., 0])
        per_layer.append(
            {
                "layer": layer,
                "image_attention": float((img_mass * rows).sum() / n_rows),
                "bos_attention": float((bos_mass * rows).sum() / n_rows),
                "max_single_image_token_share": float((top_img * rows).sum() / n_rows),
                "max_ratio_image_tokens": float(ratio[is_img].max()),
                "max_ratio_bos": float(ratio[is_bos].max()),
                "visual_sinks_per_image": float((phi[is_img] >= tau).sum() / ids.shape[0]) if layer >= 2 else 0.0,
            }
        )
    return {
        "n": int(ids.shape[0]),
        "tau": tau,
        "sink_dims": sink_dims,
        "per_layer": per_layer,
        "image_attention_mean": float(np.mean([p["image_attention"] for p in per_layer])),
        "bos_attention_mean": float(np.mean([p["bos_attention"] for p in per_layer])),
        "visual_sinks_per_image_max": float(max(p["visual_sinks_per_image"] for p in per_layer)),
    }
