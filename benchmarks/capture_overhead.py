"""Capture overhead: a sinks scan (all three sink probes reducing in flight) vs a plain bridge forward of the
same batches. Goal (issue #2): at most 1.5x.

    python benchmarks/capture_overhead.py [--model minilm] [--n-prompts 16] [--batch-size 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import attnlab
from attnlab.capture import Capture
from attnlab.datasets import DATASETS
from attnlab.probes.base import ProbeContext
from attnlab.probes.registry import PROBES, expand


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--probes", default="sinks")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model = attnlab.load(args.model, device=args.device)
    prompts = DATASETS["prose"](model, args.n_prompts, 0)
    ids = [model.token_ids(t, truncate=True) for t in prompts.texts]
    batches = [
        model.batch_from_ids(ids[i : i + args.batch_size], list(range(i, min(len(ids), i + args.batch_size))))
        for i in range(0, len(ids), args.batch_size)
    ]

    def plain():
        with torch.inference_mode():
            for b in batches:
                model.forward(b)

    def scanned():
        cap = Capture(model, progress=False)
        ctx = ProbeContext(model=model)
        probes = [PROBES[n]() for n in expand(args.probes)]
        for p in probes:
            p.attach(cap, ctx)
        with torch.inference_mode():
            for b in batches:
                cap.run_batch(b)
        for p in probes:
            p.results(ctx)

    t_plain = time_it(plain, args.repeats)
    t_scan = time_it(scanned, args.repeats)
    tokens = sum(len(i) for i in ids)
    print(
        json.dumps(
            {
                "benchmark": "capture_overhead",
                "model": args.model,
                "probes": args.probes,
                "device": args.device,
                "prompts": len(ids),
                "tokens": tokens,
                "batch_size": args.batch_size,
                "plain_forward_s": round(t_plain, 4),
                "scan_s": round(t_scan, 4),
                "overhead_x": round(t_scan / t_plain, 3),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
