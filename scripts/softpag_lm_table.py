"""SoftPAG-guided decoding on organism-lm, per ICL task: HeadHunter heads vs no guidance, best layer, random heads.

For each task: the HeadHunter search (``SoftPAGDecoding(heads=None)``, Alg. 1, objective = mean summed answer
log-prob under guided logits) runs once on ``icl:TASK:valid`` at ``--search-u`` / ``--search-scale`` (the spec
searches at u = 1). The found heads are then decoded, on ``icl:TASK:test`` (disjoint prompts and queries, checked),
at every ``u`` in ``--us`` and ``s`` in ``--scales`` and compared, paired, with no guidance and two references of
the same ``(u, s)``:

- ``layer``: all heads of the single layer whose guidance gives the best answer log-prob **on the fit split** at that
  ``(u, s)`` (chosen on fit data, never on test);
- ``random``: ``--n-random`` draws of as many heads as were found, uniformly from all heads (seeded per task); an
  item's score is its mean over the draws (the expected effect of a random head set). ``found - random`` compares
  the search with that expectation directly (paired over items).

Metrics: greedy exact match and invalid rate (``attnlab.interventions.evaluate.generation_scores``; guided logits at
every decoding step) and the summed log-prob of the answer tokens (teacher-forced). Intervals: seeded paired
percentile bootstrap over items (``paired_bootstrap``), also pooled over tasks.

    python scripts/softpag_lm_table.py --tasks choose_last,choose_middle,reverse_words,corpus_next_word \
        --out /tmp/softpag_lm.json

Results are written (atomically, after every task) to ``--out`` as JSON; ``--resume`` skips tasks already there.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

import numpy as np
from task_tables import add_run_arguments, run_resumable

ARMS = ("found", "layer", "random")


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


class CachedLogprob:
    """Per-item answer log-prob under guidance, caching the perturbed logits per ``(heads, u)``.

    The perturbed pass does not depend on the guidance scale, so every ``s`` reuses it (``AnswerLogprob`` would
    recompute it per call). Same scoring as `attnlab.interventions.softpag_lm.AnswerLogprob.per_item`.
    """

    def __init__(self, model, items):
        from attnlab.interventions.softpag_lm import AnswerLogprob

        self.model = model
        self.scorer = AnswerLogprob(model, items)
        self.cache: dict = {}

    def _pert(self, heads, u: float) -> list:
        import torch

        from attnlab.interventions.softpag_lm import perturbed_lm

        key = (tuple(sorted(map(tuple, heads))), float(u))
        if key not in self.cache:
            out = []
            with torch.no_grad(), perturbed_lm(self.model, heads, u):
                for batch, bi, pos, *_ in self.scorer.batches:
                    logits = self.model.forward(batch)
                    out.append(logits[bi.to(logits.device), pos.to(logits.device)].float().cpu())
            self.cache[key] = out
        return self.cache[key]

    def per_item(self, heads=(), u: float = 1.0, scale: float = 0.0) -> np.ndarray:
        import torch

        perts = self._pert(heads, u) if heads and scale != 0.0 else [None] * len(self.scorer.batches)
        out = []
        for (_batch, _bi, _pos, tgt, owner, n, clean), pert in zip(self.scorer.batches, perts):
            guided = clean if pert is None else clean + scale * (clean - pert)
            lp = guided.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
            out.append(torch.zeros(n, dtype=lp.dtype).index_add_(0, owner, lp).numpy())
        return np.concatenate(out).astype(np.float64)


def _guided_generation(model, heads, u, scale, fit, test, max_new_tokens):
    """Exact match and invalid flags of greedy decoding under SoftPAG guidance (fit prompts refused on test)."""
    from attnlab.interventions.evaluate import generation_scores
    from attnlab.interventions.softpag_lm import SoftPAGDecoding

    iv = SoftPAGDecoding([tuple(h) for h in heads], u=u, scale=scale).fit(model, fit.items, split=fit.name)
    iv.check_disjoint(test.prompts)
    with iv.apply(model):
        exact, invalid, _ = generation_scores(model, test.items, max_new_tokens=max_new_tokens)
    return exact, invalid


def run_task(model, task: str, args) -> dict:
    """Search on valid, then every (u, s) x arm on test: exact match, invalid rate, answer log-prob (per item)."""
    from attnlab.datasets.specs import check_sets_disjoint, load_data
    from attnlab.interventions.evaluate import default_max_new_tokens, generation_scores
    from attnlab.interventions.softpag_lm import SoftPAGDecoding
    from attnlab.stats import paired_bootstrap

    t0 = time.time()
    fit = load_data(f"icl:{task}:valid:{args.shots}", n=args.n_fit, seed=args.data_seed)
    test = load_data(f"icl:{task}:test:{args.shots}", n=args.n_test, seed=args.data_seed)
    check_sets_disjoint(fit, test)
    hunter = SoftPAGDecoding(
        None,
        u=args.search_u,
        scale=args.search_scale,
        rounds=args.rounds,
        k=args.k,
        n_candidates=args.n_candidates,
        candidate_seed=args.candidate_seed,
    ).fit(model, fit.items, split=fit.name)
    found = [list(h) for h in hunter.heads_]
    search_s = time.time() - t0
    print(
        f"[{task}] search {search_s:.0f} s: heads {found}, fit log-prob {hunter.baseline_score_:.3f} -> "
        f"{[round(r['scores'][0][2], 3) for r in hunter.history_]}",
        file=sys.stderr,
        flush=True,
    )

    pool = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    rng = np.random.default_rng([args.random_seed, zlib.crc32(task.encode())])
    randoms = [
        [list(pool[j]) for j in sorted(rng.choice(len(pool), size=len(found), replace=False).tolist())]
        for _ in range(args.n_random)
    ]
    layers = {l: [[l, h] for h in range(model.n_heads)] for l in range(model.n_layers)}

    fit_lp, test_lp = CachedLogprob(model, fit.items), CachedLogprob(model, test.items)
    mnt = default_max_new_tokens(model, test.items)
    none_exact, none_invalid, _ = generation_scores(model, test.items, max_new_tokens=mnt)
    none_lp = test_lp.per_item()
    res = {
        "task": task,
        "fit_split": fit.name,
        "eval_split": test.name,
        "n_fit": len(fit),
        "n_test": len(test),
        "max_new_tokens": mnt,
        "found": found,
        "search_u": args.search_u,
        "search_scale": args.search_scale,
        "search_seconds": round(search_s, 1),
        "fit_baseline_logprob": hunter.baseline_score_,
        "fit_round_best_logprob": [r["scores"][0][2] for r in hunter.history_],
        "random_sets": randoms,
        "none": {"exact": none_exact.tolist(), "invalid": none_invalid.tolist(), "logprob": none_lp.tolist()},
        "settings": [],
    }
    for u in args.us:
        for s in args.scales:
            fit_layer = {l: float(fit_lp.per_item(hs, u, s).mean()) for l, hs in layers.items()}
            best = max(fit_layer, key=lambda l: (fit_layer[l], -l))
            arms = {"found": [found], "layer": [layers[best]], "random": randoms}
            row = {"u": u, "scale": s, "best_layer": best, "fit_layer_logprob": fit_layer, "arms": {}}
            for name, sets in arms.items():
                ex, inv, lp = [], [], []
                for heads in sets:
                    e, i = _guided_generation(model, heads, u, s, fit, test, mnt)
                    ex.append(e), inv.append(i), lp.append(test_lp.per_item(heads, u, s))
                ex, inv, lp = (np.mean(x, axis=0) for x in (ex, inv, lp))
                row["arms"][name] = {
                    "exact": ex.tolist(),
                    "invalid": inv.tolist(),
                    "logprob": lp.tolist(),
                    "exact_vs_none": paired_bootstrap(none_exact, ex, n_boot=args.n_boot, seed=0),
                    "logprob_vs_none": paired_bootstrap(none_lp, lp, n_boot=args.n_boot, seed=0),
                }
            res["settings"].append(row)
            a = row["arms"]
            print(
                f"[{task}] u={u} s={s} EM none {none_exact.mean():.3f} "
                f"found {a['found']['exact_vs_none']['intervened']:.3f} "
                f"layer{best} {a['layer']['exact_vs_none']['intervened']:.3f} "
                f"random {a['random']['exact_vs_none']['intervened']:.3f} | "
                f"logprob none {none_lp.mean():.3f} found {a['found']['logprob_vs_none']['diff']:+.3f} "
                f"layer {a['layer']['logprob_vs_none']['diff']:+.3f} "
                f"random {a['random']['logprob_vs_none']['diff']:+.3f}  ({time.time() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _settings(results: dict) -> list[tuple[float, float]]:
    keys = []
    for r in results.values():
        for row in r["settings"]:
            if (row["u"], row["scale"]) not in keys:
                keys.append((row["u"], row["scale"]))
    return keys


def table(results: dict, args) -> str:
    """Two markdown tables (exact match, answer log-prob): per task and (u, s), plus tasks pooled; then a verdict."""
    from attnlab.stats import paired_bootstrap

    d = lambda b: f"{b['diff']:+.3f} [{b['diff_lo']:+.3f}, {b['diff_hi']:+.3f}]"  # noqa: E731
    lines = []
    verdict: dict[str, list[str]] = {"exact": [], "logprob": []}
    for metric, label in (("exact", "exact match"), ("logprob", "answer log-prob (nats)")):
        lines += [
            f"**{label}**: no guidance, and arm - none with paired 95% CI"
            + (" (invalid rate of none and of the found arm in parentheses)" if metric == "exact" else ""),
            "",
            "| task | u | s | none | found - none | best layer - none | random - none | found - random |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = [(t, r, row) for t, r in results.items() for row in r["settings"]]
        pooled_keys = _settings(results) if len(results) > 1 else []
        for t, r, row in rows:
            cells = []
            for arm in ARMS:
                b = row["arms"][arm][f"{metric}_vs_none"]
                c = d(b)
                if metric == "exact" and arm == "found":
                    c += f" ({np.mean(row['arms'][arm]['invalid']):.2f})"
                if arm == "layer":
                    c = f"L{row['best_layer']}: " + c
                if b["diff_lo"] > 0:
                    verdict[metric].append(f"{t} u={row['u']} s={row['scale']} {arm}")
                cells.append(c)
            cells.append(
                d(
                    paired_bootstrap(
                        row["arms"]["random"][metric], row["arms"]["found"][metric], n_boot=args.n_boot, seed=0
                    )
                )
            )
            none = f"{np.mean(r['none'][metric]):.3f}" + (
                f" ({np.mean(r['none']['invalid']):.2f})" if metric == "exact" else ""
            )
            lines.append(f"| {t} | {row['u']:g} | {row['scale']:g} | {none} | " + " | ".join(cells) + " |")
        for u, s in pooled_keys:
            base = np.concatenate([r["none"][metric] for r in results.values()])
            cells = []
            for arm in ARMS:
                arm_v = np.concatenate(
                    [
                        row["arms"][arm][metric]
                        for r in results.values()
                        for row in r["settings"]
                        if (row["u"], row["scale"]) == (u, s)
                    ]
                )
                b = paired_bootstrap(base, arm_v, n_boot=args.n_boot, seed=0)
                if b["diff_lo"] > 0:
                    verdict[metric].append(f"pooled u={u} s={s} {arm}")
                cells.append(d(b))
            f_v, r_v = (
                np.concatenate(
                    [
                        row["arms"][a][metric]
                        for r in results.values()
                        for row in r["settings"]
                        if (row["u"], row["scale"]) == (u, s)
                    ]
                )
                for a in ("found", "random")
            )
            cells.append(d(paired_bootstrap(r_v, f_v, n_boot=args.n_boot, seed=0)))
            lines.append(
                f"| **pooled ({len(results)} tasks)** | {u:g} | {s:g} | {base.mean():.3f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    for metric, label in (("exact", "exact match"), ("logprob", "answer log-prob")):
        hits = verdict[metric]
        lines.append(
            f"- {label} (arm - none): "
            + (
                f"CI of the gain entirely above 0 in {len(hits)} cell(s): {', '.join(hits)}"
                if hits
                else "no arm's gain has a CI entirely above 0 anywhere"
            )
        )
    lines.append("")
    lines.append(
        "Found heads per task: "
        + "; ".join(
            f"{t} (search u={r.get('search_u', args.search_u):g}, s={r.get('search_scale', args.search_scale):g}): "
            + ", ".join(f"L{l}H{h}" for l, h in r["found"])
            + f" (fit log-prob {r['fit_baseline_logprob']:.3f} -> {r['fit_round_best_logprob'][-1]:.3f})"
            for t, r in results.items()
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tasks", default="choose_last,choose_middle,reverse_words,corpus_next_word", help="comma-separated ICL tasks"
    )
    ap.add_argument("--model", default="organism-lm")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--n-fit", type=int, default=24, help="valid items for the search and the best-layer choice")
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument(
        "--n-candidates", type=int, default=16, help="heads scored per search round (drawn with --candidate-seed)"
    )
    ap.add_argument("--candidate-seed", type=int, default=0)
    ap.add_argument("--search-u", type=float, default=1.0)
    ap.add_argument("--search-scale", type=float, default=1.0)
    ap.add_argument("--us", type=_floats, default=[1.0, 0.5], help="decoding SoftPAG strengths, comma-separated")
    ap.add_argument("--scales", type=_floats, default=[0.5, 1.0, 2.0], help="guidance scales, comma-separated")
    ap.add_argument("--n-random", type=int, default=2)
    ap.add_argument("--random-seed", type=int, default=12345)
    ap.add_argument("--n-boot", type=int, default=1000)
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    return run_resumable("scripts/softpag_lm_table.py", argv, args, tasks, run_task, table)


if __name__ == "__main__":
    raise SystemExit(main())
