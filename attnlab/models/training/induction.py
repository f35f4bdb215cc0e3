"""organism-induction: a tiny Llama trained on repeated random tokens, so that it has real induction heads.

organism-lm learns retrieval from its needle data but no general induction heads; the ground-truth check
"induction heads found by the probe are the heads whose ablation hurts repeated-sequence copying" needs a
model that copies arbitrary repeated sequences. This one trains in 5-10 minutes on one CPU core.

Commands (repository root, ``PYTHONPATH=.``)::

    # the shipped checkpoint (attnlab/models/bundled/organism-induction): CPU, one thread, 10-minute cap
    # (about 3,400 of the 4,000 steps on the shared 2-core machine; the induction phase change comes at ~1,000)
    python -m attnlab.models.train induction --preset cpu --out attnlab/models/bundled/organism-induction
    # test smoke run (seconds)
    python -m attnlab.models.train induction --preset smoke --out /tmp/induction_smoke
    # evaluate a saved model
    python -c "from attnlab.models.induction import evaluate; print(evaluate('DIR', 'copy'))"

What it builds
--------------
* Tokenizer: word-level over ``t0 .. t{V-1}`` (whitespace-separated) plus ``<|pad|>``, ``<|bos|>``,
  ``<|eos|>``, ``<|unk|>``; ``<|bos|>`` is prepended by the post-processor. Saved as a
  ``PreTrainedTokenizerFast`` with the model.
* Model: ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, tied embeddings), 2 layers x 8 heads, d_model 128:
  two layers are the smallest stack in which an induction circuit (previous-token head in layer 0, induction
  head in layer 1) can form; 8 heads per layer leave heads outside the circuit (with 4 heads and d_model 64
  every head was recruited into copying and the phase change came later).
* Data: windows of ``seq_len`` tokens: BOS then segments, each a block of r random tokens (r uniform in
  ``[min_block, max_block]``) repeated 2 or 3 times (optionally a fraction ``noise`` of unrepeated
  segments; 0 in the presets). Generated on the fly with a seeded numpy RNG.
* Loss: next-token cross-entropy on every position. Only the repeated copies are predictable, so the
  loss pushes the model to copy from the earlier occurrence: induction.

Evaluation (``EVAL_TASKS``): ``copy`` — BOS + 50 random tokens + the same 50 again (the
``repeated-random`` probe dataset's shape): loss and top-1 accuracy on the second copy vs the first.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from attnlab.heads.io import write_text
from attnlab.models.induction import SPECIALS, eval_copy
from attnlab.models.training import llama_config, preset_command_line

PRESETS: dict[str, dict] = {
    "smoke": dict(
        vocab=64,
        n_layers=2,
        n_heads=4,
        d_model=32,
        d_ff=64,
        seq_len=64,
        min_block=4,
        max_block=20,
        noise=0.2,
        batch_size=8,
        lr=3e-3,
        warmup=5,
        max_steps=30,
        max_minutes=1.0,
        eval_every=10,
        eval_n=16,
    ),
    "cpu": dict(
        vocab=64,
        n_layers=2,
        n_heads=8,
        d_model=128,
        d_ff=128,
        seq_len=128,
        min_block=4,
        max_block=56,
        noise=0.0,
        batch_size=16,
        lr=3e-3,
        warmup=30,
        max_steps=4000,
        max_minutes=10.0,
        eval_every=250,
        eval_n=32,
    ),
    "gpu": dict(
        vocab=64,
        n_layers=2,
        n_heads=8,
        d_model=128,
        d_ff=128,
        seq_len=128,
        min_block=4,
        max_block=56,
        noise=0.0,
        batch_size=16,
        lr=3e-3,
        warmup=30,
        max_steps=4000,
        max_minutes=10.0,
        eval_every=250,
        eval_n=32,
    ),
}


# ---- tokenizer ------------------------------------------------------------------------------------------


def build_tokenizer(vocab: int):
    """Word-level tokenizer over ``t0..t{vocab-1}`` with BOS prepended (a ``PreTrainedTokenizerFast``)."""
    table = {s: i for i, s in enumerate(SPECIALS)}
    table.update({f"t{i}": len(SPECIALS) + i for i in range(vocab)})
    tk = Tokenizer(models.WordLevel(table, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", table["<|bos|>"])]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        model_max_length=1 << 30,
    )


# ---- data -------------------------------------------------------------------------------------------------


def window(rng: np.random.Generator, p: dict) -> np.ndarray:
    """One training window: BOS + segments of repeated random blocks (some unrepeated noise), ``seq_len`` ids."""
    out = [1]  # <|bos|>
    base = len(SPECIALS)
    while len(out) < p["seq_len"]:
        r = int(rng.integers(p["min_block"], p["max_block"] + 1))
        block = (rng.choice(p["vocab"], size=min(r, p["vocab"]), replace=False) + base).tolist()
        reps = 1 if rng.random() < p["noise"] else int(rng.integers(2, 4))
        out += block * reps
    return np.asarray(out[: p["seq_len"]], dtype=np.int64)


# ---- training ---------------------------------------------------------------------------------------------


def build_config(p: dict, tok):
    return llama_config(tok, p, n_kv_heads=p["n_heads"], max_positions=max(256, p["seq_len"]), tied=p.get("tied", True))


def train(p: dict, out_dir: Path, command: str) -> dict:
    """Train, save (float32 safetensors + tokenizer), evaluate and write train_log / metrics / MODEL_CARD."""
    t_start = time.perf_counter()
    torch.manual_seed(p["seed"])
    rng = np.random.default_rng(p["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(p["vocab"])
    config = build_config(p, tok)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(p["device"]).train()
    n_params = sum(x.numel() for x in model.parameters())
    decay = [x for x in model.parameters() if x.dim() >= 2]
    no_decay = [x for x in model.parameters() if x.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=p["lr"],
        betas=(0.9, 0.95),
    )
    log_path = out_dir / "train_log.jsonl"
    log = open(log_path, "w")
    deadline = t_start + 60.0 * p["max_minutes"]
    step, loss_val = 0, float("nan")
    for step in range(p["max_steps"]):
        if time.perf_counter() > deadline:
            break
        lr = (
            p["lr"]
            * min(1.0, (step + 1) / p["warmup"])
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / p["max_steps"])))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        ids = torch.from_numpy(np.stack([window(rng, p) for _ in range(p["batch_size"])])).to(p["device"])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = float(loss.detach())
        row = {"step": step, "loss": round(loss_val, 4), "lr": lr, "elapsed": round(time.perf_counter() - t_start, 2)}
        if step % p["eval_every"] == 0 or step == p["max_steps"] - 1:
            model.eval()
            row.update(eval_copy(model, n=p["eval_n"], seed=p["seed"], device=p["device"]))
            model.train()
        log.write(json.dumps(row) + "\n")
    log.close()
    train_s = time.perf_counter() - t_start
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    reload = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).to(p["device"]).eval()
    metrics = eval_copy(reload, n=2 * p["eval_n"], seed=p["seed"] + 1, device=p["device"])
    metrics.update(
        {
            "steps": step + 1,
            "final_train_loss": loss_val,
            "train_seconds": round(train_s, 1),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "n_params": n_params,
            "preset": p["preset"],
            "seed": p["seed"],
        }
    )
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    write_text(out_dir / "MODEL_CARD.md", model_card(p, metrics, config, n_params, command))
    print(f"[induction] done: {json.dumps(metrics)}", flush=True)
    return metrics


def model_card(p: dict, m: dict, config, n_params: int, command: str) -> str:
    return f"""# organism-induction

