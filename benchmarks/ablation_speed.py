"""All-heads exact ablation: attnlab's batched scorer (one ablated head per batch row, prefix reuse, the ablated
layer's clean attention reused, fused SDPA, metric positions only) vs a per-head loop (one full hooked bridge
forward per head), same model, prompts and metric, in one run. ``previous`` is the default path before the
clean-attention reuse (``reuse_attention=False``).

    # CPU figure (bundled organism)
    .venv/bin/python benchmarks/ablation_speed.py --model organism-lm --n-prompts 2 --length 160 --threads 1 --repeats 3
    # GPU figure: random-weight Llama-3.2-1B-shaped model (16 layers x 32 heads, 8 KV heads, d_model 2048), no download
    PYTHONPATH=. python benchmarks/ablation_speed.py --shape llama-1b --device cuda --dtype bfloat16 --length 256 \
        --n-prompts 1 --max-batch 64
    # smoke check of the shape path on CPU
    .venv/bin/python benchmarks/ablation_speed.py --shape tiny --length 128 --threads 1

Prints one JSON line: median wall seconds over ``--repeats`` (variants interleaved within each repeat) (and, on CPU,
process CPU seconds, which other processes on a shared machine disturb less) of each variant, the speed-ups (median
of per-repeat ratios), and the largest score difference between the batched scorer and the loop (exit status 1 if
above 1e-4).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    # name: (layers, heads, kv heads, d_model, d_ff, vocab, rope theta, context)
    "tiny": (2, 4, 2, 64, 128, 4096, 10000.0, 65536),
    "small": (8, 12, 6, 384, 1536, 4096, 10000.0, 65536),  # organism-lm's shape with a long context
    "llama-1b": (16, 32, 8, 2048, 8192, 128256, 500000.0, 131072),  # Llama-3.2-1B's shape
    "llama-8b": (32, 32, 8, 4096, 14336, 128256, 500000.0, 131072),  # Llama-3.1-8B's shape (embeddings tied)
}


def build_random_model(shape: str, path: Path, *, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> Path:
    """Save a random-weight ``LlamaForCausalLM`` of a named shape (organism-lm's BPE tokenizer) into ``path``.

    Built from a ``transformers`` config (nothing downloaded); initialised on ``device`` so the 1B shape takes
    seconds on a GPU. Token ids stay below the tokenizer's 4,096, the embedding has the shape's full vocabulary.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.models.lm import TOKENIZER_DIR, load_tokenizer

    layers, heads, kv, d_model, d_ff, vocab, theta, ctx = SHAPES[shape]
    tok = load_tokenizer(TOKENIZER_DIR)
    cfg = LlamaConfig(
        vocab_size=max(vocab, len(tok)),
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=ctx,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    del model
    return path


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(result, wall seconds, process CPU seconds) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-lm", help="any attnlab.load name (ignored with --shape)")
    parser.add_argument(
        "--shape", choices=tuple(SHAPES), default=None, help="random-weight Llama of this shape instead of --model"
    )
    parser.add_argument("--n-prompts", type=int, default=2)
    parser.add_argument("--length", type=int, default=160, help="NIAH prompt length in tokens")
    parser.add_argument("--mode", default="zero", choices=["zero", "mean", "uniform"])
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="rows per batched forward (default: 8 on CPU, where bigger batches gain nothing, 64 otherwise)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of every variant (median reported)")
    parser.add_argument(
        "--variants",
        default="batched,previous,eager,no_reuse,loop",
        help=(
            "comma list of: batched (default path), previous (default before clean-attention reuse), eager, no_reuse, "
            "loop"
        ),
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.max_batch is None:
        args.max_batch = 8 if args.device == "cpu" else 64

    import attnlab
    from attnlab.ablation.metrics import AnswerTokens
    from attnlab.ablation.scores import exact_ablation_grid, loop_ablation_grid
    from attnlab.datasets.niah import build_niah_trials

    tmp = None
    name = args.model
    if args.shape:
        tmp = Path(tempfile.mkdtemp(prefix=f"attnlab_{args.shape}_"))
        t0 = time.perf_counter()
        name = str(build_random_model(args.shape, tmp, device=args.device, dtype=args.dtype, seed=args.seed))
        print(f"built random {args.shape} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        model = attnlab.load(name, device=args.device, dtype=args.dtype)
        depths = np.linspace(10, 90, args.n_prompts).tolist()
        trials = build_niah_trials(model.tokenizer, (args.length,), depths, seed=args.seed)
        prompts = [t.prompt for t in trials]
        metric = AnswerTokens([" " + t.answer for t in trials])
        variants = {
            "batched": lambda: exact_ablation_grid(model, prompts, metric, mode=args.mode, max_batch=args.max_batch),
            "previous": lambda: exact_ablation_grid(
                model, prompts, metric, mode=args.mode, max_batch=args.max_batch, reuse_attention=False
            ),
            "eager": lambda: exact_ablation_grid(
                model,
                prompts,
                metric,
                mode=args.mode,
                max_batch=args.max_batch,
                attention="eager",
                read_positions=False,
            ),
            "no_reuse": lambda: exact_ablation_grid(
                model,
                prompts,
                metric,
                mode=args.mode,
                max_batch=args.max_batch,
                prefix_reuse=False,
                attention="eager",
                read_positions=False,
            ),
            "loop": lambda: loop_ablation_grid(model, prompts, metric, mode=args.mode),
        }
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        exact_ablation_grid(
            model, prompts, metric, mode=args.mode, layers=[model.n_layers - 1], max_batch=args.max_batch
        )  # warm-up
        results, report = (
            {},
            {
                "model": args.shape or model.name,
                "heads": model.n_layers * model.n_heads,
                "prompts": len(prompts),
                "tokens": int(metric.encode(model, prompts).seq_len),
                "mode": args.mode,
                "device": args.device,
                "dtype": args.dtype,
                "threads": args.threads,
                "max_batch": args.max_batch,
                "repeats": args.repeats,
            },
        )
        walls = {v: [] for v in chosen}
        cpus = {v: [] for v in chosen}
        for _ in range(args.repeats):  # variants interleaved, so load from other processes hits them alike
            for v in chosen:
                (grid, _), wall, cpu = timed(variants[v], args.device)
                results[v] = grid
                walls[v].append(wall)
                cpus[v].append(cpu)
        for v in chosen:
            report[f"{v}_s"] = round(float(np.median(walls[v])), 3)
            if args.device == "cpu":
                report[f"{v}_cpu_s"] = round(float(np.median(cpus[v])), 3)
        if "loop" in results:
            for v in results:
                if v != "loop":  # median over repeats of the per-repeat ratio
                    report[f"speedup_{v}"] = round(float(np.median(np.divide(walls["loop"], walls[v]))), 2)
                    if args.device == "cpu":
                        report[f"speedup_{v}_cpu"] = round(float(np.median(np.divide(cpus["loop"], cpus[v]))), 2)
                    report[f"max_abs_diff_{v}"] = float(np.nanmax(np.abs(results[v] - results["loop"])))
        print(json.dumps(report))
        diffs = [report[k] for k in report if k.startswith("max_abs_diff_")]
        return 0 if all(d <= 1e-4 for d in diffs) else 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
