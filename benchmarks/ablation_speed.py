"""All-heads exact ablation: attnlab's batched scorer (one ablated head per batch row, prefix reuse) vs a
per-head loop (one full forward per head), on the same model, prompts and metric, in one run.

    .venv/bin/python benchmarks/ablation_speed.py --model organism-lm --n-prompts 2 --length 160 --threads 1

Prints a JSON line: seconds of each, the speed-up, and the largest score difference (must be <= 1e-4).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-lm")
    parser.add_argument("--n-prompts", type=int, default=2)
    parser.add_argument("--length", type=int, default=160, help="NIAH prompt length in tokens")
    parser.add_argument("--mode", default="zero", choices=["zero", "mean", "uniform"])
    parser.add_argument("--max-batch", type=int, default=48, help="rows per batched forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import attnlab
    from attnlab.datasets.niah import build_niah_trials
    from attnlab.probes.ablation_metrics import AnswerTokens
    from attnlab.probes.ablation_scores import exact_ablation_grid, loop_ablation_grid

    model = attnlab.load(args.model, device=args.device, dtype=args.dtype)
    depths = np.linspace(10, 90, args.n_prompts).tolist()
    trials = build_niah_trials(model.tokenizer, (args.length,), depths, seed=args.seed)
    prompts = [t.prompt for t in trials]
    metric = AnswerTokens([" " + t.answer for t in trials])

    def timed(fn, **kw):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(model, prompts, metric, mode=args.mode, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    exact_ablation_grid(model, prompts, metric, mode=args.mode, layers=[0], max_batch=args.max_batch)  # warm-up
    (batched, _), t_batched = timed(exact_ablation_grid, max_batch=args.max_batch, prefix_reuse=True)
    (no_reuse, _), t_no_reuse = timed(exact_ablation_grid, max_batch=args.max_batch, prefix_reuse=False)
    (loop, _), t_loop = timed(loop_ablation_grid)
    diff = float(np.nanmax(np.abs(batched - loop)))
    report = {
        "model": model.name, "heads": model.n_layers * model.n_heads, "prompts": len(prompts), "tokens": int(model.encode(prompts).seq_len),
        "mode": args.mode, "device": args.device, "threads": args.threads, "max_batch": args.max_batch,
        "loop_s": round(t_loop, 3), "batched_prefix_reuse_s": round(t_batched, 3), "batched_no_reuse_s": round(t_no_reuse, 3),
        "speedup": round(t_loop / t_batched, 2), "max_abs_score_diff": diff, "max_abs_diff_no_reuse": float(np.nanmax(np.abs(no_reuse - loop))),
    }
    print(json.dumps(report))
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
