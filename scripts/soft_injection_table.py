"""Soft injection (SITE) on organism-lm, per ICL task: 0-shot, 5-shot ICL and 0-shot + injection on the TEST split.

For each task: ``SoftInjection(...).fit(model, "icl:TASK")`` (embedding and Adam steps on the train pool, theta
selection on the valid pool), then on ``n_test`` test queries (``attnlab.interventions.evaluate``, greedy exact
match): the plain 0-shot prompt, the same prompt with the injection, and the 5-shot prompt with the same query
(``icl.build_eval_prompts`` draws the same queries for every shot count). Intervals: seeded paired percentile
bootstrap over items (injected vs 0-shot, injected vs 5-shot). Heads: the ``top_k`` largest alpha per task and
their Jaccard overlap between similar and dissimilar task pairs.

    python scripts/soft_injection_table.py --position answer --loss answer --out /tmp/si_answer.json
    python scripts/soft_injection_table.py --position cue --loss first_token   # the spec's SITE

Results are written (atomically, after every task) to ``--out`` as JSON; ``--resume`` skips tasks already there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from task_tables import add_run_arguments, run_resumable

SIMILAR = [
    ("successor", "add_3"),
    ("successor", "predecessor"),
    ("first_letter", "last_letter"),
    ("choose_first", "choose_last"),
    ("uppercase", "next_letter"),
]
DISSIMILAR = [
    ("successor", "uppercase"),
    ("add_3", "choose_first"),
    ("uppercase", "repeat_word"),
    ("predecessor", "reverse_words"),
    ("first_letter", "corpus_next_word"),
]


def run_task(model, task: str, args) -> dict:
    """Fit on the task's train/valid pools; score 0-shot, injected and 5-shot on its test queries."""
    from attnlab.datasets.specs import load_data
    from attnlab.interventions.evaluate import evaluate_intervention, generation_scores
    from attnlab.interventions.soft_injection import SoftInjection
    from attnlab.stats import paired_bootstrap

    t0 = time.time()
    si = SoftInjection(
        n_steps=args.n_steps,
        lr=args.lr,
        n_shots=args.n_shots,
        n_prompts=args.n_prompts,
        loss=args.loss,
        position=args.position,
        select=args.select,
        top_k=args.top_k,
        seed=args.seed,
    ).fit(model, f"icl:{task}")
    fit_s = time.time() - t0
    zero = load_data(f"icl:{task}:test:0", n=args.n_test, seed=args.eval_seed)
    rep = evaluate_intervention(model, si, zero, n_boot=args.n_boot, seed=0)
    row = rep.table.set_index("metric").loc["exact_match"]
    injected = np.array([float(it["intervened"] == it["expected"]) for it in rep.items])
    few = load_data(f"icl:{task}:test:{args.shots}", n=args.n_test, seed=args.eval_seed)
    assert [it.query for it in few.items] == [it.query for it in zero.items]
    few_exact, few_invalid, _ = generation_scores(model, few.items, max_new_tokens=rep.info["max_new_tokens"])
    vs_few = paired_bootstrap(few_exact, injected, n_boot=args.n_boot, seed=0)
    s = si.summary()
    return {
        "task": task,
        "n": int(row["n"]),
        "zero_shot": float(row["baseline"]),
        "zero_shot_ci": [float(row["baseline_lo"]), float(row["baseline_hi"])],
        "injected": float(row["intervened"]),
        "injected_ci": [float(row["intervened_lo"]), float(row["intervened_hi"])],
        "injected_minus_zero_ci": [float(row["diff_lo"]), float(row["diff_hi"])],
        "few_shot": vs_few["baseline"],
        "few_shot_ci": [vs_few["baseline_lo"], vs_few["baseline_hi"]],
        "injected_minus_few": vs_few["diff"],
        "injected_minus_few_ci": [vs_few["diff_lo"], vs_few["diff_hi"]],
        "few_shot_invalid": float(few_invalid.mean()),
        "selected_heads": s["selected_heads"],
        "best_step": s["best_step"],
        "best_val_loss": s["best_val_loss"],
        "baseline_val_loss": s["baseline_val_loss"],
        "fit_seconds": round(fit_s, 1),
        "fit_split": s["fit_split"]["name"],
        "eval_split": rep.info["eval_split"]["name"],
        "per_item": {
            "zero": [float(it["baseline"] == it["expected"]) for it in rep.items],
            "injected": injected.tolist(),
            "few": few_exact.tolist(),
        },
    }


