"""Retrieval-head scan at long context: time and peak memory per NIAH trial for attnlab's scan (fused SDPA path,
attention rows rebuilt only for the answer queries) vs a plain SDPA forward and vs the eager-pattern baseline
(the bridge's eager attention, full ``[heads, seq, seq]`` pattern per layer), on a random-weight
Llama-3.2-1B-shaped model (16 layers x 32 heads, 8 KV heads, d_model 2048; built from a config, no download).

    # GPU figure (issue #4): 4k / 16k / 32k tokens
    PYTHONPATH=. python benchmarks/retrieval_long_context.py --shape llama-1b --device cuda --dtype bfloat16 \
        --lengths 4096,16384,32768
    # CPU smoke check of the script
    .venv/bin/python benchmarks/retrieval_long_context.py --shape tiny --lengths 512 --threads 1

Every trial runs in the same process, one after another; each figure is the median over ``--trials`` NIAH
trials (different depths) of the wall time and of the peak memory *above the loaded model* during that trial
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the resident set size sampled every 2 ms, above its value at
the trial's start; see ``Meter``). The eager baseline is skipped above ``--eager-max`` tokens and stops at its
first out-of-memory error (reported). Where it runs, the retrieval scores of the fused scan and the eager scan
must be identical (the random model answers nothing right, so the ROUGE gate is switched off and every trial is
scored) and the argmax key of every answer-query row is compared too. Prints one JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation_speed import SHAPES, build_random_model  # noqa: E402


def _rss_bytes() -> int | None:
    """The process's current resident set size (Linux ``/proc/self/statm``), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler(threading.Thread):
    """Polls the current RSS every ``interval`` seconds and keeps the largest value seen."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss_bytes() or 0, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_bytes() or 0)


class Meter:
    """Wall time and peak memory of one block of work.

    CUDA: allocator peak above the memory allocated at the start. CPU: the largest resident set size sampled every
    2 ms during the block, above the RSS at its start (tensors this large are mapped and unmapped one by one, so
    the RSS follows them; a peak shorter than the sampling interval can be missed). Falls back to peak-RSS growth
    (``ru_maxrss``, which only ever rises) where ``/proc`` is absent.
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        self.sampler = None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif _rss_bytes() is not None:
            self.base = _rss_bytes()
            self.sampler = _RssSampler()
            self.sampler.start()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.sampler is not None:
            peak = self.sampler.stop()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.seconds = time.perf_counter() - self.t0
        self.peak_bytes = max(0, peak - self.base)
        return False


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _argmax_recorder(store: dict):
    """A ``rows`` handler that keeps, per layer, the argmax key of every answer-query row (for the comparison)."""

    def fn(layer, rows, q_pos, batch):
        store.setdefault(layer, []).append(rows.argmax(-1).cpu())

    return fn


def scan_trial(model, prompt_set, attention: str, device: str):
    """One retrieval scan of a one-trial prompt set; (scores [L, H], argmax per layer, Meter)."""
    from attnlab.capture import Capture
    from attnlab.probes.base import ProbeContext
    from attnlab.probes.retrieval_heads import RetrievalHeads
    from attnlab.probes.scan import prompt_batches

    probe = RetrievalHeads(rouge_threshold=-1.0, require_correct=False)  # random weights: score every trial
    batches = prompt_batches(model, prompt_set, 1, False)
    ctx = ProbeContext(model=model, dataset="bench", n_prompts=len(prompt_set), meta=list(prompt_set.meta))
    capture = Capture(model, attention=attention, progress=False)
    probe.attach(capture, ctx)
    argmax: dict = {}
    capture.on("rows", _argmax_recorder(argmax), queries=probe._answer_queries)
    with torch.no_grad(), Meter(device) as m:
        capture.run(batches, total=len(batches), desc="bench")
    (res,) = probe.results(ctx)
    return np.asarray(res.extra["trial_scores"][0]), {l: torch.cat(v, -1) for l, v in argmax.items()}, m


