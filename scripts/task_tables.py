"""The shared driver of the per-task result tables in scripts/: run each task once, write every finished task to
a JSON file atomically (so ``--resume`` continues an interrupted run and ``--table-only`` re-prints), then print
the script's markdown table."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def add_run_arguments(ap) -> None:
    """The options every table script shares: threads, the resumable JSON file, resume and table-only."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results file (written after every task)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run from --out")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out without running")


def run_resumable(
    script: str,
    argv: list[str] | None,
    args,
    tasks: list[str],
    run_task: Callable,
    table: Callable,
    progress: Callable[[str, dict], str] | None = None,
) -> int:
    """``run_task(model, task, args) -> dict`` for every task not yet in ``args.out``; ``table(results, args) -> str``.

    ``args`` needs ``model`` and the options of ``add_run_arguments``; ``progress(task, result)`` is an optional
    one-line summary printed to stderr after each task."""
    import torch

    from attnlab.heads.io import write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    results: dict = {}
    if out is not None and (args.resume or args.table_only) and out.is_file():
        results = json.loads(out.read_text())["tasks"]
    if not args.table_only:
        import attnlab

        model = attnlab.load(args.model)
        command = " ".join(["python", script, *(argv if argv is not None else sys.argv[1:])])
        for t in tasks:
            if t in results:
                continue
            results[t] = run_task(model, t, args)
            if progress is not None:
                print(progress(t, results[t]), file=sys.stderr, flush=True)
            if out is not None:
                write_json(out, {"args": vars(args), "command": command, "tasks": results})
    print(table({t: results[t] for t in tasks if t in results}, args))
    return 0
