"""Causal check of vision-aware heads on a shape-scene VLM: ablate the top-k VHD heads vs k random heads and score
image questions (issue 4: "ablating the top vision-aware heads hurts image questions more than random heads").

Detection and evaluation use disjoint seeds. Items mix the four question kinds of ``attnlab.datasets.shapes``
(existence in the POPE phrasing, attribute, count, position), each as ``USER: <image>\\n{q} ASSISTANT: {answer}``;
metrics are teacher-forced over the answer tokens: exact match (every answer token is the argmax) and summed
log-prob. Ablation goes through ``HeadAblation`` with the pixel values kept in every sub-batch (the text-only
``causal_test.ablation_evaluator`` cannot carry images). The table is ``causal_test.causal_test``'s.

    python -m attnlab.probes.vhd_causal --k 4 --mode zero --n-seeds 8

Measured on organism-vlm (2026-11-23, ``/work/notes/vision.md``): no VHD variant (spec, unfiltered, layer-
normalised, all text positions) beats random heads; single-head ablations show the heads that matter for these
questions are layer-0 heads, most of which have VHD = 0 at the last prompt token.
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np
import torch

from attnlab.datasets import SHAPE_TEMPLATE


def shape_question_items(n: int, seed: int) -> list:
    """About ``n`` (scene, question) pairs, a quarter of each kind (POPE-random existence, attribute, count, position)."""
    from attnlab.datasets.shapes import pope_questions, task_questions

    per = max(1, n // 4)
    exist = pope_questions("random", per // 6 + 2, seed)
    exist = [exist[i] for i in np.random.default_rng(seed).permutation(len(exist))[:per]]
    return exist + [x for kind in ("attribute", "count", "position") for x in task_questions(kind, per, seed)]


def image_question_evaluator(model, items: Sequence, *, mode: str = "zero", reference_items: Sequence | None = None, batch_size: int = 48):
    """``evaluate(heads) -> {"accuracy": ..., "logprob": ...}``: teacher-forced answer metrics with ``heads`` ablated.

    Mean mode fits one all-layer mean per head on ``reference_items`` (prompts without answers) and reuses it.
    Results are memoised by head set.
    """
    from attnlab.datasets.shapes import render_scene
    from attnlab.interventions.ablation import HeadAblation
    from attnlab.models.loading import Batch

    texts = [SHAPE_TEMPLATE.format(question=q.text) + " " + q.answer for _, q in items]
    batch = model.encode(texts, images=[render_scene(s) for s, _ in items])
    n_ans = [len(model.tokenizer(q.answer, add_special_tokens=False)["input_ids"]) for _, q in items]
    ends = batch.lengths.tolist()
    targets = [batch.input_ids[i, e - n : e] for i, (e, n) in enumerate(zip(ends, n_ans))]
    ref = None
    if mode in ("mean", "resample"):
        if not reference_items:
            raise ValueError(f"mode {mode!r} needs reference_items")
        ref = model.encode([SHAPE_TEMPLATE.format(question=q.text) for _, q in reference_items], images=[render_scene(s) for s, _ in reference_items])
    fitted = {}
    cache: dict[tuple, dict] = {}

    def rows(s, e):
        pix = None if batch.pixel_values is None else batch.pixel_values[s:e]
        return Batch(batch.input_ids[s:e], batch.attention_mask[s:e], batch.prompt_indices[s:e], pix, batch.image_mask[s:e])

    @torch.no_grad()
    def evaluate(heads) -> dict:
        key = tuple(sorted((int(l), int(h)) for l, h in heads))
        if key in cache:
            return cache[key]
        if ref is not None and "all" not in fitted:
            fitted["all"] = HeadAblation([(l, h) for l in range(model.n_layers) for h in range(model.n_heads)], mode=mode).fit(model, ref)
        abl = HeadAblation(key, mode=mode).fit(model, None) if ref is None else _restrict(fitted["all"], key, model)
        acc, lp = [], []
        for s in range(0, batch.size, batch_size):
            sub = rows(s, s + batch_size)
            with abl.apply(model, sub):
                logits = model.forward(sub).float()
            for r in range(sub.size):
                i = s + r
                pred = logits[r, ends[i] - n_ans[i] - 1 : ends[i] - 1].log_softmax(-1)
                acc.append(float((pred.argmax(-1) == targets[i]).all()))
                lp.append(float(pred.gather(-1, targets[i][:, None]).sum()))
        cache[key] = {"accuracy": float(np.mean(acc)), "logprob": float(np.mean(lp))}
        return cache[key]

    return evaluate


def _restrict(full, heads, model):
    """A fitted ablation of ``heads`` sharing ``full``'s fitted state (all heads were fitted once)."""
    from attnlab.interventions.ablation import HeadAblation
    from attnlab.interventions.base import validate_heads

    abl = HeadAblation(heads, mode=full.mode, seed=full.seed)
    abl.__dict__.update({k: v for k, v in full.__dict__.items() if k.endswith("_")})
    abl.heads_ = validate_heads(model, heads)
    return abl


