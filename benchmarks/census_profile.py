"""Where a census pass spends its time: each handler's seconds (synchronised), per capture site and probe.

python benchmarks/census_profile.py --shape llama-1b --device cuda --dtype bfloat16 --n-prompts 64
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from census_speed import random_workload, workload_arguments  # noqa: E402

from attnlab.capture import Capture  # noqa: E402
from attnlab.census import census  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_arguments(ap, n_prompts=64)
    args = ap.parse_args()
    tmp, model, prompts = random_workload(args)  # noqa: F841 (the checkpoint lives as long as tmp)
    spent = collections.Counter()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    original_on = Capture.on

    def timed_on(self, site, fn, **kw):
        owner = type(getattr(fn, "__self__", None)).__name__

        def wrapped(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[f"{owner}.{site}"] += time.perf_counter() - t
            return out

        return original_on(self, site, wrapped, **kw)

    census(model, prompts, statistics="sinks,headvis,patterns", batch_size=args.batch_size, progress=False)
    Capture.on = timed_on
    sync()
    t = time.perf_counter()
    census(model, prompts, statistics="sinks,headvis,patterns", batch_size=args.batch_size, progress=False)
    sync()
    total = time.perf_counter() - t
    print(json.dumps({"total_s": total, "handlers_s": dict(spent.most_common())}, indent=1))


if __name__ == "__main__":
    main()
