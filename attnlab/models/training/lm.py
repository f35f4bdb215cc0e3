"""organism-lm: train and evaluate a small Llama that shows retrieval heads, ICL and attention sinks.

Commands (repository root, ``PYTHONPATH=.``)::

    # shipping run on one GPU; three variants can share one H100 (each ~8 min incl. data and final eval)
    python -m attnlab.models.training.lm --preset gpu --variant a --device cuda --out OUT/lm_a --max-minutes 8
    python -m attnlab.models.training.lm --preset gpu --variant b --device cuda --out OUT/lm_b --max-minutes 8
    python -m attnlab.models.training.lm --preset gpu --variant c --device cuda --out OUT/lm_c --max-minutes 8
    # pick the best of several runs (prints a table; --prune deletes the weights of the others)
    python -m attnlab.models.training.lm --select OUT/lm_a OUT/lm_b OUT/lm_c
    # CPU sanity run (a few minutes) and the test smoke run (seconds)
    python -m attnlab.models.training.lm --preset cpu --out /tmp/lm_cpu
    python -m attnlab.models.training.lm --preset smoke --out /tmp/lm_smoke
    # evaluate a saved model
    python -c "from attnlab.models.lm import evaluate; print(evaluate('DIR', 'niah'))"

What it builds
--------------
* Tokenizer: byte-level BPE (``tokenizers``), vocabulary 4,096, trained on the stdlib prose plus samples
  of every generator; digits are split one per token (so codes and sums are copied / computed digit by
  digit); ``<|bos|>`` is always prepended by the post-processor. Saved as a ``PreTrainedTokenizerFast``
  in ``lm_tokenizer/`` next to this file and reused when present (train it with ``--train-tokenizer``).
* Model: ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, GQA with fewer KV than query heads, tied
  embeddings); the gpu preset is 8 layers, d_model 384, 12 query / 6 KV heads, context 1,024 (~14.6M
  parameters, ~29 MB in float16).
* Data: an infinite stream of packed windows generated on the fly in DataLoader worker processes from
  ``attnlab.datasets`` (prose, needle documents, associative recall, ICL, arithmetic, classification;
  token shares set by ``--mix``). Every window starts with BOS; ``--bos window`` puts BOS only there
  (documents separated by EOS), ``--bos doc`` starts every document with BOS.
* Loop (nanoGPT style): AdamW (decay on matrices only), linear warm-up then cosine decay to 10% of the
  peak over the *time* budget (or over ``--max-steps``), bf16 autocast on CUDA, grad-norm clipping,
  optional ``torch.compile`` (``--compile on``; off by default: untested on the GPU box, and three
  concurrent compiles compete for its 16 cores). Every ``--eval-every-s`` seconds a light evaluation (NIAH grid, ICL
  0/5-shot, first-token sink mass per layer) is logged to ``train_log.jsonl``; the best checkpoint by
  ``niah + icl_5shot + 0.5 * sink_frac_gt_0.3`` is kept in memory and saved at the end in float16.

Attention sinks
---------------
Gu et al. 2024 ("When Attention Sink Emerges in Language Models: An Empirical View", ICLR 2025) find
that the first-token sink emerges only after enough optimisation steps (1-2k steps in their 60M
model), grows with the learning rate and with weight decay (strongest at wd 0.5 with lr 4e-4), needs
enough (diverse) data, and sits wherever a *fixed* token occupies a fixed position. The gpu variants
probe these levers: ``a`` the feasibility recipe, ``b`` strong weight decay and more prose, ``c`` a
higher learning rate and BOS at every document. The sink metric follows Gu et al.: mean attention to
position 0 over query rows 1..T-1 (T=64 and T=256 prose windows), fraction of heads past layer 0 above
0.3 / 0.5.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from attnlab.datasets import arithmetic, classification, icl, niah, recall
from attnlab.datasets.prose import load_prose
from attnlab.heads.io import write_text
from attnlab.models.lm import (
    EVAL_SIZES,
    EVAL_TASKS,
    TOKENIZER_DIR,
    autocast_for,
    eval_icl,
    eval_niah,
    eval_sink,
    load_tokenizer,
    run_eval,
    set_attn_implementation,
)
from attnlab.models.training import llama_config

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# GPT-2's pre-tokenisation regex with single digits (`` ?\p{N}``): numbers become one token per digit.
_PRETOKEN_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# --------------------------------------------------------------------------------------------------
# Presets: model size and training knobs. Variants are short diffs on the gpu preset, with reasons.
# --------------------------------------------------------------------------------------------------
DEFAULT_MIX = {"prose": 0.20, "niah": 0.44, "icl": 0.26, "recall": 0.04, "arith": 0.03, "classify": 0.03}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(  # a few steps for tests: < 60 s on one CPU core including data
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        d_ff=128,
        seq_len=128,
        batch_size=4,
        lr=2e-3,
        wd=0.1,
        warmup=2,
        max_steps=6,
        max_minutes=2.0,
        eval_every_steps=3,
        eval_every_s=0,
        workers=0,
        niah_lengths=(48, 96, 120),
        niah_depths=(0, 50, 100),
        eval_n=2,
        final_n=2,
        niah_trials_per_cell=1,
        compile="off",
    ),
    "cpu": dict(  # a few minutes on one core: checks that the loss goes down
        n_layers=4,
        d_model=128,
        n_heads=4,
        n_kv_heads=2,
        d_ff=352,
        seq_len=256,
        batch_size=8,
        lr=3e-3,
        wd=0.1,
        warmup=20,
        max_steps=None,
        max_minutes=4.0,
        eval_every_steps=0,
        eval_every_s=60,
        workers=1,
        niah_lengths=(64, 128, 192, 240),
        niah_depths=(0, 50, 100),
        eval_n=4,
        final_n=8,
        niah_trials_per_cell=1,
        compile="off",
    ),
    "gpu": dict(  # the shipping run (feasibility recipe: 8 x 384, 12/6 heads, ctx 1024, lr 2e-3, wd 0.1)
        n_layers=8,
        d_model=384,
        n_heads=12,
        n_kv_heads=6,
        d_ff=1024,
        seq_len=1024,
        batch_size=32,
        lr=2e-3,
        wd=0.1,
        warmup=150,
        max_steps=None,
        max_minutes=8.0,
        eval_every_steps=0,
        eval_every_s=45,
        workers=3,
        niah_lengths=EVAL_SIZES["niah_lengths"],
        niah_depths=EVAL_SIZES["niah_depths"],
        eval_n=8,
        final_n=EVAL_SIZES["final_n"],
        niah_trials_per_cell=2,
        compile="off",
    ),
}

VARIANTS: dict[str, dict[str, Any]] = {
    # a: the feasibility recipe (NIAH 100%, ICL 91% / 37%, no sink), plus multi-question needle
    #    documents and associative recall to speed up the retrieval circuit. Safest for NIAH / ICL.
    "a": dict(lr=2e-3, wd=0.1, bos="window", mix=dict(DEFAULT_MIX)),
    # b: Gu et al.'s strongest sink lever, weight decay 0.5 (41% sink heads vs 18% at 0.1), plus more
    #    prose: heads with nothing to retrieve in prose need a no-op, which the sink provides.
    "b": dict(
        lr=2e-3,
        wd=0.5,
        bos="window",
        mix={"prose": 0.30, "niah": 0.40, "icl": 0.20, "recall": 0.04, "arith": 0.03, "classify": 0.03},
    ),
    # c: larger learning rate (sinks grow with lr) and moderate wd, with BOS at the start of every packed
    #    document (the "consistent first token" hypothesis).
    "c": dict(
        lr=3e-3,
        wd=0.3,
        bos="doc",
        mix={"prose": 0.25, "niah": 0.42, "icl": 0.23, "recall": 0.04, "arith": 0.03, "classify": 0.03},
    ),
}


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def tokenizer_corpus(n_generated: int = 2000, seed: int = 0) -> list[str]:
    """Texts the BPE is trained on: all stdlib prose plus samples of every generator (format tokens)."""
    rng = random.Random(seed)
    texts = list(load_prose())
    for _ in range(n_generated):
        texts.append(niah.niah_document(rng, rng.randint(1, 4), n_needles=rng.randint(1, 3), n_questions=2)[0])
        texts.append(icl.icl_document(rng))
        texts.append(recall.recall_document(rng, rng.randint(2, 8)))
        texts.append(arithmetic.arithmetic_document(rng))
        texts.append(classification.classification_document(rng))
    return texts


def train_tokenizer(out_dir: str | Path, vocab_size: int = 4096, seed: int = 0):
    """Train the byte-level BPE and save it as a ``PreTrainedTokenizerFast`` loadable by ``AutoTokenizer``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKEN_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=1024,
        padding_side="left",
    )
    save_tokenizer(fast, out_dir)
    return load_tokenizer(out_dir)


