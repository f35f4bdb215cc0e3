"""The all-heads exact ablation of two versions of attnlab, side by side in one run (issue #12: the architecture
step must be no slower than before).

Each version (a git commit, or ``.`` for the working tree) is exported into a temporary directory and runs in its
own worker process (same interpreter, ``PYTHONPATH`` set to that tree), which loads the model and builds the
prompts once. The driver then asks the workers in turn for one timed call of each variant, so both versions see the
same load from other processes; it reports the median wall and CPU seconds of each (version, variant) and the
median over repeats of the per-repeat ratio ``after / before`` (below 1: faster), plus the largest score
difference between the two versions (the scores must agree: exit status 1 above 1e-5).

    .venv/bin/python benchmarks/ablation_versions.py --before main --after . --n-prompts 1 --length 64 --threads 2
    .venv/bin/python benchmarks/ablation_versions.py --before main --after . --n-prompts 2 --length 160 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# The worker: loads the model once, then answers "batched" / "loop" with one timed call (wall, CPU, scores).
# Both module layouts are accepted (attnlab.ablation.* after issue #12, attnlab.probes.ablation_* before).
WORKER = r"""
import json, sys, time
import numpy as np
import torch

threads, name, n_prompts, length, mode, max_batch = json.loads(sys.argv[1])
torch.set_num_threads(threads)
import attnlab
try:
    from attnlab.ablation.metrics import AnswerTokens
    from attnlab.ablation.scores import exact_ablation_grid, loop_ablation_grid
except ImportError:
    from attnlab.probes.ablation_metrics import AnswerTokens
    from attnlab.probes.ablation_scores import exact_ablation_grid, loop_ablation_grid
from attnlab.datasets.niah import build_niah_trials

model = attnlab.load(name)
trials = build_niah_trials(model.tokenizer, (length,), np.linspace(10, 90, n_prompts).tolist(), seed=0)
prompts = [t.prompt for t in trials]
metric = AnswerTokens([" " + t.answer for t in trials])
run = {
    "batched": lambda: exact_ablation_grid(model, prompts, metric, mode=mode, max_batch=max_batch),
    "loop": lambda: loop_ablation_grid(model, prompts, metric, mode=mode),
}
exact_ablation_grid(model, prompts, metric, mode=mode, layers=[model.n_layers - 1], max_batch=max_batch)  # warm-up
print(json.dumps({"module": attnlab.__file__, "tokens": int(metric.encode(model, prompts).seq_len)}), flush=True)
for line in sys.stdin:
    variant = line.strip()
    t0, c0 = time.perf_counter(), time.process_time()
    grid, _ = run[variant]()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "scores": np.asarray(grid, dtype=float).tolist()}), flush=True)
"""


def export(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (``.``: the working tree as it is) as a directory holding ``attnlab/``."""
    if ref == ".":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "attnlab"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


class Worker:
    def __init__(self, tree: Path, args):
        config = json.dumps([args.threads, args.model, args.n_prompts, args.length, args.mode, args.max_batch])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=tempfile.gettempdir(),  # not the repository: PYTHONPATH alone decides which attnlab is imported
            env={**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"},
        )
        self.info = json.loads(self.proc.stdout.readline())
        if not Path(self.info["module"]).resolve().is_relative_to(tree.resolve()):  # the version asked for ran
            raise RuntimeError(f"worker for {tree} imported attnlab from {self.info['module']}")

    def call(self, variant: str) -> dict:
        self.proc.stdin.write(variant + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git ref of the earlier version")
    parser.add_argument("--after", default=".", help="git ref of the later version ('.': the working tree)")
    parser.add_argument("--model", default="organism-lm")
    parser.add_argument("--n-prompts", type=int, default=2)
    parser.add_argument("--length", type=int, default=160, help="NIAH prompt length in tokens")
    parser.add_argument("--mode", default="zero", choices=["zero", "mean", "uniform"])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="batched,loop", help="comma list of: batched, loop")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="attnlab_versions_"))
    workers: dict[str, Worker] = {}
    try:
        for label, ref in (("before", args.before), ("after", args.after)):
            workers[label] = Worker(export(ref, tmp / label), args)
        walls = {(w, v): [] for w in workers for v in variants}
        cpus = {(w, v): [] for w in workers for v in variants}
        scores = {}
        for r in range(args.repeats):
            order = list(workers) if r % 2 == 0 else list(reversed(workers))  # alternate who goes first
            for v in variants:
                for w in order:
                    out = workers[w].call(v)
                    walls[w, v].append(out["wall"])
                    cpus[w, v].append(out["cpu"])
                    scores[w, v] = np.asarray(out["scores"], dtype=float)
        report = {
            "before": args.before,
            "after": args.after,
            "model": args.model,
            "prompts": args.n_prompts,
            "tokens": workers["after"].info["tokens"],
            "threads": args.threads,
            "repeats": args.repeats,
        }
        diffs = []
        for v in variants:
            for w in workers:
                report[f"{w}_{v}_s"] = round(float(np.median(walls[w, v])), 3)
                report[f"{w}_{v}_cpu_s"] = round(float(np.median(cpus[w, v])), 3)
            report[f"after_over_before_{v}"] = round(
                float(np.median(np.divide(walls["after", v], walls["before", v]))), 3
            )
            report[f"after_over_before_{v}_cpu"] = round(
                float(np.median(np.divide(cpus["after", v], cpus["before", v]))), 3
            )
            diff = float(np.nanmax(np.abs(scores["after", v] - scores["before", v])))
            report[f"max_abs_diff_{v}"] = diff
            diffs.append(diff)
        print(json.dumps(report))
        return 0 if all(d <= 1e-5 for d in diffs) else 1
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
