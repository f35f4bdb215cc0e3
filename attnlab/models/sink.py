"""organism-sink at run time: the behaviour on its Bigram-Backcopy task and the extreme-token diagnostics, and the
``evaluate`` that ``attnlab eval organism-sink --task bigram|backcopy`` runs (the model is trained by
``attnlab.models.training.sink``; Guo et al. 2024, "Active-Dormant Attention Heads", arXiv 2410.13835).

    python -c "from attnlab.models.sink import evaluate; print(evaluate('DIR', 'backcopy'))"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaForCausalLM

from attnlab.datasets.bigram_backcopy import BigramBackcopy

EVAL_TASKS = ("bigram", "backcopy")


# ---- behaviour, then the extreme-token diagnostics ---------------------------------------------------


def eval_ids(task: BigramBackcopy, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Held-out sequences (the training stream uses ``seed``; evaluation draws from ``seed + 10_000``)."""
    return torch.from_numpy(task.sample(n, seq_len, np.random.default_rng(seed + 10_000)))


@torch.no_grad()
def behaviour(model, task: BigramBackcopy, ids: torch.Tensor) -> dict:
    """Loss at bigram positions (with the chain's own entropy as the floor) and copy accuracy at trigger positions."""
    logits = model(input_ids=ids.to(model.device)).logits.float().cpu()
    lp = logits[:, :-1].log_softmax(-1)
    tgt = ids[:, 1:]
    nll = -lp.gather(-1, tgt[..., None])[..., 0].numpy()  # position t predicts token t + 1
    hit = (lp.argmax(-1) == tgt).numpy()
    bigram = task.bigram_mask(ids.numpy())[:, :-1]
    trig = task.trigger_mask(ids.numpy())[:, :-1]
    oracle = task.oracle_nll(ids.numpy())
    return {
        "bigram_loss": float(nll[bigram].mean()),
        "bigram_oracle_loss": float(np.nanmean(oracle)),
        "bigram_excess_loss": float(nll[bigram].mean() - np.nanmean(oracle)),
        "bigram_acc": float(hit[bigram].mean()),
        "copy_acc": float(hit[trig].mean()),
        "copy_loss": float(nll[trig].mean()),
        "n_bigram_positions": int(bigram.sum()),
        "n_trigger_positions": int(trig.sum()),
        "uniform_loss": math.log(task.vocab_size),
    }


@torch.no_grad()
def extremes(model, task: BigramBackcopy, ids: torch.Tensor) -> dict:
    """Per layer and head: mean attention on BOS at ordinary vs trigger positions, attention on the previous token
    at trigger positions, BOS value norm / mean value norm; per layer: BOS residual norm / median token norm.

    Computed straight from the Hugging Face model (eager attention weights, value projections, layer outputs) so
    that the training log needs no attnlab machinery; the probes (``domain_sink``, ``value_drain``,
    ``residual_norms``) measure the same quantities on the shipped model.
    """
    values: dict[int, torch.Tensor] = {}
    resid: dict[int, torch.Tensor] = {}  # each decoder layer's output (HF's last hidden state is after the final norm)
    handles = []
    for l, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, i, o, l=l: values.__setitem__(l, o)))
        handles.append(
            layer.register_forward_hook(lambda m, i, o, l=l: resid.__setitem__(l, o[0] if isinstance(o, tuple) else o))
        )
    try:
        out = model(input_ids=ids.to(model.device), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    trig = torch.from_numpy(task.trigger_mask(ids.numpy()))
    ordinary = ~trig
    ordinary[:, 0] = False  # BOS's own row is trivially all on BOS
    n_kv = model.config.num_key_value_heads
    rows = []
    for l, att in enumerate(out.attentions):
        att = att.float().cpu()  # [b, h, q, k]
        bos = att[..., 0]  # [b, h, q]
        prev = torch.diagonal(att, offset=-1, dim1=-2, dim2=-1)  # [b, h, q-1]: query q attends to key q-1
        v = values[l].float().cpu().view(ids.shape[0], ids.shape[1], n_kv, -1).norm(dim=-1)  # [b, s, kv]
        drain = (v[:, 0] / v.mean(1)).mean(0)  # [kv]
        for h in range(att.shape[1]):
            rows.append(
                {
                    "layer": l,
                    "head": h,
                    "bos_ordinary": float(bos[:, h][ordinary].mean()),
                    "bos_trigger": float(bos[:, h][trig].mean()),
                    "prev_trigger": float(prev[:, h][trig[:, 1:]].mean()),
                    "value_drain": float(drain[h * n_kv // att.shape[1]]),
                }
            )
    peaks = []
    for l in range(len(resid)):  # residual stream after each layer
        norms = resid[l].float().cpu().norm(dim=-1)  # [b, s]
        peaks.append(float((norms[:, 0] / norms[:, 1:].median(dim=1).values).mean()))
    return {"heads": rows, "bos_residual_peak": peaks}


def evaluate(model_dir: str, task: str, *, device: str = "cpu", n: int | None = None, seed: int = 0) -> dict:
    """Load a saved organism-sink and run one of ``EVAL_TASKS``; metric name -> value (+ counts)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(EVAL_TASKS)}")
    bb = BigramBackcopy.load(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    seq_len = int(json.loads((Path(model_dir) / "metrics.json").read_text()).get("seq_len", 128))
    m = behaviour(model, bb, eval_ids(bb, n or 256, seq_len, seed + 1))
    keys = ("bigram_loss", "bigram_oracle_loss", "bigram_excess_loss", "bigram_acc", "n_bigram_positions")
    if task == "backcopy":
        keys = ("copy_acc", "copy_loss", "n_trigger_positions")
    return {k: m[k] for k in keys} | {"n_sequences": n or 256, "seq_len": seq_len, "uniform_loss": m["uniform_loss"]}
