"""``attnlab.sweep``: a head census of many models, over prompt shards, in this process or on Ray; resumable.

A sweep is a set of *units*, each ``model x prompt range x statistic group``:

- ``shard`` units, one per prompt shard of each model: every statistic whose reduced state merges exactly
  (``Probe.mergeable``: sinks, HeadVis's six, the pattern scores, the max logit, streaming mass) in one capture
  pass over the shard. Shards are whole multiples of the batch size, so their batches are exactly the batches of
  an in-process census (same prompts, same padding, same float32 arithmetic, global prompt indices); a unit
  returns only the probes' reduced state (``Probe.partial()``: per-prompt sums and counts, maxima, tallies),
  never attention patterns.
- one ``model`` unit per model, over the whole prompt set: the facts the merge needs (token-id fingerprint,
  lengths, which statistics these prompts cannot give and why) and the statistics without partials (retrieval on
  NIAH prompts and the vision statistics, which do not merge exactly; the extreme-token group, whose partials are
  not written yet), run as one capture pass.
- one ``causal`` unit per model: the exact all-heads ablation on the first ``causal_prompts`` prompts (and
  attribution patching beside it).

The *driver* (the process that calls ``sweep``) writes each finished unit once, atomically, to
``SWEEP/units/KEY.safetensors`` then ``SWEEP/units/KEY.json`` (JSON + safetensors, never pickle), where KEY is a
content hash of the model's identity (alias / path / hub id and a weights digest: every checkpoint file's name,
size and first and last MiB), the prompt source (a digest of the texts, or dataset name + n + seed), the unit's
kind and prompt range, the statistic parameters, dtype, device and the attnlab version. Re-running the same
command skips finished units (resume); ``SWEEP/sweep.lock`` (``fcntl.flock``) keeps a second driver out. When
all of a model's units exist, the driver merges them (``Probe.merge_partials`` in prompt order, float64) into
the census an uninterrupted ``attnlab.census`` gives (equal to 1e-9; bit for bit except where float64 sums are
added in another order) and writes it to ``SWEEP/<model>-<digest>/`` (a run directory with ``census.json``).

Where units run: in this process, one after another (no flag: Ray is never imported), or on Ray actors
(``workers=N`` starts a local Ray with N workers; ``cluster="auto"|"HOST:PORT"`` joins a running cluster). Each
actor loads a model once and keeps it (up to two models, least recently used out); units are handed out as
actors free up (``ray.wait``), preferring a model the actor already holds, so uneven prompt lengths balance.
A unit whose actor dies (``kill -9``, out of memory) goes back to the queue and runs on a fresh actor, at most
``MAX_ATTEMPTS`` times. Actors take one GPU each where the cluster has GPUs and the device is CUDA (a fraction
for small checkpoints: by weight bytes, see ``gpu_share``; or ``gpus_per_worker``, with ``device_map="auto"``
for a model spread over several), else CPU threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from attnlab import __version__
from attnlab.ablation.metrics import NextTokenLogprob
from attnlab.ablation.scores import ablation_scores
from attnlab.capture import Capture, supports_fused
from attnlab.census import CAUSAL, Census, add_causal, census_info, collect, probe_names, unavailable
from attnlab.datasets import DATASETS
from attnlab.datasets.base import PromptSet, fingerprint
from attnlab.errors import AttnlabError
from attnlab.heads.io import read_arrays, read_json, write_arrays, write_json
from attnlab.heads.results import RESULT_TYPES
from attnlab.models.loading import load, resolve
from attnlab.probes.base import ProbeContext
from attnlab.probes.registry import PROBES
from attnlab.probes.scan import prompt_batches

UNITS = "units"
PLAN = "sweep.json"
LOG = "log.jsonl"
LOCK = "sweep.lock"
MAX_ATTEMPTS = 3  # a unit whose worker dies this many times fails the sweep (its model is too big, or a bug)
MAX_SHARDS = 64  # default shard size: at most this many shards per model
MIB = 1 << 20
# Test hook: "DIR:SECONDS" makes every unit write DIR/<key>.<pid> when it starts and sleep SECONDS mid-unit, so a
# test can kill its worker (or the driver) at a known point. Read by the driver, handed to the workers.
TEST_HOOK = "ATTNLAB_SWEEP_TEST_HOOK"


# ---- what is swept ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSpec:
    """The census parameters every unit of a sweep shares (see ``attnlab.census.census``)."""

    statistics: str = "all"
    causal_prompts: int = 16
    ablation_mode: str = "zero"
    attribution: bool = True
    batch_size: int = 8
    attention: str = "auto"
    chunk_size: int = 256
    truncate: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | dict | None = None
    max_memory: dict | None = None

    def load(self, name: str):
        if self.device_map is not None:
            return load(name, dtype=self.dtype, device_map=self.device_map, max_memory=self.max_memory)
        return load(name, device=self.device, dtype=self.dtype)


@dataclass
class PromptSource:
    """The prompts of a sweep: fixed texts / a PromptSet (the same for every model), or a dataset generator run
    per model (``attnlab.datasets.DATASETS[dataset](model, n_prompts, seed)``)."""

    prompts: PromptSet | None = None
    dataset: str | None = None
    n_prompts: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.prompts is None) == (self.dataset is None):
            raise AttnlabError("give prompts or a dataset, not both")
        if self.prompts is not None and len(self.prompts) == 0:
            raise AttnlabError("no prompts to run")
        if self.dataset is not None:
            if self.dataset not in DATASETS:
                raise AttnlabError(f"unknown dataset {self.dataset!r}; available: {', '.join(DATASETS)}")
            if int(self.n_prompts) < 1:
                raise AttnlabError(f"n_prompts must be >= 1, got {self.n_prompts}")

    def planned_n(self) -> int:
        """Prompts the shards are planned for (a generator may give fewer: the shards past its end are empty)."""
        return len(self.prompts) if self.prompts is not None else int(self.n_prompts)

    def digest(self) -> dict[str, Any]:
        if self.dataset is not None:
            return {"dataset": self.dataset, "n_prompts": int(self.n_prompts), "seed": int(self.seed)}
        p = self.prompts
        h = hashlib.sha256()
        h.update(json.dumps([p.name, p.texts, p.token_ids, p.seed], default=str).encode())
        h.update(json.dumps(p.meta, sort_keys=True, default=str).encode())
        for im in p.images or []:
            h.update(repr((getattr(im, "mode", ""), getattr(im, "size", ""))).encode())
            h.update(im.tobytes() if hasattr(im, "tobytes") else repr(im).encode())
        return {"prompts": p.name, "n_prompts": len(p), "sha256": h.hexdigest()[:16]}

    def build(self, model) -> PromptSet:
        if self.prompts is not None:
            return self.prompts

        return DATASETS[self.dataset](model, int(self.n_prompts), int(self.seed))


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``kind`` ``"model"`` / ``"shard"`` / ``"causal"`` of ``model`` on prompts
    ``start .. stop - 1``; ``key`` is its content hash (its file name under ``units/``)."""

    model: str
    kind: str
    start: int
    stop: int
    key: str
    weights: str = ""  # the model's weights digest: workers key their model cache on it

    @property
    def label(self) -> str:
        short = Path(self.model).name or self.model
        return f"{short}:{self.kind}" + (f"[{self.start}:{self.stop}]" if self.kind == "shard" else "")


