"""Command line: ``attnlab scan | census | show | import | models | eval | ablate | intervene | app | report``.

Exit codes: 0 success, 2 user error (one-line message on stderr), 1 unexpected failure (one line; set
``ATTNLAB_DEBUG=1`` for the traceback), 130 interrupted. Only ``AttnlabError`` (and its subclasses) is a user error;
any other exception is a bug. Each command imports what it needs inside its function, so that ``attnlab --help``
and the light commands start without torch, transformers or pandas. Nothing already written is lost: a scan saves each
result atomically as it finishes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

from attnlab.cli_args import (
    check_fits,
    finite_float,
    non_negative_int,
    out_dir,
    port,
    positive_float,
    positive_int,
    probe_params,
    ray_address,
    read_prompt_items,
    read_prompts,
)
from attnlab.errors import AttnlabError
from attnlab.heads.io import atomic_write
from attnlab.models.bundled import BUNDLED, list_models
from attnlab.models.loading import configure_environment

# ---- help made from the registries -----------------------------------------------------------------------------


def _organisms() -> dict:
    """Bundled models that have eval tasks: alias -> BundledModel."""
    return {a: m for a, m in BUNDLED.items() if m.eval_module}


def help_texts() -> dict[str, str]:
    """The registry-made parts of the help: probes and groups, datasets, eval tasks per organism, intervention
    methods, data specs, ablation metrics. Imported only when help is shown (the registries import torch)."""
    # (imported here, not at the top: start-up time, as the docstring says)
    from attnlab.ablation.evaluators import IMAGE_METRICS, TEXT_METRICS
    from attnlab.datasets import describe_datasets
    from attnlab.datasets.specs import data_spec_forms
    from attnlab.interventions.registry import INTERVENTIONS
    from attnlab.probes.registry import GROUPS, PROBES

    def first_line(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0].rstrip(".") if cls.__doc__ else ""

    groups = "; ".join(f"{g} = {', '.join(members)}" for g, members in GROUPS.items())
    return {
        "probes": f"groups: {groups}. Probes: {', '.join(PROBES)}",
        "datasets": "; ".join(f"{name}: {doc.rstrip('.')}" for name, doc in describe_datasets().items()),
        "eval_tasks": "; ".join(f"{a} ({', '.join(m.eval_tasks())})" for a, m in _organisms().items()),
        "eval_n": "; ".join(
            f"{a} {task}: {what}" for a, m in _organisms().items() for task, what in m.eval_counts().items()
        ),
        "organisms": ", ".join(_organisms()),
        "methods": "; ".join(f"{name}: {first_line(cls)}" for name, cls in INTERVENTIONS.items()),
        "data_specs": "; ".join(f"{form} ({meaning})" for form, meaning in data_spec_forms().items()),
        "metrics": f"{', '.join(TEXT_METRICS)} (text models); {', '.join(IMAGE_METRICS)} (vision-language models)",
    }


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose ``{name}`` placeholders in descriptions and argument help are filled from
    ``help_texts()`` when help is printed, so the lists come from the registries and stay cheap to build."""

    def format_help(self) -> str:
        texts = help_texts()

        def fill(text):
            if not text:
                return text
            for key, value in texts.items():
                text = text.replace("{" + key + "}", value)
            return text

        self.description = fill(self.description)
        for action in self._actions:
            action.help = fill(action.help)
        return super().format_help()

    def error(self, message: str):
        """A bad argument: one line (no usage block) and exit 2, like every other user error (``main`` returns 2)."""
        first = (message.strip().splitlines() or ["bad arguments"])[0]
        print(f"{self.prog}: error: {first} (see {self.prog} --help)", file=sys.stderr)
        raise UsageError(2)


class UsageError(SystemExit):
    """A bad command line (already reported in one line): ``SystemExit(2)`` for direct ``parse_args`` callers,
    exit code 2 returned by ``main``."""


def _print_top(results, k: int, not_scored: dict[str, str] | None = None) -> None:
    """A line per head-score result: its top-k heads (strongest first, as its ``higher_is`` says), or
    ``not scored: REASON`` when it holds no value."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.heads.results import HeadScores
    from attnlab.probes.availability import not_scored_reason

    not_scored = not_scored or {}
    for name, r in results.items():
        if isinstance(r, HeadScores):
            reason = not_scored.get(name) or not_scored_reason(r)
            if reason:
                print(f"  {name:<22} not scored: {reason}")
                continue
            top = r.top(k)
            heads = ", ".join(f"{row.label} {row.score:.3f}" for row in top.itertuples())
            order = " (lowest first)" if r.higher_is == "less" else ""
            print(f"  {name:<22} {heads}{order}")


def write_html(fig, path: Path) -> Path:
    """Write a plotly figure as HTML atomically, with plotly.js once beside it (``plotly.min.js``)."""
    atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs="directory"), mode=0o644)
    return path


def write_figures(results, directory: Path) -> list[Path]:
    """Write each result's plotly figure as HTML (plotly.js once, beside them) atomically; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_html(r.plot(), directory / f"{name}.html") for name, r in results.items()]


