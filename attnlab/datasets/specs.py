"""Data specs: the strings ``attnlab intervene --fit/--eval`` (``load_data``) and ``SoftInjection.fit``
(``load_task``) accept, parsed in one place; bad specs raise ``DataSpecError`` (an ``AttnlabError``, exit 2).

Evaluation data (``load_data`` -> ``EvalSet``)::

    classify:TASK:SPLIT[:SHOTS]   TASK sentiment | topic | all; SPLIT train | valid | test; SHOTS default 0
    icl:TASK:SPLIT[:SHOTS]        TASK an attnlab.datasets.icl task | all; SHOTS default 5 (0-10)
    PATH[:SHOTS]                  function-vectors JSON file [{"input": x, "output": y}, ...]; SHOTS default 0
    pope:SPLIT[:SEED]             VLMs: POPE-style yes/no questions about shape scenes (attnlab.datasets.shapes),
                                  SPLIT random | popular | adversarial, each with its rendered image; SEED draws
                                  the scenes (default: the run's seed), so fit and eval need different seeds

``n`` items per task (the whole file for a path, up to ``n`` when given) drawn with ``seed``. ICL and file
items are generation tasks in the ``Q: x\\nA:`` format (demonstrations of a file item come from the other
items of the same file, never its own query); their ``labels`` are the distinct outputs of the set (per task),
so label-scored fitting (ZeroTuning's gamma search, ACT's head filter) can run on them.

Task data (``load_task`` -> ``TaskData``: train / valid / test pairs of one task): ``icl:TASK`` (attnlab's ICL
train / valid / test pools), a function-vectors JSON file (split seeded 70 / 9 / 21 like FV), a directory holding
``train.json`` and ``valid.json`` (and optionally ``test.json``) in that format, a dict ``{"train": ...,
"valid": ...}`` of pairs, or an ``EvalSet`` (its queries: 85% train, 15% valid). Function-vectors records are read
by one parser (``read_function_vectors``) in both.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.datasets import SHAPE_TEMPLATE, classification, icl
from attnlab.datasets.shapes import POPE_SPLITS, pope_questions, render_scene
from attnlab.errors import DataSpecError


def image_prompt_key(text: str, image: Any) -> str:
    """Identity of an image prompt for fit/test hygiene: the text plus a SHA-256 digest of the image's pixels."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
    return f"{text}\x00image:{digest}"


# ---- evaluation data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPrompt:
    """A generation item: the expected first line of the continuation is ``label`` (stripped).

    ``labels`` (the set's distinct answers) let label-scored fitting use the item too.
    """

    prompt: str
    label: str
    labels: tuple[str, ...]
    query: str
    task: str = ""


@dataclass(frozen=True)
class ImageQuestion:
    """A label-scored VLM item: ``prompt`` holds the image placeholder, ``image`` is its PIL image.

    ``negative`` is the POPE negative type of an absent-object question (``cooccur`` for an absent partner of a
    present object: the hallucination case), ``""`` otherwise."""

    prompt: str
    label: str
    labels: tuple[str, ...]
    image: Any
    negative: str = ""

    @property
    def key(self) -> str:
        """The prompt's identity for fit/test hygiene: its text plus a digest of the image's pixels."""
        return image_prompt_key(self.prompt, self.image)


@dataclass
class EvalSet:
    """Items of one split with the spec that made them; ``kind`` says how they are scored."""

    name: str
    kind: str
    items: list
    queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        """Item identities: the prompt text, plus the image digest for image questions."""
        return [getattr(it, "key", it.prompt) for it in self.items]


def _shots(raw: str | None, default: int, spec: str) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise DataSpecError(f"bad data spec {spec!r}: SHOTS must be a non-negative integer, got {raw!r}")
    return int(raw)


def _task_split_shots(
    spec: str, parts: list[str], kind: str, what: str, names: list[str], *, default_shots: int
) -> tuple[str, str, list[str], int]:
    """``KIND:TASK:SPLIT[:SHOTS]`` -> (task, split, tasks, shots); TASK ``all`` means every name; one-line errors."""
    if len(parts) not in (3, 4):
        raise DataSpecError(f"bad data spec {spec!r}: expected {kind}:TASK:SPLIT[:SHOTS]")
    task, split = parts[1], parts[2]
    tasks = list(names) if task == "all" else [task]
    if any(t not in names for t in tasks):
        raise DataSpecError(f"bad data spec {spec!r}: {what} must be one of {', '.join(names)} or all")
    if split not in ("train", "valid", "test"):
        raise DataSpecError(f"bad data spec {spec!r}: split must be train, valid or test")
    return task, split, tasks, _shots(parts[3] if len(parts) == 4 else None, default_shots, spec)


