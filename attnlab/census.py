"""``attnlab.census``: every head statistic of a model in one sweep, correlational and causal, in one table.

One capture pass (one forward per batch, all probes reducing in flight) gives the correlational statistics:

- sinks: ``first_token_sink``, ``act_sinks`` (hidden-sink scores), ``value_drain`` (the first token's value norm
  over the mean value norm, per KV head), ``massive_activations`` (per layer / position);
- extreme tokens (Guo et al. 2024): ``domain_sink`` (first-token mass inside / outside a set of query positions: on
  prompts whose metadata lists them, e.g. ``--dataset bigram-backcopy``, else not scored), ``value_drain`` and
  ``residual_norms`` (residual-stream norm per position and layer);
- HeadVis's six (``self_attention_score``, ``prev_token_score``, ``pattern_entropy``, ``qk_distance``,
  ``qk_distance_variance``, ``induction_score``: Neuronpedia's definitions, so a census compares number for number
  with the published grids);
- ``duplicate_token``, RazorAttention's echo / induction scores, ``max_attention_logit``;
- ``streaming_heads`` (sink + recent-window mass); on NIAH prompts ``retrieval_heads``; on VLM prompts the
  vision-aware (VHD) and image-centric heads.

Then the causal statistic: exact single-head ablation of every head (batched, prefix reuse) on a metric — by
default the prompts' mean next-token log-prob — on the first ``causal_prompts`` prompts, with attribution
patching (AtP) as a pre-screen and its Spearman correlation with the exact scores.

A statistic whose inputs the model or the prompts lack (retrieval without NIAH prompts, vision statistics on a
text model, next-token log-prob on a bidirectional encoder) is *not scored*: ``Census.not_scored`` holds the reason,
and it appears in ``summary()`` and the CLI output, never as zeros. Every census records the model, dtype,
attention path, sequence lengths and dataset with its results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab.ablation.metrics import NextTokenLogprob
from attnlab.ablation.scores import ablation_scores
from attnlab.capture import Capture
from attnlab.datasets.base import PromptSet, fingerprint
from attnlab.errors import AttnlabError
from attnlab.fused import supports_fused
from attnlab.heads.headvis_tree import METRICS, check_headvis_target, write_headvis_tree
from attnlab.heads.inputs import save_inputs
from attnlab.heads.io import read_json, write_json
from attnlab.heads.results import HeadScores, TokenScores
from attnlab.heads.runs import Run, check_target
from attnlab.probes.availability import ALL_UNDEFINED, unavailable
from attnlab.probes.base import ProbeContext
from attnlab.probes.headvis_examples import HeadVisExamples
from attnlab.probes.registry import PROBES, build, refused
from attnlab.probes.scan import prompt_batches

CENSUS_JSON = "census.json"

# statistic groups -> probe names (a probe may give several statistics: headvis gives six)
GROUPS: dict[str, tuple[str, ...]] = {
    "sinks": ("first_token_sink", "act_sinks", "value_drain", "massive_activations"),
    "extremes": ("domain_sink", "value_drain", "residual_norms"),
    "headvis": ("headvis",),
    "patterns": ("duplicate_token", "razor_echo_induction", "max_attention_logit", "streaming_heads"),
    "retrieval": ("retrieval_heads",),
    "vision": ("vision_aware_heads", "image_centric_heads"),
}
VISION_PROBES = frozenset(GROUPS["vision"])
CAUSAL = "causal"


@dataclass
class Census:
    """A head census: one ``HeadScores`` per statistic, the statistics that could not be scored and why, the
    per-layer / per-position results (massive activations) and the provenance of the sweep.

    ``to_frame()`` is one tidy table (a row per head, a column per statistic); ``summary()`` a row per statistic
    (scored or the reason it was not, its top heads); ``plot(x, y)`` a scatter of all heads on two statistics.
    """

    scores: dict[str, HeadScores] = field(default_factory=dict)
    not_scored: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, TokenScores] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    run: Run | None = None

    @property
    def statistics(self) -> list[str]:
        return list(self.scores)

    def __getitem__(self, name: str) -> HeadScores:
        if name in self.not_scored:
            raise KeyError(f"{name} was not scored: {self.not_scored[name]}")
        return self.scores[name]

    def __repr__(self) -> str:
        m = self.info.get("model", {})
        shape = f"{m.get('n_layers', '?')} x {m.get('n_heads', '?')} heads"
        return (
            f"Census({m.get('name', '?')}, {shape}, {self.info.get('n_prompts', '?')} prompts: "
            f"{len(self.scores)} statistics scored, {len(self.not_scored)} not scored)"
        )

    def to_frame(self, per_kv_head: str | None = None) -> pd.DataFrame:
        """One row per head (``layer``, ``head``, ``label``) and one column per scored statistic.

        ``per_kv_head="max"|"mean"``: rows per KV head (grouped-query attention), each statistic aggregated over
        the query heads sharing that KV head.
        """
        if not self.scores:
            return pd.DataFrame(columns=["layer", "head", "label"])
        first = next(iter(self.scores.values()))
        grids = {
            name: (s.per_kv_head(per_kv_head) if per_kv_head else np.asarray(s.scores, float))
            for name, s in self.scores.items()
        }
        n_layers, n_heads = next(iter(grids.values())).shape
        rows = {
            "layer": np.repeat(np.arange(n_layers), n_heads),
            "head": np.tile(np.arange(n_heads), n_layers),
        }
        prefix = "KV" if per_kv_head else "H"
        df = pd.DataFrame(rows)
        df["label"] = [f"L{l}{prefix}{h}" for l, h in zip(df["layer"], df["head"])]
        for name, g in grids.items():
            df[name] = g.ravel()
        df.attrs["not_scored"] = dict(self.not_scored)
        df.attrs["model"] = first.model
        return df

    def summary(self, k: int = 3) -> pd.DataFrame:
        """A row per statistic: ``status`` (scored / not scored), ``reason``, ``higher_is``, and its top-k heads."""
        rows = []
        for name, s in self.scores.items():
            finite = np.isfinite(np.asarray(s.scores, float))
            top = ", ".join(f"{r.label} {r.score:.3g}" for r in s.top(k).itertuples()) if finite.any() else ""
            rows.append({"statistic": name, "status": "scored", "reason": "", "higher_is": s.higher_is, "top": top})
        for name, reason in self.not_scored.items():
            rows.append({"statistic": name, "status": "not scored", "reason": reason, "higher_is": "", "top": ""})
        return pd.DataFrame(rows, columns=["statistic", "status", "reason", "higher_is", "top"])

    def plot(self, x: str | None = None, y: str | None = None, *, title: str | None = None):
        """Plotly scatter of every head on statistics ``x`` and ``y`` (default: the first two), coloured by layer;
        the hover names the head and gives every statistic."""
        from attnlab.figures import census_scatter  # plotly loads only when a figure is drawn (start-up time)

        names = self.statistics
        if len(names) < 1:
            raise AttnlabError("the census has no scored statistic to plot")
        x = x or names[0]
        y = y or (names[1] if len(names) > 1 else names[0])
        for s in (x, y):
            if s not in self.scores:
                why = f": {self.not_scored[s]}" if s in self.not_scored else f"; scored: {', '.join(names)}"
                raise AttnlabError(f"statistic {s!r} is not in this census{why}")
        return census_scatter(self.to_frame(), x, y, title=title or f"{self.info.get('model', {}).get('name')}")

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Run:
        """Write the census as a run directory: each statistic a result (JSON + safetensors, atomically) that
        ``attnlab show`` and the app read, plus ``census.json`` (statistics, not-scored reasons, provenance)."""
        run = Run.create(directory, **self.info)
        for s in self.scores.values():
            run.add(s)
        for t in self.tokens.values():
            run.add(t)
        write_json(
            Path(directory) / CENSUS_JSON,
            {
                "statistics": list(self.scores),
                "token_results": list(self.tokens),
                "not_scored": self.not_scored,
                "info": self.info,
            },
        )
        self.run = run
        return run

    @classmethod
    def load(cls, directory: str | Path) -> Census:
        d = Path(directory)
        path = d / CENSUS_JSON
        if not path.is_file():
            raise AttnlabError(f"{d} holds no census ({CENSUS_JSON} missing)")
        try:
            meta = read_json(path)
        except (OSError, ValueError) as e:
            raise AttnlabError(f"{path} cannot be read: {e}") from None
        run = Run.open(d)
        scores = {name: run[name] for name in meta.get("statistics", [])}
        tokens = {name: run[name] for name in meta.get("token_results", [])}
        return cls(scores, dict(meta.get("not_scored", {})), tokens, dict(meta.get("info", {})), run)


# ---- the sweep -------------------------------------------------------------------------------------------------


def probe_names(statistics: str | Sequence[str]) -> tuple[list[str], bool]:
    """``"all"`` / group names / probe names (comma-separated or a list) -> probe names and whether the causal
    statistic is wanted."""
    items = statistics.split(",") if isinstance(statistics, str) else list(statistics)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise AttnlabError("no statistics asked for")
    names: list[str] = []
    causal = False
    for item in items:
        if item == "all":
            members = [p for g in GROUPS.values() for p in g]
            causal = True
        elif item == CAUSAL:
            causal, members = True, []
        elif item in GROUPS:
            members = list(GROUPS[item])
        elif item in PROBES:
            members = [item]
        else:
            known = sorted({*GROUPS, *PROBES, CAUSAL, "all"})
            raise AttnlabError(f"unknown statistic {item!r}; available: {', '.join(known)}")
        for m in members:
            if m in PROBES and m not in names:
                names.append(m)
    return names, causal


def census(
    model,
    prompts: Sequence[str] | PromptSet,
    *,
    statistics: str | Sequence[str] = "all",
    causal_prompts: int = 16,
    ablation_mode: str = "zero",
    attribution: bool = True,
    batch_size: int = 8,
    attention: str = "auto",
    chunk_size: int = 256,
    truncate: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    headvis_dir: str | Path | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> Census:
    """Run a head census of ``model`` on ``prompts``.

    Parameters
    ----------
    model : LoadedModel
    prompts : list of str or PromptSet
    statistics : "all", group names (sinks, extremes, headvis, patterns, retrieval, vision, causal), probe names,
        or a list
    causal_prompts : int, default=16
        Prompts (the first ones) the exact all-heads ablation and attribution patching run on.
    ablation_mode : {"zero", "mean", "uniform", "resample"}, default="zero"
    attribution : bool, default=True
        Also run attribution patching and report its Spearman correlation with the exact ablation scores.
    attention : {"auto", "eager", "fused"}, default="auto"
        ``"auto"``: the fused path (HF attention with a fused kernel; statistics exact from q, k and each row's
        log-sum-exp, no ``T x T`` matrix) wherever the model routes attention through transformers' attention
        interface, else the eager path.
    batch_size, chunk_size, truncate : as in ``attnlab.scan``
    out : directory to write the census to (a run directory with ``census.json``), or None
    progress : bool, default=True
        Progress bars with an ETA for the capture pass and the ablation.
    headvis_dir : directory or None
        Also sample example sequences per head in the same capture pass and write Neuronpedia's HeadVis tree
        there (``attnlab.heads.headvis_tree``; adds the headvis statistics when not asked for).
    params : ``{probe name: {parameter: value}}`` for the census's probes, e.g.
        ``{"massive_activations": {"ratio_threshold": 10.0}}``; a value such a probe refuses is an error, not a
        statistic left unscored.
    """
    if not isinstance(prompts, PromptSet):
        prompts = PromptSet(name="prompts", texts=list(prompts))
    if len(prompts) == 0:
        raise AttnlabError("no prompts to run")
    if int(causal_prompts) < 1:
        raise AttnlabError(f"causal_prompts must be >= 1, got {causal_prompts}")
    names, want_causal = probe_names(statistics)
    params = dict(params or {})
    stray = sorted(set(params) - set(names))
    if stray:
        raise AttnlabError(f"parameters given for {', '.join(stray)}, which these statistics do not run")
    probes = {name: build(name, params.get(name)) for name in names}  # refuse bad parameters before any compute
    if attention == "auto":  # a census never needs the eager pattern: the fused path wherever the model allows it
        attention = "fused" if supports_fused(model) else "eager"
    if headvis_dir is not None:
        check_headvis_target(headvis_dir)
        if "headvis" not in names:
            names.append("headvis")  # the HeadVis tree's scatter needs the six metrics
            probes["headvis"] = build("headvis")
    t0 = time.perf_counter()
    batches = prompt_batches(model, prompts, batch_size, truncate)
    ids = [b.input_ids[i, b.real_slice(i)].tolist() for b in batches for i in range(b.size)]
    ctx = ProbeContext(model=model, dataset=fingerprint(ids), n_prompts=len(ids), meta=list(prompts.meta))
    dataset = {"name": prompts.name, "fingerprint": ctx.dataset, "n_prompts": len(ids), "seed": prompts.seed}
    if out is not None:
        check_target(out, model.summary(), dataset, append=False)  # never mix a census into another run
    capture = Capture(model, attention=attention, chunk_size=chunk_size, progress=progress)
    not_scored: dict[str, str] = {}
    attached = []
    for name in names:
        reason = unavailable(name, model, prompts, ids)
        if reason is None:
            probe = probes[name]
            try:
                probe.attach(capture, ctx)
            except (AttnlabError, ValueError) as e:
                if name in params or isinstance(e, ValueError):  # a value given for it, refused: the user's error
                    raise refused(name, e) from None
                reason = str(e)
            else:
                attached.append(probe)
        if reason is not None:
            not_scored[name] = reason
    examples = None
    if headvis_dir is not None:
        examples = HeadVisExamples(n_sequences=sum(len(x) >= 2 for x in ids))
        examples.attach(capture, ctx)
    if attached or examples is not None:
        capture.run(batches, total=len(batches), desc="census")
    info = census_info(
        model.summary(),
        names,
        want_causal,
        [{"name": p.name, "params": p.record_params()} for p in attached],
        (prompts.name, prompts.seed),
        ctx.dataset,
        [len(x) for x in ids],
        capture.last_path if attached else "",
        batch_size,
    )
    result = Census(info=info)
    collect(result, not_scored, [probe.results(ctx) for probe in attached])
    if examples is not None:
        _write_headvis(headvis_dir, model, result, examples, ctx, batch_size)
    info["seconds_correlational"] = round(time.perf_counter() - t0, 3)
    if want_causal:
        add_causal(result, model, prompts, ids, causal_prompts, ablation_mode, attribution, progress)
    info["seconds_total"] = round(time.perf_counter() - t0, 3)
    if out is not None:
        info["inputs"] = save_inputs(out, prompts, ids)  # the census keeps its inputs, as a scan does
        result.save(out)
    return result


def census_info(
    model_summary: dict,
    names: list[str],
    want_causal: bool,
    probes: list[dict],
    dataset: tuple[str, int | None],
    fingerprint: str,
    lengths: list[int],
    attention_path: str,
    batch_size: int,
) -> dict[str, Any]:
    """The provenance a census records (``Census.info``): model, statistics, probes, dataset (name, seed),
    lengths, attention path."""
    return {
        "model": model_summary,
        "census": True,
        "statistics_asked": list(names) + ([CAUSAL] if want_causal else []),
        "probes": probes,
        "dataset": {"name": dataset[0], "fingerprint": fingerprint, "n_prompts": len(lengths), "seed": dataset[1]},
        "n_prompts": len(lengths),
        "seq_len": {"min": min(lengths), "max": max(lengths), "mean": float(np.mean(lengths))},
        "dtype": str(model_summary.get("dtype", "")),
        "attention_path": attention_path,
        "batch_size": batch_size,
    }


def collect(result: Census, not_scored: dict[str, str], results: list[list]) -> None:
    """Put the attached probes' results (one list per probe, in the order asked) into ``result``: a head grid
    with no finite value is *not scored*, never zeros; ``not_scored`` (the probes that could not run, and why)
    comes first."""
    for probe_results in results:
        for r in probe_results:
            if isinstance(r, HeadScores):
                if not np.isfinite(np.asarray(r.scores, float)).any():
                    result.not_scored[r.name] = ALL_UNDEFINED
                else:
                    result.scores[r.name] = r
            else:
                result.tokens[r.name] = r
    result.not_scored = {**not_scored, **result.not_scored}


def add_causal(result: Census, model, prompts, ids, n: int, mode: str, attribution: bool, progress: bool) -> None:
    name = f"ablation_{mode}_next_token_logprob"
    if not model.causal:
        result.not_scored[name] = "bidirectional encoder: no next-token log-prob to ablate against"
        return
    if model.modality == "vision-language" and prompts.images is not None:
        result.not_scored[name] = "vision-language prompts: the census ablates text prompts only (attnlab ablate)"
        return
    chosen = [x for x in ids if len(x) >= 2][: int(n)]
    if not chosen:
        result.not_scored[name] = "no prompt has two tokens"
        return
    t1 = time.perf_counter()
    scores = ablation_scores(
        model, chosen, NextTokenLogprob(), mode=mode, attribution=attribution, name=name, progress=progress
    )
    scores.summary["n_prompts"] = len(chosen)
    result.scores[name] = scores
    result.info["causal"] = {
        "statistic": name,
        "metric": "mean next-token log-prob of each prompt",
        "mode": mode,
        "n_prompts": len(chosen),
        "atp_spearman": scores.summary.get("atp_spearman"),
        "seconds": round(time.perf_counter() - t1, 3),
    }
    if attribution and "atp" in scores.extra:
        atp = HeadScores(
            scores=scores.extra["atp"],
            name=f"atp_{mode}_next_token_logprob",
            probe="attribution_patching",
            params={"mode": mode, "metric": "next_token_logprob"},
            model=model.name,
            n_kv_heads=model.n_kv_heads,
            description="attribution-patching estimate of the ablation drop (first-order pre-screen)",
            summary={"spearman_with_exact": scores.summary.get("atp_spearman")},
        )
        result.scores[atp.name] = atp


def _write_headvis(directory, model, result: Census, examples, ctx, batch_size: int) -> None:
    """Write the HeadVis tree of this census (its six metrics and the sampled examples) and note where."""
    info = result.info
    path = info["attention_path"] or "eager"
    provenance = {
        "dataset_name": info["dataset"]["name"],
        "dataset_fingerprint": info["dataset"]["fingerprint"],
        "batch_size": int(batch_size),
        # the model's forward: eager attention, or SDPA with the rows recomputed exactly in float32 (fused path)
        "attn_implementation": "eager" if path == "eager" else "sdpa",
        "attention_path": path,
        "rows_dtype": "float32",
        "induction_attention_threshold": next(
            (p["params"].get("induction_threshold") for p in info["probes"] if p["name"] == "headvis"), None
        ),
        "tool": "attnlab census",
    }
    metrics = {name: result.scores.get(name) for name in METRICS}
    d = write_headvis_tree(directory, model.summary(), metrics, examples.examples(ctx), provenance)
    info["headvis_dir"] = str(Path(d).resolve())


def census_json(directory: str | Path) -> dict | None:
    """The ``census.json`` of a run directory, or None when the run is not a census."""
    p = Path(directory) / CENSUS_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