def write_image_overlays(
    model, prompts, results, directory, *, sources: tuple[str, ...] = ("vhd", "image_attention"), prompt: int = 0
) -> list:
    """Overlay figures of a VLM scan: for each result in ``sources`` present in ``results``, its top head's
    attention from the last prompt token over the image patch grid of prompt ``prompt``, drawn on that image.

    Written atomically as ``directory/image_overlay_<source>.html`` (plotly.js beside it, as the scan's other
    figures); returns the paths (none when the prompts have no images).
    """
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.figures import image_attention_overlay
    from attnlab.heads.results import HeadScores
    from attnlab.probes.image_centric_heads import image_attention_grid

    if getattr(prompts, "images", None) is None or not len(prompts):
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text, image = prompts.texts[prompt], prompts.images[prompt]
    paths = []
    for name in sources:
        r = results.get(name)
        if not isinstance(r, HeadScores) or not r.top_heads(1):
            continue
        ((layer, head),) = r.top_heads(1)
        grid = image_attention_grid(model, text, image, layer=layer, head=head)
        fig = image_attention_overlay(
            image,
            grid,
            layer=layer,
            head=head,
            title=f"prompt {prompt}: L{layer}H{head} (top by {name}), last prompt token -> image patches",
        )
        paths.append(write_html(fig, directory / f"image_overlay_{name}.html"))
    return paths


# Memory a scan holds per prompt token (token ids as Python ints, padded id and mask tensors, the text) and per
# prompt and head (per-prompt float64 numerator/denominator statistics of a few probes), for the estimate that
# refuses a --n-prompts that cannot fit before any prompt is generated.
SCAN_BYTES_PER_TOKEN = 64
SCAN_BYTES_PER_PROMPT_HEAD = 64


def check_scan_fits(model, dataset: str, n_prompts: int, seed: int) -> None:
    """Refuse (one line) a dataset scan whose prompts and per-prompt statistics cannot fit in memory: measured on
    a sample of 4 of the dataset's prompts, scaled to ``n_prompts``."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.datasets import DATASETS
    from attnlab.probes.scan import prompt_token_ids

    sample = DATASETS[dataset](model, min(n_prompts, 4), seed)
    if sample.images is not None:  # image prompts: their length with the image tokens the processor expands
        lengths = model.encode(sample.texts, images=sample.images, truncate=True).lengths.tolist()
    else:
        lengths = [len(x) for x in prompt_token_ids(model, sample, truncate=True)]
    per_prompt = SCAN_BYTES_PER_TOKEN * max(1, sum(lengths) // max(1, len(lengths)))
    per_prompt += SCAN_BYTES_PER_PROMPT_HEAD * model.n_layers * model.n_heads
    if sample.images:
        w, h = sample.images[0].size
        per_prompt += 16 * w * h  # the image and its processed pixels
    check_fits(
        f"--n-prompts {n_prompts:,} ({dataset}, ~{per_prompt:,} bytes a prompt)",
        n_prompts * per_prompt,
        "use a smaller --n-prompts",
    )


def cmd_scan(args) -> int:
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.datasets import DATASETS, PromptSet
    from attnlab.heads.runs import Run, check_target
    from attnlab.models.loading import load
    from attnlab.probes.registry import expand
    from attnlab.probes.scan import scan

    if args.resume and args.probes is None:
        pending = Run.open(args.out).pending
        if not pending:
            raise AttnlabError(f"run {args.out} is complete; nothing to resume")
        args.probes = ",".join(pending)
    probe_names = expand(args.probes or "sinks,induction")  # fail on a bad probe name before loading anything
    params = probe_params(args.param, probe_names)  # and on a bad --param
    if args.resume:
        params = _resumed_params(args.out, probe_names, params)
    if bool(args.prompts) == bool(args.dataset):
        raise AttnlabError("give exactly one of --prompts FILE and --dataset NAME")
    if args.dataset and args.dataset not in DATASETS:
        raise AttnlabError(f"unknown dataset {args.dataset!r}; available: {', '.join(DATASETS)}")
    prompts = read_prompts(args.prompts) if args.prompts else None
    needles = prompts is not None and all(isinstance(p, dict) for p in prompts)
    if not (args.append or args.resume):
        check_target(args.out, None, None, append=False)  # an existing run is refused before loading anything
    model = load(args.model, device=args.device, dtype=args.dtype)
    if args.dataset:
        check_scan_fits(model, args.dataset, args.n_prompts, args.seed)
        prompts = DATASETS[args.dataset](model, args.n_prompts, args.seed)
    elif needles:  # a .jsonl of NIAH records: haystack, needle, question (answer, depth optional)
        from attnlab.datasets.niah_set import needle_prompt_set  # (start-up time: see the module docstring)

        prompts = needle_prompt_set(model, prompts, name=Path(args.prompts).stem)
    else:  # the run keeps these texts under the file's name
        prompts = PromptSet(name=Path(args.prompts).name, texts=prompts)
    print(
        f"scanning {model.name} ({model.architecture}, {model.n_layers} layers x {model.n_heads} heads, "
        f"{model.n_kv_heads} KV) on {len(prompts)} prompts: {', '.join(probe_names)}"
        + (" (resuming)" if args.resume else "")
    )
    result = scan(
        model,
        probe_names,
        prompts,
        batch_size=args.batch_size,
        out=args.out,
        attention=args.attention,
        truncate=args.truncate,
        progress=not args.quiet,
        resume=args.resume,
        params=params,
        append=args.append,
    )
    print(f"top {args.top} heads per probe:")
    _print_top(result.results, args.top, result.not_scored)
    figs = write_figures(result.results, Path(args.out) / "figures")
    if getattr(prompts, "images", None) is not None:  # VLM prompts: top heads' attention drawn on the first image
        figs += write_image_overlays(model, prompts, result.results, Path(args.out) / "figures")
    print(f"results: {Path(args.out).resolve()}  ({len(result.results)} results, run.json)")
    if figs:
        print(f"figures: {figs[0].parent.resolve()}  ({len(figs)} HTML files)")
    return 0


def _resumed_params(out: str, probe_names: list[str], given: dict) -> dict:
    """The parameters a resumed scan runs its probes with: those the interrupted scan recorded for them (a
    finished run must not mix two settings of one probe), with ``--param`` allowed only to repeat them."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.heads.runs import Run
    from attnlab.probes.registry import changed_params

    recorded = {
        p.get("name"): changed_params(p["name"], p.get("params") or {})
        for p in Run.open(out).info.get("probes", [])
        if p.get("name") in probe_names
    }
    params = {name: dict(values) for name, values in recorded.items() if values}
    for name, values in params.items():
        for key, value in values.items():
            if isinstance(value, str) and value.startswith("<callable"):
                raise AttnlabError(
                    f"the interrupted scan ran {name} with {key}={value}, which the command line cannot give; "
                    "resume it with attnlab.scan(..., resume=True) from Python"
                )
    for name, values in given.items():
        for key, value in values.items():
            before = recorded.get(name, {}).get(key, _param_default(name, key))
            if before != value:
                raise AttnlabError(
                    f"--param {name}.{key}={value}: the interrupted scan ran {name} with {key}={before}; "
                    "a resumed scan keeps its parameters"
                )
    return params


