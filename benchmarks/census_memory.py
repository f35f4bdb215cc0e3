"""Peak memory of a census at long context against one plain SDPA forward of the same model (issue #13), each in a
fresh process: the growth of the process's peak RSS over the call (CPU) or ``torch.cuda.max_memory_allocated``
above the loaded weights (CUDA).

    python benchmarks/census_memory.py --shape llama-1b --seq 16384 --threads 2

``plain``: the Hugging Face model's own forward with SDPA attention and no KV cache, keeping the last position's
logits. ``census``: ``attnlab.census`` with the correlational statistics
(``--statistics``, default sinks, HeadVis's six and the pattern statistics), fused attention, one sequence.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def measure(path: str, mode: str, seq: int, device: str, statistics: str, threads: int) -> dict:
    import torch
    from census_speed import random_prompts

    import attnlab
    from attnlab.census import census
    from attnlab.fused import fused_attention

    if threads:
        torch.set_num_threads(threads)
    model = attnlab.load(path, device=device)
    prompts = random_prompts(model, 1, seq, 0)
    warm = random_prompts(model, 1, 32, 1)
    with torch.inference_mode():  # warm-up on a short prompt: kernels and allocator, not the long one's memory
        census(model, warm, statistics=statistics, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "plain":
            ids = torch.tensor(prompts.token_ids, device=device)
            with fused_attention(model, implementation="sdpa"):
                model.hf_model(ids, logits_to_keep=1, use_cache=False)
        else:
            census(model, prompts, statistics=statistics, batch_size=1, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "seconds": round(time.perf_counter() - t0, 2), "peak_extra_bytes": int(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    ap.add_argument("--modes", default="plain,census")
    ap.add_argument(
        "--layers",
        type=int,
        default=0,
        help="keep only this many layers (same width and per-layer memory)",
    )
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        r = measure(args._worker[0], args._worker[1], args.seq, args.device, args.statistics, args.threads)
        print(json.dumps(r))
        return
    import ablation_speed

    shape = args.shape
    if args.layers:  # inference keeps no activation across layers: the extra memory is one layer's, whatever the depth
        shape = f"{args.shape}-{args.layers}l"
        ablation_speed.SHAPES[shape] = (args.layers, *ablation_speed.SHAPES[args.shape][1:])
    with tempfile.TemporaryDirectory() as tmp:
        path = ablation_speed.build_random_model(shape, Path(tmp) / shape)
        rows = []
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--seq", str(args.seq), "--device", args.device]
            cmd += ["--threads", str(args.threads), "--statistics", args.statistics, "--_worker", str(path), mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    by = {r["mode"]: r for r in rows}
    report = {"benchmark": "census_memory", "shape": shape, "seq": args.seq, "device": args.device, "runs": rows}
    if "plain" in by and "census" in by:
        report["census_over_plain_memory"] = by["census"]["peak_extra_bytes"] / max(1, by["plain"]["peak_extra_bytes"])
        report["census_over_plain_time"] = by["census"]["seconds"] / max(by["plain"]["seconds"], 1e-3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