def save_tokenizer(tok, out_dir: str | Path) -> None:
    """``save_pretrained`` with a portable ``tokenizer_class`` (``PreTrainedTokenizerFast``, known to v4 and v5)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    write_text(cfg_path, json.dumps(cfg, indent=2) + "\n", mode=0o644)


def load_or_train_tokenizer(path: str | Path = TOKENIZER_DIR, vocab_size: int = 4096):
    if (Path(path) / "tokenizer.json").is_file():
        return load_tokenizer(path)
    return train_tokenizer(path, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------------
# Data: packed windows generated on the fly
# --------------------------------------------------------------------------------------------------
class WindowStream:
    """Infinite stream of packed training windows of exactly ``seq_len`` token ids.

    A window starts with BOS and is filled with documents whose kind is chosen to keep each kind's
    token share close to ``mix`` (largest deficit first). Each document ends with EOS; with
    ``bos="doc"`` every document also starts with BOS. A document that does not fit is regenerated
    shorter (needles) or the window is topped up with a truncated prose document. Needle keys are
    unique within a window, so a question never has two answers in view.
    """

    def __init__(self, tokenizer: Any, seq_len: int, mix: dict[str, float], *, bos: str = "window", seed: int = 0):
        unknown = set(mix) - {"prose", "niah", "icl", "recall", "arith", "classify"}
        if unknown:
            raise ValueError(f"unknown mixture kinds: {sorted(unknown)}")
        if bos not in ("window", "doc"):
            raise ValueError(f"bos must be 'window' or 'doc', got {bos!r}")
        total = sum(mix.values())
        self.mix = {k: v / total for k, v in mix.items() if v > 0}
        self.tok = tokenizer
        self.seq_len = seq_len
        self.bos_policy = bos
        self.rng = random.Random(seed)
        self.counts = {k: 1.0 for k in self.mix}
        self.prose = load_prose()
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no Python-side overhead per call
        icl.warm_caches()
        niah.needle_keys()

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _doc(self, kind: str, room: int, keys: set[str]) -> tuple[str, list[str]]:
        r = self.rng
        if kind == "niah":
            n_sent = max(1, int(r.uniform(1, max(1.0, (room - 40) / 22.0))))
            n_needles = r.choice((1, 1, 2, 2, 3, 4))
            return niah.niah_document(
                r, n_sent, n_needles=n_needles, n_questions=r.randint(1, n_needles), exclude_keys=keys
            )
        if kind == "icl":
            return icl.icl_document(r), []
        if kind == "recall":
            return recall.recall_document(r, r.randint(2, 24)), []
        if kind == "arith":
            return arithmetic.arithmetic_document(r), []
        if kind == "classify":
            return classification.classification_document(r), []
        return self.prose[r.randrange(len(self.prose))], []

    def window(self) -> list[int]:
        ids = [self.bos_id]
        keys: set[str] = set()
        while len(ids) < self.seq_len:
            room = self.seq_len - len(ids)
            kind = min(self.mix, key=lambda k: self.counts[k] / sum(self.counts.values()) / self.mix[k])
            piece: list[int] = []
            for _attempt in range(3):
                text, used = self._doc(kind, room, keys)
                piece = (
                    ([self.bos_id] if self.bos_policy == "doc" and len(ids) > 1 else [])
                    + self._encode(text)
                    + [self.eos_id]
                )
                if len(piece) <= room:
                    keys.update(used)
                    break
                room_for_retry = room
                room = max(8, room_for_retry // 2)
            if len(piece) > self.seq_len - len(ids):  # top up with a truncated prose document
                kind = "prose"
                text = self.prose[self.rng.randrange(len(self.prose))]
                piece = ([self.bos_id] if self.bos_policy == "doc" and len(ids) > 1 else []) + self._encode(text)
                piece = piece[: self.seq_len - len(ids)]
            ids.extend(piece)
            self.counts[kind] = self.counts.get(kind, 0.0) + len(piece)
        return ids

    def batch(self, batch_size: int) -> np.ndarray:
        return np.asarray([self.window() for _ in range(batch_size)], dtype=np.int64)


class _BatchDataset(torch.utils.data.IterableDataset):
    """Each DataLoader worker owns a ``WindowStream`` seeded by (seed, worker id) and yields batches."""

    def __init__(self, tokenizer: Any, seq_len: int, batch_size: int, mix: dict[str, float], bos: str, seed: int):
        self.args = (tokenizer, seq_len, mix, bos, seed)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        tokenizer, seq_len, mix, bos, seed = self.args
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        stream = WindowStream(tokenizer, seq_len, mix, bos=bos, seed=seed * 1000 + wid)
        while True:
            yield torch.from_numpy(stream.batch(self.batch_size))


def make_loader(
    tokenizer: Any, seq_len: int, batch_size: int, mix: dict[str, float], bos: str, seed: int, workers: int
):
    ds = _BatchDataset(tokenizer, seq_len, batch_size, mix, bos, seed)
    kwargs: dict[str, Any] = dict(batch_size=None, num_workers=workers)
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=True)
    return torch.utils.data.DataLoader(ds, **kwargs)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def build_config(p: dict, tok):
    return llama_config(tok, p, n_kv_heads=p["n_kv_heads"], max_positions=p["seq_len"], tied=True)


def lr_at(progress: float, step: int, p: dict) -> float:
    """1) linear warm-up over ``warmup`` steps, 2) cosine from ``lr`` to ``0.1 * lr`` over progress 0..1."""
    if step < p["warmup"]:
        return p["lr"] * (step + 1) / p["warmup"]
    progress = min(max(progress, 0.0), 1.0)
    return p["lr"] * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _light_eval(model, tok, device: str, p: dict, niah_trials) -> dict:
    model.eval()
    m = {}
    m.update(eval_niah(model, tok, device, lengths=(), depths=(), trials=niah_trials))
    m.update(eval_icl(model, tok, device, n=p["eval_n"], seed=1))
    m.update(eval_sink(model, tok, device, n=8, seq_lens=(64,), seed=1))
    m["score"] = combined_score(m)
    return {k: v for k, v in m.items() if not k.endswith("_by_task") and k != "sink_mass"}


def combined_score(m: dict) -> float:
    """Checkpoint-selection criterion: NIAH + ICL 5-shot + half the sink fraction (each in [0, 1])."""
    return float(m.get("niah_exact_match", 0.0) + m.get("icl_5shot", 0.0) + 0.5 * m.get("sink_frac_gt_0.3", 0.0))


def resolve_params(args: argparse.Namespace) -> dict:
    p = dict(PRESETS[args.preset])
    p.update(lr=p["lr"], wd=p["wd"], bos="window", mix=dict(DEFAULT_MIX))
    if args.variant:
        if args.variant not in VARIANTS:
            raise ValueError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
        p.update(copy.deepcopy(VARIANTS[args.variant]))
    for key in (
        "lr",
        "wd",
        "bos",
        "batch_size",
        "max_steps",
        "max_minutes",
        "workers",
        "compile",
        "warmup",
        "n_layers",
        "d_model",
        "n_heads",
        "n_kv_heads",
        "d_ff",
        "seq_len",
    ):
        val = getattr(args, key)
        if val is not None:
            p[key] = val
    if args.mix:
        p["mix"] = parse_mix(args.mix)
    if p["d_model"] % p["n_heads"] or p["n_heads"] % p["n_kv_heads"]:
        raise ValueError("d_model must be divisible by n_heads, and n_heads by n_kv_heads")
    p["seed"], p["device"], p["variant"] = args.seed, args.device, args.variant
    return p


def parse_mix(text: str) -> dict[str, float]:
    """``"prose=0.3,niah=0.4,icl=0.3"`` -> dict (normalised later)."""
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def train(p: dict, out_dir: Path, command: str) -> dict:
    """Train, keep the best checkpoint, save it (float16), evaluate it fully and write all outputs."""
    t_start = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers fork after the tokenizer ran
    budget_s = p["max_minutes"] * 60.0
    reserve_s = min(75.0, 0.15 * budget_s)  # final eval + save must fit inside --max-minutes
    device = p["device"]
    random.seed(p["seed"])
    np.random.seed(p["seed"])
    torch.manual_seed(p["seed"])
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_or_train_tokenizer(TOKENIZER_DIR)
    load_prose()  # fill the caches before DataLoader workers fork
    icl.warm_caches()
    niah.needle_keys()
    loader = iter(make_loader(tok, p["seq_len"], p["batch_size"], p["mix"], p["bos"], p["seed"], p["workers"]))

    config = build_config(p, tok)
    model = LlamaForCausalLM(config).to(device)
    set_attn_implementation(model, "sdpa")
    n_params = sum(t.numel() for t in model.parameters())
    decay = [t for n, t in model.named_parameters() if t.dim() >= 2]
    no_decay = [t for n, t in model.named_parameters() if t.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
        **({"fused": True} if device.startswith("cuda") else {}),
    )
    fwd = model
    if p["compile"] == "on" or (p["compile"] == "auto" and device.startswith("cuda")):
        fwd = torch.compile(model)
    niah_trials = niah.build_niah_trials(
        tok, [x for x in p["niah_lengths"] if x <= p["seq_len"]], p["niah_depths"], seed=1
    )

    log_path = out_dir / "train_log.jsonl"
    log = open(log_path, "w")
    step, tokens, best, best_state, best_step = 0, 0, -1.0, None, 0
    last_eval = time.time()
    t_train0 = time.time()
    train_budget = budget_s - reserve_s - (t_train0 - t_start)
    compiled_ok = fwd is model
    loss_ema = None
    print(
        f"[lm] params={n_params / 1e6:.2f}M preset={p.get('variant') or ''} data+setup {t_train0 - t_start:.1f}s",
        flush=True,
    )
    while True:
        elapsed_train = time.time() - t_train0
        if p["max_steps"] is not None and step >= p["max_steps"]:
            break
        if p["max_steps"] is None and elapsed_train >= train_budget:
            break
        if time.time() - t_start >= budget_s - reserve_s:
            break
        progress = step / p["max_steps"] if p["max_steps"] else elapsed_train / max(train_budget, 1e-9)
        lr = lr_at(progress, step, p)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(loader).to(device, non_blocking=True)
        model.train()
        try:
            with autocast_for(device):
                loss = fwd(input_ids=batch, labels=batch).loss
            loss.backward()
        except Exception as exc:  # noqa: BLE001 - a torch.compile failure falls back to eager once
            if compiled_ok:
                raise
            print(f"[lm] torch.compile failed ({type(exc).__name__}: {exc}); continuing eager", flush=True)
            fwd, compiled_ok = model, True
            opt.zero_grad(set_to_none=True)
            continue
        compiled_ok = True
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch.numel()
        if step % 10 == 0 or step <= 3:
            lv = loss.item()  # CPU-GPU sync point, only every 10 steps
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            rec = {
                "step": step,
                "loss": round(lv, 4),
                "lr": lr,
                "grad_norm": round(float(gnorm), 3),
                "elapsed": round(time.time() - t_start, 1),
                "tokens": tokens,
                "tok_per_s": round(tokens / max(time.time() - t_train0, 1e-9)),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % 100 == 0 or step <= 3:
                print(f"[lm] {json.dumps(rec)}", flush=True)
        due = (p["eval_every_steps"] and step % p["eval_every_steps"] == 0) or (
            p["eval_every_s"] and time.time() - last_eval >= p["eval_every_s"]
        )
        if due:
            m = _light_eval(model, tok, device, p, niah_trials)
            last_eval = time.time()
            rec = {"step": step, "elapsed": round(time.time() - t_start, 1), "eval": m}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"[lm] eval {json.dumps(rec)}", flush=True)
            if m["score"] > best:
                best, best_state = (
                    m["score"],
                    {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                )
                best_step = step
    # the last state is a candidate too (the end of the cosine is usually best)
    m_last = _light_eval(model, tok, device, p, niah_trials)
    log.write(
        json.dumps({"step": step, "elapsed": round(time.time() - t_start, 1), "eval": m_last, "final": True}) + "\n"
    )
    chosen_step = step
    if best_state is not None and best > m_last["score"]:
        model.load_state_dict(best_state)
        chosen_step = best_step
    log.close()
    train_seconds = time.time() - t_train0

    model.eval()
    save_model = copy.deepcopy(model).to(torch.float16)
    save_model.generation_config.pad_token_id = tok.pad_token_id
    save_model.save_pretrained(str(out_dir), safe_serialization=True)
    save_tokenizer(tok, out_dir)
    del save_model
    for f in out_dir.iterdir():  # package data must be world-readable (safetensors writes 0600)
        if f.is_file():
            f.chmod(0o644)

    metrics: dict[str, Any] = {}
    reload = (
        LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32 if device == "cpu" else torch.bfloat16)
        .to(device)
        .eval()
    )
    for task in EVAL_TASKS:
        n = p["niah_trials_per_cell"] if task == "niah" else 16 if task == "sink" else p["final_n"]
        metrics.update(run_eval(reload, tok, task, device, n=n, seed=0, preset=p))
    metrics.update(
        steps=step,
        chosen_step=chosen_step,
        tokens=tokens,
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.time() - t_start, 1),
        n_params=n_params,
        score=combined_score(metrics),
        config={k: v for k, v in p.items() if k != "niah_lengths"} | {"niah_lengths": list(p["niah_lengths"])},
        command=command,
    )
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=str), mode=0o644)
    write_text(out_dir / "MODEL_CARD.md", model_card(p, metrics, config, n_params, command), mode=0o644)
    shown = (
        "niah_exact_match",
        "icl_0shot",
        "icl_5shot",
        "arith_accuracy",
        "classify_accuracy",
        "recall_accuracy",
        "sink_frac_gt_0.3",
        "sink_frac_gt_0.5",
        "sink_max",
        "steps",
        "total_seconds",
    )
    print(f"[lm] done: {json.dumps({k: metrics[k] for k in shown})}", flush=True)
    return metrics


def model_card(p: dict, m: dict, config, n_params: int, command: str) -> str:
    mix = ", ".join(f"{k} {v:.0%}" for k, v in p["mix"].items())
    icl_rows = "\n".join(
        f"| {t} | {m['icl_0shot_by_task'].get(t, float('nan')):.2f} "
        f"| {m['icl_5shot_by_task'].get(t, float('nan')):.2f} |"
        for t in icl.TASK_NAMES
    )
    sink_rows = "\n".join(
        f"| {i} | " + " ".join(f"{x:.2f}" for x in row) + " |" for i, row in enumerate(m["sink_mass"])
    )
    return f"""# organism-lm

