"""``attnlab.scan``: run several probes over a set of prompts with one forward pass per batch."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.capture import Capture
from attnlab.datasets.base import PromptSet, fingerprint
from attnlab.errors import AttnlabError
from attnlab.heads.inputs import save_inputs
from attnlab.heads.results import HeadScores, TokenScores
from attnlab.heads.runs import Run, check_target
from attnlab.probes.availability import not_scored_reason, unavailable
from attnlab.probes.base import Probe, ProbeContext
from attnlab.probes.registry import build, expand, refused


@dataclass
class ScanResult:
    """Results of a scan by name; ``run`` is set when the scan was written to a directory."""

    results: dict[str, HeadScores | TokenScores] = field(default_factory=dict)
    run: Run | None = None
    info: dict[str, Any] = field(default_factory=dict)
    not_scored: dict[str, str] = field(default_factory=dict)  # result name -> why it holds no value

    def __getitem__(self, name: str):
        return self.results[name]

    def head_scores(self) -> dict[str, HeadScores]:
        return {k: v for k, v in self.results.items() if isinstance(v, HeadScores)}

    def __repr__(self) -> str:
        model = self.info.get("model", {}).get("name", "?")
        n = self.info.get("dataset", {}).get("n_prompts", "?")
        heads = len(self.head_scores())
        where = f", saved in {self.run.directory}" if self.run is not None else ""
        missing = f", {len(self.not_scored)} not scored" if self.not_scored else ""
        return (
            f"ScanResult({model} on {n} prompts: {len(self.results)} results "
            f"({heads} head scores, {len(self.results) - heads} token scores){missing}{where})"
        )

    def _repr_html_(self) -> str:
        from attnlab.notebook import html_escape, table_html

        rows = []
        for name, r in self.results.items():
            if name in self.not_scored:
                what = f"not scored: {self.not_scored[name]}"
            elif isinstance(r, HeadScores):
                what = ", ".join(f"{x.label} {x.score:.3g}" for x in r.top(3).itertuples())
            else:
                what = f"prompt {r.prompt_index}, {len(r.tokens)} tokens"
            rows.append({"result": name, "kind": r.kind.replace("_", " "), "top / what": what})
        model = self.info.get("model", {}).get("name", "?")
        ds = self.info.get("dataset", {})
        where = f"; saved in {html_escape(self.run.directory)}" if self.run is not None else ""
        return (
            f"<div><b>scan</b> of {html_escape(model)} on {html_escape(ds.get('name', '?'))} "
            f"({ds.get('n_prompts', '?')} prompts){where}{table_html(rows)}</div>"
        )


def _as_probes(probes, params: Mapping[str, Mapping[str, Any]] | None = None) -> list[Probe]:
    """Probe objects from names / groups / objects, each probe once; named probes are built with their entry of
    ``params``. ``"induction"`` is a probe and a group (of previous_token, duplicate_token and induction), so a list
    that names the group's members and then the group (as the CLI passes an expanded list) must not run the members
    twice."""
    if isinstance(probes, (str, Probe)):
        probes = [probes]
    params = dict(params or {})
    out: dict[str, Probe] = {}
    named: set[str] = set()
    for p in probes:
        if isinstance(p, Probe):
            if p.name in out:
                raise AttnlabError(f"two probes named {p.name!r}: their results would overwrite each other")
            out[p.name] = p
            continue
        names = expand(p)
        named.update(names)
        for name in names:
            if name not in out:
                out[name] = build(name, params.get(name))
    stray = sorted(set(params) - named)
    if stray:
        raise AttnlabError(f"parameters given for {', '.join(stray)}, which this scan does not build by name")
    return list(out.values())


def attach_all(probes: Sequence[Probe], capture, ctx: ProbeContext) -> None:
    """Attach every probe; a parameter value a probe refuses when it attaches (a ``ValueError``, sklearn style) is a
    one-line ``AttnlabError`` naming the probe, raised before any compute."""
    for p in probes:
        try:
            p.attach(capture, ctx)
        except ValueError as e:
            raise refused(p.name, e) from None


def prompt_token_ids(model, prompts: PromptSet, truncate: bool, offset: int = 0) -> list[list[int]]:
    """Token ids of every prompt of a PromptSet under the model's BOS policy (length-checked or truncated);
    ``offset``: the first prompt's index in error messages."""
    if prompts.token_ids is not None:
        ids = prompts.token_ids
        return [model.check_length(list(x), truncate=truncate, index=offset + i) for i, x in enumerate(ids)]
    return [model.token_ids(t, truncate=truncate, index=offset + i) for i, t in enumerate(prompts.texts)]


