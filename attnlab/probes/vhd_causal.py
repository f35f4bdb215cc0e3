"""Causal check of vision-aware heads on a shape-scene VLM: ablate the top-k VHD heads vs k random heads and score
image questions (issue 4: "ablating the top vision-aware heads hurts image questions more than random heads").

Detection and evaluation use disjoint seeds. Items mix the four question kinds of ``attnlab.datasets.shapes``
(existence in the POPE phrasing, attribute, count, position), each as ``USER: <image>\\n{q} ASSISTANT: {answer}``;
metrics are teacher-forced over the answer tokens: exact match (every answer token is the argmax) and summed
log-prob. Scoring goes through the shared ``causal_test.ablation_evaluator`` (``HeadAblation``, each prompt's
pixel values kept in every sub-batch), which also serves ``attnlab ablate --metric shapes``. The table is
``causal_test.causal_test``'s.

    python -m attnlab.probes.vhd_causal --k 4 --mode zero --n-seeds 8

Measured on organism-vlm (2026-11-23, ``/work/notes/vision.md``): no VHD variant (spec, unfiltered, layer-
normalised, all text positions) beats random heads; single-head ablations show the heads that matter for these
questions are layer-0 heads, most of which have VHD = 0 at the last prompt token.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from attnlab.datasets import SHAPE_TEMPLATE


def shape_question_items(n: int, seed: int) -> list:
    """About ``n`` (scene, question) pairs, a quarter of each kind (POPE-random existence, attribute, count,
    position)."""
    from attnlab.datasets.shapes import pope_questions, task_questions

    per = max(1, n // 4)
    exist = pope_questions("random", per // 6 + 2, seed)
    exist = [exist[i] for i in np.random.default_rng(seed).permutation(len(exist))[:per]]
    return exist + [x for kind in ("attribute", "count", "position") for x in task_questions(kind, per, seed)]


def image_question_evaluator(
    model, items: Sequence, *, mode: str = "zero", reference_items: Sequence | None = None, batch_size: int = 48
):
    """``evaluate(heads) -> {"accuracy": ..., "logprob": ...}``: teacher-forced answer metrics with ``heads`` ablated.

    The shared ablation path (``causal_test.ablation_evaluator``): each question ``USER: <image>\\n{q} ASSISTANT:``
    with its scene's image, the answer appended as ``AnswerTokens``; exact match and log-prob come from one
    forward. Mean mode fits one all-layer mean per head on ``reference_items`` (prompts without answers, with
    their images) and reuses it. Results are memoised by head set.
    """
    from attnlab.datasets.shapes import render_scene
    from attnlab.probes.ablation_metrics import AnswerTokens
    from attnlab.probes.causal_test import ablation_evaluator

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

    ``variants`` maps a label to ``VisionAwareHeads`` keyword arguments (default: the spec, no outlier filter,
    layer-normalised, all text positions).
    """
    import attnlab
    from attnlab.datasets.base import PromptSet
    from attnlab.datasets.shapes import render_scene
    from attnlab.probes.causal_test import causal_test
    from attnlab.probes.vision_aware_heads import VisionAwareHeads

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
        scores = attnlab.scan(model, VisionAwareHeads(**kw), ps, progress=False)["vhd"]
        out[label] = {
            m: causal_test(
                scores, k, lambda hs, m=m: evaluate(hs)[m], n_seeds=n_seeds, seed=0, layer_matched=layer_matched
            )
            for m in ("accuracy", "logprob")
        }
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
    tables = vhd_causal_tables(
        model, k=a.k, mode=a.mode, n_seeds=a.n_seeds, n_eval=a.n_eval, layer_matched=a.layer_matched
    )
    record = {}
    for label, by_metric in tables.items():
        for metric, t in by_metric.items():
            print(
                f"--- {label} / {metric} (k={a.k}, mode={a.mode}, "
                f"{'layer-matched' if a.layer_matched else 'uniform'} random sets)"
            )
            print(
                t[["condition", "metric", "ci_low", "ci_high", "drop", "p_value", "heads"]].to_string(
                    index=False, max_colwidth=60
                )
            )
            record[f"{label}/{metric}"] = t.to_dict(orient="records")
    if a.out:
        from attnlab.heads.io import write_json

        write_json(a.out, {"args": vars(a), "tables": record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
