"""The census computed both ways the fused path can: from a kept weights block per layer (which also gives the
layer's attention output) and from streamed rows (no block; the model's own SDPA call). Prints, per statistic, the
largest difference between the two grids and its size relative to the grid's scale -- a check of the block path on
a device the test suite does not run on (benchmarks/census_gpu.sh runs it on the GPU).

python benchmarks/census_paths_agree.py --shape tiny                                       # CPU, float32
python benchmarks/census_paths_agree.py --shape llama-1b --device cuda --dtype bfloat16    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from census_speed import random_workload, workload_arguments  # noqa: E402

from attnlab import lse  # noqa: E402
from attnlab.census import census  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap, n_prompts=16)
    args = ap.parse_args()
    tmp, model, prompts = random_workload(args)  # noqa: F841 (the checkpoint lives as long as tmp)
    kw = dict(statistics="sinks,headvis,patterns", batch_size=args.batch_size, progress=False, attention="fused")
    runs = {}
    for name, budget in (("kept block", 1 << 40), ("streamed rows", 0)):
        with mock.patch.multiple(lse, DENSE_BUDGET=budget, DENSE_BUDGET_CUDA=budget):
            runs[name] = census(model, prompts, **kw)
    a, b = runs["kept block"], runs["streamed rows"]
    out = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "prompts": [args.n_prompts, args.seq_len]}
    stats = {}
    for name in a.scores:
        x, y = a.scores[name].scores, b.scores[name].scores
        diff = float(np.nanmax(np.abs(x - y))) if np.isfinite(x).any() else float("nan")
        scale = float(np.nanmax(np.abs(y))) if np.isfinite(y).any() else float("nan")
        stats[name] = {"max_abs_diff": diff, "relative": diff / scale if scale else float("nan")}
    out["statistics"] = stats
    out["worst_relative"] = max((v["relative"] for v in stats.values() if np.isfinite(v["relative"])), default=0.0)
    if torch.cuda.is_available():
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
