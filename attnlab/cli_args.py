"""Every value the command line takes is checked here, at the edge, before anything is loaded or computed.

One function per kind of value. The ``argparse`` types (``positive_int``, ``non_negative_int``, ``finite_float``,
``positive_float``, ``port``, ``ray_address``, ``out_dir``) raise ``argparse.ArgumentTypeError``, which the parser
turns into one line and exit 2; the readers and checks that need more than the text (``read_prompts``,
``probe_params``, ``check_fits``) raise ``AttnlabError``, which ``attnlab.cli.main`` prints as one line with exit 2.
None of them lets a malformed value reach the code behind it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnlab.errors import AttnlabError

# ---- numbers -----------------------------------------------------------------------------------------------------

_MAX_INT = 10**12  # beyond any count a command can use; keeps int("9" * 5000) and friends out


def _int(text: str, what: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {str(text)[:40]!r}") from None
    if abs(value) > _MAX_INT:
        raise argparse.ArgumentTypeError(f"must be {what} of at most {_MAX_INT:,}, got {str(text)[:40]}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts: prompts, items, seeds, heads, batch sizes, bootstrap resamples)."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite real number (no nan, no inf)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {str(text)[:40]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite real number > 0 (shares: GPUs per worker)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def ray_address(text: str) -> str:
    """A Ray cluster to join: ``auto`` (the one this machine runs or ``RAY_ADDRESS`` names), ``HOST:PORT`` (its
    head's GCS port) or ``ray://HOST:PORT`` (Ray Client). Whether anything answers there is checked when the sweep
    starts (``attnlab.sweep.check_cluster``)."""
    value = str(text).strip()
    if value == "auto":
        return value
    rest = value.removeprefix("ray://")
    host, sep, port_text = rest.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not sep or not host or any(c.isspace() or c in "/@?#" for c in host):
        raise argparse.ArgumentTypeError(f"must be auto or HOST:PORT (e.g. 10.0.0.5:6379), got {value[:60]!r}")
    port(port_text)
    return value


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = _int(text, "a port number (1-65535)")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {value}")
    return value


# ---- output directories ------------------------------------------------------------------------------------------

_PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


def out_dir(text: str) -> str:
    """A directory results can be written to, checked before any work: it is a directory or can be made one, it is
    not on a pseudo file system (``/proc``, ``/sys``, ``/dev``), and a file can really be created in it (or in its
    nearest existing parent). Nothing is left behind by the check."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must be a directory path, got an empty string")
    if "\x00" in str(text):
        raise argparse.ArgumentTypeError("must be a directory path, got a NUL byte")
    try:
        path = Path(text).expanduser().resolve()
    except (OSError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(f"{text} cannot be resolved: {e.strerror or e}") from None
    if any(path == p or path.is_relative_to(p) for p in _PSEUDO_FS):
        raise argparse.ArgumentTypeError(
            f"{text} is on a system pseudo file system ({path.parts[1]}); pick a directory of your own"
        )
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise argparse.ArgumentTypeError(f"{text} {what}, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".attnlab-write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {probe}: {e.strerror or e}") from None
    return str(text)


# ---- prompt files ------------------------------------------------------------------------------------------------

MAX_PROMPT_FILE_BYTES = 512 * 1024**2


def read_prompts(path: str) -> list:
    """Prompts from a file: ``.jsonl`` (one JSON object per line with a string field "prompt" or "text", or a JSON
    string), ``.json`` (a list of strings), else one prompt per line. UTF-8 text only: a binary file, invalid UTF-8,
    NUL bytes, a line that is not an object or string, or a prompt that is not a non-empty string is refused with
    one line naming the line.

    A ``.jsonl`` whose records all give ``haystack``, ``needle`` and ``question`` is a file of needle-in-a-haystack
    trials: its records are returned as dicts (``attnlab.datasets.niah_set.needle_prompt_set`` builds the prompts).
    """
    p = Path(path)
    text = _prompt_file_text(path)
    try:
        if p.suffix == ".jsonl":
            from attnlab.datasets.niah_set import is_needle_record  # (start-up: datasets import torch)

            lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [_jsonl_record(line, i, path) for i, line in lines]
            if records and all(is_needle_record(r) for r in records):
                return records
            prompts = [_jsonl_prompt(rec, i, path) for rec, (i, _) in zip(records, lines)]
        elif p.suffix == ".json":
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                raise AttnlabError(f"{path} must hold a JSON list of strings")
            empty = [i for i, x in enumerate(prompts) if not x.strip()]
            if empty:
                raise AttnlabError(f"{path}: prompt {empty[0]} is empty")
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise AttnlabError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise AttnlabError(f"{path} nests JSON too deeply") from None
    if not prompts:
        raise AttnlabError(f"{path} holds no prompts")
    return prompts


def _prompt_file_text(path: str) -> str:
    """A prompts file's text: an existing file, within the size limit, UTF-8 without NUL bytes (BOM dropped)."""
    p = Path(path)
    if not p.is_file():
        raise AttnlabError(f"prompts file {path} does not exist")
    size = p.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise AttnlabError(f"prompts file {path} has {size:,} bytes; the limit is {MAX_PROMPT_FILE_BYTES:,}")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise AttnlabError(f"{path} holds NUL bytes (a binary file?); prompts must be UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AttnlabError(f"{path} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
    return text.removeprefix("\ufeff")


def read_prompt_items(path: str) -> list[tuple[str, str | None]]:
    """``(prompt, answer or None)`` pairs from a prompts file: as ``read_prompts``, and a ``.jsonl`` record or a
    ``.json`` list item may be ``{"prompt": ..., "answer": ...}`` (the answer is what ``ablate`` scores). The same
    checks as ``read_prompts`` (size, UTF-8, no NUL bytes, non-empty string prompts), one line naming the record."""
    p = Path(path)
    if p.suffix not in (".json", ".jsonl"):
        return [(t, None) for t in read_prompts(path)]
    text = _prompt_file_text(path)
    try:
        if p.suffix == ".jsonl":
            lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [(f"line {i}", _jsonl_record(line, i, path)) for i, line in lines]
        else:
            loaded = json.loads(text)
            if not isinstance(loaded, list):
                raise AttnlabError(f"{path} must hold a list of prompts (strings or objects with a 'prompt')")
            records = [(f"record {i}", rec) for i, rec in enumerate(loaded)]
    except json.JSONDecodeError as e:
        raise AttnlabError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise AttnlabError(f"{path} nests JSON too deeply") from None
    if not records:
        raise AttnlabError(f"{path} holds no prompts")
    items = []
    for where, rec in records:
        answer = None
        if isinstance(rec, dict):
            answer = rec.get("answer")
            rec = rec.get("prompt", rec.get("text"))
        if not isinstance(rec, str) or not rec.strip():
            raise AttnlabError(f'{path} {where} is neither a non-empty string nor an object with a "prompt"')
        if answer is not None and not isinstance(answer, str):
            raise AttnlabError(f"{path} {where}: the answer is not a string")
        items.append((rec, answer))
    return items


def _jsonl_record(line: str, lineno: int, path: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise AttnlabError(f"{path} line {lineno} is not valid JSON: {e.msg}") from None


def _jsonl_prompt(rec, lineno: int, path: str) -> str:
    if isinstance(rec, dict):
        rec = rec.get("prompt", rec.get("text"))
    elif not isinstance(rec, str):
        raise AttnlabError(f'{path} line {lineno} is a JSON {type(rec).__name__}; expected an object with "prompt"')
    if not isinstance(rec, str) or not rec.strip():
        raise AttnlabError(f'{path} line {lineno} has no non-empty string "prompt" (or "text") field')
    return rec


# ---- probe parameters -------------------------------------------------------------------------------------------


def probe_params(pairs: Sequence[str], probe_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param PROBE.NAME=VALUE`` values (``scan`` and ``census``) -> ``{probe: {name: value}}``.

    VALUE is read as a JSON scalar: a number, ``true``/``false``, or a string (quoted, or a bare word that is not
    JSON). PROBE must be one of ``probe_names`` (the probes the command runs) and NAME a parameter of its
    constructor; where the parameter's default is a number or a bool, the value must be one too (an int where
    the default is an int; an int is widened to float where the default is a float). Lists, objects, null, nan and
    inf, an empty value and malformed JSON are refused; so is a parameter given twice. Values the probe itself
    refuses are refused when it is built or attached (``attnlab.probes.registry``)."""
    from attnlab.probes.registry import PROBES, build, param_defaults  # (start-up: the probes import torch)

    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        target, sep, raw = str(pair).partition("=")
        probe, dot, name = target.strip().rpartition(".")
        name = name.strip().replace("-", "_")
        if not sep or not dot or not probe or not name:
            raise AttnlabError(f"--param must look like PROBE.NAME=VALUE, got {str(pair)[:80]!r}")
        if probe not in probe_names:
            what = "is not among the probes run here" if probe in PROBES else "is not a probe"
            raise AttnlabError(f"--param {target}: {probe!r} {what}; probes run here: {', '.join(probe_names)}")
        defaults = param_defaults(probe)
        if name not in defaults:
            known = ", ".join(defaults)
            raise AttnlabError(f"--param {target}: {probe} has no parameter {name!r}; parameters: {known}")
        if name in out.get(probe, {}):
            raise AttnlabError(f"--param {probe}.{name} given twice")
        out.setdefault(probe, {})[name] = _param_value(f"{probe}.{name}", raw, defaults[name])
    for probe, params in out.items():
        build(probe, params)  # values the constructor refuses: refused here, before anything is loaded
    return out


def _param_value(target: str, raw: str, default: Any) -> Any:
    """One ``--param`` value: a JSON scalar (or a bare word, kept as a string), checked against the default's type."""
    text = raw.strip()
    if not text:
        raise AttnlabError(f"--param {target}: no value after '='")

    def not_finite(constant: str):
        raise AttnlabError(f"--param {target}: {constant} is not a finite number")

    try:
        value = json.loads(text, parse_constant=not_finite)
    except (ValueError, RecursionError):  # JSONDecodeError, or an int of more digits than Python reads
        if text[0] in '[{"' or text[0].isdigit() or text[0] in "-+.":
            raise AttnlabError(
                f"--param {target}: cannot read {text[:40]!r} (a number, true/false or a string)"
            ) from None
        value = text  # a bare word: a string
    if value is None or isinstance(value, (list, dict)):
        raise AttnlabError(f"--param {target}: must be a number, true/false or a string, got {text[:40]}")
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        raise AttnlabError(f"--param {target}: {value} is not a finite number")
    if isinstance(value, float) and not math.isfinite(value):  # 1e999
        raise AttnlabError(f"--param {target}: {text[:40]} is not a finite number")
    want = type(default)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise AttnlabError(f"--param {target}: must be true or false, got {text[:40]}")
    if want is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise AttnlabError(f"--param {target}: must be an integer, got {text[:40]}")
    if isinstance(value, int) and abs(value) > _MAX_INT:
        raise AttnlabError(f"--param {target}: {text[:40]} is out of range (at most {_MAX_INT:,})")
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AttnlabError(f"--param {target}: must be a number, got {text[:40]}")
        value = float(value)
    if want is str and not isinstance(value, str):
        raise AttnlabError(f"--param {target}: must be a string, got {text[:40]}")
    return value


# ---- sizes that fit in memory ------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_fits(what: str, need_bytes: float, hint: str, *, available: int | None = None) -> None:
    """Refuse (one line, exit 2) work whose estimated memory ``need_bytes`` exceeds what is available."""
    have = available_memory() if available is None else available
    if have is not None and need_bytes > have:
        raise AttnlabError(
            f"{what} needs about {human_bytes(need_bytes)} of memory, "
            f"more than the {human_bytes(have)} available; {hint}"
        )