def vhd_causal_tables(model, *, k: int = 4, mode: str = "zero", n_seeds: int = 8, n_detect: int = 32, n_eval: int = 96, detect_seed: int = 101, eval_seed: int = 202, layer_matched: bool = False, variants: dict | None = None) -> dict:
    """Causal-test tables (accuracy and log-prob) for each VHD variant: ``{variant: {metric: DataFrame}}``.

    ``variants`` maps a label to ``VisionAwareHeads`` keyword arguments (default: the spec, no outlier filter,
    layer-normalised, all text positions).
    """
    import attnlab
    from attnlab.datasets.base import PromptSet
    from attnlab.datasets.shapes import render_scene
    from attnlab.probes.causal_test import causal_test
    from attnlab.probes.vision_aware_heads import VisionAwareHeads

    variants = variants or {"spec": {}, "unfiltered": {"outlier_filter": False}, "layer_mean": {"normalize": "layer_mean"}, "text_positions": {"positions": "text"}}
    det = shape_question_items(n_detect, detect_seed)
    ps = PromptSet(name="vhd-detect", texts=[SHAPE_TEMPLATE.format(question=q.text) for _, q in det], images=[render_scene(s) for s, _ in det])
    evaluate = image_question_evaluator(model, shape_question_items(n_eval, eval_seed), mode=mode, reference_items=det)
    out = {}
    for label, kw in variants.items():
        scores = attnlab.scan(model, VisionAwareHeads(**kw), ps, progress=False)["vhd"]
        out[label] = {m: causal_test(scores, k, lambda hs, m=m: evaluate(hs)[m], n_seeds=n_seeds, seed=0, layer_matched=layer_matched) for m in ("accuracy", "logprob")}
    return out


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--out``, write as JSON) the VHD causal tables for one model, k and ablation mode."""
    p = argparse.ArgumentParser(prog="python -m attnlab.probes.vhd_causal", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism-vlm")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--mode", default="zero", choices=["zero", "mean"])
    p.add_argument("--n-seeds", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=96)
    p.add_argument("--layer-matched", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the tables")
    a = p.parse_args(argv)
    import attnlab

    torch.set_num_threads(a.threads)
    model = attnlab.load(a.model)
    tables = vhd_causal_tables(model, k=a.k, mode=a.mode, n_seeds=a.n_seeds, n_eval=a.n_eval, layer_matched=a.layer_matched)
    record = {}
    for label, by_metric in tables.items():
        for metric, t in by_metric.items():
            print(f"--- {label} / {metric} (k={a.k}, mode={a.mode}, {'layer-matched' if a.layer_matched else 'uniform'} random sets)")
            print(t[["condition", "metric", "ci_low", "ci_high", "drop", "p_value", "heads"]].to_string(index=False, max_colwidth=60))
            record[f"{label}/{metric}"] = t.to_dict(orient="records")
    if a.out:
        from attnlab.heads.io import write_json

        write_json(a.out, {"args": vars(a), "tables": record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
