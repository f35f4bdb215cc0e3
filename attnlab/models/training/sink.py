"""organism-sink: a small Llama trained on the Bigram-Backcopy task, so that it has a real attention sink, a
value-state drain and a residual-state peak, by a mechanism we know (Guo et al. 2024, "Active-Dormant Attention
Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835).

Commands (repository root)::

    # the shipped checkpoint (Adam): CPU, one thread, a few minutes
    python -m attnlab.models.train sink --preset cpu --out attnlab/models/bundled/organism-sink
    # the control: the same task, model and data, trained with SGD instead of Adam (one of the paper's mitigations)
    python -m attnlab.models.train sink --preset sgd --out attnlab/models/bundled/organism-sink-sgd
    # test smoke run (seconds)
    python -m attnlab.models.train sink --preset smoke --out /tmp/sink_smoke
    # re-measure a saved model
    attnlab eval organism-sink --task bigram      # loss at ordinary positions (vs the chain's own entropy)
    attnlab eval organism-sink --task backcopy    # copy accuracy at trigger positions

The file reads top to bottom: presets, tokenizer, model config, the training loop, the model card, the command
line. The evaluation (behaviour and the sink diagnostics logged during training, ``evaluate``) is the organism's
run time, in ``attnlab.models.sink``.

What the paper predicts (section 2) and what the model card reports: a head that is *active* at trigger
positions (attends to the previous token and copies it) and *dormant* at ordinary positions (attends to BOS);
BOS's value state is small (a drain: attending to it adds almost nothing) and its residual state is large (a
peak); with SGD instead of Adam the sink, drain and peak do not form.
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

from attnlab.datasets.bigram_backcopy import BigramBackcopy, make_task
from attnlab.heads.io import write_json, write_text
from attnlab.models.sink import behaviour, eval_ids, extremes
from attnlab.models.training import llama_config, preset_command_line

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")  # ids 0..3; the task's state 0 is token id 4

# ---- presets: plain values, each with what it is ---------------------------------------------------------------

PRESETS: dict[str, dict] = {
    "cpu": dict(
        # task (attnlab.datasets.bigram_backcopy.make_task)
        vocab=64,  # states, triggers included (the paper: 65 characters)
        n_triggers=3,  # the paper: 3
        concentration=0.1,  # Dirichlet concentration of the chain's rows: small = peaked, a leak into them costs
        trigger_rate=0.2,  # P(an ordinary token is followed by a trigger)
        # model: LlamaForCausalLM (RoPE, RMSNorm, SwiGLU)
        n_layers=3,  # the paper: 1 or 3 layers
        n_heads=1,  # the paper: 1 head per layer (with 4 heads per layer the copy spread over heads, none sank)
        d_model=64,  # the paper: 256
        d_ff=256,
        seq_len=64,  # the paper: 256
        # optimisation (the paper: AdamW lr 3e-4, betas (0.9, 0.99), weight decay 1e-4, batch 512, 10k steps);
        # a higher lr on far fewer, smaller batches: the sink forms near step 500, at lr 3e-3 not by step 2,200
        optimizer="adam",  # adam (AdamW) | sgd (SGD with momentum)
        lr=1e-2,
        momentum=0.9,  # SGD only
        weight_decay=1e-4,
        batch_size=32,
        warmup=50,  # steps of linear warm-up, then cosine decay to 10% at max_steps
        max_steps=3000,
        max_minutes=60.0,  # wall-clock cap of the loop (the shipped run stopped at max_steps)
        eval_every=200,
        eval_n=64,  # sequences per evaluation
    ),
}
PRESETS["sgd"] = dict(PRESETS["cpu"], optimizer="sgd", lr=0.03)  # the paper's SGD run: lr 0.03, momentum 0.9
PRESETS["smoke"] = dict(
    PRESETS["cpu"], n_layers=2, n_heads=2, d_model=32, d_ff=64, seq_len=32, batch_size=8, max_steps=20, eval_every=10,
    eval_n=8, max_minutes=1.0,
)  # fmt: skip


# ---- tokenizer: one word per state ------------------------------------------------------------------------------


def build_tokenizer(names: list[str]):
    """Word-level tokenizer over the task's state names (``t0 ..``, ``T0 ..``) after the specials; BOS prepended."""
    table = {s: i for i, s in enumerate(SPECIALS)}
    table.update({name: len(SPECIALS) + i for i, name in enumerate(names)})
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


def build_config(p: dict, tok):
    return llama_config(tok, p, n_kv_heads=p["n_heads"], max_positions=max(256, p["seq_len"]), tied=False)


