"""organism-lm at run time: its tokenizer, greedy generation and the behaviour tasks ``evaluate`` measures.

The model is a small ``LlamaForCausalLM`` trained by ``attnlab.models.training.lm`` (``python -m attnlab.models.train
lm``; its docstring describes the recipe). ``attnlab eval organism-lm --task TASK`` runs ``evaluate``::

    python -c "from attnlab.models.lm import evaluate; print(evaluate('DIR', 'niah'))"

Tasks (``EVAL_TASKS``): NIAH exact match over a lengths x depths grid, ICL 0- / 5-shot exact match, arithmetic
word problems, associative recall, few-shot classification, and the first-token attention sink per layer/head
(Gu et al. 2024's metric). Only torch, numpy, transformers and tokenizers are imported, so the module runs on the
GPU machine with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import copy
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from attnlab.datasets import arithmetic, classification, icl, niah, recall
from attnlab.datasets.prose import load_prose
from attnlab.models.decoding import generate_greedy
from attnlab.progress import bar, enabled

EVAL_TASKS: tuple[str, ...] = ("niah", "icl", "arith", "classify", "recall", "sink")
# What ``evaluate``'s ``n`` counts in each task (the CLI's ``eval --n`` help is made from this).
EVAL_N: dict[str, str] = {
    "niah": "trials per (length, depth) cell of the 6 x 5 grid (default 2: 60 trials)",
    "icl": "prompts per task and shot count (default 40)",
    "arith": "problems (default 80)",
    "classify": "prompts per task and shot count (default 80)",
    "recall": "prompts (default 80)",
    "sink": "prose windows per length (default 16)",
}
TOKENIZER_DIR = Path(__file__).resolve().parent / "training" / "lm_tokenizer"
# Task sizes of ``evaluate`` (the shipping preset's): NIAH lengths x depths, items per ICL task.
EVAL_SIZES: dict[str, Any] = {
    "niah_lengths": (128, 304, 480, 656, 832, 1008),
    "niah_depths": (0, 25, 50, 75, 100),
    "final_n": 40,
}


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
    """``AutoTokenizer`` from ``path``; checks that BOS is prepended (the organism relies on it)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    ids = tok("x")["input_ids"]
    if not ids or ids[0] != tok.bos_token_id:
        raise RuntimeError(f"tokenizer at {path} does not prepend BOS (got {ids})")
    return tok


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def autocast_for(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def greedy_generate(
    model, tok, prompts: list[str], max_new_tokens: int, device: str, batch_size: int = 64, on_batch=None
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of left-padded prompt batches; ``on_batch(k)`` is
    called with the number of prompts done after each batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    result: dict[int, str] = {}
    for s in bar(range(0, len(order), batch_size), desc=f"generate ({len(prompts)} prompts)", unit="batch"):
        idx = order[s : s + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        with autocast_for(device):
            texts = generate_greedy(
                model,
                enc,
                tok,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        result.update(zip(idx, texts))
        if on_batch is not None:
            on_batch(len(result))
    return [result[i] for i in range(len(prompts))]


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


# Evaluation streams its items: at most EVAL_CHUNK prompts are made, held and scored at a time, and only counts
# are kept, so memory stays flat in --n (a larger --n costs time, not memory). Task defaults fit in one chunk, so
# they are scored exactly as one list. Progress goes to stderr when there is more than one chunk.
EVAL_CHUNK = 4096
SINK_CHUNK = 16  # prose windows per forward of the sink statistic (its attentions are [rows, heads, T, T])


def _chunks(items, size: int | None = None):
    """Lists of up to ``size`` (default ``EVAL_CHUNK``) items from an iterable."""
    size = size or EVAL_CHUNK
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_last_progress = [0.0]
PROGRESS_EVERY_S = 10.0


def _progress(what: str, done: int, total: int) -> None:
    """One stderr line at most every ``PROGRESS_EVERY_S`` seconds (and at the end), for runs of more than a chunk
    (off with ``--quiet``, as the progress bars)."""
    now = time.monotonic()
    if enabled() and total > EVAL_CHUNK and (now - _last_progress[0] >= PROGRESS_EVERY_S or done >= total):
        _last_progress[0] = now
        print(f"eval {what}: {done:,}/{total:,} items", file=sys.stderr, flush=True)


def _mean(hits: int, n: int) -> float:
    return hits / n if n else float("nan")


def eval_niah(
    model, tok, device: str, *, lengths, depths, trials_per_cell: int = 1, seed: int = 0, trials=None
) -> dict:
    """Exact match of the 3-digit code over a lengths x depths grid (continuation's leading digits)."""
    total = len(trials) if trials is not None else len(lengths) * len(depths) * trials_per_cell
    if trials is None:
        trials = niah.iter_niah_trials(tok, lengths, depths, trials_per_cell=trials_per_cell, seed=seed)
    by_len: dict[str, list[int]] = {}  # key -> [hits, n]
    by_depth: dict[str, list[int]] = {}
    hits_all = n_all = 0
    for chunk in _chunks(trials):
        gens = greedy_generate(
            model,
            tok,
            [t.prompt for t in chunk],
            5,
            device,
            batch_size=16,
            on_batch=lambda k, before=n_all: _progress("niah", before + k, total),
        )
        for g, t in zip(gens, chunk):
            m = re.match(r"\s*(\d+)", g)
            h = int(bool(m) and m.group(1) == t.answer)
            for table, key in ((by_len, str(t.target_length)), (by_depth, str(int(t.depth)))):
                cell = table.setdefault(key, [0, 0])
                cell[0] += h
                cell[1] += 1
            hits_all += h
            n_all += 1
        _progress("niah", n_all, total)
    return {
        "niah_exact_match": _mean(hits_all, n_all),
        "niah_n": n_all,
        "niah_by_length": {k: _mean(*v) for k, v in by_len.items()},
        "niah_by_depth": {k: _mean(*v) for k, v in by_depth.items()},
    }


def eval_icl(model, tok, device: str, *, n: int, shots=(0, 5), tasks=icl.TASK_NAMES, seed: int = 0) -> dict:
    """Exact-match accuracy per task on the TEST split for each shot count, and the task average."""
    out: dict[str, Any] = {}
    for k in shots:
        prompts = (
            icl.build_eval_prompts(t, k, 1, split="test", seed=seed, start=i)[0] for t in tasks for i in range(n)
        )
        per: dict[str, list[int]] = {}
        done = 0
        for chunk in _chunks(prompts):
            gens = greedy_generate(
                model,
                tok,
                [p.prompt for p in chunk],
                12,
                device,
                on_batch=lambda j, before=done, k=k: _progress(f"icl {k}-shot", before + j, n * len(tasks)),
            )
            for p, g in zip(chunk, gens):
                cell = per.setdefault(p.task, [0, 0])
                cell[0] += int(_first_line(g) == p.answer)
                cell[1] += 1
            done += len(chunk)
            _progress(f"icl {k}-shot", done, n * len(tasks))
        accs = {t: _mean(*v) for t, v in per.items()}
        out[f"icl_{k}shot"] = float(np.mean(list(accs.values())))
        out[f"icl_{k}shot_by_task"] = accs
    out["icl_n_per_task"] = n
    return out


def eval_arith(model, tok, device: str, *, n: int, seed: int = 0) -> dict:
    hits = done = 0
    for chunk in _chunks(arithmetic.iter_eval_problems(n, split="test", seed=seed)):
        gens = greedy_generate(
            model, tok, [p.prompt for p in chunk], 48, device, on_batch=lambda j, b=done: _progress("arith", b + j, n)
        )
        hits += sum(arithmetic.parse_answer(g) == p.answer for g, p in zip(gens, chunk))
        done += len(chunk)
        _progress("arith", done, n)
    return {"arith_accuracy": _mean(hits, done), "arith_n": n}


def eval_recall(model, tok, device: str, *, n: int, seed: int = 0) -> dict:
    hits = done = 0
    for chunk in _chunks(recall.iter_recall_prompts(n, seed=seed)):
        gens = greedy_generate(
            model, tok, [p.prompt for p in chunk], 5, device, on_batch=lambda j, b=done: _progress("recall", b + j, n)
        )
        hits += sum(_first_line(g) == p.answer for g, p in zip(gens, chunk))
        done += len(chunk)
        _progress("recall", done, n)
    return {"recall_accuracy": _mean(hits, done), "recall_n": n}


@torch.no_grad()
def eval_classify(model, tok, device: str, *, n: int, shots=(0, 4), seed: int = 0) -> dict:
    """Accuracy of the arg-max over label words' first-token logits at the answer position."""
    out: dict[str, Any] = {}
    for task, labels in bar(classification.LABELS.items(), desc="classify tasks", unit="task"):
        label_ids = [tok(" " + lab, add_special_tokens=False)["input_ids"][0] for lab in labels]
        for k in shots:
            hits = done = 0
            for start in range(0, n, EVAL_CHUNK):  # a multiple of 64: the same forward batches as one list
                ps = classification.build_eval_prompts(task, k, min(EVAL_CHUNK, n - start), seed=seed, start=start)
                for s in range(0, len(ps), 64):
                    chunk = ps[s : s + 64]
                    enc = tok([p.prompt for p in chunk], return_tensors="pt", padding=True).to(device)
                    with autocast_for(device):
                        logits = model(**enc).logits[:, -1, :].float()
                    pred = logits[:, label_ids].argmax(-1).tolist()
                    hits += sum(labels[j] == p.label for j, p in zip(pred, chunk))
                    _progress(f"classify {task} {k}-shot", done + s + len(chunk), n)
                done += len(ps)
            out[f"classify_{task}_{k}shot"] = _mean(hits, done)
    out["classify_accuracy"] = float(np.mean([v for k, v in out.items() if k.endswith(f"_{shots[-1]}shot")]))
    out["classify_n"] = n
    return out


def _iter_prose_windows(tok, seq_len: int, n: int, seed: int) -> Iterator[list[int]]:
    """``n`` windows, one at a time: BOS then ``seq_len - 1`` tokens of contiguous corpus prose (random offsets)."""
    docs = load_prose()
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(len(docs))
        ids: list[int] = []
        while len(ids) < seq_len - 1:
            ids += tok("\n\n" + docs[i % len(docs)] if ids else docs[i % len(docs)], add_special_tokens=False)[
                "input_ids"
            ]
            i += 1
        yield [tok.bos_token_id] + ids[: seq_len - 1]


def _prose_windows(tok, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """``n`` windows: BOS then ``seq_len - 1`` tokens of contiguous corpus prose (random offsets)."""
    return torch.tensor(list(_iter_prose_windows(tok, seq_len, n, seed)))


@torch.no_grad()
def first_token_mass(model, input_ids: torch.Tensor) -> np.ndarray:
    """Mean attention to position 0 over query rows 1..T-1 and the batch: array [layer, head].

    Runs one eager forward (the attention weights are materialised) on a copy of the model, so the
    caller's model (possibly wrapped by ``torch.compile``) keeps its attention implementation.
    """
    eager = copy.deepcopy(model)
    set_attn_implementation(eager, "eager")
    return _first_token_mass_sum(eager, input_ids) / (input_ids.shape[0] * (input_ids.shape[1] - 1))


@torch.no_grad()
def _first_token_mass_sum(eager, input_ids: torch.Tensor) -> np.ndarray:
    """Sum of the attention to position 0 over query rows 1..T-1 and the batch: array [layer, head] (float64)."""
    out = eager(input_ids=input_ids, output_attentions=True)
    return np.stack([a[:, :, 1:, 0].double().sum(dim=(0, 2)).cpu().numpy() for a in out.attentions])


def set_attn_implementation(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except Exception:  # noqa: BLE001 - older/newer transformers: fall back to the config field
            pass
    model.config._attn_implementation = impl


def eval_sink(model, tok, device: str, *, n: int = 16, seq_lens=(64, 256), seed: int = 0) -> dict:
    """First-token sink mass per layer/head on prose windows (Gu et al.'s metric, thresholds 0.3 / 0.5), summed
    over ``SINK_CHUNK`` windows per forward."""
    out: dict[str, Any] = {}
    max_len = getattr(model.config, "max_position_embeddings", 1024)
    eager = copy.deepcopy(model)
    set_attn_implementation(eager, "eager")
    for T in seq_lens:
        T = min(T, max_len)
        total, rows = 0.0, 0
        for chunk in _chunks(_iter_prose_windows(tok, T, n, seed), SINK_CHUNK):
            ids = torch.tensor(chunk).to(device)
            total = total + _first_token_mass_sum(eager, ids)
            rows += ids.shape[0] * (T - 1)
            _progress(f"sink@{T}", rows // (T - 1), n)
        mass = total / rows
        past0 = mass[1:] if mass.shape[0] > 1 else mass
        sfx = "" if T == seq_lens[0] else f"@{T}"
        out[f"sink_frac_gt_0.3{sfx}"] = float((past0 > 0.3).mean())
        out[f"sink_frac_gt_0.5{sfx}"] = float((past0 > 0.5).mean())
        out[f"sink_max{sfx}"] = float(mass.max())
        out[f"sink_mean_by_layer{sfx}"] = [round(float(x), 4) for x in mass.mean(axis=1)]
        if not sfx:
            out["sink_mass"] = [[round(float(x), 4) for x in row] for row in mass]
            out["sink_seq_len"] = T
    return out


def run_eval(model, tok, task: str, device: str, *, n: int | None, seed: int, preset: dict | None = None) -> dict:
    """Dispatch one evaluation task on a loaded model (sizes from ``n`` or the preset's defaults)."""
    p = preset or EVAL_SIZES
    model.eval()
    if task == "niah":
        max_len = model.config.max_position_embeddings
        lengths = [x for x in p["niah_lengths"] if x <= max_len]
        return eval_niah(
            model, tok, device, lengths=lengths, depths=p["niah_depths"], trials_per_cell=n or 2, seed=seed
        )
    if task == "icl":
        return eval_icl(model, tok, device, n=n or p["final_n"], seed=seed)
    if task == "arith":
        return eval_arith(model, tok, device, n=n or 2 * p["final_n"], seed=seed)
    if task == "classify":
        return eval_classify(model, tok, device, n=n or 2 * p["final_n"], seed=seed)
    if task == "recall":
        return eval_recall(model, tok, device, n=n or 2 * p["final_n"], seed=seed)
    if task == "sink":
        return eval_sink(model, tok, device, n=n or 16, seed=seed)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(EVAL_TASKS)}")


def evaluate(model_dir: str, task: str, *, device: str = "cpu", n: int | None = None, seed: int = 0) -> dict:
    """Load a saved organism-lm and run one of ``EVAL_TASKS``; returns metric name -> value (+ counts).

    NIAH: exact match over 6 lengths (128..1008 tokens, clipped to the context) x 5 depths; ``n`` is the
    number of trials per cell (default 2). ICL: 0- and 5-shot exact match per task on the TEST split (``n``
    prompts per task). Sink: first-token attention per layer/head on ``n`` prose windows.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(EVAL_TASKS)}")
    tok = load_tokenizer(model_dir)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return run_eval(model, tok, task, device, n=n, seed=seed)