def _param_default(probe: str, key: str):
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.probes.registry import param_defaults

    return param_defaults(probe).get(key)


def params_line(probes: list) -> str:
    """``"massive_activations.ratio_threshold=10.0, ..."``: the probe parameters a run recorded that differ from
    the probes' defaults ("" when all are defaults)."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.probes.registry import changed_params

    return ", ".join(
        f"{p['name']}.{k}={json.dumps(v) if isinstance(v, str) else v}"
        for p in probes
        if isinstance(p, dict) and isinstance(p.get("params"), dict) and p.get("name")
        for k, v in changed_params(p["name"], p["params"]).items()
    )


def cmd_show(args) -> int:
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.heads.runs import Run

    run = Run.open(args.run_dir)
    info = run.info
    model = info.get("model", {})
    print(
        f"run {run.directory}: model {model.get('name')} ({model.get('architecture')}), "
        f"dataset {info.get('dataset', {}).get('name')}, created {info.get('created')}"
    )
    if info.get("imported"):
        print(f"  imported from {info['imported'].get('format')} file {info['imported'].get('source')}")
    changed = params_line(info.get("probes") or [])
    if changed:
        print(f"  probe parameters: {changed} (others at their defaults)")
    if not run.complete:
        print(f"  {run.state_line()}")
    if run.rebuilt:
        print(f"  note: {run.directory.name}/run.json disagreed with the result files; listed from the files")
    if args.result:
        from attnlab.probes.availability import not_scored_reason

        r = run[args.result]
        reason = info.get("not_scored", {}).get(args.result) or (
            not_scored_reason(r) if r.kind == "head_scores" else None
        )
        print(f"{args.result}: not scored: {reason}" if reason else r.top(args.top).to_string(index=False))
        return 0
    for name, meta in run.results.items():
        print(f"  {name:<26} {meta['kind']:<12} {meta.get('description', '')}")
    results = {n: run[n] for n in run.names("head_scores")}
    if results:
        print(f"top {args.top} heads per probe:")
        _print_top(results, args.top, info.get("not_scored"))
    return 0


def cmd_import(args) -> int:
    """Turn a reference tool's published file into a run that ``show`` and the app open like any other."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.heads import formats

    if args.format == "retrieval-head":
        run = formats.import_retrieval_head(args.file, args.out, model=args.model, n_kv_heads=args.n_kv_heads)
    elif args.format == "duo":
        run = formats.import_duo(
            args.file,
            args.out,
            config=args.config,
            n_heads=args.n_heads,
            model=args.model,
            sparsity=args.sparsity,
            threshold=args.threshold,
            seed=args.seed,
        )
    else:
        run = formats.import_headvis(args.file, args.out, model=args.model)
    m = run.info["model"]
    kv = f", {m['n_kv_heads']} KV" if m.get("n_kv_heads") else ""
    print(f"imported {args.file} ({args.format}): {m['name']}, {m['n_layers']} layers x {m['n_heads']} heads{kv}")
    print(f"run: {Path(args.out).resolve()}  ({len(run.results)} results: {', '.join(run.results)})")
    return 0