A small Llama (`LlamaForCausalLM`) trained from scratch by `attnlab.models.training.lm` on procedurally
generated data, so that it shows retrieval heads (needle-in-a-haystack), in-context learning and the
first-token attention sink. Weights in float16 safetensors; tokenizer: byte-level BPE ({len_vocab(config)} tokens,
digits split, `<|bos|>` always prepended).

## Architecture
{config.num_hidden_layers} layers, d_model {config.hidden_size}, {config.num_attention_heads} query heads / \
{config.num_key_value_heads} KV heads (GQA),
head dim {config.hidden_size // config.num_attention_heads}, SwiGLU d_ff {config.intermediate_size}, RMSNorm, \
RoPE (theta {config.rope_theta if hasattr(config, "rope_theta") else 10000}),
context {config.max_position_embeddings}, tied embeddings, {n_params / 1e6:.2f}M parameters.

## Data
Generated on the fly by `attnlab.datasets` (stdlib docstrings and `pydoc_data` topics for prose): token
shares {mix}. Needle documents: prose haystacks with 1-4 needles "The secret KEY code is 123." and 1-4
answered questions "Question: What is the secret KEY code?\\nAnswer: 123". ICL: {len(icl.TASK_NAMES)} tasks, 0-10 shots,
train split only. BOS policy: `{p["bos"]}` \
(every window starts with BOS{"; every document too" if p["bos"] == "doc" else "; documents separated by EOS"}).

## Training
AdamW lr {p["lr"]}, weight decay {p["wd"]} (matrices only), betas (0.9, 0.95), warm-up {p["warmup"]} steps, \
cosine to 10%,
batch {p["batch_size"]} x {p["seq_len"]}, bf16 autocast on CUDA, grad clip 1.0, seed {p["seed"]}, device {p["device"]}.
Steps: {m["steps"]} ({m["tokens"] / 1e6:.1f}M tokens, {m["train_seconds"]} s); checkpoint kept: step {m["chosen_step"]}
(criterion NIAH + ICL 5-shot + 0.5 x sink fraction, evaluated every \
{p["eval_every_s"] or p["eval_every_steps"]} {"s" if p["eval_every_s"] else "steps"}).

Retrain (repository root):

    {command}

## Measured metrics (this checkpoint)
- NIAH exact match: {m["niah_exact_match"]:.3f} over {m["niah_n"]} trials \
(lengths {list(m["niah_by_length"])}, depths {list(m["niah_by_depth"])})
  by length {m["niah_by_length"]}; by depth {m["niah_by_depth"]}
- ICL (test split, {m["icl_n_per_task"]} prompts per task): 0-shot {m["icl_0shot"]:.3f}, 5-shot {m["icl_5shot"]:.3f}
- Associative recall: {m["recall_accuracy"]:.3f}; arithmetic (worked solution, exact answer): {m["arith_accuracy"]:.3f}
- Classification ({", ".join(f"{k} {v:.2f}" for k, v in m.items() if k.startswith("classify_") and k.endswith("shot"))})
- First-token sink (prose windows of {m["sink_seq_len"]} tokens, mean attention to BOS over rows 1..T-1):
  fraction of heads past layer 0 above 0.3: {m["sink_frac_gt_0.3"]:.2f}, above 0.5: {m["sink_frac_gt_0.5"]:.2f}, \
max {m["sink_max"]:.2f};
  at 256 tokens: {m.get("sink_frac_gt_0.3@256", float("nan")):.2f} / {m.get("sink_frac_gt_0.5@256", float("nan")):.2f}

| ICL task | 0-shot | 5-shot |
|---|---|---|
{icl_rows}

Sink mass per layer (rows) and head (columns):

| layer | heads |
|---|---|
{sink_rows}

Evaluate: `python -c "from attnlab.models.lm import evaluate; print(evaluate('DIR', 'niah'))"` \
(tasks: {", ".join(EVAL_TASKS)}).
"""


def len_vocab(config) -> int:
    return int(config.vocab_size)


def select_runs(run_dirs: list[str], prune: bool = False) -> str | None:
    """Rank finished runs by the target criteria; print a table; with ``prune`` delete the losers' weights.

    A run meets the targets if NIAH >= 0.9 and ICL 5-shot >= 0.7 with 0-shot at least 0.15 lower;
    among those (else among all) the one with the largest sink fraction (> 0.3), then the best score.
    """
    rows = []
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            print(f"{d}: no metrics.json")
            continue
        m = json.loads(path.read_text())
        ok = m["niah_exact_match"] >= 0.9 and m["icl_5shot"] >= 0.7 and m["icl_5shot"] - m["icl_0shot"] >= 0.15
        rows.append((ok, m.get("sink_frac_gt_0.3", 0.0), m["score"], d, m))
    if not rows:
        return None
    rows.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    print("run | targets | niah | icl0 | icl5 | sink>0.3 | sink>0.5 | sink_max | arith | classify | steps")
    for ok, _, _, d, m in rows:
        print(
            f"{d} | {'yes' if ok else 'no'} | {m['niah_exact_match']:.2f} | {m['icl_0shot']:.2f} | "
            f"{m['icl_5shot']:.2f} | {m['sink_frac_gt_0.3']:.2f} | {m['sink_frac_gt_0.5']:.2f} | "
            f"{m['sink_max']:.2f} | {m['arith_accuracy']:.2f} | "
            f"{m['classify_accuracy']:.2f} | {m['steps']}"
        )
    best = rows[0][3]
    print(f"best: {best}")
    if prune:
        for _, _, _, d, _ in rows[1:]:
            for f in Path(d).glob("*.safetensors"):
                f.unlink()
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attnlab.models.training.lm", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output directory (model, tokenizer, train_log.jsonl, metrics.json, MODEL_CARD.md)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--variant", choices=tuple(VARIANTS), default=None, help="gpu-recipe variant (see VARIANTS)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-minutes",
        dest="max_minutes",
        type=float,
        default=None,
        help="wall-clock cap for everything (incl. data, final eval)",
    )
    ap.add_argument(
        "--max-steps",
        dest="max_steps",
        type=int,
        default=None,
        help="fixed step count (step-based cosine) instead of the time budget",
    )
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=None, help="AdamW weight decay on matrices")
    ap.add_argument(
        "--bos", choices=("window", "doc"), default=None, help="BOS at window start only, or at every document"
    )
    ap.add_argument(
        "--mix", default=None, help="token shares, e.g. prose=0.3,niah=0.4,icl=0.2,recall=0.04,arith=0.03,classify=0.03"
    )
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--n-layers", dest="n_layers", type=int, default=None, help="architecture overrides of the preset")
    ap.add_argument("--d-model", dest="d_model", type=int, default=None)
    ap.add_argument("--n-heads", dest="n_heads", type=int, default=None)
    ap.add_argument("--n-kv-heads", dest="n_kv_heads", type=int, default=None)
    ap.add_argument("--d-ff", dest="d_ff", type=int, default=None)
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="training window = context length")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader worker processes generating data")
    ap.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default=None,
        help="torch.compile the training forward (auto: on for cuda; every preset defaults to off)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--train-tokenizer", action="store_true", help=f"(re)train the BPE into {TOKENIZER_DIR} and exit")
    ap.add_argument("--select", nargs="+", default=None, metavar="RUN_DIR", help="rank finished runs and exit")
    ap.add_argument("--prune", action="store_true", help="with --select: delete the other runs' weights")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_tokenizer:
        tok = train_tokenizer(TOKENIZER_DIR)
        print(f"tokenizer: {len(tok)} tokens -> {TOKENIZER_DIR}")
        return 0
    if args.select:
        return 0 if select_runs(args.select, prune=args.prune) else 1
    if not args.out:
        ap.error("--out is required for training")
    p = resolve_params(args)
    command = "PYTHONPATH=. python -m attnlab.models.training.lm " + " ".join(sys.argv[1:] if argv is None else argv)
    train(p, Path(args.out), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