def _classify(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    task, split, tasks, k = _task_split_shots(
        spec, parts, "classify", "classification task", list(classification.LABELS), default_shots=0
    )
    items = [p for t in tasks for p in classification.build_eval_prompts(t, k, n, split=split, seed=seed)]
    return EvalSet(f"classify:{task}:{split}:{k}", "label", items, [p.prompt.rsplit("Text: ", 1)[-1] for p in items])


def _icl(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    task, split, tasks, k = _task_split_shots(spec, parts, "icl", "ICL task", list(icl.TASK_NAMES), default_shots=5)
    if k > icl.MAX_SHOTS:
        raise DataSpecError(f"bad data spec {spec!r}: at most {icl.MAX_SHOTS} shots")
    items = []
    for t in tasks:
        ps = icl.build_eval_prompts(t, k, n, split=split, seed=seed)
        labels = tuple(sorted({p.answer for p in ps}))
        items += [
            GenerationPrompt(p.prompt, p.answer, labels, p.prompt.rsplit("Q: ", 1)[-1][: -len("\nA:")], t) for p in ps
        ]
    return EvalSet(f"icl:{task}:{split}:{k}", "generation", items, [it.query for it in items])


def _pope(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    if len(parts) not in (2, 3) or parts[1] not in POPE_SPLITS:
        raise DataSpecError(
            f"bad data spec {spec!r}: expected pope:SPLIT[:SEED] with SPLIT one of {', '.join(POPE_SPLITS)}"
        )
    if len(parts) == 3 and not parts[2].isdigit():
        raise DataSpecError(f"bad data spec {spec!r}: SEED must be a non-negative integer")
    split, scene_seed = parts[1], int(parts[2]) if len(parts) == 3 else seed
    pairs = pope_questions(split, n_scenes=n // 2 + 1, seed=scene_seed)[:n]  # up to 6 questions a scene
    images = {}
    items = [
        ImageQuestion(
            SHAPE_TEMPLATE.format(question=q.text),
            q.answer,
            ("yes", "no"),
            images.setdefault(id(s), render_scene(s)),
            q.negative,
        )
        for s, q in pairs
    ]
    return EvalSet(f"pope:{split}:{scene_seed}", "label", items, [it.key for it in items])


def read_function_vectors(path: str | Path) -> list[tuple[str, str]]:
    """(input, output) pairs of a function-vectors JSON file ``[{"input": x, "output": y}, ...]``."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataSpecError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(rows, list) or not rows:
        raise DataSpecError(f'{path} must hold a non-empty JSON list of {{"input": ..., "output": ...}} records')
    return [_record_pair(r, i, str(path)) for i, r in enumerate(rows)]


def _record_pair(record: Any, i: int, where: str) -> tuple[str, str]:
    """One function-vectors record ``{"input": x, "output": y}`` (``y`` may be a list: its first entry) as a
    stripped pair; any other record is a pair ``(x, y)`` kept as given."""
    if isinstance(record, dict):
        if "input" not in record or "output" not in record:
            raise DataSpecError(f"{where}: record {i} needs 'input' and 'output'")
        out = record["output"]
        out = out[0] if isinstance(out, list) and out else out
        return str(record["input"]).strip(), str(out).strip()
    x, y = record
    return str(x), str(y)


def _file(spec: str, path: Path, k: int, n: int | None, seed: int) -> EvalSet:
    pairs = read_function_vectors(path)
    if k >= len(pairs):
        raise DataSpecError(f"bad data spec {spec!r}: {k} shots need more than {k} records, the file has {len(pairs)}")
    rng = random.Random(f"fv:{seed}:{path.name}")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    labels = tuple(sorted({y for _, y in pairs}))
    items = []
    for i in order[: n if n is not None else len(order)]:
        others = [j for j in range(len(pairs)) if pairs[j][0] != pairs[i][0]]
        demos = [pairs[j] for j in rng.sample(others, min(k, len(others)))]
        x, y = pairs[i]
        items.append(GenerationPrompt(icl.format_prompt(demos, x), y, labels, x, path.stem))
    return EvalSet(f"{path.name}:{k}", "generation", items, [it.query for it in items])


def data_spec_forms() -> dict[str, str]:
    """What ``load_data`` accepts: each spec form with its one-line meaning, the task, split and shot names read
    from the dataset modules. The CLI's help and ``load_data``'s error message are made from this table."""
    return {
        "classify:TASK:SPLIT[:SHOTS]": f"text classification; TASK {'|'.join(classification.LABELS)}|all, "
        f"SPLIT {'|'.join(icl.SPLITS)}, SHOTS default 0",
        "icl:TASK:SPLIT[:SHOTS]": f"in-context learning; TASK {'|'.join(icl.TASK_NAMES)}|all, "
        f"SPLIT {'|'.join(icl.SPLITS)}, SHOTS default 5 (at most {icl.MAX_SHOTS})",
        "pope:SPLIT[:SEED]": f"vision-language models: yes/no questions on rendered shape scenes, SPLIT "
        f"{'|'.join(POPE_SPLITS)}, SEED draws the scenes (fit and eval need different seeds)",
        "PATH[:SHOTS]": 'function-vectors JSON file [{"input": x, "output": y}, ...], SHOTS default 0',
    }


def load_data(spec: str, *, n: int = 32, seed: int = 0) -> EvalSet:
    """An ``EvalSet`` from a data spec (``data_spec_forms``); one-line ``DataSpecError`` when bad."""
    if n < 1:
        raise DataSpecError(f"n must be >= 1, got {n}")
    parts = spec.split(":")
    if parts[0] == "classify":
        return _classify(spec, parts, n, seed)
    if parts[0] == "icl":
        return _icl(spec, parts, n, seed)
    if parts[0] == "pope":
        return _pope(spec, parts, n, seed)
    path, k = Path(spec), 0
    if not path.is_file() and len(parts) > 1 and parts[-1].isdigit():
        path, k = Path(spec.rsplit(":", 1)[0]), int(parts[-1])
    if not path.is_file():
        forms = list(data_spec_forms())
        raise DataSpecError(
            f"data {spec!r} is neither {', '.join(forms[:-1])} nor an existing function-vectors JSON file {forms[-1]}"
        )
    return _file(spec, path, k, n, seed)


def check_sets_disjoint(fit: EvalSet, test: EvalSet) -> None:
    """Raise ``DataSpecError`` (a ValueError) when the two sets share a prompt or a query (the item answered)."""
    shared_p = len(set(fit.prompts) & set(test.prompts))
    shared_q = len(set(fit.queries) & set(test.queries))
    if shared_p or shared_q:
        raise DataSpecError(
            f"fit data {fit.name!r} and eval data {test.name!r} overlap "
            f"({shared_p} prompts, {shared_q} queries in common): measure on a held-out split"
        )


# ---- task data (train / valid / test pairs) -----------------------------------------------------------------


@dataclass
class TaskData:
    """(input, output) pairs of one task's splits; ``test`` is never used by ``fit``."""

    name: str
    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]


def _pairs(rows: Any, where: str) -> list[tuple[str, str]]:
    """Pairs from a path to a function-vectors JSON file or from a list of dicts / pairs."""
    if isinstance(rows, (str, Path)):
        return read_function_vectors(rows)
    out = [_record_pair(r, i, where) for i, r in enumerate(rows)]
    if not out:
        raise DataSpecError(f"{where} is empty")
    return out


def split_pairs(
    pairs: Sequence[tuple[str, str]], *, seed: int = 42, fractions: tuple[float, float] = (0.70, 0.09)
) -> tuple[list, list, list]:
    """Seeded train / valid / test split of one file's pairs (70 / 9 / 21 by default, as FV's files)."""
    order = list(range(len(pairs)))
    random.Random(f"site-split:{seed}").shuffle(order)
    n_tr = int(round(fractions[0] * len(pairs)))
    n_va = max(1, int(round(fractions[1] * len(pairs))))
    pick = lambda idx: [tuple(pairs[i]) for i in idx]  # noqa: E731
    return pick(order[:n_tr]), pick(order[n_tr : n_tr + n_va]), pick(order[n_tr + n_va :])


def load_task(source: Any, *, seed: int = 42) -> TaskData:
    """``TaskData`` from ``icl:TASK``, a function-vectors JSON file, a directory of split files, or a dict."""
    if isinstance(source, TaskData):
        return source
    if isinstance(source, dict):
        return TaskData(
            str(source.get("name", "task")),
            _pairs(source["train"], "train"),
            _pairs(source["valid"], "valid"),
            _pairs(source["test"], "test") if source.get("test") else [],
        )
    items = getattr(source, "items", source)
    if (
        isinstance(items, (list, tuple))
        and items
        and all(hasattr(it, "query") and hasattr(it, "label") for it in items)
    ):
        # an EvalSet / GenerationPrompt list (the CLI's --fit data): its queries, 85% steps + 15% selection
        tr, va, _ = split_pairs([(it.query, it.label) for it in items], seed=seed, fractions=(0.85, 0.15))
        return TaskData(str(getattr(source, "name", "fit")), tr, va, [])
    if isinstance(source, str) and source.startswith("icl:"):
        task = source.split(":")[1]
        if task not in icl.TASKS:
            raise DataSpecError(f"unknown ICL task {task!r}; known: {', '.join(icl.TASK_NAMES)}")
        sp = {
            s: [(r["input"], r["output"]) for r in icl.export_function_vectors(task, s, seed=seed)] for s in icl.SPLITS
        }
        return TaskData(task, sp["train"], sp["valid"], sp["test"])
    p = Path(source)
    if p.is_dir():
        files = {s: p / f"{s}.json" for s in ("train", "valid", "test")}
        if not files["train"].is_file() or not files["valid"].is_file():
            raise DataSpecError(f"{p} must hold train.json and valid.json (function-vectors format)")
        return TaskData(
            p.name,
            _pairs(files["train"], "train"),
            _pairs(files["valid"], "valid"),
            _pairs(files["test"], "test") if files["test"].is_file() else [],
        )
    if p.is_file():
        tr, va, te = split_pairs(_pairs(p, str(p)), seed=seed)
        return TaskData(p.stem, tr, va, te)
    raise DataSpecError(
        f"task data {source!r} is neither icl:TASK, a function-vectors JSON file, a directory of split files nor a dict"
    )