def shardable(names: Sequence[str]) -> list[str]:
    """The probes among ``names`` whose state merges exactly across shards."""

    return [n for n in names if PROBES[n].mergeable]


def whole_set(names: Sequence[str]) -> list[str]:
    """The probes among ``names`` that run over the whole prompt set (their state does not merge exactly)."""

    return [n for n in names if not PROBES[n].mergeable]


def shard_size(n_prompts: int, batch_size: int, size: int | None = None) -> int:
    """Prompts per shard: ``size`` rounded up to a multiple of the batch size, or by default the smallest multiple
    that makes at most ``MAX_SHARDS`` shards."""
    if int(batch_size) < 1:
        raise AttnlabError(f"batch_size must be >= 1, got {batch_size}")
    if size is not None:
        if int(size) < 1:
            raise AttnlabError(f"shard_size must be >= 1, got {size}")
        return -(-int(size) // batch_size) * batch_size
    n_batches = -(-int(n_prompts) // batch_size)
    return max(1, -(-n_batches // MAX_SHARDS)) * batch_size


def weights_digest(directory: str | Path) -> str:
    """A fast digest of a checkpoint directory: every file's relative path and size, and its first and last MiB
    (not the whole weights: a sweep over 70B checkpoints should not read 140 GB to name them)."""
    root = Path(directory)
    h = hashlib.sha256()
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(root).parts)  # .cache, .git
    files = sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(MIB))
            if size > MIB:
                fh.seek(max(MIB, size - MIB))
                h.update(fh.read(MIB))
    return h.hexdigest()[:16]


def model_identity(name: str) -> dict[str, Any]:
    """What names a model's weights in unit keys: the name as given, and the digest of the checkpoint directory it
    resolves to (a bundled alias, a local path, or a hub id found in the local cache); a hub id not in the cache is
    keyed by its id alone (pin a local copy to make resumes check the weights)."""

    path = resolve(name)
    if Path(path).is_dir():
        return {"name": name, "weights": weights_digest(path)}
    return {"name": name, "hub_id": path, "weights": "unpinned"}


def _weight_bytes(name: str) -> int:
    path = Path(resolve(name))
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))


def gpu_share(weight_bytes: int) -> float:
    """GPUs one worker asks for by the checkpoint's size: a quarter for < 2 GB, half for < 8 GB, else one."""
    if weight_bytes < 2e9:
        return 0.25
    if weight_bytes < 8e9:
        return 0.5
    return 1.0


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _probe_params(names: Sequence[str]) -> dict[str, dict]:
    return {n: PROBES[n]().record_params() for n in names}


def plan(
    models: Sequence[str],
    identities: dict[str, dict],
    source: PromptSource,
    spec: SweepSpec,
    size: int | None = None,
) -> list[Unit]:
    """The units of a sweep, per model: the causal unit, the model unit, then the shards in prompt order."""

    names, want_causal = probe_names(spec.statistics)
    shards = shardable(names)
    n = source.planned_n()
    step = shard_size(n, spec.batch_size, size)
    common = {
        "prompts": source.digest(),
        "dtype": spec.dtype,
        "device": spec.device,
        "device_map": spec.device_map,
        "truncate": spec.truncate,
        "attnlab": __version__,
    }
    capture = {"batch_size": spec.batch_size, "attention": spec.attention, "chunk_size": spec.chunk_size}
    causal = {"n": spec.causal_prompts, "mode": spec.ablation_mode, "attribution": spec.attribution}
    whole = {**capture, "names": names, "probes": _probe_params(whole_set(names))}
    shard = {**capture, "probes": _probe_params(shards)}
    units = []

    def unit(m: str, kind: str, start: int, stop: int, params: dict) -> Unit:
        what = {**common, "model": identities[m], "kind": kind, "range": [start, stop], "params": params}
        return Unit(m, kind, start, stop, _key(what), identities[m].get("weights", ""))

    for m in models:
        if want_causal:
            units.append(unit(m, "causal", 0, n, causal))
        units.append(unit(m, "model", 0, n, whole))
        if shards:
            units.extend(unit(m, "shard", a, min(a + step, n), shard) for a in range(0, n, step))
    return units


# ---- running one unit (in a worker, or in this process) --------------------------------------------------------


def _attention(model, attention: str) -> str:
    if attention != "auto":
        return attention

    return "fused" if supports_fused(model) else "eager"


