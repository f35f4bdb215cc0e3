"""Causal check of vision-aware heads on a shape-scene VLM: ablate the top-k VHD heads vs k random heads and score
image questions (issue 4: "ablating the top vision-aware heads hurts image questions more than random heads").

Detection and evaluation use disjoint seeds. Items mix the four question kinds of ``attnlab.datasets.shapes``
(existence in the POPE phrasing, attribute, count, position), each as ``USER: <image>\\n{q} ASSISTANT: {answer}``;
metrics are teacher-forced over the answer tokens: exact match (every answer token is the argmax) and summed
log-prob. Scoring goes through the shared ``attnlab.ablation.evaluators.ablation_evaluator`` (``HeadAblation``,
each prompt's pixel values kept in every sub-batch), which also serves ``attnlab ablate --metric shapes``. The
tables are ``attnlab.ablation.causal_test.vhd_causal_tables``'s.

    python scripts/vhd_causal.py --k 4 --mode zero --n-seeds 8

Measured on organism-vlm (2026-11-23, ``/work/notes/vision.md``): no VHD variant (spec, unfiltered, layer-
normalised, all text positions) beats random heads; single-head ablations show the heads that matter for these
questions are layer-0 heads, most of which have VHD = 0 at the last prompt token.
"""

from __future__ import annotations

import argparse

import torch

from attnlab.ablation.causal_test import vhd_causal_tables
from attnlab.heads.io import write_json
from attnlab.models.loading import load


def main(argv: list[str] | None = None) -> int:
    """Print (and with ``--out``, write as JSON) the VHD causal tables for one model, k and ablation mode."""
    p = argparse.ArgumentParser(prog="python scripts/vhd_causal.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism-vlm")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--mode", default="zero", choices=["zero", "mean"])
    p.add_argument("--n-seeds", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=96)
    p.add_argument("--layer-matched", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the tables")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load(a.model)
    tables = vhd_causal_tables(
        model, k=a.k, mode=a.mode, n_seeds=a.n_seeds, n_eval=a.n_eval, layer_matched=a.layer_matched
    )
    record = {}
    sets = "layer-matched" if a.layer_matched else "uniform"
    for label, by_metric in tables.items():
        for metric, t in by_metric.items():
            print(f"--- {label} / {metric} (k={a.k}, mode={a.mode}, {sets} random sets)")
            columns = ["condition", "metric", "ci_low", "ci_high", "drop", "p_value", "heads"]
            print(t[columns].to_string(index=False, max_colwidth=60))
            record[f"{label}/{metric}"] = t.to_dict(orient="records")
    if a.out:
        write_json(a.out, {"args": vars(a), "tables": record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
