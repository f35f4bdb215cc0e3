"""Where a census's time goes, side by side in one run: the HF model's plain SDPA forward, the bridge's forward
(no hooks), the capture engine's fused forward with no probe attached, and the census with each statistic alone;
then the host synchronisations of one census batch by source line (``torch.cuda.set_sync_debug_mode``) and a
torch.profiler table of one census pass.

    python benchmarks/census_breakdown.py --shape llama-8b --device cuda --dtype bfloat16 --n-prompts 64

Prints one JSON object (seconds per variant, median of ``--repeats``, variants interleaved; sync sites) and the
profiler tables on stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics as st
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import attnlab  # noqa: E402
from attnlab.capture import Capture  # noqa: E402
from attnlab.census import GROUPS, census  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512, help="random token sequences of this length (0: prose)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-rows", type=int, default=40)
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    args = ap.parse_args()
    from ablation_speed import build_random_model
    from census_speed import random_prompts, sdpa_forward, sync

    tmp = tempfile.TemporaryDirectory()
    path = args.model or str(build_random_model(args.shape, Path(tmp.name) / "m", device=args.device, dtype=args.dtype))
    model = attnlab.load(path, device=args.device, dtype=args.dtype)
    if args.seq_len:
        prompts = random_prompts(model, args.n_prompts, args.seq_len, 0)
    else:
        from attnlab.datasets import DATASETS

        prompts = DATASETS["prose"](model, args.n_prompts, 0)
    from attnlab.probes.scan import prompt_batches

    batches = [b.to(model.device) for b in prompt_batches(model, prompts, args.batch_size, False)]
    dev = args.device

    def timed(fn):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t

    def hf_plain():
        sdpa_forward(model, batches, dev)

    def bridge_plain():
        with torch.inference_mode():
            for b in batches:
                model.forward(b)

    def capture_only():
        cap = Capture(model, attention="fused", chunk_size=256, progress=False)
        with torch.inference_mode():
            for b in batches:
                cap.run_batch(b)

    def census_of(stats):
        return lambda: census(model, prompts, statistics=stats, batch_size=args.batch_size, progress=False)

    variants = {"hf_sdpa": hf_plain, "bridge_forward": bridge_plain, "capture_no_probe": capture_only}
    groups = [g for g in args.statistics.split(",") if g]
    for g in groups:
        for p in GROUPS.get(g, (g,)):
            variants[f"census:{p}"] = census_of(p)
    variants["census:" + args.statistics] = census_of(args.statistics)
    for name, fn in list(variants.items()):  # warm-up (kernels, allocator)
        try:
            fn()
        except Exception as e:  # a probe not installed on this branch
            print(f"{name}: warm-up failed, left out: {e}", file=sys.stderr)
            del variants[name]
    times: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            try:
                times[name].append(timed(fn))
            except Exception as e:
                print(f"{name} failed: {e}", file=sys.stderr)
    med = {k: st.median(v) for k, v in times.items()}
    out = {
        "model": args.model or args.shape,
        "device": dev,
        "dtype": args.dtype,
        "n_prompts": len(prompts),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seconds": med,
        "over_hf_sdpa": {k: v / med["hf_sdpa"] for k, v in med.items()},
    }
    if dev.startswith("cuda"):  # where the host waits for the device: one census of one batch
        one = random_prompts(model, args.batch_size, args.seq_len, 1)
        sites: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                census(model, one, statistics=args.statistics, batch_size=args.batch_size, progress=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
        out["sync_sites"] = dict(sites.most_common(40))
        out["sync_total"] = sum(sites.values())
    print(json.dumps(out, indent=1), flush=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        census_of(args.statistics)()
        sync(dev)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows), file=sys.stderr)
    if dev.startswith("cuda"):
        print(ka.table(sort_by="self_cuda_time_total", row_limit=args.profile_rows), file=sys.stderr)


if __name__ == "__main__":
    main()
