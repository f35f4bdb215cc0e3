"""Scalar metrics for ablation scoring: each turns logits into one number per batch row.

A metric has ``encode(model, prompts) -> Batch`` (how its prompts are tokenized, e.g. with the answer appended
for teacher forcing), ``__call__(logits, batch) -> Tensor[rows]`` and ``read_positions(batch)``: the positions
whose logits it reads (None: any), so that the ablation scorer unembeds only there. Rows may repeat prompts (batched
ablation repeats each prompt once per ablated head): per-prompt targets are looked up through
``batch.prompt_indices``, so ``encode`` must be called first. See ``docs/methods/ablation_scoring.md`` §2 (Metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnlab.models.answers import TeacherForced


def _per_prompt(values, n: int, what: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} prompts")
    return values


class AnswerTokens:
    """Teacher-forced answer tokens after each prompt: their summed log-prob, or exact match.

    The metric of "the answer's log-prob" (``attnlab.models.answers.TeacherForced`` computes it, for this metric,
    the app's answer log-prob, ``attnlab ablate --prompts`` and SoftPAG decoding's search objective alike).

    Parameters
    ----------
    answers : str or sequence of str, optional
        Continuation of each prompt, tokenized without special tokens and appended to the prompt's ids
        (include the leading space if the model writes one, e.g. ``" 417"``). None: the prompts ``encode`` gets
        are ``(token ids, answer start)`` pairs whose tails are the answers.
    reduce : {"logprob", "exact_match"}, default="logprob"
        ``logprob``: sum over answer tokens of log p(token | prefix). ``exact_match``: 1.0 when every answer
        token is the argmax at its position, i.e. when greedy decoding would start with the answer.
    """

    def __init__(self, answers: str | Sequence[str] | None = None, *, reduce: str = "logprob"):
        self.answers = answers
        self.reduce = reduce

    @property
    def name(self) -> str:
        return "answer_logprob" if self.reduce == "logprob" else "answer_exact_match"

    def encode(self, model, prompts: Sequence):
        if self.reduce not in ("logprob", "exact_match"):
            raise ValueError(f"reduce must be 'logprob' or 'exact_match', got {self.reduce!r}")
        if self.answers is None:
            self.teacher_forced_ = TeacherForced.from_token_ids(prompts)
        else:
            answers = _per_prompt(self.answers, len(prompts), "answers")
            self.teacher_forced_ = TeacherForced.from_answers(model, prompts, answers)
        return self.teacher_forced_.batch(model)

    def read_positions(self, batch) -> torch.Tensor | None:
        """Positions ``s-1 .. e-2`` of each prompt's answer span ``[s, e)`` (union over the batch's prompts)."""
        return self.teacher_forced_.read_positions(batch) if hasattr(self, "teacher_forced_") else None

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        answers = self.teacher_forced_
        answer_logits = answers.answer_logits(logits, batch)
        if self.reduce == "logprob":
            return answers.logprob(answer_logits, batch)
        return answers.exact_match(answer_logits, batch)


class LogitDifference:
    """``logit(correct) - logit(incorrect)`` at each prompt's last real token (first token of each answer)."""

    name = "logit_diff"

    def __init__(self, correct: str | Sequence[str], incorrect: str | Sequence[str]):
        self.correct = correct
        self.incorrect = incorrect

    def _first_ids(self, model, words: list[str]) -> torch.Tensor:
        ids = []
        for w in words:
            t = model.tokenizer(w, add_special_tokens=False)["input_ids"]
            if not t:
                raise ValueError(f"answer {w!r} has no tokens")
            ids.append(t[0])
        return torch.tensor(ids)

    def encode(self, model, prompts: Sequence[str]):
        self.correct_ids_ = self._first_ids(model, _per_prompt(self.correct, len(prompts), "correct answers"))
        self.incorrect_ids_ = self._first_ids(model, _per_prompt(self.incorrect, len(prompts), "incorrect answers"))
        return model.encode(list(prompts))

    def read_positions(self, batch) -> torch.Tensor:
        """Each prompt's last real token."""
        return torch.tensor(sorted(set((batch.first_real + batch.lengths - 1).tolist())), dtype=torch.long)

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        idx = torch.as_tensor(batch.prompt_indices)
        last = (batch.first_real + batch.lengths - 1).to(logits.device)
        final = logits[torch.arange(logits.shape[0], device=logits.device), last].float()
        rows = torch.arange(final.shape[0], device=final.device)
        return (
            final[rows, self.correct_ids_[idx].to(final.device)]
            - final[rows, self.incorrect_ids_[idx].to(final.device)]
        )


class NextTokenLogprob:
    """Mean next-token log-prob of each prompt: ``1/(n-1) sum_{t<n-1} log p(x_{t+1} | x_{<=t})`` (teacher forced).

    The census's default causal metric: it needs no answers, so any prompts score every head. Prompts may be
    strings (tokenized under the model's BOS policy) or token-id lists (used as given).
    """

    name = "next_token_logprob"

    def encode(self, model, prompts: Sequence):
        if all(isinstance(p, (list, tuple)) for p in prompts):
            ids = [list(p) for p in prompts]
        else:
            ids = [model.token_ids(p, index=i) for i, p in enumerate(prompts)]
        short = [i for i, x in enumerate(ids) if len(x) < 2]
        if short:
            raise ValueError(f"prompt {short[0]} has fewer than two tokens: no next token to predict")
        return model.batch_from_ids(ids, list(range(len(ids))))

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        out = []
        for row in range(batch.size):
            sl = batch.real_slice(row)
            pred = logits[row, sl.start : sl.stop - 1].float().log_softmax(-1)
            tgt = batch.input_ids[row, sl.start + 1 : sl.stop].to(pred.device)
            out.append(pred.gather(-1, tgt[:, None]).mean())
        return torch.stack(out)


class CallableMetric:
    """Any ``fn(logits, batch) -> Tensor[rows]``; prompts encoded with ``model.encode``."""

    def __init__(self, fn: Callable, *, name: str = "custom"):
        self.fn = fn
        self.name = name

    def encode(self, model, prompts: Sequence[str]):
        return model.encode(list(prompts))

    def read_positions(self, batch) -> None:
        """Unknown: any position."""
        return None

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return self.fn(logits, batch)


def as_metric(metric):
    """A metric object from a metric object or a bare callable."""
    if hasattr(metric, "encode") and callable(metric):
        return metric
    if callable(metric):
        return CallableMetric(metric, name=getattr(metric, "__name__", "custom"))
    raise TypeError(f"metric must be a metric object or a callable fn(logits, batch), got {type(metric).__name__}")
