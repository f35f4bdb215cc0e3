"""Peak memory of a sinks scan at long context on a random-weight Llama-architecture model, against what caching
every layer's full attention pattern would take (issue #2). Each mode runs in a fresh process.

    python benchmarks/long_context_memory.py [--seq 4096] [--device cpu|cuda]

Modes: ``plain`` (bridge forward, no hooks), ``eager`` (the bridge builds each layer's pattern; the reducers see one
layer at a time), ``fused`` (SDPA forward; attention rows recomputed in chunks of ``--chunk`` queries).
On CPU the figure is the growth of the process's peak RSS over the forward; on CUDA it is
``torch.cuda.max_memory_allocated`` over the forward.
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


def build_model(path: Path, *, layers: int, d_model: int, heads: int, kv_heads: int, seq: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(4096)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="t1 $A", special_tokens=[("t1", 1)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t3", unk_token="t0"
    )
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq + 16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)


def measure(path: str, mode: str, seq: int, chunk: int, device: str) -> dict:
    import torch

    import attnlab
    from attnlab.capture import Capture
    from attnlab.probes.base import ProbeContext
    from attnlab.probes.registry import PROBES, expand

    model = attnlab.load(path, device=device)
    ids = [[1] + torch.randint(10, 4096, (seq - 1,), generator=torch.Generator().manual_seed(0)).tolist()]
    batch = model.batch_from_ids(ids, [0])
    with torch.inference_mode():
        model.forward(model.batch_from_ids([ids[0][:16]], [0]))  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "plain":
            model.forward(batch)
        else:
            cap = Capture(model, attention=mode, chunk_size=chunk, progress=False)
            ctx = ProbeContext(model=model)
            for name in expand("sinks"):
                PROBES[name]().attach(cap, ctx)
            cap.run_batch(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "seconds": round(time.perf_counter() - t0, 3), "peak_extra_bytes": int(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="plain,eager,fused")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(measure(args._worker[0], args._worker[1], args.seq, args.chunk, args.device)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_model(
            Path(tmp), layers=args.layers, d_model=args.d_model, heads=args.heads, kv_heads=args.kv_heads, seq=args.seq
        )
        one_layer = args.heads * args.seq * args.seq * 4
        rows = []
        for mode in args.modes.split(","):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--seq",
                    str(args.seq),
                    "--chunk",
                    str(args.chunk),
                    "--device",
                    args.device,
                    "--_worker",
                    tmp,
                    mode,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "long_context_memory",
        "device": args.device,
        "seq": args.seq,
        "chunk": args.chunk,
        "model": (
            f"Llama random weights, {args.layers} layers, d_model {args.d_model}, "
            f"{args.heads} heads / {args.kv_heads} KV heads"
        ),
        "one_layer_pattern_bytes": one_layer,
        "all_layers_pattern_bytes": one_layer * args.layers,
        "chunk_rows_bytes": args.heads * args.chunk * args.seq * 4,
        "runs": rows,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
