"""Telling a prompt's forward pass from the passes that continue it, for interventions that act on "the prompt".

Several methods act on the prompt only: VAR computes its sinks at prefill, SITE injects at the prompt's last token.
With a KV cache a decoding step is recognisable (fewer queries than keys). Greedy decoding without a cache (the
evaluation harness, Retrieval_Head-style scoring, ``generate(use_cache=False)``) re-runs prompt + generated tokens,
and each pass looks like a new, longer prompt. ``PromptMemory`` remembers the prompts seen inside one ``apply``
context: a row whose real tokens start with a remembered prompt is that prompt's continuation, and its prompt part
is the remembered length. Rows are matched by their tokens, not their batch index, so a harness may drop finished
rows between steps.

One consequence to know: inside one ``apply`` context, a new prompt that begins with an earlier prompt of the same
context is taken for its continuation. Leave and re-enter ``apply`` between unrelated batches where that can happen.
"""

from __future__ import annotations

import torch


class PromptMemory:
    """Prompts seen so far (token tuples), and for each new row how many of its real tokens are the prompt."""

    def __init__(self) -> None:
        self._prompts: set[tuple[int, ...]] = set()
        self._lengths: set[int] = set()

    def clear(self) -> None:
        self._prompts.clear()
        self._lengths.clear()

    def prompt_lengths(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``[batch]``: the number of real tokens of each row ``ids[b][real[b]]`` that belong to its prompt.

        A row that starts with a remembered prompt gets that prompt's length (the shortest one, i.e. the original
        prompt); any other row is remembered as a new prompt and gets its full length.
        """
        out = []
        for row, keep in zip(ids.tolist(), real.bool().tolist()):
            toks = tuple(t for t, k in zip(row, keep) if k)
            n = next((n for n in sorted(self._lengths) if n <= len(toks) and toks[:n] in self._prompts), None)
            if n is None:
                self._prompts.add(toks)
                self._lengths.add(len(toks))
                n = len(toks)
            out.append(n)
        return torch.tensor(out, dtype=torch.long)


def prompt_mask(real: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: the real positions that are among the first ``lengths[b]`` real tokens of row b."""
    rank = real.long().cumsum(1)  # 1-based index among real tokens
    return real.bool() & (rank <= lengths.to(real.device)[:, None])


__all__ = ["PromptMemory", "prompt_mask"]
