"""A run directory: the results of one scan plus ``run.json``, an index of what they are and how they were made.

``run.json`` holds ``info`` (model, probes, dataset, ...), ``results`` (name -> kind, probe, description),
``status`` (``"complete"`` or ``"incomplete"``) and ``pending`` (probes whose results are not all in yet). A scan
marks its probes pending before it computes and clears each once its last result is saved, so a run killed
mid-scan says it is incomplete, and ``attnlab scan --resume`` runs only the pending probes.

Every index update happens under an exclusive ``fcntl`` lock on ``.run.lock`` in the directory and re-reads the
index first, so two scans writing into one directory both end up indexed. When the index and the result files
disagree (a writer died between saving a result and indexing it, or an older attnlab lost an update), reading the
run rebuilds the index from the result files, and the next write stores the rebuilt one.

Names in an index are data, not paths: a result name must be a plain file-name stem, and every file a run opens
(``run.json`` included) must resolve inside the run directory, so a crafted ``run.json`` or a symlink cannot make
attnlab read a file elsewhere. Unreadable or malformed files give a one-line ``AttnlabError``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from attnlab.errors import AttnlabError
from attnlab.heads.io import clean_stale_temp, read_json, write_json
from attnlab.heads.results import RESULT_TYPES, HeadScores, TokenScores, load_result

INDEX = "run.json"
LOCK = ".run.lock"
COMPLETE, INCOMPLETE = "complete", "incomplete"
RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_INDEX_BYTES = 64 * 1024**2


class MissingResult(AttnlabError, KeyError):
    """A result name the run does not hold (a user error that is also a ``KeyError``, as for a dict)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such result"


def check_result_name(name: Any) -> str:
    """``name`` if it can name a result file (``NAME.json`` / ``NAME.safetensors`` in the run directory)."""
    if not isinstance(name, str) or not RESULT_NAME.match(name) or name.endswith((".json", ".safetensors")):
        raise AttnlabError(f"{str(name)[:80]!r} is not a result name (letters, digits, '.', '_', '-')")
    return name