def table(results: dict, args) -> str:
    """Markdown table per task, the average with bootstrap intervals, and the head overlaps."""
    from attnlab.interventions.soft_injection import head_overlap
    from attnlab.stats import paired_bootstrap

    ci = lambda v, c: f"{v:.2f} [{c[0]:.2f}, {c[1]:.2f}]"  # noqa: E731
    lines = [
        f"| task | 0-shot | {args.shots}-shot ICL | 0-shot + injection | injection - {args.shots}-shot "
        "| top heads (alpha) |",
        "|---|---|---|---|---|---|",
    ]
    for t, r in results.items():
        heads = ", ".join(f"L{h[0]}H{h[1]} {h[2]:.2f}" for h in r["selected_heads"][:5])
        lines.append(
            f"| {t} | {ci(r['zero_shot'], r['zero_shot_ci'])} | {ci(r['few_shot'], r['few_shot_ci'])} "
            f"| {ci(r['injected'], r['injected_ci'])} | {r['injected_minus_few']:+.2f} "
            f"[{r['injected_minus_few_ci'][0]:+.2f}, {r['injected_minus_few_ci'][1]:+.2f}] | {heads} |"
        )
    if results:
        # task average: items pooled (equal n per task, so the pooled mean is the mean of task means)
        z = np.concatenate([r["per_item"]["zero"] for r in results.values()])
        inj = np.concatenate([r["per_item"]["injected"] for r in results.values()])
        few = np.concatenate([r["per_item"]["few"] for r in results.values()])
        a, b = paired_bootstrap(z, inj, n_boot=args.n_boot), paired_bootstrap(few, inj, n_boot=args.n_boot)
        lines.append(
            f"| **average ({len(results)} tasks)** | {ci(a['baseline'], [a['baseline_lo'], a['baseline_hi']])} "
            f"| {ci(b['baseline'], [b['baseline_lo'], b['baseline_hi']])} "
            f"| {ci(a['intervened'], [a['intervened_lo'], a['intervened_hi']])} "
            f"| {b['diff']:+.2f} [{b['diff_lo']:+.2f}, {b['diff_hi']:+.2f}] | |"
        )
        reached = b["diff"] >= 0
        lines.append("")
        lines.append(
            f"Average injected {a['intervened']:.3f} vs {args.shots}-shot {b['baseline']:.3f}: "
            f"{'reaches' if reached else 'does NOT reach'} {args.shots}-shot ICL "
            f"(difference {b['diff']:+.3f}, 95% CI [{b['diff_lo']:+.3f}, {b['diff_hi']:+.3f}])."
        )
    lines.append("")
    lines.append(f"Jaccard overlap of the top-{args.top_k} heads by alpha:")
    for kind, pairs in (("similar", SIMILAR), ("dissimilar", DISSIMILAR)):
        vals = []
        for x, y in pairs:
            if x in results and y in results:
                j = head_overlap(results[x]["selected_heads"], results[y]["selected_heads"])
                vals.append(j)
                lines.append(f"- {kind}: {x} vs {y}: {j:.2f}")
        if vals:
            lines.append(f"- mean {kind}: {np.mean(vals):.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from attnlab.datasets import icl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="all", help="comma-separated ICL tasks or 'all'")
    ap.add_argument("--model", default="organism-lm")
    ap.add_argument("--position", default="cue", choices=["cue", "last", "answer"])
    ap.add_argument("--loss", default="first_token", choices=["first_token", "answer"])
    ap.add_argument("--select", default="best", choices=["best", "last"])
    ap.add_argument("--n-steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--n-shots", type=int, default=10, help="demonstrations per embedding prompt")
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--shots", type=int, default=5, help="the ICL baseline's demonstrations")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=0)
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    tasks = list(icl.TASK_NAMES) if args.tasks == "all" else args.tasks.split(",")
    progress = lambda t, r: (
        f"[{t}] 0-shot {r['zero_shot']:.2f}  {args.shots}-shot {r['few_shot']:.2f}  injected {r['injected']:.2f}  "
        f"(fit {r['fit_seconds']} s)"
    )  # noqa: E731
    return run_resumable("scripts/soft_injection_table.py", argv, args, tasks, run_task, table, progress)


if __name__ == "__main__":
    raise SystemExit(main())
