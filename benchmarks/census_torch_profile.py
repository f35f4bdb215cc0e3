"""torch.profiler over one census pass (after a warm-up): the top operators by CPU and by device time.

python benchmarks/census_torch_profile.py --shape llama-1b --device cuda --dtype bfloat16 --n-prompts 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import attnlab  # noqa: E402
from attnlab.census import census  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    from ablation_speed import build_random_model
    from census_speed import random_prompts

    tmp = tempfile.TemporaryDirectory()
    path = build_random_model(args.shape, Path(tmp.name) / "m", device=args.device, dtype=args.dtype)
    model = attnlab.load(str(path), device=args.device, dtype=args.dtype)
    prompts = random_prompts(model, args.n_prompts, args.seq_len, 0)
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
