"""Atomic writes: a result file either exists whole or not at all (temp file in the same directory, then rename).

A temp file is named ``.NAME.<pid>.<random>.tmp`` after the process writing it. A writer killed between the two
steps (``kill -9``) leaves its temp file behind; ``clean_stale_temp(directory)`` removes those whose process is gone
(and unnamed ones older than an hour), never another live writer's, and the run index calls it on its next write.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

_TMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")
STALE_UNOWNED_S = 3600.0


def atomic_write(path: str | Path, write, *, mode: int | None = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path`` (readers never see a
    partial file; a failed write leaves the old one). ``mode``: permissions to give the file (default: those of
    ``tempfile.mkstemp``, owner read/write only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temp(directory: str | Path) -> list[Path]:
    """Remove temp files of writers that died mid-write in ``directory`` (not recursive); returns what went."""
    d = Path(directory)
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    now = time.time()
    for f in entries:
        if not (f.name.startswith(".") and f.name.endswith(".tmp")) or f.is_symlink() or not f.is_file():
            continue
        m = _TMP.match(f.name)
        if m:
            stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
        else:  # an older or foreign temp name: only when nobody has touched it for a while
            try:
                stale = now - f.stat().st_mtime > STALE_UNOWNED_S
            except OSError:
                continue
        if stale:
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Write text (e.g. a CSV table), atomically (``mode`` as in ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mode=mode)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write raw bytes (e.g. a PNG), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write named numpy arrays as safetensors, atomically."""
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def json_default(o: Any) -> Any:
    """``json.dumps``' ``default``: numpy scalars and arrays, paths, sets and tuples as JSON values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
