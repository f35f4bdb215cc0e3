"""Ray overhead per unit vs in-process on one GPU (issue #14's GPU figure), measured side by side in one run.

    # GPU (about 2 minutes on an H200): a random-weight Llama-3.2-1B-shaped model in bf16, nothing downloaded
    PYTHONPATH=.:/tmp/site python3 benchmarks/sweep_gpu.py --out "$OUT/sweep_gpu.json"
    # smoke check on the CPU with the tiny shape (float32, a few short prompts)
    .venv/bin/python benchmarks/sweep_gpu.py --device cpu --tiny --out /tmp/sweep_gpu_tiny.json

Ray may come from wheels installed into a folder on ``PYTHONPATH`` (``pip install --target DIR ray-*.whl`` and, where
the machine lacks them, its dependencies in the lock: click, filelock, jsonschema with attrs, referencing, rpds-py and
jsonschema-specifications, msgpack, packaging, protobuf, pyyaml, requests): the script puts that folder and the
repository on the ``PYTHONPATH`` that Ray's worker processes inherit.

One checkpoint (``ablation_speed.build_random_model``, ``--shape``), ``--n-prompts`` random-token sequences of
``--seq-len`` tokens (HeadVis's workload shape), the correlational statistics (``--statistics``; no causal unit), in
shards of ``--shard-size`` prompts: one ``model`` unit (tokenisation) and ``n_prompts / shard_size`` shard units per
sweep. Variants, each sweep into a fresh directory:

- ``in_process``: ``attnlab.sweep.sweep`` without Ray (units one after another in this process);
- ``ray_cold``: the first sweep on a Ray session this script starts (``ray.init``, timed apart): one actor starts,
  imports torch and TransformerLens, loads the model, then runs the units;
- ``ray_warm``: the same sweep again on that session, its actor holding the model (``--repeats`` times,
  alternating with ``in_process``);
- ``ray_warm_2``: two actors sharing the GPU (half a GPU each: ``gpu_share`` of a 2.5 GB checkpoint), after one
  sweep that starts the second actor (skipped with ``--no-two-workers`` or when less than 50 s of
  ``--budget-s`` are left).

Per unit, from each sweep's log (the driver's write times): ``steady_per_unit_s`` is the time from the first unit
written to the last over the units in between (no start-up, no model load, no final merge); ``overhead_ms`` (in
this process or one actor: units one after another) the median over those units of (time since the previous unit
was written - the unit's compute seconds inside its worker): the driver's and Ray's cost per unit (scheduling,
moving the reduced state back, writing the unit files).
Writes one JSON object to ``--out`` (and prints it): those figures per variant, medians over the repeats, the
ratios Ray warm / in-process, Ray's start-up (``ray.init``, cold - warm), and the largest difference between the
in-process census and the Ray ones (same GPU, same kernels: expected 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ablation_speed import build_random_model  # noqa: E402


def random_prompts(n: int, seq_len: int, seed: int):
    """``n`` sequences of ``seq_len`` random token ids below 4,096 (organism-lm's tokenizer), BOS first."""
    from attnlab.datasets.base import PromptSet
    from attnlab.models.training.lm import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(len(tok), 4096), (n, seq_len), generator=g)
    if tok.bos_token_id is not None:
        ids[:, 0] = tok.bos_token_id
    return PromptSet(name=f"random(n={n},len={seq_len})", token_ids=ids.tolist(), seed=seed)


def per_unit(result, sequential: bool = True) -> dict:
    """Steady per-unit wall time and (units one after another: in-process, one actor) the per-unit overhead, from
    the sweep's log (one line per unit written)."""
    from attnlab.sweep import SweepDir

    log = sorted(SweepDir(result.directory).log(), key=lambda e: e["written"])
    n = len(log)
    gaps = [log[i]["written"] - log[i - 1]["written"] for i in range(1, n)]
    overheads = [g - (log[i]["seconds"] or 0.0) for i, g in zip(range(1, n), gaps)]
    return {
        "units": n,
        "steady_per_unit_s": round((log[-1]["written"] - log[0]["written"]) / max(1, n - 1), 4),
        "unit_compute_s": round(statistics.median(e["seconds"] or 0.0 for e in log[1:] or log), 4),
        "overhead_ms": round(1e3 * statistics.median(overheads), 2) if overheads and sequential else None,
    }