# ---- training ---------------------------------------------------------------------------------------------------


def train(p: dict, out_dir: Path, command: str) -> dict:
    """Train, save (float32 safetensors + tokenizer + the task), evaluate, write train_log / metrics / MODEL_CARD."""
    t_start = time.perf_counter()
    torch.manual_seed(p["seed"])
    rng = np.random.default_rng(p["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)

    # the task, its tokenizer and the model
    task = make_task(
        vocab_size=p["vocab"],
        n_triggers=p["n_triggers"],
        concentration=p["concentration"],
        trigger_rate=p["trigger_rate"],
        seed=p["seed"],
        token_offset=len(SPECIALS),
        bos_id=SPECIALS.index("<|bos|>"),
    )
    tok = build_tokenizer(task.token_names())
    config = build_config(p, tok)
    config._attn_implementation = "eager"  # the diagnostics read attention weights
    model = LlamaForCausalLM(config).to(p["device"]).train()
    n_params = sum(x.numel() for x in model.parameters())

    # the optimiser: the one thing the control changes
    decay = [x for x in model.parameters() if x.dim() >= 2]
    no_decay = [x for x in model.parameters() if x.dim() < 2]
    groups = [{"params": decay, "weight_decay": p["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if p["optimizer"] == "adam":
        opt = torch.optim.AdamW(groups, lr=p["lr"], betas=(0.9, 0.99), eps=1e-8)
    elif p["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=p["lr"], momentum=p["momentum"])
    else:
        raise ValueError(f"optimizer must be adam or sgd, got {p['optimizer']!r}")

    held_out = eval_ids(task, p["eval_n"], p["seq_len"], p["seed"])
    log = []
    deadline = t_start + 60.0 * p["max_minutes"]
    step, loss_val = 0, float("nan")
    for step in range(p["max_steps"]):
        if time.perf_counter() > deadline:
            break
        # linear warm-up, then cosine to 10% (the paper keeps lr constant; with a constant lr 1e-2 the sink's mass
        # swung between 0.79 and 0.998 from one evaluation to the next, so the end point was a matter of luck)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / p["max_steps"]))
        lr = p["lr"] * min(1.0, (step + 1) / p["warmup"]) * decay
        for g in opt.param_groups:
            g["lr"] = lr
        ids = torch.from_numpy(task.sample(p["batch_size"], p["seq_len"], rng)).to(p["device"])
        loss = model(input_ids=ids, labels=ids).loss  # next-token loss on every position, as in the paper
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())  # a sync point; cheap at this size
        row = {"step": step, "loss": round(loss_val, 4), "lr": lr, "elapsed": round(time.perf_counter() - t_start, 2)}
        if step % p["eval_every"] == 0 or step == p["max_steps"] - 1:
            model.eval()
            row.update(behaviour(model, task, held_out))
            row.update(extremes(model, task, held_out))
            model.train()
            b = max(row["heads"], key=lambda r: r["bos_ordinary"] - r["bos_trigger"])  # the most active-dormant head
            print(
                f"[sink] step {step} loss {loss_val:.3f} bigram {row['bigram_loss']:.3f} "
                f"(floor {row['bigram_oracle_loss']:.3f}) copy {row['copy_acc']:.3f} | L{b['layer']}H{b['head']} "
                f"BOS {b['bos_ordinary']:.2f}/{b['bos_trigger']:.2f} prev {b['prev_trigger']:.2f} "
                f"drain {b['value_drain']:.2f} | peak {max(row['bos_residual_peak']):.1f}",
                flush=True,
            )
        log.append(row)
    train_s = time.perf_counter() - t_start

    # save, reload, measure on fresh held-out sequences
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    task.save(out_dir)
    write_text(out_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    reload = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager")
    reload = reload.to(p["device"]).eval()
    test = eval_ids(task, 4 * p["eval_n"], p["seq_len"], p["seed"] + 1)
    metrics = behaviour(reload, task, test) | extremes(reload, task, test)
    metrics.update(
        {
            "steps": step + 1,
            "final_train_loss": loss_val,
            "train_seconds": round(train_s, 1),
            "n_params": n_params,
            "preset": p["preset"],
            "optimizer": p["optimizer"],
            "seed": p["seed"],
            "seq_len": p["seq_len"],
            "n_eval_sequences": int(test.shape[0]),
        }
    )
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "MODEL_CARD.md", model_card(p, metrics, config, task, n_params, command))
    print(f"[sink] done: {json.dumps({k: v for k, v in metrics.items() if k != 'heads'})}", flush=True)
    return metrics


# ---- model card ---------------------------------------------------------------------------------------------------


def _head_table(m: dict) -> str:
    lines = [
        "| head | BOS attention, ordinary positions | BOS attention, trigger positions "
        "| previous token, trigger positions | BOS value / mean value |",
        "|---|---|---|---|---|",
    ]
    for r in m["heads"]:
        cells = [r["bos_ordinary"], r["bos_trigger"], r["prev_trigger"], r["value_drain"]]
        lines.append(f"| L{r['layer']}H{r['head']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def model_card(p: dict, m: dict, config, task: BigramBackcopy, n_params: int, command: str) -> str:
    name = "organism-sink" if p["optimizer"] == "adam" else "organism-sink-sgd"
    adam = p["optimizer"] == "adam"
    optimiser = "AdamW" if adam else f"SGD (momentum {p['momentum']})"
    settings = f"AdamW lr {p['lr']}, betas (0.9, 0.99)" if adam else f"SGD lr {p['lr']}, momentum {p['momentum']}"
    peaks = ", ".join(f"layer {l}: {v:.1f}x" for l, v in enumerate(m["bos_residual_peak"]))
    return f"""# {name}

A small Llama (`LlamaForCausalLM`) trained from scratch by `attnlab.models.training.sink` on the Bigram-Backcopy
task of Guo et al. 2024 (arXiv 2410.13835) with **{optimiser}**.
Float32 safetensors; word-level tokenizer over the task's states (`t0 ..` ordinary, `T0 ..` triggers) with `<|bos|>`
prepended; the task itself (transition matrix, trigger set) is saved beside the model as `bigram_backcopy.json` +
`bigram_backcopy.safetensors` (`attnlab.datasets.bigram_backcopy.BigramBackcopy.load(DIR)`).

## Architecture
{config.num_hidden_layers} layers, d_model {config.hidden_size}, {config.num_attention_heads} heads (no GQA), head dim
{config.hidden_size // config.num_attention_heads}, SwiGLU d_ff {config.intermediate_size}, RMSNorm, RoPE, untied
embeddings, {n_params / 1e3:.1f}k parameters.

## Data
Sequences of {p["seq_len"]} tokens: BOS, then a bigram Markov chain over {task.vocab_size} states (rows
{1 - p["trigger_rate"]:.2f} x Dirichlet({p["concentration"]}) over the {task.vocab_size - len(task.triggers)} ordinary
states + {p["trigger_rate"]:.2f} over the triggers), except that after each of the {len(task.triggers)} triggers
({", ".join(task.token_names()[s] for s in task.triggers)}) the next token copies the token before the trigger.
Generated on the fly (seed {p["seed"]}); evaluation sequences come from a separate seed.

## Training
{settings},
weight decay {p["weight_decay"]} on matrices, linear warm-up {p["warmup"]} steps then cosine to 10%, batch
{p["batch_size"]} x {p["seq_len"]}, next-token loss on every position, seed {p["seed"]}, device {p["device"]},
preset `{p["preset"]}`. Steps: {m["steps"]} ({m["train_seconds"]} s).

Retrain (repository root):

    {command}

## Measured metrics (this checkpoint; {m["n_eval_sequences"]} held-out sequences)
- bigram positions ({m["n_bigram_positions"]}): loss {m["bigram_loss"]:.3f} against the chain's own entropy
  {m["bigram_oracle_loss"]:.3f} (excess {m["bigram_excess_loss"]:.3f}; uniform {m["uniform_loss"]:.3f}), top-1
  accuracy {m["bigram_acc"]:.3f}
- trigger positions ({m["n_trigger_positions"]}): copy accuracy {m["copy_acc"]:.3f}, loss {m["copy_loss"]:.3f}
- final training loss {m["final_train_loss"]:.3f}

Re-measure: `attnlab eval {name} --task bigram` and `--task backcopy`.

## Extreme tokens (the same held-out sequences)

{_head_table(m)}

BOS residual norm / median token norm after each layer: {peaks}.
"""


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args, p = preset_command_line(
        argv,
        prog="attnlab.models.training.sink",
        description=__doc__.split("\n")[0],
        presets=PRESETS,
        out_help="output directory (model, tokenizer, task, logs, MODEL_CARD.md)",
        example="n_layers=2",
    )
    command = "python -m attnlab.models.train sink " + " ".join(sys.argv[1:] if argv is None else argv)
    train(p, Path(args.out), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
