"""HeadHunter on organism-dit: search heads for an objective (or load a saved search), then compare them with no
guidance, every whole layer and k random heads on held-out noise seeds, paired; prints a markdown table.

    python scripts/headhunter_dit.py --objective classifier --rounds 2 --k 2 --n-per-class 2 --steps 10 --out OUT

The search and the measurement are ``attnlab.interventions.headhunter`` (``HeadHunter``, ``compare``,
``comparison_table``); results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attnlab.heads.io import write_json, write_text
from attnlab.interventions.headhunter import OBJECTIVES, HeadHunter, compare, comparison_table
from attnlab.interventions.softpag import VARIANTS
from attnlab.models import dit
from attnlab.models.bundled import BUNDLED_DIR


def main(argv: list[str] | None = None) -> int:
    """Search heads on organism-dit for an objective (or --load a saved search), then compare against no
    guidance, every whole layer and k random heads on held-out noise seeds, paired; prints a markdown table."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default=str(BUNDLED_DIR / "organism-dit"))
    p.add_argument("--objective", default="classifier", choices=OBJECTIVES)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--n-candidates", type=int, default=None)
    p.add_argument("--candidate-seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--u", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--variant", default="identity", choices=VARIANTS)
    p.add_argument("--n-per-class", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", default=None, help="directory with a saved headhunter.json: skip the search")
    p.add_argument("--eval-n-per-class", type=int, default=20)
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument(
        "--eval-u", type=float, nargs="*", default=[], help="extra u values for found heads vs the best layer"
    )
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers for the all-heads-of-a-layer baseline")
    p.add_argument("--random-draws", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for headhunter.json, compare.json and compare.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    org = dit.load(a.model)
    t0 = time.time()
    if a.load:
        hunter = HeadHunter.load(a.load)
    else:
        hunter = HeadHunter(
            a.objective,
            a.rounds,
            a.k,
            a.n_candidates,
            a.scale,
            a.u,
            a.cfg_scale,
            n_per_class=a.n_per_class,
            num_steps=a.steps,
            seed=a.seed,
            candidate_seed=a.candidate_seed,
            variant=a.variant,
        ).fit(org, log=print)
    search_s = time.time() - t0
    print(f"search: {search_s:.1f} s, heads {list(hunter.heads_)}", flush=True)
    res = compare(
        org,
        hunter,
        n_per_class=a.eval_n_per_class,
        num_steps=hunter.num_steps,
        seed=a.eval_seed,
        layers=a.layers,
        random_draws=a.random_draws,
        eval_u=a.eval_u,
        log=lambda m: print(m, flush=True),
    )
    res["search_seconds"] = search_s
    table = comparison_table(res)
    if a.out:
        if not a.load:
            hunter.save(a.out)
        write_json(Path(a.out) / "compare.json", res)
        write_text(Path(a.out) / "compare.md", table + "\n", mode=0o644)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
