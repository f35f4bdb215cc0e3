"""App under concurrent clients: N clients at once against the app served on 127.0.0.1 (a free port, one process).

Each client GETs the page, ``/_dash-layout`` and ``/_dash-dependencies``, then posts the callbacks a visitor's page
posts (``/_dash-update-component``: pick a run, the head map, the difference map of two runs, the selected head's
pattern and its query row on a run prompt; and the live views behind buttons: the interventions view's method info
and "run intervention" (ZeroTuning gamma=2 on a NIAH-style prompt, both outputs and the attention difference), "run
ablation" (the selected head against random heads, answer log-prob), and the vision view's overlay on an
organism-vlm shape-scene run) ``--rounds`` times. Each callback is first posted alone and must answer with an empty
status line (a real figure, not a message). Requests, errors (non-200, failed requests, error
messages in a response, exceptions raised in the server), "busy" answers of live callbacks, and p50/p95 latency
are printed. Bounded: ``clients * (3 + rounds * 9)`` requests with a timeout each (5 without ``--live-views``),
so it always ends.

Issue #6 asks for no errors with 20 concurrent clients.

    python benchmarks/app_concurrency.py [--model organism-lm] [--vlm organism-vlm] [--clients 20] [--rounds 2]
        [--no-live-views] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

import attnlab
from attnlab.apps import ids, loadtest
from attnlab.apps.app import create_app
from attnlab.apps.live import LiveModels
from attnlab.datasets import DATASETS

IV_PROMPT = "The secret KEY code is 482.\nQuestion: What is the secret KEY code?\nAnswer:"
# the status line each live view's callback must leave empty when it worked
STATUS = {"intervention": ids.IV_STATUS, "ablation": ids.ABL_STATUS, "vision": ids.VISION_STATUS}


def make_runs(model, root: Path) -> tuple[str, str]:
    """Two scans of the same probe on different prose prompts (seeds 0 and 1): a real difference to draw."""
    for name, seed in (("seed0", 0), ("seed1", 1)):
        attnlab.scan(model, "first_token_sink", DATASETS["prose"](model, 2, seed), out=root / name, progress=False)
    return "seed0", "seed1"


def make_vision_run(name: str, root: Path) -> str:
    """One organism-vlm scan of two shape scenes (the vision view's run image 0)."""
    from attnlab.apps.vision import shape_prompts

    vlm = attnlab.load(name)
    attnlab.scan(vlm, "first_token_sink", shape_prompts("attribute", 2, 0), out=root / "shapes", progress=False)
    return "shapes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism-lm")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--vlm", default="organism-vlm", help="VLM scanned for the vision view ('' = no vision view)")
    ap.add_argument(
        "--no-live-views",
        action="store_true",
        help="only the page, head-map and pattern callbacks (no interventions, ablation, vision)",
    )
    ap.add_argument("--json", action="store_true", help="print the full summary as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = attnlab.load(args.model)
    root = Path(tempfile.mkdtemp(prefix="attnlab-app-load-"))
    try:
        run_a, run_b = make_runs(model, root)
        live_views = not args.no_live_views
        vision_run = make_vision_run(args.vlm, root) if live_views and args.vlm else None
        live = LiveModels()
        live.preload(model.name, model)
        app = create_app(root, live_model=live)
        with loadtest.ServedApp(app.server) as served:
            deps = loadtest.dependencies(served.url)
            head = {"layer": 3, "head": 5}
            bodies = loadtest.page_bodies(deps, run_a, "first_token_sink", compare=run_b, head=head)
            if live_views:
                bodies.update(
                    loadtest.view_bodies(
                        deps,
                        run_a,
                        head=head,
                        vision_run=vision_run,
                        intervention={
                            "method": "zerotuning",
                            "params": "gamma=2",
                            "prompt": IV_PROMPT,
                            "answer": "482",
                        },
                        ablation={"source": "selected", "k": 1, "metric": "logprob", "seeds": 1},
                    )
                )
            for name, body in bodies.items():  # each callback once alone: valid, and the prompt's q/k are cached
                warm = loadtest.timed(name, served.url + loadtest.UPDATE, body, args.timeout)
                if warm.error:
                    raise SystemExit(f"callback {name} failed alone: {warm.error}")
                if name in STATUS:
                    message = (
                        loadtest.callback_response(served.url, body, args.timeout).get(STATUS[name], {}).get("children")
                    )
                    if message:
                        raise SystemExit(f"callback {name} answered with a message: {message}")
            report = loadtest.run_load(
                served.url, bodies, clients=args.clients, rounds=args.rounds, timeout=args.timeout
            )
        summary = {
            "model": args.model,
            "vlm": args.vlm if vision_run else None,
            **report.summary(),
            "server_exceptions": served.exceptions,
            "machine": f"{platform.machine()}, {platform.python_version()}, torch threads {torch.get_num_threads()}",
        }
        print("\n".join(report.lines()))
        print(f"server exceptions: {len(served.exceptions)}")
        if args.json:
            print(json.dumps(summary, indent=2))
        return 1 if report.errors or served.exceptions else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