def largest_difference(a, b) -> float:
    """Largest |difference| between two censuses' head grids (the same statistics in both)."""
    assert list(a.scores) == list(b.scores), (list(a.scores), list(b.scores))
    diffs = [np.abs(np.asarray(a.scores[k].scores, float) - np.asarray(b.scores[k].scores, float)) for k in a.scores]
    return float(max((np.nanmax(d) if np.isfinite(d).any() else 0.0) for d in diffs))


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write the figures to")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke check: tiny shape, float32, 16 prompts of 64 tokens")
    ap.add_argument("--shape", default="llama-1b", help="ablation_speed.SHAPES name")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n-prompts", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in-process and per actor (0: 4, 1 on CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-two-workers", action="store_true")
    ap.add_argument("--budget-s", type=float, default=170.0)
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.dtype, args.n_prompts, args.seq_len, args.batch_size, args.shard_size = (
            "tiny",
            "float32",
            16,
            64,
            4,
            4,
        )
    out_path = Path(args.out).resolve()
    t_start = time.perf_counter()
    out: dict = {"figure": "Ray overhead per unit vs in-process, one device", "args": vars(args)}
    try:
        import ray
    except ImportError as e:
        out["error"] = f"Ray is not importable ({e}): put its wheels on PYTHONPATH or pip install 'attnlab[ray]'"
        write_json(out_path, out)
        print(out["error"], file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out["error"] = "--device cuda but torch sees no GPU (use --device cpu --tiny for the smoke check)"
        write_json(out_path, out)
        print(out["error"], file=sys.stderr)
        return 2
    # Ray's worker processes inherit this environment: they must find attnlab, ray and its dependencies
    ray_site = str(Path(ray.__file__).resolve().parent.parent)
    paths = [str(REPO), ray_site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import attnlab
    from attnlab.sweep import release_workers, sweep

    cuda = args.device.startswith("cuda")
    threads = args.threads or (4 if cuda else 1)
    torch.set_num_threads(threads)
    out["env"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "attnlab": attnlab.__version__,
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="sweep-gpu-"))
    t = time.perf_counter()
    model = str(build_random_model(args.shape, tmp / args.shape, device=args.device, dtype=args.dtype))
    out["build_model_s"] = round(time.perf_counter() - t, 2)
    if cuda:
        torch.cuda.empty_cache()
    prompts = random_prompts(args.n_prompts, args.seq_len, seed=0)
    common = dict(
        statistics=args.statistics,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        dtype=args.dtype,
        progress=False,
    )
    ray_kw = dict(threads_per_worker=threads, **common)
    n_sweep = 0

    def run(label: str, **kw):
        nonlocal n_sweep
        n_sweep += 1
        t = time.perf_counter()
        r = sweep([model], prompts, out=tmp / f"{n_sweep:02d}-{label}", **kw)
        wall = time.perf_counter() - t
        print(f"{label}: {wall:.2f} s ({time.perf_counter() - t_start:.0f} s in)", file=sys.stderr, flush=True)
        return r, {"wall_s": round(wall, 3), **per_unit(r, sequential=kw.get("workers", 1) == 1)}

    # CUDA context, kernels and the first-call costs, in this process (not timed)
    warm_prompts = type(prompts)(name="warm-up", token_ids=prompts.token_ids[: 2 * args.batch_size], seed=0)
    sweep([model], warm_prompts, out=tmp / "00-warm-up", **common)

    t = time.perf_counter()
    ray.init(
        num_cpus=max(2 * threads, os.cpu_count() or 1),
        num_gpus=torch.cuda.device_count() if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    out["ray_init_s"] = round(time.perf_counter() - t, 2)
    try:
        _, out["ray_cold"] = run("ray_cold", workers=1, **ray_kw)
        runs: dict[str, list] = {"in_process": [], "ray_warm": []}
        results = {}
        for _ in range(max(1, args.repeats)):
            results["in_process"], fig = run("in_process", **common)
            runs["in_process"].append(fig)
            results["ray_warm"], fig = run("ray_warm", workers=1, **ray_kw)
            runs["ray_warm"].append(fig)
        if args.no_two_workers or time.perf_counter() - t_start > args.budget_s - 50:
            out["ray_warm_2"] = "skipped"
        else:
            run("ray_warm_2_start", workers=2, **ray_kw)  # the second actor starts and loads the model
            results["ray_warm_2"], out["ray_warm_2"] = run("ray_warm_2", workers=2, **ray_kw)
        for k, figs in runs.items():
            out[k] = {f: round(statistics.median(x[f] for x in figs), 4) for f in figs[0] if figs[0][f] is not None}
            out[k]["repeats"] = figs
        ip, rw = out["in_process"], out["ray_warm"]
        out["ray_warm_over_in_process_per_unit"] = round(rw["steady_per_unit_s"] / ip["steady_per_unit_s"], 3)
        out["ray_overhead_per_unit_ms"] = round(
            1e3 * (rw["steady_per_unit_s"] - ip["steady_per_unit_s"]), 2
        )  # the extra wall per unit on Ray
        out["ray_startup_s"] = round(out["ray_cold"]["wall_s"] - rw["wall_s"], 2)  # actor start-up + model load
        out["max_difference_vs_in_process"] = max(
            largest_difference(results["in_process"][model], r[model]) for k, r in results.items() if k != "in_process"
        )
    finally:
        release_workers()
        ray.shutdown()
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    write_json(out_path, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("args",)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
