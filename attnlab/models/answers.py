"""Teacher-forced answers: each prompt followed by its answer in one sequence, and the log-probability of the answer.

``TeacherForced`` holds the token ids of every item (prompt + answer), where each answer sits (``spans``, ``[start,
end)``) and its tokens (``targets``). Position ``t`` predicts token ``t + 1``, so an answer ``[s, e)`` is read from
the logits at positions ``s - 1 .. e - 2`` (``read_positions``). Rows of a batch may repeat items (the batched
ablation scorer repeats each prompt once per ablated head): items are looked up through ``batch.prompt_indices``.

It is the one implementation of "summed log-prob of the answer tokens" (and of "greedy decoding would start with
the answer"): the ablation metric ``AnswerTokens``, the app's answer log-prob on a run's prompts and SoftPAG
decoding's search objective all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnlab.errors import AttnlabError


@dataclass
class TeacherForced:
    """Items as prompt + answer token ids, with each answer's span ``[start, end)`` and tokens."""

    ids: list[list[int]]
    spans: list[tuple[int, int]]
    targets: list[torch.Tensor]

    @classmethod
    def from_answers(cls, model, prompts: Sequence[str], answers: Sequence[str]) -> TeacherForced:
        """Each prompt's ids under the model's BOS policy, then its answer tokenized on its own (no special tokens;
        include the leading space if the model writes one, e.g. ``" 417"``)."""
        ids, spans = [], []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            prompt_ids = model.token_ids(p, index=i)
            answer_ids = list(model.tokenizer(a, add_special_tokens=False)["input_ids"])
            if not answer_ids:
                raise ValueError(f"answer {i} ({a!r}) has no tokens")
            spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
            ids.append(prompt_ids + answer_ids)
        return cls._of(ids, spans)

    @classmethod
    def from_token_ids(cls, pairs: Sequence[tuple[Sequence[int], int]]) -> TeacherForced:
        """Items given as ``(token ids, answer start)``: the answer is the tail of the ids from that position."""
        ids = [list(p[0]) for p in pairs]
        spans = [(int(p[1]), len(p[0])) for p in pairs]
        for i, (s, e) in enumerate(spans):
            if not 1 <= s < e:
                raise AttnlabError(f"prompt {i} has no answer tokens to score")
        return cls._of(ids, spans)

    @classmethod
    def _of(cls, ids: list[list[int]], spans: list[tuple[int, int]]) -> TeacherForced:
        return cls(ids, spans, [torch.tensor(x[s:e]) for x, (s, e) in zip(ids, spans)])

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, model, indices: Sequence[int] | None = None, *, padding_side: str = "right"):
        """A ``Batch`` of the items ``indices`` (default all); answers keep their positions under right padding."""
        indices = list(range(len(self))) if indices is None else list(indices)
        return model.batch_from_ids([self.ids[i] for i in indices], indices, padding_side=padding_side)

    def read_positions(self, batch) -> torch.Tensor:
        """Positions ``s-1 .. e-2`` of the answers of the batch's items (sorted union)."""
        spans = [self.spans[p] for p in set(batch.prompt_indices)]
        return torch.tensor(sorted({t for s, e in spans for t in range(s - 1, e - 1)}), dtype=torch.long)

    def token_index(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every answer token of every row: (row, position of the logits that predict it, the token id)."""
        rows, positions, targets = [], [], []
        for row, p in enumerate(batch.prompt_indices):
            s, e = self.spans[p]
            rows += [row] * (e - s)
            positions += range(s - 1, e - 1)
            targets.append(self.targets[p])
        return torch.tensor(rows), torch.tensor(positions), torch.cat(targets)

    def answer_logits(self, logits, batch) -> torch.Tensor:
        """Float32 logits ``[answer tokens, vocab]`` that predict the answer tokens of every row, in row order."""
        rows, positions, _ = self.token_index(batch)
        return logits[rows.to(logits.device), positions.to(logits.device)].float()

    def logprob(self, answer_logits: torch.Tensor, batch) -> torch.Tensor:
        """Summed log-prob of each row's answer ``[rows]`` from ``answer_logits`` (``answer_logits``' layout)."""
        rows, _, targets = self.token_index(batch)
        lp = answer_logits.log_softmax(-1).gather(-1, targets.to(answer_logits.device)[:, None])[:, 0]
        return torch.zeros(batch.size, dtype=lp.dtype, device=lp.device).index_add_(0, rows.to(lp.device), lp)

    def exact_match(self, answer_logits: torch.Tensor, batch) -> torch.Tensor:
        """1.0 for a row whose every answer token is the argmax at its position (greedy decoding starts with the
        answer), else 0.0 ``[rows]``."""
        rows, _, targets = self.token_index(batch)
        wrong = (answer_logits.argmax(-1) != targets.to(answer_logits.device)).to(answer_logits.dtype)
        misses = torch.zeros(batch.size, dtype=wrong.dtype, device=wrong.device).index_add_(
            0, rows.to(wrong.device), wrong
        )
        return (misses == 0).to(answer_logits.dtype)
