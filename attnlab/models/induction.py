"""organism-induction at run time: the repeated-random-token copy task ``evaluate`` measures.

The model is a tiny ``LlamaForCausalLM`` trained by ``attnlab.models.training.induction`` on repeated random
tokens (its docstring describes the recipe), so that it has real induction heads.

Evaluation (``EVAL_TASKS``): ``copy`` — BOS + 50 random tokens + the same 50 again (the ``repeated-random`` probe
dataset's shape): loss and top-1 accuracy on the second copy vs the first::

    python -c "from attnlab.models.induction import evaluate; print(evaluate('DIR', 'copy'))"
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LlamaForCausalLM

EVAL_TASKS = ("copy",)
EVAL_N: dict[str, str] = {"copy": "repeated random sequences (default 64)"}  # what evaluate's n counts
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")


def repeated_batch(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """``[n, 1 + 2*length]`` ids: BOS + ``length`` distinct random tokens + the same tokens again."""
    rng = np.random.default_rng(seed)
    rows = [[1] + (b := (rng.choice(vocab, size=length, replace=False) + len(SPECIALS)).tolist()) + b for _ in range(n)]
    return torch.tensor(rows, dtype=torch.long)


COPY_CHUNK = 256  # sequences per forward: memory stays flat in n (their full logits are kept per forward)


@torch.no_grad()
def eval_copy(model, *, n: int = 64, length: int = 50, seed: int = 0, device: str = "cpu") -> dict:
    """Loss / top-1 accuracy on the first and the second copy of repeated random sequences (sums over forwards of
    ``COPY_CHUNK`` sequences, then means: every sequence has the same length, so this is the mean over all)."""
    vocab = model.config.vocab_size - len(SPECIALS)
    all_ids = repeated_batch(n, min(length, vocab), vocab, seed + 10_000)
    length = (all_ids.shape[1] - 1) // 2
    first, second = slice(0, length), slice(length + 1, 2 * length)  # second copy's first token is unpredictable
    sums = {"nll_first": 0.0, "nll_second": 0.0, "hit_first": 0.0, "hit_second": 0.0}
    for start in range(0, n, COPY_CHUNK):
        ids = all_ids[start : start + COPY_CHUNK].to(device)
        logits = model(input_ids=ids).logits.float()
        lp = logits[:, :-1].log_softmax(-1)
        tgt = ids[:, 1:]
        nll = -lp.gather(-1, tgt[..., None])[..., 0]  # [b, 2L]; position t predicts token t+1
        hit = (lp.argmax(-1) == tgt).float()
        sums["nll_first"] += float(nll[:, first].double().sum())
        sums["nll_second"] += float(nll[:, second].double().sum())
        sums["hit_first"] += float(hit[:, first].double().sum())
        sums["hit_second"] += float(hit[:, second].double().sum())
    n_first, n_second = n * (first.stop - first.start), n * (second.stop - second.start)
    return {
        "copy_loss_first_half": sums["nll_first"] / n_first,
        "copy_loss_second_half": sums["nll_second"] / n_second,
        "copy_acc_first_half": sums["hit_first"] / n_first,
        "copy_acc_second_half": sums["hit_second"] / n_second,
        "copy_n": n,
        "copy_length": length,
        "uniform_loss": math.log(vocab),
    }


def evaluate(model_dir: str, task: str, *, device: str = "cpu", n: int | None = None, seed: int = 0) -> dict:
    """Load a saved organism-induction and run one of ``EVAL_TASKS``; metric name -> value (+ counts)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(EVAL_TASKS)}")
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return eval_copy(model, n=n or 64, seed=seed, device=device)
