"""HeadHunter: greedy iterative search for the attention heads whose SoftPAG perturbation best serves an objective.

See ``docs/methods/headhunter_softpag.md`` §4 (HeadHunter greedy head search, Alg. 1), on organism-dit::

    S = {}
    repeat rounds times:
        for each (l, h) in candidates(pool \\ S):
            score(l, h) = mean objective of images sampled with SoftPAG on S + {(l, h)}
        S = S + top-k heads by score

Objectives (higher is better), per generated image with its intended label:

* ``"classifier"``: the bundled digit scorer's probability of the intended class (`dit.get_scorer`), the
  quality objective (PickScore's role in the paper);
* ``"ink"``, ``"thickness"``, ``"slant"``: `dit.style_scores` (the style objective; maximised, so
  ``thickness`` looks for heads that make strokes bolder);
* or any callable ``(images, labels) -> per-image scores``.

CPU settings: ``n_candidates`` draws that many heads per round from the remaining pool (seeded; None = all
L x H heads, the reference), ``n_per_class`` x ``classes`` images per candidate with ``num_steps`` DDIM steps.
The reference settings (quality: M = 20, 1 round, k = 24, w = 3, u = 0.25; style: 5 rounds, k = 3, w = 3,
u = 1) are available through the parameters. Search images use seed ``seed``; evaluate on other seeds
(`compare`, ``main``) so the reported numbers are not the ones the search was fitted on. ``variant`` picks the
SoftPAG interpolation / target (`softpag.VARIANTS`) for the search and the returned guidance.

Measurement (`compare`, ``python scripts/headhunter_dit.py``): found heads vs no guidance, all heads of
each layer and k random heads on held-out noise, every condition on the same labels and noise, so differences
``found - baseline`` get paired bootstrap CIs (objective and the classifier's log p of the intended digit);
`comparison_table` prints them with a verdict against the best whole layer. Results: ``notes/headhunter_dit.md``.

Like `SoftPAG`, this is not a TransformerBridge `Intervention` (the DiT has no bridge hooks); it keeps the
shape: explicit parameters, ``fit`` setting attributes ending in ``_``, JSON ``save`` / ``load``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.errors import InputError, InvalidParameterError
from attnlab.heads.io import read_json, write_json
from attnlab.interventions.softpag import VARIANTS, SoftPAG, attention_modules
from attnlab.models import dit
from attnlab.params import CALLABLE, INTEGERS, Interval, Options, Parameterized
from attnlab.stats import bootstrap_ci

OBJECTIVES = ("classifier", "ink", "thickness", "slant")
JSON_NAME = "headhunter.json"


def objective_fn(objective: str | Callable) -> Callable[[torch.Tensor, np.ndarray], np.ndarray]:
    """Per-image objective ``(images, labels) -> scores`` for a name in `OBJECTIVES` or a callable."""
    if callable(objective):
        return objective
    if objective == "classifier":
        return lambda images, labels: dit.get_scorer().prob_of(images, labels)
    if objective in dit.STYLE_NAMES:
        return lambda images, labels: dit.style_scores(images)[objective]
    raise ValueError(f"objective must be one of {OBJECTIVES} or a callable, got {objective!r}")


def search_labels(classes: Sequence[int], n_per_class: int) -> torch.Tensor:
    return torch.as_tensor(list(classes), dtype=torch.long).repeat_interleave(int(n_per_class))


def score_guidance(
    organism, guidance: SoftPAG, objective, labels: torch.Tensor, *, num_steps: int, seed: int, device: str = "cpu"
) -> np.ndarray:
    """Per-image objective of images sampled with ``guidance`` (labels given, seed fixed)."""
    images = guidance.sample(organism, labels, num_steps=num_steps, seed=seed, device=device)
    return np.asarray(objective_fn(objective)(images, labels.numpy()), dtype=np.float64)


def greedy_head_search(
    pool: Sequence[tuple[int, int]],
    score: Callable[[list[tuple[int, int]]], float],
    *,
    rounds: int,
    k: int,
    n_candidates: int | None = None,
    candidate_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """Alg. 1 with any objective: ``rounds`` times, score ``S + {h}`` for each candidate ``h`` of ``pool \\ S``
    (all of them, or ``n_candidates`` drawn with ``candidate_seed`` and the round) and add the top ``k``.

    ``score(heads) -> float`` (higher is better). Returns the chosen heads in the order added and, per round,
    ``scores`` (``[layer, head, score]`` best first, ties by layer then head) and ``chosen``. Used by the
    causal-LM search (`attnlab.interventions.softpag_lm.SoftPAGDecoding`).
    """
    if k < 1 or rounds < 1:
        raise InvalidParameterError(f"k and rounds must be >= 1, got k={k}, rounds={rounds}")
    pool = [(int(l), int(h)) for l, h in pool]
    if len(set(pool)) != len(pool):
        raise InputError("the candidate pool has duplicate heads")
    if rounds * k > len(pool):
        raise InputError(f"rounds * k = {rounds * k} heads asked from a pool of {len(pool)}")
    chosen: list[tuple[int, int]] = []
    history = []
    for rnd in range(rounds):
        remaining = [p for p in pool if p not in set(chosen)]
        if n_candidates is not None and n_candidates < len(remaining):
            rng = np.random.default_rng([candidate_seed, rnd])
            remaining = [
                remaining[i]
                for i in sorted(rng.choice(len(remaining), size=max(int(n_candidates), k), replace=False).tolist())
            ]
        scored = sorted(
            ((l, h, float(score(chosen + [(l, h)]))) for l, h in remaining), key=lambda r: (-r[2], r[0], r[1])
        )
        new = [(l, h) for l, h, _ in scored[:k]]
        chosen.extend(new)
        history.append({"round": rnd, "scores": [[l, h, s] for l, h, s in scored], "chosen": [list(p) for p in new]})
        if log:
            log(f"round {rnd}: chose {new}, best {scored[0][2]:.4f}")
    return chosen, history


class HeadHunter(Parameterized):
    """Greedy iterative head search (HeadHunter, Alg. 1) for SoftPAG on organism-dit.

    Parameters
    ----------
    objective : str or callable, default="classifier"
        See the module docstring.
    rounds : int, default=1
        Greedy rounds ``R_n``; ``|heads_| = rounds * k``.
    k : int, default=3
        Heads added per round (top-k of the round's scores).
    n_candidates : int or None, default=None
        Heads scored per round, drawn (seeded by ``candidate_seed`` and the round) from the heads not yet
        chosen; None scores every remaining head.
    scale, u, cfg_scale : float
        SoftPAG guidance weight ``w``, strength ``u`` in the search, and organism-dit CFG scale (1 = off, as
        in the reference search).
    classes, n_per_class : the labels of the search images (``n_per_class`` of each class).
    num_steps : int, default=10
        DDIM steps per search sample.
    seed : int, default=0
        Noise seed of the search images.
    candidate_seed : int, default=0
        Seed of the per-round candidate draw.
    variant : one of `softpag.VARIANTS`, default="identity"
        SoftPAG interpolation / target used in the search and by `guidance` (passed to `SoftPAG`);
        "identity" is Eq. 7.

    Attributes
    ----------
    heads_ : tuple of (layer, head)
        Selected heads in the order they were added.
    history_ : list of dict
        Per round: ``scores`` (``[layer, head, score]`` sorted best first, ties by layer then head), ``chosen``.
    baseline_score_ : float
        Objective of the same search images without perturbation guidance.
    """

    name = "headhunter"
    _parameter_constraints = {
        "objective": [Options(OBJECTIVES), CALLABLE],
        "rounds": [Interval(int, 1, None)],
        "k": [Interval(int, 1, None)],
        "n_candidates": [Interval(int, 1, None), None],
        "scale": [Interval(float, None, None)],
        "u": [Interval(float, 0, 1)],
        "cfg_scale": [Interval(float, None, None)],
        "classes": [INTEGERS],
        "n_per_class": [Interval(int, 1, None)],
        "num_steps": [Interval(int, 1, None)],
        "seed": [Interval(int, None, None)],
        "candidate_seed": [Interval(int, None, None)],
        "variant": [Options(VARIANTS)],
    }

    def __init__(
        self,
        objective: str = "classifier",
        rounds: int = 1,
        k: int = 3,
        n_candidates: int | None = None,
        scale: float = 3.0,
        u: float = 1.0,
        cfg_scale: float = 1.0,
        classes: Sequence[int] = tuple(range(10)),
        n_per_class: int = 1,
        num_steps: int = 10,
        seed: int = 0,
        candidate_seed: int = 0,
        variant: str = "identity",
    ):
        self.objective = objective
        self.rounds = rounds
        self.k = k
        self.n_candidates = n_candidates
        self.scale = scale
        self.u = u
        self.cfg_scale = cfg_scale
        self.classes = classes
        self.n_per_class = n_per_class
        self.num_steps = num_steps
        self.seed = seed
        self.candidate_seed = candidate_seed
        self.variant = variant

    def _guidance(self, heads) -> SoftPAG:
        return SoftPAG(heads=heads, u=self.u, scale=self.scale, cfg_scale=self.cfg_scale, variant=self.variant)

    def _candidates(
        self, pool: list[tuple[int, int]], chosen: list[tuple[int, int]], rnd: int
    ) -> list[tuple[int, int]]:
        remaining = [p for p in pool if p not in set(chosen)]
        if self.n_candidates is None or self.n_candidates >= len(remaining):
            return remaining
        rng = np.random.default_rng([self.candidate_seed, rnd])
        pick = sorted(rng.choice(len(remaining), size=self.n_candidates, replace=False).tolist())
        return [remaining[i] for i in pick]

    def fit(self, organism, *, device: str = "cpu", log: Callable[[str], None] | None = None) -> HeadHunter:
        """Check the parameters, run the greedy search on ``organism`` (a `dit.DiTOrganism` or a model directory);
        returns ``self``."""
        self._validate_params()
        org = dit.as_organism(organism, device)
        mods = attention_modules(org.transformer)
        pool = [(l, h) for l in range(len(mods)) for h in range(mods[l].heads)]
        labels = search_labels(self.classes, self.n_per_class)
        kw = dict(num_steps=self.num_steps, seed=self.seed, device=device)
        self.baseline_score_ = float(score_guidance(org, self._guidance(()), self.objective, labels, **kw).mean())
        chosen: list[tuple[int, int]] = []
        history = []
        for rnd in range(self.rounds):
            scored = []
            for head in self._candidates(pool, chosen, rnd):
                s = float(score_guidance(org, self._guidance(chosen + [head]), self.objective, labels, **kw).mean())
                scored.append((head[0], head[1], s))
            scored.sort(key=lambda r: (-r[2], r[0], r[1]))
            new = [(l, h) for l, h, _ in scored[: self.k]]
            chosen.extend(new)
            history.append(
                {"round": rnd, "scores": [[l, h, s] for l, h, s in scored], "chosen": [list(p) for p in new]}
            )
            if log:
                log(f"round {rnd}: chose {new}, best {scored[0][2]:.4f}, baseline {self.baseline_score_:.4f}")
        self.heads_ = tuple(chosen)
        self.history_ = history
        return self

    def guidance(
        self, *, u: float | None = None, scale: float | None = None, cfg_scale: float | None = None
    ) -> SoftPAG:
        """SoftPAG on the found heads (optionally a lower ``u`` at inference, as the paper recommends)."""
        if not hasattr(self, "heads_"):
            raise RuntimeError("HeadHunter is not fitted; call fit(organism) first")
        return SoftPAG(
            self.heads_,
            u=self.u if u is None else u,
            scale=self.scale if scale is None else scale,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
            variant=self.variant,
        )

    def save(self, directory: str | Path) -> Path:
        if callable(self.objective):
            raise TypeError("a HeadHunter with a callable objective cannot be saved; use a named objective")
        d = Path(directory)
        write_json(
            d / JSON_NAME,
            {
                "method": self.name,
                "params": self.get_params(),
                "heads_": [list(p) for p in self.heads_],
                "history_": self.history_,
                "baseline_score_": self.baseline_score_,
            },
        )
        return d

    @classmethod
    def load(cls, directory: str | Path) -> HeadHunter:
        meta = read_json(Path(directory) / JSON_NAME)
        obj = cls(**meta["params"])
        obj.heads_ = tuple((int(l), int(h)) for l, h in meta["heads_"])
        obj.history_ = meta["history_"]
        obj.baseline_score_ = float(meta["baseline_score_"])
        return obj


# ---- measurement ---------------------------------------------------------------------------------------------
#
# Every condition of `compare` samples the same labels from the same initial noise (``seed``), so per-image values
# are paired across conditions; differences get a paired bootstrap CI (resampling images, the same indices for
# both conditions), which is far tighter than comparing two unpaired CIs.

LOGP_FLOOR = 1e-6  # log p(intended) is clipped at log(1e-6) so one hopeless image cannot dominate a mean


def per_image_metrics(
    organism,
    guidance: SoftPAG,
    objective,
    *,
    n_per_class: int = 20,
    num_steps: int = 10,
    seed: int = 1000,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Per image (``n_per_class`` digits of each class, noise ``seed``): ``objective``, the classifier's clipped
    ``logp`` of the intended digit, and ``correct`` (argmax == intended)."""

    labels = search_labels(range(dit.NUM_CLASSES), n_per_class)
    images = guidance.sample(organism, labels, num_steps=num_steps, seed=seed, device=device)
    proba = dit.get_scorer().predict_proba(images)
    y = labels.numpy()
    return {
        "objective": np.asarray(objective_fn(objective)(images, y), dtype=np.float64),
        "logp": np.log(np.clip(proba[np.arange(len(y)), y], LOGP_FLOOR, 1.0)),
        "correct": (proba.argmax(axis=1) == y).astype(np.float64),
    }


def _summary(v: np.ndarray) -> dict[str, Any]:
    lo, hi = bootstrap_ci(v)
    return {"mean": float(np.mean(v)), "ci95": [lo, hi]}


def evaluate_guidance(
    organism,
    guidance: SoftPAG,
    objective,
    *,
    n_per_class: int = 8,
    num_steps: int = 10,
    seed: int = 1000,
    device: str = "cpu",
) -> dict[str, Any]:
    """Objective mean with a bootstrap CI (and classification accuracy) on ``n_per_class`` digits per class."""
    m = per_image_metrics(
        organism, guidance, objective, n_per_class=n_per_class, num_steps=num_steps, seed=seed, device=device
    )
    s = _summary(m["objective"])
    return {"mean": s["mean"], "ci95": s["ci95"], "acc": float(m["correct"].mean()), "n": int(len(m["objective"]))}


def verdict(diff: dict[str, Any], what: str) -> str:
    """Plain-language reading of a paired difference ``found - what`` with its 95% CI."""
    lo, hi = diff["ci95"]
    if lo > 0:
        return f"found heads beat {what}"
    if hi < 0:
        return f"found heads are worse than {what}"
    return f"no significant difference from {what}"


def compare(
    organism,
    hunter: HeadHunter,
    *,
    n_per_class: int = 20,
    num_steps: int = 10,
    seed: int = 1000,
    layers: Sequence[int] | None = None,
    random_draws: int = 5,
    eval_u: Sequence[float] = (),
    random_seed: int = 12345,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Found heads vs no guidance vs all heads of one layer vs k random heads, paired, on held-out noise seeds.

    All conditions use the hunter's ``scale``, ``cfg_scale``, ``variant`` and (main table) ``u``; the images of
    every condition share labels and initial noise (``seed`` must differ from the search seed). Rows carry
    ``found_minus``: the paired difference ``found - row`` (objective and log p) with a 95% bootstrap CI.
    The best whole layer is the one with the highest objective mean on these evaluation images, which favours
    the baseline (its choice is not held out), so "found beats best layer" is a conservative claim.
    ``eval_u`` adds, per extra strength ``u'``, found heads and the best layer at ``u'`` (the spec's practice:
    search at u = 1, guide at a lower u), compared with each other.
    """
    if seed == hunter.seed:
        raise ValueError("evaluate on a noise seed other than the search seed")

    org = dit.as_organism(organism, device)
    mods = attention_modules(org.transformer)
    kw = dict(n_per_class=n_per_class, num_steps=num_steps, seed=seed, device=device)
    k = len(hunter.heads_)
    found = [list(p) for p in hunter.heads_]
    mk = lambda heads, u: SoftPAG(heads, u=u, scale=hunter.scale, cfg_scale=hunter.cfg_scale, variant=hunter.variant)
    per: dict[str, dict[str, np.ndarray]] = {}
    rows: list[dict[str, Any]] = []
    t0 = time.time()

    def run(name: str, kind: str, heads: list, u: float) -> None:
        per[name] = per_image_metrics(org, mk(heads, u), hunter.objective, **kw)
        rows.append(
            {
                "name": name,
                "kind": kind,
                "heads": [list(p) for p in heads],
                "u": u,
                **{m: _summary(per[name][m]) for m in ("objective", "logp", "correct")},
            }
        )
        if log:
            log(f"{name}: objective {rows[-1]['objective']['mean']:.4f} ({time.time() - t0:.0f} s)")

    run("found", "found", found, hunter.u)
    run("none", "none", [], hunter.u)
    for l in range(len(mods)) if layers is None else layers:
        run(f"layer {int(l)}", "layer", [(int(l), h) for h in range(mods[int(l)].heads)], hunter.u)
    pool = [(l, h) for l in range(len(mods)) for h in range(mods[l].heads)]
    rng = np.random.default_rng(random_seed)
    for i in range(random_draws):
        run(f"random {i + 1}", "random", [pool[j] for j in rng.choice(len(pool), size=k, replace=False)], hunter.u)
    layer_rows = [r for r in rows if r["kind"] == "layer"]
    best = max(layer_rows, key=lambda r: r["objective"]["mean"])["name"] if layer_rows else None
    for u in eval_u:
        if float(u) == hunter.u:
            continue
        run(f"found u={u:g}", "found", found, float(u))
        if best is not None:
            run(f"{best} u={u:g}", "layer", next(r["heads"] for r in layer_rows if r["name"] == best), float(u))
    for r in rows:
        ref = "found" if r["u"] == hunter.u else f"found u={r['u']:g}"
        r["compared_with"] = ref
        if r["name"] != ref:
            r["found_minus"] = {m: _summary(per[ref][m] - per[r["name"]][m]) for m in ("objective", "logp")}
    out: dict[str, Any] = {
        "objective": hunter.objective,
        "heads": found,
        "search_seed": hunter.seed,
        "eval_seed": seed,
        "n": int(n_per_class) * dit.NUM_CLASSES,
        "n_per_class": int(n_per_class),
        "num_steps": num_steps,
        "scale": hunter.scale,
        "u": hunter.u,
        "cfg_scale": hunter.cfg_scale,
        "variant": hunter.variant,
        "random_seed": random_seed,
        "rows": rows,
        "best_layer": best,
        "eval_seconds": time.time() - t0,
    }
    verdicts = {}
    by = {r["name"]: r for r in rows}
    verdicts["none"] = verdict(by["none"]["found_minus"]["objective"], "no guidance")
    if best is not None:
        verdicts["best_layer"] = verdict(by[best]["found_minus"]["objective"], f"the best whole layer ({best})")
    rand = [r for r in rows if r["kind"] == "random"]
    if rand:
        verdicts["random"] = (
            f"{sum(r['found_minus']['objective']['ci95'][0] > 0 for r in rand)} of {len(rand)} "
            f"random {k}-head draws beaten"
        )
    for u in eval_u:
        if float(u) != hunter.u and best is not None:
            verdicts[f"best_layer u={u:g}"] = verdict(
                by[f"{best} u={u:g}"]["found_minus"]["objective"], f"{best} at u={u:g}"
            )
    out["verdicts"] = verdicts
    out["per_image"] = {name: {m: v.tolist() for m, v in d.items()} for name, d in per.items()}
    return out


def _fmt(s: dict[str, Any], d: int = 3, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{d}f}}"
    return f"{f.format(s['mean'])} [{f.format(s['ci95'][0])}, {f.format(s['ci95'][1])}]"


def comparison_table(res: dict[str, Any]) -> str:
    """Markdown table of `compare`'s result, with the paired differences and the verdicts."""
    obj = res["objective"] if res["objective"] != "classifier" else "p(intended)"
    lines = [
        f"objective {res['objective']}; found heads {res['heads']}; s={res['scale']:g}, u={res['u']:g}, "
        f"variant {res['variant']}, cfg {res['cfg_scale']:g}; {res['n']} held-out images "
        f"(noise seed {res['eval_seed']}, "
        f"search seed {res['search_seed']}), {res['num_steps']} DDIM steps; paired 95% bootstrap CIs",
        "",
        f"| condition | u | {obj} [95% CI] | log p(intended) | accuracy | found - this, {obj} [paired CI] "
        "| found - this, log p [paired CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        name = r["name"] if r["kind"] != "random" else f"{r['name']} {r['heads']}"
        fm = r.get("found_minus")
        diff = (_fmt(fm["objective"], 4, True), _fmt(fm["logp"], 3, True)) if fm else ("(reference)", "")
        lines.append(
            f"| {name} | {r['u']:g} | {_fmt(r['objective'], 4)} | {_fmt(r['logp'])} | {r['correct']['mean']:.3f} "
            f"| {diff[0]} | {diff[1]} |"
        )
    lines.append("")
    lines.append(f"best whole layer (of those evaluated, chosen on these evaluation images): {res['best_layer']}")
    for key, v in res["verdicts"].items():
        lines.append(f"- {key}: {v}")
    return "\n".join(lines)
