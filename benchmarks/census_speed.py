"""Census speed, measured side by side in one run: the census's correlational pass vs the sum of the separate
scans of the same probes vs one plain forward of the Hugging Face model itself with its fastest attention.

    python benchmarks/census_speed.py --model organism-lm --n-prompts 64 --threads 2
    python benchmarks/census_speed.py --model minilm --n-prompts 64 --threads 2
    python benchmarks/census_speed.py --shape llama-1b --device cuda --dtype bfloat16 --seq-len 512 \
        --n-prompts 256 --batch-size 16 --ablation-prompts 16     # GPU workload of HeadVis's shape

Prints one JSON object: seconds of each variant (median of ``--repeats``, variants interleaved in each repeat),
the ratios to the plain forward, sequences per second, and (``--ablation-prompts``) the all-heads exact ablation's
time, with a projection to ``--project`` sequences (HeadVis runs 16,384 sequences of 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import attnlab  # noqa: E402
from attnlab.census import census  # noqa: E402
from attnlab.datasets import DATASETS  # noqa: E402
from attnlab.datasets.base import PromptSet  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_forward(hf, batches, device: str) -> float:
    """Seconds of one forward of every batch through the HF model (no hooks, its fastest attention)."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            kw = {"attention_mask": b.attention_mask}
            if "logits_to_keep" in hf.forward.__code__.co_varnames:
                kw["logits_to_keep"] = 1  # what a census needs of the logits: nothing (generate's prefill keeps 1)
            hf(b.input_ids, **kw)
    sync(device)
    return time.perf_counter() - t


def sdpa_forward(model, batches, device: str) -> float:
    """``plain_forward`` of the HF model with its own fastest attention, SDPA (the bridge loads it eager)."""
    from attnlab.fused import fused_attention

    with fused_attention(model, implementation="sdpa"):
        return plain_forward(model.hf_model, batches, device)


def random_prompts(model, n: int, seq_len: int, seed: int) -> PromptSet:
    """``n`` sequences of ``seq_len`` random token ids (BOS first), HeadVis's workload shape."""
    g = torch.Generator().manual_seed(seed)
    hi = min(model.tokenizer.vocab_size, 4096)
    ids = torch.randint(5, hi, (n, seq_len), generator=g)
    bos = model.tokenizer.bos_token_id
    if bos is not None:
        ids[:, 0] = bos
    return PromptSet(name=f"random(n={n},len={seq_len})", token_ids=ids.tolist(), seed=seed)


def workload_arguments(ap: argparse.ArgumentParser, *, n_prompts: int = 64, batch_size: int = 16) -> None:
    """The arguments of a random-Llama census workload (``random_workload``)."""
    ap.add_argument("--shape", default="tiny", help="ablation_speed.SHAPES name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=n_prompts)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=batch_size)


def random_workload(args) -> tuple[tempfile.TemporaryDirectory, object, PromptSet]:
    """(the checkpoint's temporary directory, the model, the prompts): a random Llama of ``args.shape`` built on
    ``args.device`` in ``args.dtype``, and ``args.n_prompts`` random sequences of ``args.seq_len`` tokens."""
    from ablation_speed import build_random_model

    tmp = tempfile.TemporaryDirectory()
    path = build_random_model(args.shape, Path(tmp.name) / "m", device=args.device, dtype=args.dtype)
    model = attnlab.load(str(path), device=args.device, dtype=args.dtype)
    return tmp, model, random_prompts(model, args.n_prompts, args.seq_len, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="bundled alias or checkpoint directory")
    ap.add_argument("--shape", help="build a random Llama of this shape instead (see ablation_speed.SHAPES)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=0, help="random token sequences of this length (0: prose)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--separate", action="store_true", help="also time the separate scans (sum)")
    ap.add_argument("--ablation-prompts", type=int, default=0, help="also time the all-heads exact ablation")
    ap.add_argument("--project", type=int, default=16384)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    path = args.model
    if args.shape:
        from ablation_speed import build_random_model

        tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        path = str(build_random_model(args.shape, Path(tmp.name) / args.shape, device=args.device, dtype=args.dtype))
        print(f"built {args.shape} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    model = attnlab.load(path, device=args.device, dtype=args.dtype)
    if args.seq_len:
        prompts = random_prompts(model, args.n_prompts, args.seq_len, 0)
    else:
        prompts = DATASETS["prose"](model, args.n_prompts, 0)
    from attnlab.probes.scan import prompt_batches

    batches = [b.to(model.device) for b in prompt_batches(model, prompts, args.batch_size, False)]
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)

    def run_census():
        sync(args.device)
        t = time.perf_counter()
        c = census(
            model,
            prompts,
            statistics=args.statistics,
            batch_size=args.batch_size,
            attention=args.attention,
            progress=False,
        )
        sync(args.device)
        return time.perf_counter() - t, c

    def run_plain():
        return sdpa_forward(model, batches, args.device)

    times: dict[str, list[float]] = {"plain_forward": [], "census": [], "separate_scans": []}
    probes = None
    run_plain()  # warm-up
    for _ in range(args.repeats):
        times["plain_forward"].append(run_plain())
        dt, c = run_census()
        times["census"].append(dt)
        probes = [p["name"] for p in c.info["probes"]]
        if args.separate:
            t = 0.0
            for p in probes:
                sync(args.device)
                t0 = time.perf_counter()
                attnlab.scan(model, p, prompts, batch_size=args.batch_size, attention=args.attention, progress=False)
                sync(args.device)
                t += time.perf_counter() - t0
            times["separate_scans"].append(t)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    out = {
        "model": model.name if not args.shape else args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "n_prompts": len(prompts),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "attention_path": c.info.get("attention_path"),
        "probes": probes,
        "seconds": med,
        "census_over_plain": med["census"] / med["plain_forward"],
        "sequences_per_second": {k: len(prompts) / v for k, v in med.items()},
        "threads": torch.get_num_threads(),
    }
    if "separate_scans" in med:
        out["separate_over_plain"] = med["separate_scans"] / med["plain_forward"]
        out["separate_over_census"] = med["separate_scans"] / med["census"]
    if args.ablation_prompts:
        from attnlab.ablation.metrics import NextTokenLogprob
        from attnlab.ablation.scores import ablation_scores

        ids = (prompts.token_ids or [model.token_ids(t) for t in prompts.texts])[: args.ablation_prompts]
        sync(args.device)
        t = time.perf_counter()
        ablation_scores(model, ids, NextTokenLogprob(), max_batch=max(64, len(ids)))
        sync(args.device)
        out["ablation_seconds"] = time.perf_counter() - t
        out["ablation_prompts"] = len(ids)
        per_seq = med["census"] / len(prompts)
        out["projected_census_seconds"] = {
            "sequences": args.project,
            "correlational": per_seq * args.project,
            "with_ablation": per_seq * args.project + out["ablation_seconds"],
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