def _attach(names, model, capture, ctx) -> tuple[list, dict[str, str]]:
    attached, errors = [], {}
    for name in names:
        probe = PROBES[name]()
        try:
            probe.attach(capture, ctx)
        except AttnlabError as e:
            errors[name] = str(e)
        else:
            attached.append(probe)
    return attached, errors


def _pack_results(results: dict[str, list]) -> tuple[dict, dict[str, np.ndarray]]:
    """Probe results as JSON (each result's metadata) + arrays ``result/<name>/<array>``."""
    meta, arrays = {}, {}
    for probe, rs in results.items():
        meta[probe] = [r._meta() for r in rs]
        for r in rs:
            arrays.update({f"result/{r.name}/{k}": v for k, v in r.arrays().items()})
    return meta, arrays


def _unpack_results(meta: dict, arrays: dict[str, np.ndarray]) -> dict[str, list]:
    out = {}
    for probe, metas in meta.items():
        out[probe] = []
        for m in metas:
            prefix = f"result/{m['name']}/"
            mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            out[probe].append(RESULT_TYPES[m["kind"]].from_parts(m, mine))
    return out


def run_unit(
    model, prompts: PromptSet, spec: SweepSpec, unit: Unit, test_hook: str | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Compute one unit; returns its file contents: JSON-able metadata and named arrays."""

    t0 = time.perf_counter()
    names, _ = probe_names(spec.statistics)
    attention = _attention(model, spec.attention)
    meta: dict[str, Any] = {"kind": unit.kind, "model": unit.model, "range": [unit.start, unit.stop]}
    arrays: dict[str, np.ndarray] = {}
    if test_hook:
        _test_pause(unit, test_hook)
    if unit.kind == "shard":
        batches = prompt_batches(model, prompts, spec.batch_size, spec.truncate, unit.start, unit.stop)
        ctx = ProbeContext(model=model, dataset="", n_prompts=len(prompts), meta=list(prompts.meta))
        capture = Capture(model, attention=attention, chunk_size=spec.chunk_size, progress=False)
        attached, errors = _attach(shardable(names), model, capture, ctx)
        if attached and batches:
            capture.run(batches, total=len(batches))
        meta["errors"] = errors
        meta["attention_path"] = capture.last_path if attached else ""
        meta["partials"] = {}
        for probe in attached:
            part = probe.partial()
            meta["partials"][probe.name] = part["meta"]
            arrays.update({f"partial/{probe.name}/{k}": np.asarray(v) for k, v in part["arrays"].items()})
        meta["n_prompts"] = sum(b.size for b in batches)
        meta["tokens"] = sum(b.size * b.seq_len for b in batches)
    elif unit.kind == "model":
        batches = prompt_batches(model, prompts, spec.batch_size, spec.truncate)
        ids = [b.input_ids[i, b.real_slice(i)].tolist() for b in batches for i in range(b.size)]
        if len(ids) > unit.stop:
            raise AttnlabError(f"{unit.model}: the prompt set has {len(ids)} prompts, more than {unit.stop} planned")
        ctx = ProbeContext(model=model, dataset=fingerprint(ids), n_prompts=len(ids), meta=list(prompts.meta))
        reasons = {n: r for n in names if (r := unavailable(n, model, prompts, ids)) is not None}
        capture = Capture(model, attention=attention, chunk_size=spec.chunk_size, progress=False)
        attached, errors = _attach([n for n in whole_set(names) if n not in reasons], model, capture, ctx)
        if attached:
            capture.run(batches, total=len(batches))
        results, arrays = _pack_results({p.name: p.results(ctx) for p in attached})
        meta["facts"] = {
            "summary": model.summary(),
            "fingerprint": ctx.dataset,
            "lengths": [len(x) for x in ids],
            "dataset": prompts.name,
            "seed": prompts.seed,
        }
        meta.update(reasons=reasons, errors=errors, results=results)
        meta["attention_path"] = capture.last_path if attached else ""
        meta["tokens"] = sum(b.size * b.seq_len for b in batches) if attached else 0
    elif unit.kind == "causal":
        batches = prompt_batches(model, prompts, spec.batch_size, spec.truncate)
        ids = [b.input_ids[i, b.real_slice(i)].tolist() for b in batches for i in range(b.size)]
        part = Census()
        add_causal(part, model, prompts, ids, spec.causal_prompts, spec.ablation_mode, spec.attribution, False)
        results, arrays = _pack_results({CAUSAL: list(part.scores.values())})
        meta.update(results=results, not_scored=part.not_scored, causal=part.info.get("causal"))
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta, arrays


def _process_age() -> float | None:
    """Seconds since this process started (Linux), or None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _test_pause(unit: Unit, hook: str) -> None:
    directory, _, seconds = hook.rpartition(":")
    Path(directory).mkdir(parents=True, exist_ok=True)
    Path(directory, f"{unit.key}.{os.getpid()}").touch()
    time.sleep(float(seconds))


class SweepWorker:
    """Runs units: loads each model it is given once and keeps up to ``max_models`` (least recently used out),
    with the prompt set each model was built for. The same class serves in this process and as a Ray actor."""

    def __init__(self, threads: int | None = None, max_models: int = 2, actor: bool = False):
        t0 = time.perf_counter()
        # TransformerLens' bridge loads lazily in attnlab.load: import it here, once per worker, so that a model's
        # load time is the load alone (the plan counts worker start-up and model loads apart)
        import transformer_lens.model_bridge  # noqa: F401

        if threads:
            torch.set_num_threads(int(threads))
        # a Ray actor's start-up: its process's age now (Ray's worker boot and every import); here: the import above
        self.startup_s = (_process_age() if actor else None) or time.perf_counter() - t0
        self.max_models = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._prompts: dict[tuple[str, str], PromptSet] = {}
        self.loads: list[tuple[str, float]] = []

    def pid(self) -> int:
        return os.getpid()

    @staticmethod
    def _cache_key(name: str, weights: str, spec: SweepSpec) -> str:
        how = [spec.device, spec.dtype, spec.device_map, spec.max_memory]
        return json.dumps([name, weights, how], sort_keys=True, default=str)

    def model(self, name: str, spec: SweepSpec, weights: str = ""):
        key = self._cache_key(name, weights, spec)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        while len(self._models) >= self.max_models:
            old, _ = self._models.popitem(last=False)
            self._prompts = {k: v for k, v in self._prompts.items() if k[0] != old}
        t0 = time.perf_counter()
        self._models[key] = spec.load(name)
        self.loads.append((name, time.perf_counter() - t0))
        return self._models[key]

    def prompts(self, name: str, spec: SweepSpec, source: PromptSource, weights: str = "") -> PromptSet:
        key = (self._cache_key(name, weights, spec), json.dumps(source.digest(), sort_keys=True))
        if key not in self._prompts:
            self._prompts[key] = source.build(self.model(name, spec, weights))
        return self._prompts[key]

    def run(
        self, spec: SweepSpec, source: PromptSource, unit: Unit, test_hook: str | None = None
    ) -> tuple[dict, dict[str, np.ndarray]]:
        model = self.model(unit.model, spec, unit.weights)
        prompts = self.prompts(unit.model, spec, source, unit.weights)
        meta, arrays = run_unit(model, prompts, spec, unit, test_hook)
        meta["worker"] = {"pid": os.getpid(), "host": os.uname().nodename}
        return meta, arrays

    def calibrate(self, spec: SweepSpec, source: PromptSource, name: str) -> dict[str, Any]:
        """Time one batch of the model's first shard (after a warm-up batch), its peak memory, the tokenisation
        of the whole prompt set, the load, and one prompt of the causal ablation; the plan scales these."""
        return _calibrate(self, spec, source, name)


# ---- the sweep directory ---------------------------------------------------------------------------------------


class SweepDir:
    """A sweep directory: the lock, the finished units, the log and the per-model census directories."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.units = self.root / UNITS
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the sweep's lock (one driver at a time) or fail with a one-line error."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AttnlabError(
                f"{self.root} is in use by another sweep driver (pid {holder}); wait for it to finish or use another "
                "--out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def done(self, unit: Unit) -> bool:
        return (self.units / f"{unit.key}.json").is_file() and (self.units / f"{unit.key}.safetensors").is_file()

    def write(self, unit: Unit, meta: dict, arrays: dict[str, np.ndarray], attempt: int) -> None:
        """Write a finished unit (arrays first, then its JSON: a JSON always points at whole arrays), once; log it."""
        if self.done(unit):
            raise RuntimeError(f"unit {unit.key} ({unit.label}) is already written")
        write_arrays(self.units / f"{unit.key}.safetensors", arrays)
        write_json(self.units / f"{unit.key}.json", {"unit": asdict(unit), **meta})
        entry = {"unit": unit.key, "label": unit.label, "attempt": attempt, "seconds": meta.get("seconds")}
        entry.update(worker=meta.get("worker", {}).get("pid"), written=time.time())
        with open(self.root / LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def read(self, unit: Unit) -> tuple[dict, dict[str, np.ndarray]]:
        try:
            return read_json(self.units / f"{unit.key}.json"), read_arrays(self.units / f"{unit.key}.safetensors")
        except (OSError, ValueError) as e:
            raise AttnlabError(f"unit file {unit.key} cannot be read ({e}); delete it to recompute the unit") from None

    def log(self) -> list[dict]:
        """The log of written units (one entry per write, across runs)."""
        p = self.root / LOG
        if not p.is_file():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a killed driver
                continue
        return out

    def model_dir(self, name: str, identity: dict) -> Path:
        short = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name).strip("_") or "model"
        return self.root / f"{short}-{_key(identity)[:8]}"


# ---- merging a model's units into its census -------------------------------------------------------------------


class ModelFacts:
    """What merging needs of a loaded model (name, shape, causality: its ``summary()``), without its weights."""

    def __init__(self, summary: dict[str, Any]):
        self._summary = dict(summary)

    def __getattr__(self, key: str):
        try:
            return self.__dict__["_summary"][key]
        except KeyError:
            raise AttributeError(key) from None

    def summary(self) -> dict[str, Any]:
        return dict(self._summary)


def assemble(units: list[Unit], spec: SweepSpec, store: SweepDir) -> Census:
    """The census of one model from its finished units: shard partials merged in prompt order and restored into
    fresh probes, the whole-set results and the causal scores, in the order ``attnlab.census`` puts them."""

    files = {u: store.read(u) for u in units}
    model_meta, model_arrays = next(files[u] for u in units if u.kind == "model")
    shard_files = [files[u] for u in sorted((u for u in units if u.kind == "shard"), key=lambda u: u.start)]
    facts = model_meta["facts"]
    fm = ModelFacts(facts["summary"])
    ctx = ProbeContext(model=fm, dataset=facts["fingerprint"], n_prompts=len(facts["lengths"]))
    whole = _unpack_results(model_meta["results"], model_arrays)
    names, want_causal = probe_names(spec.statistics)
    not_scored, attached, results = {}, [], []
    for name in names:
        mergeable = PROBES[name].mergeable
        reason = model_meta["reasons"].get(name)
        if reason is None:
            errors = shard_files[0][0]["errors"] if mergeable and shard_files else model_meta["errors"]
            reason = errors.get(name)
        if reason is not None:
            not_scored[name] = reason
            continue
        probe = PROBES[name]()
        if mergeable:
            parts = []
            for meta, arrays in shard_files:
                prefix = f"partial/{name}/"
                mine = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                parts.append({"arrays": mine, "meta": meta["partials"][name]})
            probe.restore(ctx, type(probe).merge_partials(parts))
            results.append(probe.results(ctx))
        else:
            results.append(whole[name])
        attached.append({"name": name, "params": probe.record_params()})
    paths = [m["attention_path"] for m, _ in shard_files] + [model_meta["attention_path"]]
    info = census_info(
        fm.summary(),
        names,
        want_causal,
        attached,
        (facts["dataset"], facts["seed"]),
        facts["fingerprint"],
        facts["lengths"],
        next((p for p in paths if p), ""),
        spec.batch_size,
    )
    result = Census(info=info)
    collect(result, not_scored, results)
    correlational = sum(m.get("seconds", 0) for m, _ in shard_files) + model_meta.get("seconds", 0)
    info["seconds_correlational"] = round(correlational, 3)
    causal = [files[u] for u in units if u.kind == "causal"]
    if causal:
        meta, arrays = causal[0]
        for s in _unpack_results(meta["results"], arrays)[CAUSAL]:
            result.scores[s.name] = s
        result.not_scored.update(meta["not_scored"])
        if meta.get("causal"):
            info["causal"] = meta["causal"]
    causal_s = sum(files[u][0].get("seconds", 0) for u in units if u.kind == "causal")
    info["seconds_total"] = round(correlational + causal_s, 3)
    info["sweep"] = {"directory": str(store.root.resolve()), "units": [u.key for u in units]}
    return result


# ---- executors -------------------------------------------------------------------------------------------------

OnDone = Callable[[Unit, dict, dict, int], None]


class _InProcess:
    """Runs units one after another in this process (no Ray)."""

    n_workers = 1

    def __init__(self, spec: SweepSpec, source: PromptSource):
        self.spec, self.source = spec, source
        self.worker = SweepWorker()
        self.hook = os.environ.get(TEST_HOOK)

    def run(self, units: list[Unit], on_done: OnDone) -> None:
        for unit in units:
            meta, arrays = self.worker.run(self.spec, self.source, unit, self.hook)
            on_done(unit, meta, arrays, 1)

    def calibrate(self, names: list[str]) -> dict[str, dict]:
        return {n: self.worker.calibrate(self.spec, self.source, n) for n in names}

    def close(self) -> None:
        pass


# Actors kept warm (their models loaded) between sweeps of one Ray session that the caller started (a notebook's
# or a test's ``ray.init``): (job id, CPUs, GPUs per actor) -> actor handles. A sweep that starts Ray itself shuts
# it down at the end, and its actors with it.
_WARM: dict[tuple, list] = {}


class _RayPool:
    """Ray actors (``SweepWorker``) fed units as they free up; a unit whose actor dies goes to a fresh actor."""

    def __init__(
        self,
        spec: SweepSpec,
        source: PromptSource,
        models: list[str],
        workers: int | None,
        cluster: str | None,
        gpus_per_worker: float | None,
        threads_per_worker: int | None = None,
    ):
        import ray  # Ray only on this path: an in-process sweep never imports it

        self.ray = ray
        self.spec, self.source = spec, source
        self.started = False
        if not ray.is_initialized():
            opts: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
            try:
                if cluster:
                    ray.init(address=cluster, **opts)
                else:
                    cpus = max(int(workers or 1) * int(threads_per_worker or 1), os.cpu_count() or 1)
                    ray.init(num_cpus=cpus, include_dashboard=False, **opts)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {cluster}" if cluster else "a local Ray instance"
                raise AttnlabError(f"could not start or join {where}: {_first_line(e)}") from None
            self.started = True
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
        use_gpu = spec.device.startswith("cuda") or (spec.device_map is not None and gpus > 0)
        if use_gpu and gpus <= 0:
            self.close()
            raise AttnlabError(f"--device {spec.device} asked for, but the Ray cluster has no GPU")
        if use_gpu:
            self.gpus = float(gpus_per_worker or max(gpu_share(_weight_bytes(m)) for m in models))
            self.n_workers = int(workers or max(1, int(gpus // self.gpus)))
        else:
            self.gpus = 0.0
            self.n_workers = int(workers or max(1, int(cpus // (threads_per_worker or 2))))
        self.threads = int(threads_per_worker or max(1, int(cpus // self.n_workers)))
        self.hook = os.environ.get(TEST_HOOK)
        self.actor_cls = ray.remote(SweepWorker)
        self.warm_key = (ray.get_runtime_context().get_job_id(), self.threads, self.gpus)
        kept = [] if self.started else _WARM.pop(self.warm_key, [])
        self.actors = kept[: self.n_workers] + [self._new_actor() for _ in range(self.n_workers - len(kept))]
        self.spare = kept[self.n_workers :]
        self.holds: list[set[str]] = [set() for _ in self.actors]
        self.source_ref = ray.put(source)

    def _new_actor(self):
        opts = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_restarts": 0}
        return self.actor_cls.options(**opts).remote(self.threads, actor=True)

    def _pick(self, pending: list[Unit], i: int) -> Unit:
        """Next unit for actor i: one of a model it holds, else of a model no actor holds, else the first."""
        held_elsewhere = set().union(*(h for j, h in enumerate(self.holds) if j != i))
        for choose in (lambda u: u.model in self.holds[i], lambda u: u.model not in held_elsewhere):
            for k, u in enumerate(pending):
                if choose(u):
                    return pending.pop(k)
        return pending.pop(0)

    def run(self, units: list[Unit], on_done: OnDone) -> None:
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError  # Ray only on this path

        pending = list(units)
        attempts = dict.fromkeys((u.key for u in units), 0)
        free = list(range(len(self.actors)))
        inflight: dict[Any, tuple[int, Unit]] = {}
        while pending or inflight:
            while free and pending:
                i = free.pop(0)
                unit = self._pick(pending, i)
                attempts[unit.key] += 1
                self.holds[i].add(unit.model)
                inflight[self.actors[i].run.remote(self.spec, self.source_ref, unit, self.hook)] = (i, unit)
            done, _ = ray.wait(list(inflight), num_returns=1)
            i, unit = inflight.pop(done[0])
            try:
                meta, arrays = ray.get(done[0])
            except (RayActorError, WorkerCrashedError) as e:  # the worker died mid-unit: a fresh actor, the unit again
                if attempts[unit.key] >= MAX_ATTEMPTS:
                    raise AttnlabError(
                        f"unit {unit.label} lost its worker {attempts[unit.key]} times (out of memory?); "
                        f"last: {_first_line(e)}"
                    ) from None
                ray.kill(self.actors[i], no_restart=True)
                self.actors[i] = self._new_actor()
                self.holds[i] = set()
                pending.insert(0, unit)
                free.append(i)
                continue
            except RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, AttnlabError):
                    raise AttnlabError(f"{unit.label}: {cause}") from None
                raise RuntimeError(f"{unit.label} failed on a worker: {_first_line(cause or e)}") from None
            free.append(i)
            on_done(unit, meta, arrays, attempts[unit.key])

    def calibrate(self, names: list[str]) -> dict[str, dict]:
        refs = {
            name: self.actors[k % len(self.actors)].calibrate.remote(self.spec, self.source_ref, name)
            for k, name in enumerate(names)
        }
        return {name: self.ray.get(ref) for name, ref in refs.items()}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()  # its actors go with it
        elif hasattr(self, "actors"):
            _WARM[self.warm_key] = self.actors + self.spare


def release_workers() -> int:
    """End the Ray actors kept warm between sweeps of this Ray session (their models with them); returns how many.
    Sweeps that started Ray themselves keep none."""
    n = 0
    if _WARM:
        import ray  # there are warm actors: Ray is loaded already

        for actors in _WARM.values():
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                    n += 1
                except Exception:  # already gone with its session
                    pass
        _WARM.clear()
    return n


def check_cluster(cluster: str | None, timeout: float = 5.0) -> None:
    """A cluster address naming a host and port (``HOST:PORT``, ``ray://HOST:PORT``) must accept a TCP connection
    before Ray is asked to join it: where nothing listens, ``ray.init`` retries for many minutes. ``auto`` and None
    pass (Ray itself says at once when no cluster runs here)."""
    if cluster is None or cluster == "auto":
        return
    host, sep, port = str(cluster).removeprefix("ray://").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AttnlabError(f"cluster must be auto or HOST:PORT, got {cluster!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise AttnlabError(
            f"no Ray cluster answers at {cluster} ({why}); start one there (ray start --head --port {port}) or check "
            "the address"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---- the entry points ------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """A finished sweep: one ``Census`` per model (by the name given), the units computed in this run and the ones
    found finished (resumed), and the sweep directory."""

    censuses: dict[str, Census] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    directory: Path | None = None
    dirs: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, model: str) -> Census:
        return self.censuses[model]

    def __repr__(self) -> str:
        return (
            f"SweepResult({len(self.censuses)} models, {len(self.computed)} units computed, "
            f"{len(self.resumed)} resumed, {self.directory})"
        )


def _setup(models, prompts, dataset, n_prompts, seed, **params) -> tuple[list[str], PromptSource, SweepSpec]:
    if isinstance(models, str):
        models = [m for m in models.split(",")]
    models = [str(m).strip() for m in models if str(m).strip()]
    if not models:
        raise AttnlabError("no models to sweep")
    if len(set(models)) != len(models):
        raise AttnlabError("a model is listed twice")
    if prompts is not None and not isinstance(prompts, PromptSet):
        prompts = PromptSet(name="prompts", texts=list(prompts))
    source = PromptSource(prompts=prompts, dataset=dataset, n_prompts=n_prompts, seed=seed)
    spec = SweepSpec(**params)
    probe_names(spec.statistics)  # a bad statistic fails before anything starts
    if int(spec.causal_prompts) < 1:
        raise AttnlabError(f"causal_prompts must be >= 1, got {spec.causal_prompts}")
    return models, source, spec


def _executor(spec, source, models, workers, cluster, gpus_per_worker, threads_per_worker=None):
    if workers is None and cluster is None:
        return _InProcess(spec, source)
    if workers is not None and int(workers) < 1:
        raise AttnlabError(f"workers must be >= 1, got {workers}")
    try:
        import ray  # noqa: F401  (is Ray installed? only asked on the Ray path)
    except ImportError:
        msg = "Ray is not installed: pip install 'attnlab[ray]' (or run without --workers/--cluster)"
        raise AttnlabError(msg) from None
    if threads_per_worker is not None and int(threads_per_worker) < 1:
        raise AttnlabError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    return _RayPool(spec, source, models, workers, cluster, gpus_per_worker, threads_per_worker)


def sweep(
    models: str | Sequence[str],
    prompts: Sequence[str] | PromptSet | None = None,
    *,
    out: str | Path,
    dataset: str | None = None,
    n_prompts: int = 64,
    seed: int = 0,
    statistics: str = "all",
    causal_prompts: int = 16,
    ablation_mode: str = "zero",
    attribution: bool = True,
    batch_size: int = 8,
    attention: str = "auto",
    chunk_size: int = 256,
    truncate: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    gpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run a census of every model in ``models`` on ``prompts`` (or ``dataset``), unit by unit, into ``out``.

    Parameters
    ----------
    models : comma-separated string or list of model names (bundled alias, checkpoint directory or hub id)
    prompts : list of str or PromptSet, or None with ``dataset`` (generated per model: n_prompts, seed)
    out : the sweep directory (units, lock, log, one census run directory per model)
    statistics, causal_prompts, ablation_mode, attribution, batch_size, attention, chunk_size, truncate :
        as in ``attnlab.census.census``
    device, dtype, device_map, max_memory : how each worker loads each model (``attnlab.load``)
    shard_size : int or None
        Prompts per shard unit, rounded up to a multiple of ``batch_size`` (default: at most 64 shards per model).
    workers : int or None
        Ray workers (actors). None and no ``cluster``: units run in this process, without Ray.
    cluster : "auto", "HOST:PORT" or None
        Join a running Ray cluster instead of starting a local one.
    gpus_per_worker : float or None
        GPUs per actor on a GPU cluster (default from the checkpoint size: ``gpu_share``).
    threads_per_worker : int or None
        CPUs (torch threads) per actor (default: the cluster's CPUs over the workers).
    progress : bool, default=True
        One progress bar for the sweep, with each model's finished / total units.
    """
    models, source, spec = _setup(
        models,
        prompts,
        dataset,
        n_prompts,
        seed,
        statistics=statistics,
        causal_prompts=causal_prompts,
        ablation_mode=ablation_mode,
        attribution=attribution,
        batch_size=batch_size,
        attention=attention,
        chunk_size=chunk_size,
        truncate=truncate,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
    )
    check_cluster(cluster)
    identities = {m: model_identity(m) for m in models}
    units = plan(models, identities, source, spec, shard_size)
    store = SweepDir(out)
    store.lock()
    try:
        pool = (workers, cluster, gpus_per_worker, threads_per_worker)
        return _drive(store, models, identities, units, source, spec, pool, progress)
    finally:
        store.unlock()


def _drive(store, models, identities, units, source, spec, pool, progress):
    write_json(
        store.root / PLAN,
        {
            "models": {
                m: {"identity": identities[m], "census": store.model_dir(m, identities[m]).name} for m in models
            },
            "prompts": source.digest(),
            "spec": asdict(spec),
            "units": [asdict(u) for u in units],
        },
    )
    result = SweepResult(directory=store.root)
    by_model = {m: [u for u in units if u.model == m] for m in models}
    todo = [u for u in units if not store.done(u)]
    result.resumed = [u.key for u in units if store.done(u)]
    left = {m: sum(1 for u in todo if u.model == m) for m in models}
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep", disable=not progress, unit="unit")

    def counts() -> str:
        return ", ".join(f"{Path(m).name or m} {len(by_model[m]) - left[m]}/{len(by_model[m])}" for m in models)

    def finish(m: str) -> None:
        c = assemble(by_model[m], spec, store)
        d = store.model_dir(m, identities[m])
        c.save(d)
        result.censuses[m], result.dirs[m] = c, d

    def on_done(unit: Unit, meta: dict, arrays: dict, attempt: int) -> None:
        store.write(unit, meta, arrays, attempt)
        result.computed.append(unit.key)
        left[unit.model] -= 1
        bar.update(1)
        bar.set_postfix_str(counts())
        if left[unit.model] == 0:
            finish(unit.model)

    bar.set_postfix_str(counts())
    try:
        for m in models:
            if left[m] == 0:
                finish(m)
        if todo:
            executor = _executor(spec, source, models, *pool)
            try:
                executor.run(todo, on_done)
            finally:
                executor.close()
    finally:
        bar.close()
    result.censuses = {m: result.censuses[m] for m in models}
    result.dirs = {m: result.dirs[m] for m in models}
    return result


# ---- the plan before the spend ---------------------------------------------------------------------------------


def _peak_memory_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: reset this process's peak resident set (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _memory_now(device: str) -> tuple[int | None, int | None]:
    """(current, peak) bytes: CUDA allocator on a GPU, the process's resident set (VmRSS, VmHWM) on a CPU."""

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated()), int(torch.cuda.max_memory_allocated())
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    kb = {k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}
    return kb.get("VmRSS"), kb.get("VmHWM")


def _calibrate(worker: SweepWorker, spec: SweepSpec, source: PromptSource, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    fresh = SweepWorker._cache_key(name, "", spec) not in worker._models
    model = worker.model(name, spec)
    load_s = time.perf_counter() - t0 if fresh else next((s for n, s in reversed(worker.loads) if n == name), 0.0)
    prompts = worker.prompts(name, spec, source)
    t1 = time.perf_counter()
    batches = prompt_batches(model, prompts, spec.batch_size, spec.truncate)
    tokenize_s = time.perf_counter() - t1
    lengths = [int(n) for b in batches for n in b.lengths.tolist()]
    names, want_causal = probe_names(spec.statistics)
    probes = shardable(names) or whole_set(names)
    first = batches[0]
    ctx = ProbeContext(model=model, dataset="", n_prompts=len(prompts), meta=list(prompts.meta))
    attention = _attention(model, spec.attention)
    dev = str(model.device)

    def one_batch() -> float:
        capture = Capture(model, attention=attention, chunk_size=spec.chunk_size, progress=False)
        _attach(probes, model, capture, ctx)
        t = time.perf_counter()
        with torch.inference_mode():
            capture.run_batch(first, logit_positions=None)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    one_batch()  # warm-up: first-call costs are not per-token costs
    base, _ = _memory_now(dev)
    _peak_memory_reset(dev)
    seconds = one_batch()
    _, peak = _memory_now(dev)
    out = {
        "model": name,
        "device": dev,
        "startup_s": worker.startup_s,
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        "lengths": lengths,
        "batch": [first.size, first.seq_len],
        "attention": attention,
        "sec_per_token": seconds / (first.size * first.seq_len),
        "base_bytes": base,
        "activation_bytes": None if base is None or peak is None else max(0, peak - base),
        "causal_sec_per_token": None,
    }
    if want_causal and model.causal and not (model.modality == "vision-language" and prompts.images is not None):
        ids = [b.input_ids[i, b.real_slice(i)].tolist() for b in batches for i in range(b.size)]
        one = next((x for x in ids if len(x) >= 2), None)
        if one is not None:
            t = time.perf_counter()
            ablation_scores(
                model, [one], NextTokenLogprob(), mode=spec.ablation_mode, attribution=spec.attribution, progress=False
            )
            out["causal_sec_per_token"] = (time.perf_counter() - t) / len(one)
    return out


@dataclass
class SweepPlan:
    """``--dry-run``: the units, each one's estimated time and peak memory (from a calibration of each model on its
    first batch, scaled to the unit's batches), and the wall time the sweep would take on ``n_workers``."""

    rows: list[dict] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)
    n_workers: int = 1
    wall_s: float = 0.0
    compute_s: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"{'unit':<26} {'model / kind':<34} {'prompts':>11} {'tokens':>9} {'est. time':>10} {'est. memory':>12}"
        ]
        for r in self.rows:
            what = f"{Path(r['model']).name or r['model']} {r['kind']}"
            mem = _fmt_bytes(r["memory"]) if r["memory"] else "?"
            t = "done" if r["done"] else _fmt_s(r["seconds"])
            lines.append(
                f"{r['key']:<26} {what:<34} {r['start']:>5}-{r['stop']:<5} {r['tokens']:>9,} {t:>10} {mem:>12}"
            )
        for m, c in self.models.items():
            lines.append(
                f"{Path(m).name or m}: calibrated on {c['device']} ({c['attention']} path): "
                f"{c['sec_per_token'] * 1e6:.1f} us per token, worker start-up {c['startup_s']:.1f} s, "
                f"model load {c['load_s']:.1f} s"
            )
        lines.append(
            f"compute {_fmt_s(self.compute_s)} in all; with {self.n_workers} worker(s) about {_fmt_s(self.wall_s)} "
            "wall (a list schedule of these estimates with worker start-up and model loads; Ray's own start-up not "
            "included; a projection)"
        )
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1024 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return ""


