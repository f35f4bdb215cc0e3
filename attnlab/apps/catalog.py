"""What the browser may name: runs inside one directory, and results inside a run.

The browser sends run *names* (a direct child directory of ``runs_dir`` that holds a ``run.json``) and result names
(keys of that run's index), never paths. Everything else is refused with ``AttnlabError`` before any file is read.
Fitted interventions (``attnlab intervene --out NAME``) are named the same way: a direct child ``NAME`` holding
``intervention/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlab.errors import AttnlabError
from attnlab.heads.runs import INDEX, Run

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class RunCatalog:
    """The runs found directly under ``runs_dir`` (one level deep, symlinks that leave the directory ignored)."""

    runs_dir: Path

    @classmethod
    def at(cls, runs_dir: str | Path) -> RunCatalog:
        d = Path(runs_dir).expanduser().resolve()
        if not d.is_dir():
            raise AttnlabError(f"runs directory {runs_dir} does not exist")
        return cls(d)

    def names(self) -> list[str]:
        """Names of the runs, sorted; a directory itself being a run is listed as ``"."``-free: only children."""
        out = []
        for child in sorted(self.runs_dir.iterdir()):
            if _NAME.match(child.name) and self._inside(child) and (child / INDEX).is_file():
                out.append(child.name)
        return out

    def _inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.runs_dir)
        except OSError:
            return False

    def open(self, name: Any) -> Run:
        """The run called ``name``; refuses anything that is not the name of a listed run."""
        if not isinstance(name, str) or not _NAME.match(name) or name not in self.names():
            raise AttnlabError(f"no run named {str(name)[:80]!r} in the runs directory")
        return Run.open(self.runs_dir / name)

    def result(self, run_name: Any, result_name: Any, kind: str):
        """A result of a run by name, checked to be of ``kind`` ("head_scores" or "token_scores")."""
        run = self.open(run_name)
        if not isinstance(result_name, str) or result_name not in run.names(kind):
            raise AttnlabError(f"run {run_name} has no {kind.replace('_', ' ')} result named {str(result_name)[:80]!r}")
        result = run[result_name]
        if result.kind != kind:  # the index said one kind, the file holds another
            raise AttnlabError(f"result {result_name} of run {run_name} holds {result.kind}, not {kind}")
        return result

    def summary(self, name: str) -> dict[str, Any]:
        """One row of the runs table: model, probes, dataset, created, number of results, status (complete, or
        incomplete with the probes not finished)."""
        run = self.open(name)
        info = run.info
        return {
            "run": name,
            "model": model_label(info.get("model", {}).get("name", "?")),
            "probes": ", ".join(p.get("name", "?") for p in info.get("probes", [])),
            "dataset": info.get("dataset", {}).get("name", "?"),
            "created": info.get("created", "?"),
            "results": len(run.results),
            "status": "complete" if run.complete else f"incomplete ({', '.join(run.pending) or 'unfinished'})",
        }

    # ---- fitted interventions (``attnlab intervene --out RUN`` writes ``RUN/intervention/``) ------------------------

    def fitted_names(self) -> list[str]:
        """Names of the directories directly under ``runs_dir`` that hold a saved intervention of a finished
        ``attnlab intervene`` (``intervention/intervention.json`` and the ``report.json`` written after it, the
        files resolving inside the runs directory), sorted."""
        out = []
        for child in sorted(self.runs_dir.iterdir()):
            files = [child / FITTED_DIR / name for name in FITTED_FILES] + [child / FITTED_REPORT]
            if (
                _NAME.match(child.name)
                and files[0].is_file()
                and files[-1].is_file()  # written last: a killed `attnlab intervene` left no report, so no offer
                and all(self._inside(f) for f in files)
            ):
                out.append(child.name)
        return out

    def fitted_dir(self, name: Any) -> Path:
        """The ``intervention/`` directory of the fitted run called ``name``; refuses anything not listed."""
        if not isinstance(name, str) or not _NAME.match(name) or name not in self.fitted_names():
            raise AttnlabError(f"no fitted intervention named {str(name)[:80]!r} in the runs directory")
        return self.runs_dir / name / FITTED_DIR


FITTED_DIR = "intervention"  # what ``attnlab intervene --out`` writes (``Intervention.save``)
FITTED_REPORT = "report.json"  # written after intervention/: its presence says the intervene run finished


def model_label(name: Any) -> str:
    """A model name for the page: a local checkpoint path shows as its directory name only (no server paths)."""
    text = str(name)
    return Path(text.rstrip("/\\")).name if text.startswith(("/", "~")) or ":\\" in text else text


FITTED_FILES = (
    "intervention.json",
    "arrays.safetensors",
)  # base.JSON_NAME, base.ARRAYS_NAME (not imported: no torch here)
