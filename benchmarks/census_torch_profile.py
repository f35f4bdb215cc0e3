"""torch.profiler over one census pass (after a warm-up): the top operators by CPU and by device time.

python benchmarks/census_torch_profile.py --shape llama-1b --device cuda --dtype bfloat16 --n-prompts 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from census_speed import random_workload, workload_arguments  # noqa: E402

from attnlab.census import census  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_arguments(ap, n_prompts=32)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    tmp, model, prompts = random_workload(args)  # noqa: F841 (the checkpoint lives as long as tmp)
    kw = dict(statistics="sinks,headvis,patterns", batch_size=args.batch_size, progress=False)
    census(model, prompts, **kw)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, with_stack=False) as prof:
        census(model, prompts, **kw)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.device.startswith("cuda"):
        print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
