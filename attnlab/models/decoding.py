"""Greedy decoding, written once: the bridge loop probes and interventions use, and Hugging Face ``generate``.

``greedy_decode`` runs a ``LoadedModel`` step by step with a full forward pass over prompt + generated tokens at
every step (right padding, no KV cache), so hooks and interventions see ordinary prefill passes and a caller can
watch each step (``forward``). ``generate_greedy`` is ``generate(do_sample=False)`` on a plain Hugging Face model
(the organisms' behaviour evaluations), decoded without the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attnlab.progress import bar


@dataclass
class Continuation:
    """The tokens greedy decoding produced after a prompt; ``finished``: it stopped at EOS or a newline."""

    tokens: list[int]
    finished: bool


@torch.no_grad()
def greedy_decode(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_at_newline: bool = True,
    keep_eos: bool = False,
    max_len: int | None = None,
    batch_size: int = 32,
    forward: Callable | None = None,
    desc: str | None = None,
) -> list[Continuation]:
    """Greedy continuation of each prompt (token ids), ``batch_size`` prompts per forward pass.

    A prompt stops at EOS (kept in its tokens with ``keep_eos``), after a token whose text holds a newline
    (``stop_at_newline``), when prompt + continuation reach ``max_len`` tokens, or after ``max_new_tokens``.
    ``forward(batch, step) -> logits`` replaces ``model.forward`` (to hook the first pass, or to run a capture
    engine at every step); the batch holds the active prompts, right-padded, ``prompt_indices`` their indices in
    the chunk. With ``desc``, a progress bar over the chunks.
    """
    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    run = forward if forward is not None else (lambda batch, step: model.forward(batch))
    out: list[Continuation] = []
    for s in bar(range(0, len(prompt_ids), batch_size), desc=desc, unit="batch", disable=desc is None):
        ids = [list(p) for p in prompt_ids[s : s + batch_size]]
        new: list[list[int]] = [[] for _ in ids]
        done = [False] * len(ids)  # stopped
        finished = [False] * len(ids)  # stopped at EOS or a newline
        for step in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            batch = model.batch_from_ids([ids[i] + new[i] for i in active], active, padding_side="right")
            logits = run(batch, step)
            last = batch.lengths.to(logits.device) - 1
            nxt = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
            for i, t in zip(active, nxt):
                if eos is not None and t == eos:
                    done[i] = finished[i] = True
                    if keep_eos:
                        new[i].append(int(t))
                    continue
                new[i].append(int(t))
                if stop_at_newline and "\n" in tok.decode([int(t)], skip_special_tokens=True):
                    done[i] = finished[i] = True
                elif max_len is not None and len(ids[i]) + len(new[i]) >= max_len:
                    done[i] = True
        out += [Continuation(n, f) for n, f in zip(new, finished)]
    return out


@torch.no_grad()
def generate_greedy(model, inputs, decoder, *, max_new_tokens: int, **generate_kwargs) -> list[str]:
    """Greedy ``generate`` on a Hugging Face model; the new tokens of each row decoded by ``decoder`` (a tokenizer
    or processor), special tokens dropped."""
    gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return decoder.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