def plain_trial(model, prompt_set, device: str):
    """A plain forward (fused SDPA attention, no hooks, no capture) of the same tokens.

    Logits at the last position only, as ``generate``'s prefill computes them (``logits_to_keep=1``): the full
    ``[seq, vocab]`` logits would be the largest tensor of the pass (8 GB at 16k tokens in float32) and are not
    part of a forward's cost that a scan should be compared with. The scan unembeds only the answer steps.
    """
    from attnlab.capture import Capture
    from attnlab.probes.scan import prompt_batches

    (batch,) = prompt_batches(model, prompt_set, 1, False)
    capture = Capture(model, attention="fused", progress=False)  # no handlers: only the SDPA swap
    with torch.no_grad(), Meter(device) as m:
        capture.run_batch(batch, logit_positions=None)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="llama-1b")
    ap.add_argument("--model", default=None, help="an attnlab.load name instead of a random --shape model")
    ap.add_argument("--lengths", default="4096,16384,32768", help="comma list of NIAH prompt lengths in tokens")
    ap.add_argument("--trials", type=int, default=3, help="NIAH trials (depths) per length")
    ap.add_argument("--eager-max", type=int, default=32768, help="skip the eager baseline above this length")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warmup",
        choices=["each", "first"],
        default="each",
        help=(
            "unmeasured warm-up trial before each length's trials, or only before the first length's "
            "(saves a long forward on a slow CPU)"
        ),
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import attnlab
    from attnlab.datasets.niah_set import niah_prompt_set

    tmp = None
    name = args.model
    if name is None:
        tmp = Path(tempfile.mkdtemp(prefix=f"attnlab_{args.shape}_"))
        name = str(build_random_model(args.shape, tmp, device=args.device, dtype=args.dtype, seed=args.seed))
    status = 0
    try:
        model = attnlab.load(name, device=args.device, dtype=args.dtype)
        eager_ok, warmed = True, False
        for length in [int(x) for x in args.lengths.split(",") if x.strip()]:
            depths = np.linspace(10, 90, args.trials).tolist()
            full = niah_prompt_set(model, lengths=[length], depths=depths, seed=args.seed)
            rows = {"plain": [], "scan": [], "eager": []}
            diffs, argmax_agree, eager_error = [], [], None
            for i in range(len(full)):
                one = _subset(full, i)
                if i == 0 and (
                    args.warmup == "each" or not warmed
                ):  # warm-up, not measured: first-call costs (kernels, allocator growth) would land on 'plain'
                    warmed = True
                    plain_trial(model, one, args.device)
                    scan_trial(model, one, "fused", args.device)
                rows["plain"].append(plain_trial(model, one, args.device))
                scores, amax, m = scan_trial(model, one, "fused", args.device)
                rows["scan"].append(m)
                if eager_ok and length <= args.eager_max:
                    try:
                        e_scores, e_amax, em = scan_trial(model, one, "eager", args.device)
                        rows["eager"].append(em)
                        diffs.append(float(np.nanmax(np.abs(scores - e_scores))) if scores.size else 0.0)
                        argmax_agree.append(
                            float(np.mean([(amax[l] == e_amax[l]).float().mean().item() for l in amax]))
                        )
                    except Exception as e:  # noqa: BLE001 - an eager OOM is a result, anything else is re-raised
                        if not _is_oom(e):
                            raise
                        eager_ok, eager_error = False, f"out of memory at {length} tokens"
                        if args.device.startswith("cuda"):
                            torch.cuda.empty_cache()
            med = lambda ms, attr: float(np.median([getattr(x, attr) for x in ms])) if ms else None
            report = {
                "model": args.model or args.shape,
                "device": args.device,
                "dtype": args.dtype,
                "tokens": int(np.median([len(x) for x in full.token_ids])) if full.token_ids else length,
                "trials": len(full),
                **{f"{k}_s": (round(med(v, "seconds"), 4) if v else None) for k, v in rows.items()},
                **{f"{k}_peak_mib": (round(med(v, "peak_bytes") / 2**20, 1) if v else None) for k, v in rows.items()},
            }
            if rows["plain"]:
                report["scan_time_vs_plain"] = round(report["scan_s"] / report["plain_s"], 2)
                if report["plain_peak_mib"]:
                    report["scan_mem_vs_plain"] = round(report["scan_peak_mib"] / report["plain_peak_mib"], 2)
            if diffs:
                report["max_abs_score_diff_vs_eager"] = max(diffs)
                report["argmax_agreement_vs_eager"] = round(min(argmax_agree), 4)
                status |= int(max(diffs) > 0)
            if eager_error or not eager_ok:
                report["eager"] = eager_error or "skipped after an earlier out-of-memory"
            elif length > args.eager_max:
                report["eager"] = f"skipped (> --eager-max {args.eager_max})"
            print(json.dumps(report), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


def _subset(prompt_set, i: int):
    """A one-prompt copy of a PromptSet (token ids, texts and meta)."""
    import dataclasses

    fields = {f.name: getattr(prompt_set, f.name) for f in dataclasses.fields(prompt_set)}
    for key in ("texts", "token_ids", "meta", "images"):
        value = fields.get(key)
        if isinstance(value, (list, tuple)) and len(value) > i:
            fields[key] = [value[i]]
    return type(prompt_set)(**fields)


if __name__ == "__main__":
    sys.exit(main())
