"""Memory traffic and arithmetic of one census layer of the 8B (or 1B) shape, counted on the CPU: a device-free
estimate of what the census costs on a GPU relative to a plain forward (BENCHMARKS.md, "Head census on the GPU").

Once no operator waits for the host (``census_op_count.py`` finds none inside a layer's work), a GPU runs each
operator in about ``max(bytes moved / bandwidth, flops / matmul throughput, launch floor)``. Those two quantities
do not depend on the device, so they can be counted here exactly, on the real Llama-3.1-8B (``--shape llama-1b``:
Llama-3.2-1B) layer shape in bfloat16 (16 sequences x 512 tokens, the GPU's path: the weights block kept, the
attention output from the model's SDPA call), with a ``TorchDispatchMode`` that sees every operator the census and
a plain Hugging Face SDPA forward dispatch:
bytes = the sizes of the tensors an operator reads and writes (views free; gathers and scatters count the entries
they move, not the whole source), flops = PyTorch's own ``flop_counter`` formulas (matrix products and attention
kernels; causal flash attention counted at half its square). Per layer and batch = (2-layer model) - (1-layer).

The time model is an estimate, not a measurement: H200 figures (4.8 TB/s, 989 bf16 TFLOP/s dense) at stated
efficiencies (``--bandwidth-efficiency``, ``--flops-efficiency``) and a floor per kernel (``--launch-us``). It is
checked against the one measured figure it can be: the plain forward's sequences/s on the lent H200 (61 for the
8B shape, 302 for the 1B).

python benchmarks/census_traffic.py          # ~1 minute on 2 cores (bf16 on the CPU's matrix units)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))

import ablation_speed  # noqa: E402
from ablation_speed import build_random_model  # noqa: E402
from census_speed import random_prompts, sdpa_forward  # noqa: E402

import attnlab  # noqa: E402
from attnlab import lse  # noqa: E402
from attnlab.census import census  # noqa: E402
from attnlab.probes.scan import prompt_batches  # noqa: E402

aten = torch.ops.aten
GATHERS = {aten.index.Tensor, aten.gather.default, aten.index_select.default, aten.take_along_dim.default}
SCATTERS = {aten.index_put_.default, aten.index_put.default, aten.scatter_add_.default, aten.scatter_add.default,
            aten.index_add_.default, aten.scatter_.src, aten.scatter_.value}  # fmt: skip
NO_WORK = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.lift_fresh.default,
           aten.detach.default, aten.alias.default, aten.set_.source_Storage_storage_offset}  # fmt: skip


def _einsum_flops(args, out) -> int:
    equation, operands = args[0], args[1]
    sizes = {}
    for letters, t in zip(equation.split("->")[0].split(","), operands, strict=False):
        sizes.update(zip(letters.strip(), t.shape, strict=False))
    n = 1
    for v in sizes.values():
        n *= v
    return 2 * n * (len(operands) - 1)


def _attention_flops(causal_arg: int):
    """Two ``T x T x d`` products per head; a causal call skips the masked half (flash attention does)."""

    def flops(args, out) -> int:
        q, k = args[0], args[1]
        causal = len(args) > causal_arg and bool(args[causal_arg])
        return 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] // (2 if causal else 1)

    return flops


COMPOSITE_PRODUCTS = {  # flops of products that reach the mode undecomposed (CPU kernels of their own)
    aten.linear: lambda args, out: 2 * out.numel() * args[0].shape[-1],
    aten.matmul: lambda args, out: 2 * out.numel() * args[0].shape[-1],
    aten.einsum: _einsum_flops,
    aten.scaled_dot_product_attention: _attention_flops(5),  # (q, k, v, mask, dropout, is_causal)
}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # (q, k, v, dropout, is_causal)
    COMPOSITE_PRODUCTS[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops(4)
# BENCHMARKS.md, "Head census on the GPU": the HF model's SDPA forward, H200, bf16, 16 x 512 tokens, 2026-12-04
MEASURED_PLAIN_SEQ_PER_S = {"llama-8b": 61.0, "llama-1b": 302.0}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic(TorchDispatchMode):
    """Every operator dispatched inside the mode: its name, bytes read and written, flops, and whether it read
    a host value (``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self.host_reads += 1
            return out
        if func in NO_WORK:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.is_view and {_storage(t) for t in outs} <= {_storage(i) for i in ins}:
            return out  # a view (``to``, ``reshape``, ``contiguous`` may alias or copy: a copy counts)
        if func in GATHERS:  # the entries fetched (written out and read), plus the indices
            moved = 2 * sum(map(_nbytes, outs)) + sum(_nbytes(t) for t in ins[1:] if t.dtype == torch.long)
        elif func in SCATTERS:  # the values written (read and written), plus the indices (read)
            moved = sum(_nbytes(t) * (1 if t.dtype == torch.long else 2) for t in ins[1:])
        else:
            out_ptrs = {(t.data_ptr(), t.shape) for t in outs}
            inplace = func._schema.name.endswith("_")  # an in-place operator reads its output too
            moved = sum(_nbytes(t) for t in ins if inplace or (t.data_ptr(), t.shape) not in out_ptrs)
            moved += sum(map(_nbytes, outs))
        flops = 0
        if func.overloadpacket in COMPOSITE_PRODUCTS:  # matrix products the mode sees whole
            flops = COMPOSITE_PRODUCTS[func.overloadpacket](args, outs[0])
        elif func.overloadpacket in flop_registry:
            flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        self.ops.append((func.overloadpacket.__name__, moved, flops))
        return out


def record(fn) -> Traffic:
    fn()  # warm-up: what a census remembers across batches is made here
    with Traffic() as t:
        fn()
    return t


def measure(base: str, layers: int, batch_size: int, seq_len: int, statistics: str) -> dict[str, Traffic]:
    _, heads, kv, d_model, d_ff, _, theta, _ = ablation_speed.SHAPES[base]
    shape = f"{base}-{layers}"  # the shape's layers, a small vocabulary (the logits are not what is compared)
    ablation_speed.SHAPES[shape] = (layers, heads, kv, d_model, d_ff, 8192, theta, 8192)
    tmp = tempfile.TemporaryDirectory()
    model = attnlab.load(str(build_random_model(shape, Path(tmp.name) / "m", dtype="bfloat16")), dtype="bfloat16")
    prompts = random_prompts(model, batch_size, seq_len, 0)
    batches = [b.to(model.device) for b in prompt_batches(model, prompts, batch_size, False)]
    kw = dict(statistics=statistics, batch_size=batch_size, progress=False, attention="fused")
    # the GPU's path: the whole block kept, the attention output from the model's SDPA call (``create``: a library
    # from before OUTPUT_FROM_BLOCK, measured for comparison, has no such setting)
    with mock.patch.multiple(lse, DENSE_BUDGET=lse.DENSE_BUDGET_CUDA, OUTPUT_FROM_BLOCK=frozenset(), create=True):
        return {
            "plain HF SDPA forward": record(lambda: sdpa_forward(model, batches, "cpu")),
            "census": record(lambda: census(model, prompts, **kw)),
        }


def per_op(t: Traffic) -> dict[str, list[float]]:
    """op name -> [calls, bytes, flops]."""
    acc = collections.defaultdict(lambda: [0, 0, 0])
    for name, b, f in t.ops:
        a = acc[name]
        a[0], a[1], a[2] = a[0] + 1, a[1] + b, a[2] + f
    return acc


def seconds(ops, bandwidth: float, flops: float, floor: float) -> float:
    return sum(max(b / bandwidth, f / flops, floor) for _, b, f in ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=tuple(MEASURED_PLAIN_SEQ_PER_S), default="llama-8b")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--statistics", default="sinks,headvis,patterns")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth-efficiency", type=float, default=0.8, help="share of the H200's 4.8 TB/s")
    ap.add_argument("--flops-efficiency", type=float, default=0.7, help="share of its 989 bf16 TFLOP/s")
    ap.add_argument("--launch-us", type=float, default=4.0, help="least device time of one kernel")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw, fl, floor = 4.8e12 * args.bandwidth_efficiency, 989e12 * args.flops_efficiency, args.launch_us * 1e-6
    one, two = (
        measure(args.shape, 1, args.batch_size, args.seq_len, args.statistics),
        measure(args.shape, 2, args.batch_size, args.seq_len, args.statistics),
    )
    out = {"shape": f"{args.shape}: {ablation_speed.SHAPES[args.shape][:5]} (layers, heads, KV, width, MLP), bf16",
           "batch": [args.batch_size, args.seq_len],
           "model": {"bandwidth TB/s": bw / 1e12, "TFLOP/s": fl / 1e12, "launch floor us": args.launch_us}}  # fmt: skip
    layer_s = {}
    for name in one:
        a, b = per_op(one[name]), per_op(two[name])
        diff = {k: [b[k][i] - a.get(k, [0, 0, 0])[i] for i in range(3)] for k in b}
        layer_s[name] = seconds(two[name].ops, bw, fl, floor) - seconds(one[name].ops, bw, fl, floor)
        ranked = sorted(diff.items(), key=lambda kv: -max(kv[1][1] / bw, kv[1][2] / fl, kv[1][0] * floor))
        out[name] = {
            "per layer and batch": {
                "operators": len(two[name].ops) - len(one[name].ops),
                "GB moved": round(sum(v[1] for v in diff.values()) / 1e9, 3),
                "TFLOP": round(sum(v[2] for v in diff.values()) / 1e12, 3),
                "host reads": two[name].host_reads - one[name].host_reads,
                "estimated device ms": round(1e3 * layer_s[name], 3),
            },
            "top operators (calls, GB, GFLOP) per layer and batch": {
                k: [v[0], round(v[1] / 1e9, 3), round(v[2] / 1e9, 1)] for k, v in ranked[: args.top]
            },
        }
    plain, cen = layer_s["plain HF SDPA forward"], layer_s["census"]
    seq_per_s, n_layers = MEASURED_PLAIN_SEQ_PER_S[args.shape], ablation_speed.SHAPES[args.shape][0]
    measured_layer = args.batch_size / seq_per_s / n_layers  # a whole forward's share per layer
    out["estimate"] = {
        "census / plain (device time per layer)": round(cen / plain, 3),
        "plain per layer: estimated ms vs measured on the H200 (incl. its share of embedding / norm / head)": [
            round(1e3 * plain, 2), round(1e3 * measured_layer, 2)],
        "census of 16,384 sequences, correlational pass, minutes (measured plain x estimated ratio)": round(
            16384 / seq_per_s * cen / plain / 60, 2),
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