def prompt_batches(
    model, prompts: PromptSet, batch_size: int, truncate: bool, start: int = 0, stop: int | None = None
) -> list:
    """Encode the whole prompt set up front (so bad prompts fail before any compute) into padded batches.

    ``start`` / ``stop``: only the prompts ``start .. stop - 1`` (``start`` a multiple of ``batch_size``): the same
    batches, with the same global ``prompt_indices``, as the whole set's (``attnlab.sweep``'s prompt shards)."""
    n = len(prompts) if stop is None else min(int(stop), len(prompts))
    if start % batch_size:
        raise ValueError(f"a shard starts at a multiple of the batch size, got {start} with batch size {batch_size}")
    starts = range(start, n, batch_size)
    if prompts.images is not None:
        if prompts.texts is None:
            raise AttnlabError("image prompts need text prompts beside them")
        return [
            model.encode(
                prompts.texts[i : min(i + batch_size, n)],
                images=prompts.images[i : min(i + batch_size, n)],
                truncate=truncate,
                start_index=i,
            )
            for i in starts
        ]
    ids = prompt_token_ids(model, _slice(prompts, start, n), truncate, offset=start)
    return [
        model.batch_from_ids(ids[i - start : i - start + batch_size], list(range(i, min(i + batch_size, n))))
        for i in starts
    ]


def _slice(prompts: PromptSet, start: int, stop: int) -> PromptSet:
    """Prompts ``start .. stop - 1`` of a PromptSet (texts or token ids; meta and images are read by index)."""
    if start == 0 and stop == len(prompts):
        return prompts
    if prompts.token_ids is not None:
        return PromptSet(name=prompts.name, token_ids=prompts.token_ids[start:stop], seed=prompts.seed)
    return PromptSet(name=prompts.name, texts=prompts.texts[start:stop], seed=prompts.seed)