def cmd_models(args) -> int:
    rows = list_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        available = "available" if r["available"] == "yes" else "missing  "
        print(f"{r['name']:<{width}}  {r['kind']:<8} {available}  {r['description']}")
    return 0


def cmd_eval(args) -> int:
    organisms = _organisms()
    organism = organisms.get(args.model)
    path = organism.path if organism else None
    if organism is None:
        p = Path(args.model)
        card = p / "MODEL_CARD.md"
        for alias, m in organisms.items():
            if p.is_dir() and card.is_file() and alias in card.read_text(errors="replace"):
                organism, path = m, p
        if organism is None:
            raise AttnlabError(
                f"eval tasks are defined for the organisms ({', '.join(organisms)}) or their checkpoint directories"
            )
    if path is None:
        raise AttnlabError(f"{args.model} is not installed (its files are missing)")
    module = importlib.import_module(organism.eval_module)
    if args.task not in module.EVAL_TASKS:
        raise AttnlabError(f"unknown task {args.task!r} for {args.model}; tasks: {', '.join(module.EVAL_TASKS)}")
    if args.device.startswith("cuda"):
        import torch  # (start-up: see the module docstring)

        if not torch.cuda.is_available():
            raise AttnlabError(f"--device {args.device} was asked for but no CUDA GPU is available; use --device cpu")
    footprint = getattr(module, "eval_footprint", None)  # tasks that hold all their items: refuse what cannot fit
    if footprint is not None:
        check_fits(
            f"eval {args.model} --task {args.task}" + (f" --n {args.n:,}" if args.n else ""),
            footprint(str(path), args.task, args.n),
            "use a smaller --n",
        )
    metrics = module.evaluate(str(path), args.task, device=args.device, n=args.n, seed=args.seed)
    print(json.dumps(metrics, indent=2, default=float))
    return 0


def cmd_report(args) -> int:
    from attnlab.apps.report import write_report

    out = write_report(args.run_dir, args.out)
    print(f"report: {out}  (one HTML file, plotly embedded: opens offline)")
    return 0


def cmd_app(args) -> int:
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.apps import guard
    from attnlab.apps.app import create_app

    token = None if guard.is_loopback(args.host) else guard.new_token()
    app = create_app(args.runs, host=args.host, token=token)  # a missing runs directory: exit 2 before serving
    query = ""
    if token is not None:
        query = f"?token={token}"
        print(
            f"attnlab: serving on {args.host}: anyone who can reach this address and has the token can run models "
            "here; the token below is required on every request",
            file=sys.stderr,
        )
    shown = "127.0.0.1" if args.host in guard.WILDCARD_HOSTS else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"attnlab app on http://{shown}:{args.port}/{query}  (runs: {Path(args.runs).resolve()}; Ctrl-C stops)")
    sys.stdout.flush()
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def _print_census(result) -> None:
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    import pandas as pd

    table = result.summary(k=3)
    with pd.option_context("display.width", 200, "display.max_colwidth", 90):
        for row in table.itertuples():
            what = row.top if row.status == "scored" else f"not scored: {row.reason}"
            print(f"  {row.statistic:<34} {what}")
    causal = result.info.get("causal")
    if causal and causal.get("atp_spearman") is not None:
        print(f"attribution patching vs exact ablation: Spearman {causal['atp_spearman']:.3f}")


def _device_map(value: str | None):
    """--device-map: "auto" / "balanced" / ... or a JSON file holding an explicit module -> device map."""
    if value is None or not value.endswith(".json"):
        return value
    p = Path(value)
    if not p.is_file():
        raise AttnlabError(f"device map file {value} does not exist")
    try:
        dm = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AttnlabError(f"{value} is not valid JSON: {e.msg}") from None
    if not isinstance(dm, dict):
        raise AttnlabError(f"{value} must hold a JSON object of module name -> device")
    return dm


