"""How many operators a census batch runs, with the kept weights block and with streamed rows: a CPU proxy for the
GPU's kernel launches and host synchronisations, which bound the census there (BENCHMARKS.md, "Head census on the
GPU"). HeadVis's workload shape (16 sequences x 512 tokens, 32 query heads, 8 KV heads); the width is small (the
counts do not depend on it) so that it runs on a laptop CPU in a minute.

Counted (torch.profiler, one census pass after a warm-up): leaf ``aten::`` operators that do work (views,
reshapes and allocations left out) -- on a GPU each is a kernel launch -- and ``aten::_local_scalar_dense`` calls
(a tensor read on the host: on a GPU each waits for the device when the tensor is there). Reported per layer and
batch, and per batch apart from the layers, from 2- and 4-layer models run on 1 and 2 batches (what a census
does once, at its end, drops out).

python benchmarks/census_op_count.py            # --batch-size 16 --seq-len 512 (~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))

import ablation_speed  # noqa: E402
from ablation_speed import build_random_model  # noqa: E402
from census_speed import random_prompts, sdpa_forward  # noqa: E402

import attnlab  # noqa: E402
from attnlab import lse  # noqa: E402
from attnlab.census import census  # noqa: E402
from attnlab.probes.scan import prompt_batches  # noqa: E402

# metadata and allocation operators: no kernel of their own on a GPU
NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::select", "aten::slice", "aten::reshape",
    "aten::expand", "aten::transpose", "aten::t", "aten::permute", "aten::unsqueeze", "aten::squeeze",
    "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::unflatten", "aten::flatten", "aten::split", "aten::chunk",
    "aten::unbind", "aten::narrow", "aten::diagonal", "aten::_reshape_alias", "aten::result_type", "aten::to",
    "aten::_to_copy", "aten::contiguous", "aten::set_", "aten::is_nonzero", "aten::item",
}  # fmt: skip


def count(fn) -> dict:
    fn()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ops = syncs = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        if e.name == "aten::_local_scalar_dense":
            syncs += 1
        elif e.name not in NO_KERNEL and not any(c.name.startswith("aten::") for c in e.cpu_children):
            ops += 1
    return {"operators": ops, "host_reads": syncs}


def measure(layers: int, n_batches: int, batch_size: int, seq_len: int) -> dict:
    shape = f"headvis-narrow-{layers}"
    ablation_speed.SHAPES[shape] = (layers, 32, 8, 512, 1024, 4096, 500000.0, 8192)
    tmp = tempfile.TemporaryDirectory()
    model = attnlab.load(str(build_random_model(shape, Path(tmp.name) / "m")))
    prompts = random_prompts(model, n_batches * batch_size, seq_len, 0)
    kw = dict(statistics="sinks,headvis,patterns", batch_size=batch_size, progress=False, attention="fused")
    batches = [b.to(model.device) for b in prompt_batches(model, prompts, batch_size, False)]
    out = {"plain HF SDPA forward": count(lambda: sdpa_forward(model, batches, "cpu"))}
    for name, b in (("census, streamed rows", 0), ("census, kept block", lse.DENSE_BUDGET_CUDA)):
        # the GPU's path (its attention output: SDPA)
        with mock.patch.multiple(lse, DENSE_BUDGET=b, OUTPUT_FROM_BLOCK=frozenset()):
            out[name] = count(lambda: census(model, prompts, **kw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = {(l, n): measure(l, n, args.batch_size, args.seq_len) for l in (2, 4) for n in (1, 2)}
    out = {
        "shape": "32 heads / 8 KV, d_head 16; 2 and 4 layers, 1 and 2 batches",
        "batch": [args.batch_size, args.seq_len],
    }
    for name in c[2, 1]:  # separate what grows with layers x batches, with batches alone, and neither
        get = lambda l, n, k, name=name: c[l, n][name][k]  # noqa: E731
        row = {}
        for k in ("operators", "host_reads"):
            per_layer_batch = ((get(4, 2, k) - get(2, 2, k)) - (get(4, 1, k) - get(2, 1, k))) / 2
            per_batch = get(2, 2, k) - get(2, 1, k) - 2 * per_layer_batch
            row[k] = {"per layer and batch": per_layer_batch, "per batch (not per layer)": per_batch}
        out[name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