def scan(
    model,
    probes: str | Probe | Sequence[str | Probe],
    prompts: Sequence[str] | PromptSet,
    *,
    batch_size: int = 8,
    out: str | Path | None = None,
    attention: str = "auto",
    chunk_size: int = 256,
    truncate: bool = False,
    progress: bool = True,
    resume: bool = False,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    append: bool = False,
) -> ScanResult:
    """Run ``probes`` on ``prompts`` and return (and, with ``out``, save) their results.

    Parameters
    ----------
    model : LoadedModel
    probes : probe names ("sinks", "induction", "first_token_sink", ...), Probe objects, or a mix
    prompts : list of str or PromptSet
    batch_size : int, default=8
    out : directory to write the run to (results are saved one by one, atomically), or None
    attention : {"auto", "eager", "fused"}; see ``attnlab.capture``
    truncate : cut prompts longer than the model's context instead of failing
    progress : show a progress bar with an ETA over the batches
    resume : finish the incomplete run in ``out``: only its pending probes run (of those given), on the same
        prompts (checked by fingerprint) and model; finished probes are not redone
    params : ``{probe name: {parameter: value}}`` for probes given by name, e.g.
        ``{"massive_activations": {"ratio_threshold": 10.0}}``; recorded in ``run.json`` and each result's params
    append : add the results to the run already in ``out`` (same model and same inputs only); without it (or
        ``resume``) an existing run in ``out`` is refused, and a run of another model is refused always

    With ``out``, the run is marked incomplete (its probes pending) before any compute and each probe is cleared
    once its last result is saved, so an interrupted scan leaves a run that says it is incomplete. The run keeps
    its inputs (``attnlab.heads.inputs``): the texts or token ids, the exact token ids the model saw, the images by
    content digest and the per-prompt metadata, so it can be re-opened, re-scored (``Run.inputs().prompt_set()``)
    and shared without the file or generator that made them.
    """
    if not isinstance(prompts, PromptSet):
        prompts = PromptSet(name="prompts", texts=list(prompts))
    if len(prompts) == 0:
        raise AttnlabError("no prompts to run")
    probe_objs = _as_probes(probes, params)
    batches = prompt_batches(model, prompts, batch_size, truncate)
    ids = [b.input_ids[i, b.real_slice(i)].tolist() for b in batches for i in range(b.size)]
    ctx = ProbeContext(model=model, dataset=fingerprint(ids), n_prompts=len(ids), meta=list(prompts.meta))
    dataset = {"name": prompts.name, "fingerprint": ctx.dataset, "n_prompts": len(ids), "seed": prompts.seed}
    if resume:
        if out is None:
            raise AttnlabError("resume needs the run directory to finish (out)")
        probe_objs = _pending_probes(Run.open(out), probe_objs, model, ctx.dataset)
    if out is not None:
        check_target(out, model.summary(), dataset, append=append or resume)  # before any compute
    capture = Capture(model, attention=attention, chunk_size=chunk_size, progress=progress)
    attach_all(probe_objs, capture, ctx)  # probes refuse inputs and parameters they cannot use, before any compute
    info = {
        "model": model.summary(),
        "probes": [{"name": p.name, "params": p.record_params()} for p in probe_objs],
        "dataset": dataset,
        "batch_size": batch_size,
    }
    result = ScanResult(info=info)
    if out is not None:
        info["inputs"] = save_inputs(out, prompts, ids)
        result.run = Run.create(out, pending=[p.name for p in probe_objs], **info)
    capture.run(batches, total=len(batches), desc="scan")
    info["attention_path"] = capture.last_path
    if result.run is not None:
        result.run.info["attention_path"] = capture.last_path
    done_names: set[str] = set()
    for p in probe_objs:
        why = unavailable(p.name, model, prompts, ids)
        for r in p.results(ctx):
            result.results[r.name] = r
            reason = not_scored_reason(r, why) if isinstance(r, HeadScores) else None
            if reason is not None:
                result.not_scored[r.name] = reason
            if result.run is not None:
                result.run.add(r)
        if result.run is not None:
            # why this probe's results hold no value, recorded under the run's lock (earlier scans' reasons for
            # other results stay; a result scored now drops its old reason)
            names = [n for n in result.results if n not in done_names]
            result.run.record_not_scored(names, {n: result.not_scored[n] for n in names if n in result.not_scored})
            done_names.update(names)
            result.run.done(p.name)
            if p is not probe_objs[-1]:
                pause_for_tests()
    info["not_scored"] = dict(result.not_scored)
    return result


def _pending_probes(run: Run, probe_objs: list[Probe], model, dataset: str) -> list[Probe]:
    """The probes of ``probe_objs`` an incomplete ``run`` still needs, after checking it ran on these inputs."""
    if run.complete:
        raise AttnlabError(f"run {run.directory} is complete; nothing to resume")
    recorded = run.info.get("dataset", {}).get("fingerprint")
    if recorded and recorded != dataset:
        raise AttnlabError(
            f"run {run.directory} was scanned on other prompts (fingerprint {recorded}, these are {dataset}); "
            "give the same --prompts or --dataset, --n-prompts and --seed as the interrupted scan"
        )
    rec_model = run.info.get("model", {})
    if rec_model and model.name not in (rec_model.get("name"), rec_model.get("path")):
        raise AttnlabError(f"run {run.directory} was scanned with {rec_model.get('name')!r}, not {model.name!r}")
    missing = [name for name in run.pending if name not in {p.name for p in probe_objs}]
    if missing:
        raise AttnlabError(f"run {run.directory} still needs probes {', '.join(missing)}; include them to resume")
    return [p for p in probe_objs if p.name in run.pending]


def pause_for_tests() -> None:
    """Tests of kills and concurrent writers: ``ATTNLAB_TEST_PAUSE_S`` seconds of sleep between the probes of a scan
    (and after ``attnlab intervene`` saved its intervention), so a test can act at a known moment.
    Unset in normal use."""
    pause = os.environ.get("ATTNLAB_TEST_PAUSE_S")
    if pause:
        time.sleep(float(pause))