def cmd_census(args) -> int:
    """Every head statistic of a model in one sweep: correlational in one capture pass, then the causal ablation.
    With --models, --workers, --cluster or --dry-run: a sweep (attnlab.sweep) over models and prompt shards."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.census import census, probe_names
    from attnlab.datasets import DATASETS
    from attnlab.models.loading import load

    names, _ = probe_names(args.statistics)  # fail on a bad statistic name before loading anything
    params = probe_params(args.param, names)  # and on a bad --param
    if bool(args.model) == bool(args.models):
        raise AttnlabError("give exactly one of --model M and --models A,B,...")
    if bool(args.prompts) == bool(args.dataset):
        raise AttnlabError("give exactly one of --prompts FILE and --dataset NAME")
    if args.dataset and args.dataset not in DATASETS:
        raise AttnlabError(f"unknown dataset {args.dataset!r}; available: {', '.join(DATASETS)}")
    prompts = read_prompts(args.prompts) if args.prompts else None
    device_map = _device_map(args.device_map)
    if args.models or args.workers is not None or args.cluster or args.dry_run:
        if params:  # the sweep's units and keys do not carry probe parameters yet: refuse rather than ignore them
            raise AttnlabError("--param applies to one model's census (--model, without sweep flags) for now")
        return _census_sweep(args, prompts, device_map)
    for flag in ("shard_size", "gpus_per_worker", "threads_per_worker"):
        if getattr(args, flag) is not None:
            raise AttnlabError(f"--{flag.replace('_', '-')} applies to sweeps (--models, --workers or --cluster)")
    if device_map is not None:
        model = load(args.model, dtype=args.dtype, device_map=device_map)
    else:
        model = load(args.model, device=args.device, dtype=args.dtype)
    if args.dataset:
        check_scan_fits(model, args.dataset, args.n_prompts, args.seed)
        prompts = DATASETS[args.dataset](model, args.n_prompts, args.seed)
    print(
        f"census of {model.name} ({model.architecture}, {model.n_layers} layers x {model.n_heads} heads, "
        f"{model.n_kv_heads} KV) on {len(prompts)} prompts"
    )
    result = census(
        model,
        prompts,
        statistics=args.statistics,
        causal_prompts=args.causal_prompts,
        attribution=not args.no_attribution,
        batch_size=args.batch_size,
        attention=args.attention,
        truncate=args.truncate,
        out=args.out,
        progress=not args.quiet,
        headvis_dir=args.headvis,
        params=params,
    )
    _print_census(result)
    print(f"census: {Path(args.out).resolve()}  ({len(result.scores)} statistics, census.json)")
    if args.headvis:
        print(f"HeadVis tree: {result.info['headvis_dir']}  (config.json, scatter_data.json, heads/)")
    return 0


def _census_sweep(args, prompts, device_map) -> int:
    """``attnlab census --models ... [--workers N | --cluster ADDR] [--dry-run]``: attnlab.sweep."""
    from attnlab import sweep as sw  # (start-up: the sweep imports torch; Ray only on its own path)

    if args.headvis:
        raise AttnlabError("--headvis writes one model's HeadVis tree: run it with --model, without a sweep")
    models = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]
    common = dict(
        dataset=args.dataset,
        n_prompts=args.n_prompts,
        seed=args.seed,
        statistics=args.statistics,
        causal_prompts=args.causal_prompts,
        attribution=not args.no_attribution,
        batch_size=args.batch_size,
        attention=args.attention,
        truncate=args.truncate,
        device=args.device,
        dtype=args.dtype,
        device_map=device_map,
        shard_size=args.shard_size,
        workers=args.workers,
        cluster=args.cluster,
        gpus_per_worker=args.gpus_per_worker,
        threads_per_worker=args.threads_per_worker,
    )
    if args.dry_run:
        print(sw.dry_run(models, prompts, out=args.out, **common))
        return 0
    where = (
        f"Ray cluster {args.cluster}"
        if args.cluster
        else (f"{args.workers} Ray worker(s)" if args.workers else "this process")
    )
    print(f"sweep of {len(models)} model(s) on {where}: {Path(args.out).resolve()}")
    result = sw.sweep(models, prompts, out=args.out, progress=not args.quiet, **common)
    for m, c in result.censuses.items():
        print(f"{m}: {len(c.scores)} statistics -> {result.dirs[m]}")
        _print_census(c)
    print(
        f"sweep: {len(result.computed)} unit(s) computed, {len(result.resumed)} found finished "
        f"({Path(args.out).resolve() / sw.UNITS})"
    )
    return 0


def cmd_ablate(args) -> int:
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.ablation.causal_test import parse_heads_spec, run_causal_test
    from attnlab.ablation.evaluators import METRICS
    from attnlab.heads.results import HeadScores
    from attnlab.heads.runs import Run
    from attnlab.models.loading import load

    run_dir, name = parse_heads_spec(args.heads)  # fail on a malformed spec, result, k or metric before loading
    metric = args.metric or ("logprob" if args.prompts else "niah")
    if metric not in METRICS:
        raise AttnlabError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if args.prompts and metric != "logprob":
        raise AttnlabError(f"with --prompts the metric is the answers' log-prob (--metric logprob), not {metric}")
    scores = Run.open(run_dir)[name]
    if not isinstance(scores, HeadScores):
        raise AttnlabError(f"{name} in {run_dir} is not a head-score result")
    check_k(scores, args.k)
    items = read_prompt_items(args.prompts) if args.prompts else None
    model = load(args.model, device=args.device)
    table = run_causal_test(
        model,
        args.heads,
        k=args.k,
        metric=metric,
        out=args.out,
        mode=args.mode,
        n_seeds=args.n_seeds,
        seed=args.seed,
        prompts=items,
        truncate=args.truncate,
    )
    print(table[["condition", "k", "n_sets", "metric", "ci_low", "ci_high", "drop", "p_value"]].to_string(index=False))
    print(f"table: {Path(args.out).resolve()}")
    return 0


def check_k(scores, k: int) -> None:
    """``--k`` must leave room for both sets: at most the result's scored heads, and k other heads to draw from."""
    import numpy as np  # (start-up: see the module docstring)

    scored = int(np.isfinite(scores.scores).sum())
    total = scores.n_layers * scores.n_heads
    if k > scored:
        raise AttnlabError(f"--k {k} is more than the {scored} scored heads of {scores.name}")
    if k > total - k:
        raise AttnlabError(
            f"--k {k} leaves {total - k} of the {total} heads to draw k random heads from; use --k {total // 2} or less"
        )


