"""Census sweep on Ray vs in this process, measured side by side in one run (issue #14's CPU figure).

    python benchmarks/sweep_speed.py --shape small --n-models 2 --n-prompts 64 --workers 2

Two random-weight Llama checkpoints of one shape (seeds 0, 1; ``ablation_speed.SHAPES``), the same prompts, the
correlational statistics (``--statistics``). Variants, each into a fresh sweep directory:

- ``in_process_T``: ``attnlab.sweep`` without Ray (units one after another), torch on T threads for each T of
  ``--threads`` (on a shared 2-core host one thread can beat two: intra-op threads wait for each other);
- ``ray_cold``: a local Ray instance started by the sweep with ``--workers`` actors of one thread each: Ray's
  start-up, the actors' start-up (imports) and model loads included;
- ``ray_warm``: the same sweep again on a Ray session this script started, whose actors already hold the models
  (what a notebook's second sweep costs).

Prints one JSON object: wall seconds of each variant, ``ray.init`` seconds, the summed compute seconds of the
units (inside the workers), the speed-ups over the fastest in-process variant and the Ray overhead (cold - warm).
Every variant's census is checked equal to the in-process one. The machine's load average is recorded (other
jobs share it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ablation_speed import build_random_model  # noqa: E402


def unit_seconds(result) -> float:
    from attnlab.sweep import SweepDir

    log = SweepDir(result.directory).log()
    return round(sum(e["seconds"] or 0 for e in log), 3)


def same(a, b) -> float:
    """Largest difference between two censuses' grids (they must hold the same statistics)."""
    assert list(a.scores) == list(b.scores), (list(a.scores), list(b.scores))
    return max(float(np.nanmax(np.abs(a.scores[k].scores - b.scores[k].scores))) for k in a.scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--n-models", type=int, default=2)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--dataset", default="prose")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="torch threads of the in-process variants")
    args = ap.parse_args()

    import ray

    from attnlab.sweep import sweep

    tmp = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    models = [str(build_random_model(args.shape, tmp / f"{args.shape}-{s}", seed=s)) for s in range(args.n_models)]
    common = dict(
        dataset=args.dataset,
        n_prompts=args.n_prompts,
        statistics=args.statistics,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        progress=False,
    )
    out: dict = {
        "shape": args.shape,
        "n_models": args.n_models,
        "n_prompts": args.n_prompts,
        "statistics": args.statistics,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    threads_before = torch.get_num_threads()
    base = None
    for n in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(n)
        t = time.perf_counter()
        r = sweep(models, out=tmp / f"in_process_{n}", **common)
        out[f"in_process_{n}_s"] = round(time.perf_counter() - t, 2)
        out[f"in_process_{n}_unit_s"] = unit_seconds(r)
        if base is None:
            base = r
    torch.set_num_threads(threads_before)
    fastest = min(v for k, v in out.items() if k.startswith("in_process") and k.endswith("_s") and "unit" not in k)
    out["in_process_fastest_s"] = fastest

    t = time.perf_counter()
    cold = sweep(models, out=tmp / "ray_cold", workers=args.workers, threads_per_worker=1, **common)
    out["ray_cold_s"] = round(time.perf_counter() - t, 2)
    out["ray_cold_unit_s"] = unit_seconds(cold)

    t = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    out["ray_init_s"] = round(time.perf_counter() - t, 2)
    sweep(models, out=tmp / "ray_warmup", workers=args.workers, threads_per_worker=1, **common)  # actors load
    t = time.perf_counter()
    warm = sweep(models, out=tmp / "ray_warm", workers=args.workers, threads_per_worker=1, **common)
    out["ray_warm_s"] = round(time.perf_counter() - t, 2)
    out["ray_warm_unit_s"] = unit_seconds(warm)
    ray.shutdown()

    out["max_difference_vs_in_process"] = max(same(base[m], r[m]) for r in (cold, warm) for m in models)
    out["speedup_cold"] = round(fastest / out["ray_cold_s"], 2)
    out["speedup_warm"] = round(fastest / out["ray_warm_s"], 2)
    out["ray_overhead_s"] = round(out["ray_cold_s"] - out["ray_warm_s"], 2)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
