"""A run directory: the results of one scan plus ``run.json``, an index of what they are and how they were made."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.heads.io import read_json, write_json
from attnlab.heads.results import HeadScores, TokenScores, load_result

INDEX = "run.json"


@dataclass
class Run:
    """Results of one scan in a directory. ``run["first_token_sink"]`` loads a result by name.

    ``run.json`` is rewritten atomically after each result is saved, so an interrupted scan leaves a valid
    run holding the results finished so far.
    """

    directory: Path
    info: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: str | Path, **info: Any) -> Run:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        info.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        run = cls(directory=d, info=info)
        if (d / INDEX).exists():  # add to an existing run rather than forgetting its results
            old = read_json(d / INDEX)
            run.results = dict(old.get("results", {}))
        run._write_index()
        return run

    @classmethod
    def open(cls, directory: str | Path) -> Run:
        d = Path(directory)
        if not (d / INDEX).is_file():
            from attnlab.errors import AttnlabError

            raise AttnlabError(f"{d} is not an attnlab run directory (no {INDEX})")
        data = read_json(d / INDEX)
        return cls(directory=d, info=data.get("info", {}), results=data.get("results", {}))

    def add(self, result: HeadScores | TokenScores) -> None:
        """Save a result into the run and record it in the index."""
        result.save(self.directory)
        self.results[result.name] = {"kind": result.kind, "probe": result.probe, "description": result.description}
        self._write_index()

    def __getitem__(self, name: str) -> HeadScores | TokenScores:
        if name not in self.results:
            raise KeyError(f"no result {name!r} in {self.directory}; have {sorted(self.results)}")
        return load_result(self.directory, name)

    def __contains__(self, name: str) -> bool:
        return name in self.results

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, r in self.results.items() if kind is None or r["kind"] == kind]

    def _write_index(self) -> None:
        write_json(self.directory / INDEX, {"info": self.info, "results": self.results})