def cmd_intervene(args) -> int:
    """Fit an intervention (on --fit), measure it against the baseline on --eval, save both into --out."""
    # Imported here, not at the top: torch, transformers and pandas would slow every command's start-up.
    from attnlab.datasets.specs import check_sets_disjoint, load_data
    from attnlab.interventions.evaluate import evaluate_intervention, format_table
    from attnlab.interventions.registry import build
    from attnlab.models.loading import load
    from attnlab.probes.scan import pause_for_tests

    iv = build(args.method, args.param)  # bad method / parameter name: exit 2 before loading anything
    eval_set = load_data(args.eval, n=args.n, seed=args.seed)
    fit_set = load_data(args.fit, n=args.n_fit or args.n, seed=args.seed) if args.fit else None
    if fit_set is not None:
        check_sets_disjoint(fit_set, eval_set)  # refuse before loading anything
    model = load(args.model, device=args.device)
    # User errors raised by fit (parameter values, unusable data, an overlap) are AttnlabErrors (exit 2);
    # anything else is a bug and surfaces as an internal error.
    iv.fit(model, fit_set.items if fit_set else None, split=fit_set.name if fit_set else "none")
    if iv.does_nothing():  # say so before the measurement, not only in its table
        print(f"attnlab: note: {iv.does_nothing()}", file=sys.stderr)
    report = evaluate_intervention(model, iv, eval_set, n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size)
    out = Path(args.out)
    for stale in ("report.json", "report.csv"):  # a fitted intervention counts as finished once its report is in
        (out / stale).unlink(missing_ok=True)
    iv.save(out / "intervention")
    pause_for_tests()
    report.save(out)  # last: the app offers intervention/ only beside its report
    print(
        f"{args.method} on {model.name}: fit on {report.info['fit_split']['name']} "
        f"(n={report.info['fit_split']['n']}), measured on {eval_set.name} (n={len(eval_set)})"
    )
    print(format_table(report))
    for note in report.info.get("fitted", {}).get("notes", []):  # e.g. why the method changed nothing here
        print(f"note: {note}")
    print(f"run: {out.resolve()}  (intervention/, report.json, report.csv)")
    return 0