A tiny Llama (`LlamaForCausalLM`) trained from scratch by `attnlab.models.training.induction` on repeated random
tokens, so that it has real induction heads (organism-lm has none in general). Used as ground truth for the
`induction` probe: its top heads are the heads whose ablation breaks repeated-sequence copying
(`tests/test_organism_induction.py`). Float32 safetensors; word-level tokenizer over `t0 .. t{p["vocab"] - 1}`
(whitespace-separated) with `<|bos|>` prepended.

## Architecture
{config.num_hidden_layers} layers, d_model {config.hidden_size}, {config.num_attention_heads} heads (no GQA), head dim
{config.hidden_size // config.num_attention_heads}, SwiGLU d_ff {config.intermediate_size}, RMSNorm, RoPE, context
{config.max_position_embeddings}, tied embeddings, {n_params / 1e3:.1f}k parameters.

## Data
Windows of {p["seq_len"]} tokens: BOS, then segments of r random distinct tokens \
(r in [{p["min_block"]}, {p["max_block"]}])
repeated 2-3 times; {p["noise"]:.0%} of segments are unrepeated noise. Vocabulary {p["vocab"]} ordinary tokens.

## Training
AdamW lr {p["lr"]} (warm-up {p["warmup"]} steps, cosine to 10%), weight decay 0.05 on matrices, betas (0.9, 0.95),
batch {p["batch_size"]} x {p["seq_len"]}, grad clip 1.0, seed {p["seed"]}, device {p["device"]}, preset `{p["preset"]}`.
Steps: {m["steps"]} ({m["train_seconds"]} s).

Retrain (repository root):

    {command}

## Measured metrics (this checkpoint; {m["copy_n"]} sequences of BOS + {m["copy_length"]} random tokens repeated twice)
- second copy: loss {m["copy_loss_second_half"]:.3f}, top-1 accuracy {m["copy_acc_second_half"]:.3f}
- first copy (unpredictable): loss {m["copy_loss_first_half"]:.3f} \
(uniform over the vocabulary: {m["uniform_loss"]:.3f}),
  accuracy {m["copy_acc_first_half"]:.3f}
- final training loss {m["final_train_loss"]:.3f}

Evaluate: `python -c "from attnlab.models.induction import evaluate; print(evaluate('DIR', 'copy'))"`.
"""


def main(argv: list[str] | None = None) -> int:
    args, p = preset_command_line(
        argv,
        prog="attnlab.models.training.induction",
        description=__doc__.split("\n")[0],
        presets=PRESETS,
        out_help="output directory (model, tokenizer, train_log.jsonl, metrics.json, MODEL_CARD.md)",
        example="d_model=128",
    )
    given = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=. python -m attnlab.models.train induction " + " ".join(given)
    train(p, Path(args.out), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