def inside(directory: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed), refused unless it stays inside ``directory``."""
    root = directory.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        raise AttnlabError(f"{path.name} in {directory.name} cannot be resolved") from None
    if not resolved.is_relative_to(root):
        raise AttnlabError(f"{path.name} in {directory.name} points outside the run directory; refused")
    return resolved


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Exclusive lock on a run directory (``fcntl.flock`` on ``.run.lock``) for the duration of the block."""
    import fcntl  # (POSIX only: imported where a lock is taken)

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(inside(d, d / LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _malformed(path: Path, what: str) -> AttnlabError:
    return AttnlabError(f"{path.parent.name}/{path.name} is malformed: {what}")


def read_index(directory: Path) -> dict[str, Any]:
    """The index of a run directory, checked field by field; one-line AttnlabError when it cannot be used."""
    path = directory / INDEX
    if path.is_symlink() or path.exists():
        real = inside(directory, path)
        if not real.is_file():
            raise AttnlabError(f"{directory} is not an attnlab run directory ({INDEX} is not a file)")
    else:
        raise AttnlabError(f"{directory} is not an attnlab run directory (no {INDEX})")
    try:
        if real.stat().st_size > MAX_INDEX_BYTES:
            raise _malformed(path, f"{real.stat().st_size:,} bytes, more than an index can hold")
        data = read_json(real)
    except AttnlabError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        what = f"{e.msg} (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise _malformed(path, f"not readable JSON: {what}") from None
    return check_index(data, path)


def check_index(data: Any, path: Path) -> dict[str, Any]:
    """Type-check an index (as read from ``path``): wrong types are refused with one line naming the field."""
    if not isinstance(data, dict):
        raise _malformed(path, f"a JSON {type(data).__name__}, not an object")
    info, results = data.get("info", {}), data.get("results", {})
    if not isinstance(info, dict):
        raise _malformed(path, '"info" is not an object')
    if not isinstance(results, dict):
        raise _malformed(path, '"results" is not an object')
    for key in ("model", "dataset"):
        if not isinstance(info.get(key, {}), dict):
            raise _malformed(path, f'"info.{key}" is not an object')
    probes = info.get("probes", [])
    if not isinstance(probes, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name", ""), str) for p in probes
    ):
        raise _malformed(path, '"info.probes" is not a list of objects with a string "name"')
    for key in ("name", "architecture", "path"):
        if not isinstance(info.get("model", {}).get(key, ""), str):
            raise _malformed(path, f'"info.model.{key}" is not a string')
    for key in ("n_layers", "n_heads", "n_kv_heads"):
        value = info.get("model", {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _malformed(path, f'"info.model.{key}" is not a non-negative integer')
    ds = info.get("dataset", {})
    for key in ("n_prompts", "seed"):
        value = ds.get(key, 0)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _malformed(path, f'"info.dataset.{key}" is not a non-negative integer')
    for key in ("name", "fingerprint"):
        if not isinstance(ds.get(key, ""), str):
            raise _malformed(path, f'"info.dataset.{key}" is not a string')
    if not isinstance(info.get("created", ""), str):
        raise _malformed(path, '"info.created" is not a string')
    if not isinstance(info.get("imported", {}), dict):
        raise _malformed(path, '"info.imported" is not an object')
    not_scored = info.get("not_scored", {})
    if not isinstance(not_scored, dict) or not all(isinstance(v, str) for v in not_scored.values()):
        raise _malformed(path, '"info.not_scored" is not an object of reasons (strings)')
    for name, meta in results.items():
        if not RESULT_NAME.match(name) or name.endswith((".json", ".safetensors")):
            raise _malformed(path, f"result name {name[:80]!r} is not a plain name")
        if not isinstance(meta, dict) or meta.get("kind") not in RESULT_TYPES:
            raise _malformed(path, f"result {name!r} has no kind head_scores or token_scores")
        if not all(isinstance(meta.get(k, ""), str) for k in ("probe", "description")):
            raise _malformed(path, f"result {name!r} has a non-string probe or description")
    status = data.get("status", COMPLETE)
    pending = data.get("pending", [])
    if status not in (COMPLETE, INCOMPLETE):
        raise _malformed(path, f'"status" is {str(status)[:40]!r}, not complete or incomplete')
    if not isinstance(pending, list) or not all(isinstance(p, str) for p in pending):
        raise _malformed(path, '"pending" is not a list of probe names')
    return {"info": info, "results": results, "status": status, "pending": pending}


def result_stems(directory: Path) -> set[str]:
    """Names of the results present on disk: ``NAME.json`` and ``NAME.safetensors`` both there (nothing is opened
    or followed here; loading a result refuses files that resolve outside the directory)."""
    found = set()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return found
    for f in entries:
        name = f.name[: -len(".json")] if f.name.endswith(".json") else ""
        if not name or f.name == INDEX or not RESULT_NAME.match(name):
            continue
        if os.path.lexists(directory / f"{name}.safetensors"):
            found.add(name)
    return found


def result_meta(directory: Path, name: str) -> dict[str, str] | None:
    """Index entry (kind, probe, description) of result file ``NAME.json``, or None when it is not a readable result."""
    try:
        f = inside(directory, directory / f"{name}.json")
        if f.stat().st_size > MAX_INDEX_BYTES:
            return None
        meta = read_json(f)
    except (AttnlabError, OSError, ValueError, RecursionError):
        return None
    if not (isinstance(meta, dict) and meta.get("kind") in RESULT_TYPES and meta.get("name") == name):
        return None
    return {"kind": meta["kind"], "probe": str(meta.get("probe", "")), "description": str(meta.get("description", ""))}


def reconciled(directory: Path, indexed: dict[str, dict[str, str]]) -> dict[str, dict[str, str]] | None:
    """The index's results made to agree with the files: entries without files dropped, files without entries
    added (read from their JSON). None when they already agree."""
    on_disk = result_stems(directory)
    if on_disk == set(indexed):
        return None
    out = {n: m for n, m in indexed.items() if n in on_disk}
    for name in sorted(on_disk - set(indexed)):
        meta = result_meta(directory, name)
        if meta is not None:
            out[name] = meta
    return None if out == indexed else out  # files that are not results change nothing


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' model records name the same model: the same checkpoint (resolved path) or the same name,
    and the same layers x heads."""
    shape = ("architecture", "n_layers", "n_heads", "n_kv_heads")
    if any(a.get(k) != b.get(k) for k in shape if k in a and k in b):
        return False
    same_path = bool(a.get("path")) and a.get("path") == b.get("path")
    return same_path or (bool(a.get("name")) and a.get("name") == b.get("name"))


def check_target(
    directory: str | Path, model: dict[str, Any] | None, dataset: dict[str, Any] | None, *, append: bool
) -> None:
    """Refuse to write results into a directory that holds a run they do not belong to.

    A run is one model on one set of inputs: a run of another model is never added to; a run of the same model on
    the same inputs (dataset fingerprint) only with ``append``; nothing is added to a run made on other inputs.
    ``model`` / ``dataset`` None: not known yet (the CLI checks once before loading the model, then again).
    """
    d = Path(directory)
    if not ((d / INDEX).exists() or (d / INDEX).is_symlink()):
        return
    old = Run.open(d)
    old_model, old_ds = old.info.get("model", {}), old.info.get("dataset", {})
    if model is not None and old_model and not same_model(old_model, model):
        raise AttnlabError(
            f"{d} holds a run of {old_model.get('name')!r} ({old_model.get('n_layers')} x {old_model.get('n_heads')} "
            f"heads); its results would be mixed with {model.get('name')!r}'s: choose another --out"
        )
    if not append:
        raise AttnlabError(
            f"{d} already holds a run ({len(old.results)} results of {old_model.get('name')!r}); pass --append to add "
            "these results to it, or choose another --out"
        )
    fp = old_ds.get("fingerprint")
    if dataset is not None and fp and dataset.get("fingerprint") and fp != dataset["fingerprint"]:
        raise AttnlabError(
            f"{d} holds a run on other inputs ({old_ds.get('name')}, fingerprint {fp}; these are "
            f"{dataset.get('name')}, {dataset['fingerprint']}); a run keeps one set of inputs: choose another --out"
        )


@dataclass
class Run:
    """Results of one scan in a directory. ``run["first_token_sink"]`` loads a result by name.

    ``run.json`` is rewritten atomically, under the directory's lock, after each result is saved, so an
    interrupted scan leaves a valid run holding the results finished so far, marked incomplete.
    """

    directory: Path
    info: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, str]] = field(default_factory=dict)
    status: str = COMPLETE
    pending: list[str] = field(default_factory=list)
    rebuilt: bool = False  # the index on disk disagreed with the result files and was rebuilt from them

    @classmethod
    def create(cls, directory: str | Path, *, pending: list[str] | tuple[str, ...] = (), **info: Any) -> Run:
        """Start (or add to) the run in ``directory``: the ``pending`` probes are added to the index's pending list
        and the run is marked incomplete until ``done`` clears them. An existing run's results are kept."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        with locked(d):
            run = cls(directory=d, info=info)
            if (d / INDEX).exists() or (d / INDEX).is_symlink():
                old = cls._read(d)
                run.results = dict(old.results)
                run.pending = list(old.pending)
                known = {p["name"] for p in info.get("probes", [])}
                run.info["probes"] = [p for p in old.info.get("probes", []) if p.get("name") not in known] + list(
                    info.get("probes", [])
                )
                if old.info.get("not_scored"):  # earlier scans' reasons stay until their results are scored
                    run.info.setdefault("not_scored", dict(old.info["not_scored"]))
            run.pending += [p for p in pending if p not in run.pending]
            run._write_index()
        return run

    @classmethod
    def open(cls, directory: str | Path) -> Run:
        """The run in ``directory`` as its files say (the index rebuilt from the result files if they disagree)."""
        return cls._read(Path(directory))

    @classmethod
    def _read(cls, d: Path) -> Run:
        data = read_index(d)
        run = cls(directory=d, info=data["info"], results=data["results"], pending=data["pending"])
        fixed = reconciled(d, run.results)
        if fixed is not None:
            run.results, run.rebuilt = fixed, True
        run.status = INCOMPLETE if run.pending or data["status"] == INCOMPLETE else COMPLETE
        return run

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE and not self.pending

    def state_line(self) -> str:
        """``""`` for a complete run, else one line saying what is missing and how to finish it."""
        if self.complete:
            return ""
        what = f"probes not finished: {', '.join(self.pending)}" if self.pending else "its last write did not finish"
        return f"incomplete run ({what}); finish it with `attnlab scan --resume` and the same --model and prompts"

    def add(self, result: HeadScores | TokenScores) -> None:
        """Save a result into the run and record it in the index (under the directory's lock)."""
        check_result_name(result.name)
        with locked(self.directory):
            clean_stale_temp(self.directory)
            result.save(self.directory)
            self._merge_from_disk()
            self.results[result.name] = {
                "kind": result.kind,
                "probe": result.probe,
                "description": result.description,
            }
            self._write_index()

    def done(self, probe: str) -> None:
        """Mark ``probe``'s results all saved: it leaves the pending list; the run is complete when none is left."""
        with locked(self.directory):
            self._merge_from_disk()
            self.pending = [p for p in self.pending if p != probe]
            self._write_index()

    def record_not_scored(self, scored: set[str] | list[str], reasons: dict[str, str]) -> None:
        """Record why results hold no value (``info["not_scored"]``, under the directory's lock): the reasons of
        results in ``scored`` are replaced by ``reasons``; earlier scans' reasons for other results stay."""
        with locked(self.directory):
            self._merge_from_disk()
            old = {k: v for k, v in self.info.get("not_scored", {}).items() if k not in scored}
            self.info["not_scored"] = {**old, **reasons}
            self._write_index()

    def _merge_from_disk(self) -> None:
        """Take in what other writers indexed since we last read (call with the lock held)."""
        if not (self.directory / INDEX).exists():
            return
        disk = Run._read(self.directory)
        merged = {**disk.results, **self.results}
        self.results = reconciled(self.directory, merged) or merged
        self.pending = list(disk.pending)
        known = {p.get("name") for p in self.info.get("probes", [])}
        self.info["probes"] = list(self.info.get("probes", [])) + [
            p for p in disk.info.get("probes", []) if p.get("name") not in known
        ]
        if "not_scored" in disk.info:  # written only under the lock, so the file's reasons are the current ones
            self.info["not_scored"] = dict(disk.info["not_scored"])

    def __getitem__(self, name: str) -> HeadScores | TokenScores:
        if not isinstance(name, str) or name not in self.results:
            raise MissingResult(f"no result {str(name)[:80]!r} in {self.directory}; have {sorted(self.results)}")
        check_result_name(name)
        for suffix in (".json", ".safetensors"):
            inside(self.directory, self.directory / f"{name}{suffix}")
        try:
            size = (self.directory / f"{name}.json").stat().st_size
        except OSError:
            size = 0
        if size > MAX_INDEX_BYTES:
            raise AttnlabError(f"result {name} in {self.directory.name} has a {size:,}-byte JSON file; refused")
        try:
            return load_result(self.directory, name)
        except AttnlabError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, SafetensorError) as e:
            # a corrupt or truncated file: JSON, safetensors, missing fields or shapes (a data error, not a bug)
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise AttnlabError(
                f"result {name} in {self.directory.name} is unreadable: {type(e).__name__}: {first}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.results

    def __repr__(self) -> str:
        model = self.info.get("model", {}).get("name", "?")
        ds = self.info.get("dataset", {})
        return f"Run({str(self.directory)!r}: {model} on {ds.get('name', '?')}, {len(self.results)} results)"

    def inputs(self):
        """The prompts (texts or token ids), images and metadata the run was made on (``RunInputs``), or None for a
        run written before runs kept their inputs."""
        from attnlab.heads.inputs import load_inputs

        return load_inputs(self.directory)

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, r in self.results.items() if kind is None or r["kind"] == kind]

    def _write_index(self) -> None:
        status = INCOMPLETE if self.pending else COMPLETE
        self.status = status
        path = (
            self.directory / INDEX
        )  # os.replace swaps the directory entry: a symlinked run.json is never written through
        write_json(path, {"info": self.info, "results": self.results, "status": status, "pending": self.pending})