def _batch_shapes(lengths: list[int], batch_size: int, start: int, stop: int) -> list[tuple[int, int]]:
    return [
        (len(lengths[i : min(i + batch_size, stop)]), max(lengths[i : min(i + batch_size, stop)]))
        for i in range(start, min(stop, len(lengths)), batch_size)
    ]


def estimate(units: list[Unit], calib: dict[str, dict], spec: SweepSpec, store: SweepDir | None, n_workers: int):
    """Per-unit time and memory from each model's calibration, and a list schedule of them on ``n_workers``."""
    names, _ = probe_names(spec.statistics)
    has_whole = bool(whole_set(names))
    rows = []
    for u in units:
        c = calib[u.model]
        lengths = c["lengths"]
        b0, t0 = c["batch"]

        def act(b: int, t: int, c=c, b0=b0, t0=t0) -> float:  # activation memory scales with the batch's rows x keys
            if not c["activation_bytes"]:
                return 0.0
            cols = min(t, spec.chunk_size) if c["attention"] == "fused" else t
            cols0 = min(t0, spec.chunk_size) if c["attention"] == "fused" else t0
            return c["activation_bytes"] * (b * t * cols) / (b0 * t0 * cols0)

        shapes = _batch_shapes(lengths, spec.batch_size, u.start, u.stop)
        tokens = sum(b * t for b, t in shapes)
        memory = (c["base_bytes"] or 0) + max((act(b, t) for b, t in shapes), default=0.0)
        if u.kind == "shard":
            seconds = tokens * c["sec_per_token"]
        elif u.kind == "model":
            seconds = c["tokenize_s"] + (tokens * c["sec_per_token"] if has_whole else 0.0)
            tokens = tokens if has_whole else 0
        else:
            chosen = [n for n in lengths if n >= 2][: spec.causal_prompts]
            tokens = sum(chosen)
            seconds = tokens * (c["causal_sec_per_token"] or 0.0)
        done = store is not None and store.done(u)
        rows.append(
            {**asdict(u), "tokens": int(tokens), "seconds": float(seconds), "memory": memory, "done": bool(done)}
        )
    todo = sorted((r for r in rows if not r["done"]), key=lambda r: -r["seconds"])
    startup = max((c.get("startup_s", 0.0) for c in calib.values()), default=0.0)
    clocks = [startup] * max(1, n_workers)
    held: list[set] = [set() for _ in clocks]
    for r in todo:  # longest first, each on the worker that frees first (plus a load if it lacks the model)
        load = calib[r["model"]]["load_s"]
        i = min(range(len(clocks)), key=lambda k: clocks[k] + (0 if r["model"] in held[k] else load))
        if r["model"] not in held[i]:
            clocks[i] += calib[r["model"]]["load_s"]
            held[i].add(r["model"])
        clocks[i] += r["seconds"]
    return SweepPlan(rows, calib, n_workers, max(clocks), sum(r["seconds"] for r in todo))


def dry_run(
    models: str | Sequence[str],
    prompts: Sequence[str] | PromptSet | None = None,
    *,
    out: str | Path | None = None,
    dataset: str | None = None,
    n_prompts: int = 64,
    seed: int = 0,
    shard_size: int | None = None,
    workers: int | None = None,
    cluster: str | None = None,
    gpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    **params,
) -> SweepPlan:
    """The plan of ``sweep(...)`` with the same arguments, before any compute: the units (finished ones marked
    done when ``out`` holds them), and the time and memory of each from a short calibration of every model (one
    batch, on a worker when ``workers`` / ``cluster`` are given, else here), scaled to the sweep."""
    models, source, spec = _setup(models, prompts, dataset, n_prompts, seed, **params)
    check_cluster(cluster)
    identities = {m: model_identity(m) for m in models}
    units = plan(models, identities, source, spec, shard_size)
    executor = _executor(spec, source, models, workers, cluster, gpus_per_worker, threads_per_worker)
    try:
        calib = executor.calibrate(models)
        n = executor.n_workers if workers is None else int(workers)
    finally:
        executor.close()
    return estimate(units, calib, spec, SweepDir(out) if out else None, n)