PARAM_HELP = (
    "a probe parameter, PROBE.NAME=VALUE (repeatable), VALUE a number, true/false or a string, e.g. "
    "massive_activations.ratio_threshold=10 (its default 1000 suits 4096-wide models); recorded in run.json and "
    "each result; PROBE must be one the command runs and NAME a parameter of it"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlab",
        description="Find, score and change the attention heads and tokens that matter in a transformer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "scan",
        help="run probes on a model and write a run directory",
        description="Run probes over prompts with one forward pass per batch; write results (JSON + safetensors) "
        "and HTML figures.",
    )
    p.add_argument(
        "--model", required=True, help="bundled alias (see `attnlab models`), local checkpoint directory, or hub id"
    )
    p.add_argument(
        "--probes",
        default=None,
        help="comma-separated probes or groups (default sinks,induction; with --resume, the run's unfinished "
        "probes); {probes}",
    )
    p.add_argument(
        "--prompts",
        help="prompts file: one per line, .jsonl with a 'prompt' field, or .json list; a .jsonl whose records give "
        "'haystack', 'needle' and 'question' (optional 'answer', 'depth') holds needle-in-a-haystack trials for "
        "the retrieval probe",
    )
    p.add_argument(
        "--dataset",
        help="built-in prompt generator: {datasets}",
    )
    p.add_argument("--n-prompts", type=positive_int, default=16, help="prompts to generate with --dataset (default 16)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--out",
        required=True,
        type=out_dir,
        help="run directory to write; it keeps the prompts (texts, token ids, images) beside the results",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add these results to the run already in --out (same model, same prompts); without it an existing "
        "run is refused",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "eager", "fused"],
        help="how attention rows are obtained (default auto: fused SDPA + recomputed rows for long inputs)",
    )
    p.add_argument(
        "--truncate", action="store_true", help="cut prompts longer than the model's context instead of failing"
    )
    p.add_argument("--param", action="append", default=[], metavar="PROBE.NAME=VALUE", help=PARAM_HELP)
    p.add_argument("--top", type=positive_int, default=5, help="heads to print per probe")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish the incomplete run in --out (a scan that was interrupted): run only its unfinished probes, "
        "on the same --model and prompts (checked), without redoing the finished ones",
    )
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser(
        "census",
        help="every head statistic of a model in one sweep (correlational and causal)",
        description="Run a head census: sinks, HeadVis's six metrics, pattern scores, retrieval / vision where the "
        "prompts allow, in one capture pass; then exact single-head ablation of every head on the prompts' "
        "next-token log-prob with attribution patching beside it. Statistics the model or prompts cannot give "
        "are listed as not scored, with the reason.",
    )
    p.add_argument("--model", help="bundled alias (see `attnlab models`), local checkpoint directory, or hub id")
    p.add_argument(
        "--models",
        help="comma-separated models: a sweep (attnlab.sweep) with one census per model, resumable, under --out",
    )
    p.add_argument("--prompts", help="prompts file: one per line, .jsonl with a 'prompt' field, or .json list")
    p.add_argument("--dataset", help="built-in prompt generator: {datasets}")
    p.add_argument("--n-prompts", type=positive_int, default=64, help="prompts to generate with --dataset (default 64)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--statistics",
        default="all",
        help="all (default), or comma-separated groups (sinks, extremes, headvis, patterns, retrieval, vision, causal) "
        "and probe names",
    )
    p.add_argument(
        "--causal-prompts",
        type=positive_int,
        default=16,
        help="prompts the all-heads ablation runs on (default 16)",
    )
    p.add_argument("--param", action="append", default=[], metavar="PROBE.NAME=VALUE", help=PARAM_HELP)
    p.add_argument("--no-attribution", action="store_true", help="skip attribution patching")
    p.add_argument(
        "--out",
        required=True,
        type=out_dir,
        help="run directory to write (a run plus census.json); for a sweep, the sweep directory (units/, a lock, "
        "a log, one census run directory per model)",
    )
    p.add_argument(
        "--headvis",
        metavar="DIR",
        type=out_dir,
        help="also write Neuronpedia's HeadVis tree (scatter_data.json, heads/L{l}H{h}.json with sampled examples) "
        "to DIR, from the same pass",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--attention", default="auto", choices=["auto", "eager", "fused"])
    p.add_argument(
        "--truncate", action="store_true", help="cut prompts longer than the model's context instead of failing"
    )
    p.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread each model over several devices: auto, balanced, or a JSON file of module -> device "
        "(Accelerate, through the TransformerLens bridge; replaces --device)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group(
        "sweeps",
        "Given --models, --workers, --cluster or --dry-run, the census runs as a sweep: units of model x prompt "
        "shard x statistic group, each written once under --out/units/ (resume by re-running the same command), "
        "merged exactly into one census per model. Without --workers/--cluster the units run in this process "
        "(no Ray); with them, on Ray actors (pip install 'attnlab[ray]').",
    )
    g.add_argument(
        "--workers",
        type=positive_int,
        help="Ray workers (actors): start a local Ray instance with N, or run N on the --cluster",
    )
    g.add_argument(
        "--cluster",
        metavar="ADDR",
        type=ray_address,
        help="join a running Ray cluster: auto, HOST:PORT (its head's port) or ray://HOST:PORT (workers default to "
        "the cluster's GPUs / --gpus-per-worker, else its CPUs / --threads-per-worker (2))",
    )
    g.add_argument(
        "--shard-size",
        type=positive_int,
        help="prompts per shard unit, rounded up to a multiple of --batch-size (default: at most 64 shards)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=positive_float,
        help="GPUs each worker takes (default from the checkpoint size: 0.25 below 2 GB, 0.5 below 8 GB, else 1; "
        "more than 1 with --device-map auto for a model spread over several)",
    )
    g.add_argument(
        "--threads-per-worker", type=positive_int, help="CPUs (torch threads) per worker (default: CPUs / workers)"
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the units and each one's estimated time and memory (calibrated on one batch per model), and "
        "the wall time on the workers; compute nothing else",
    )
    p.set_defaults(func=cmd_census)

    p = sub.add_parser(
        "show",
        help="print what a run directory holds",
        description="Print a run's model, dataset, results and top heads.",
    )
    p.add_argument("run_dir")
    p.add_argument("--result", help="print one result's top rows")
    p.add_argument("--top", type=positive_int, default=5)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "import",
        help="turn a reference tool's file into a run (Retrieval_Head, DuoAttention, Neuronpedia HeadVis)",
        description="Read a file a reference tool published and write a run directory that `attnlab show` and "
        "`attnlab app` open like any other: retrieval-head (Retrieval_Head's head_score/MODEL.json, one "
        "{'L-H': [trial scores]} object), duo (DuoAttention's full_attention_heads.tsv, gates per KV head, with its "
        "config.json), headvis (Neuronpedia's per-model head-metrics JSON: six statistics per head).",
    )
    p.add_argument("format", choices=["retrieval-head", "duo", "headvis"])
    p.add_argument("file", help="the file to import")
    p.add_argument("--out", required=True, type=out_dir, help="run directory to write (must not hold a run yet)")
    p.add_argument("--model", help="model name to record (default: from the file)")
    p.add_argument("--n-kv-heads", type=positive_int, help="retrieval-head: KV heads per layer (GQA), if known")
    p.add_argument("--config", help="duo: the config.json written with the TSV (default: the one beside it)")
    p.add_argument(
        "--n-heads", type=positive_int, help="duo: query heads per layer (known for the models DuoAttention publishes)"
    )
    p.add_argument(
        "--sparsity",
        type=finite_float,
        help="duo: full/streaming heads by DuoAttention's quantile rule (about 1 - sparsity of KV heads full); "
        "default: the threshold rule",
    )
    p.add_argument(
        "--threshold", type=finite_float, default=0.5, help="duo: threshold rule, full if gate >= this (0.5)"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="duo: seed of the quantile rule's tie-breaking noise"
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "models",
        help="list bundled models and locally cached checkpoints",
        description="List bundled aliases (whether their files are present, their shape from their config) and "
        "checkpoints in the local Hugging Face cache.",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "eval",
        help="evaluate a bundled organism on its behaviour tasks",
        description="Evaluate an organism on its tasks: {eval_tasks}.",
    )
    p.add_argument("model", help="{organisms}, or a checkpoint directory written by the trainer")
    p.add_argument("--task", required=True, help="one of the organism's tasks: {eval_tasks}")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--n",
        type=positive_int,
        default=None,
        help="the task's size; what it counts depends on the task (its default when omitted): {eval_n}",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "ablate",
        help="causal test: ablate a result's top-k heads vs k random heads",
        description="Ablate the top-k heads of a saved head-score result and k random heads (several seeds) on "
        "NIAH accuracy or answer log-prob (text models) or on shape-scene image-question accuracy or answer "
        "log-prob, each question with its image (vision-language models); write the table (CSV + JSON).",
    )
    p.add_argument("--model", required=True)
    p.add_argument(
        "--heads", required=True, help="RUN_DIR:result_name of a head-score result (e.g. runs/lm:retrieval_heads)"
    )
    p.add_argument("--k", type=positive_int, default=8)
    p.add_argument(
        "--metric",
        default=None,
        help="{metrics} (default niah; logprob with --prompts)",
    )
    p.add_argument(
        "--prompts",
        help="your own prompts to ablate on (metric logprob): one per line (each prompt's last token is scored), "
        'or .jsonl / .json records {"prompt": ..., "answer": ...} (the answer\'s tokens are scored)',
    )
    p.add_argument(
        "--truncate", action="store_true", help="cut prompts longer than the model's context instead of failing"
    )
    p.add_argument("--mode", default="zero", choices=["zero", "mean", "uniform"], help="ablation mode (default zero)")
    p.add_argument("--n-seeds", type=positive_int, default=5, help="random head sets (default 5)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, type=out_dir, help="directory for the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser(
        "intervene",
        help="fit an attention intervention and measure it against the baseline",
        description="Fit an intervention on --fit, then score the baseline and the intervened model on the "
        "held-out --eval data with paired bootstrap intervals. DATA is one of: {data_specs}.",
    )
    p.add_argument("--model", required=True)
    p.add_argument(
        "--method",
        required=True,
        help="{methods}",
    )
    p.add_argument("--fit", help="DATA the intervention is fitted on (optional for methods with fixed parameters)")
    p.add_argument("--eval", required=True, help="held-out DATA it is measured on (must not overlap --fit)")
    p.add_argument(
        "--out",
        required=True,
        type=out_dir,
        help="run directory: intervention/ (fitted state), report.json, report.csv",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="method parameter, value read as JSON (repeatable), e.g. gamma=2.0 or heads=[[3,0]]",
    )
    p.add_argument(
        "--n", type=positive_int, default=32, help="eval items per task (default 32; a file gives at most n)"
    )
    p.add_argument("--n-fit", type=positive_int, default=None, help="fit items per task (default: --n)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_intervene)

    p = sub.add_parser(
        "app",
        help="open the interactive app over a directory of runs",
        description="Serve the Dash app (head maps, attention patterns, token scores) over the runs in a directory.",
    )
    p.add_argument(
        "--runs", required=True, help="directory whose sub-directories are runs written by `attnlab scan --out`"
    )
    p.add_argument("--port", type=port, default=8050)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report of a run (opens offline)",
        description="Write a run's model card, top heads per statistic, head maps (and census scatter, token scores) "
        "or an intervention run's effect table with its intervals, as one HTML file with plotly embedded: no server, "
        "no network needed to open it.",
    )
    p.add_argument("run_dir", help="a run directory (attnlab scan / census / intervene --out)")
    p.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return int(e.code)
    saved_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_a, **_k: f"attnlab: warning: {message}\n"  # one line, no source
    from attnlab import progress

    bars_before = progress.enabled()
    progress.set_enabled(not getattr(args, "quiet", False))  # every progress bar of the command, with an ETA
    try:
        return args.func(args)
    except AttnlabError as e:
        one_line = " ".join(str(e).splitlines())  # a user's value with a line break in it stays on the one line
        print(f"attnlab: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: one line unless debugging
        if os.environ.get("ATTNLAB_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"attnlab: internal error: {type(e).__name__}: {first} (set ATTNLAB_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = saved_format
        progress.set_enabled(bars_before)  # main() called from Python (tests, notebooks) leaves no global change


if __name__ == "__main__":
    sys.exit(main())
