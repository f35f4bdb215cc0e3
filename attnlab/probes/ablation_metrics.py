"""Scalar metrics for ablation scoring: each turns logits into one number per batch row.

A metric has ``encode(model, prompts) -> Batch`` (how its prompts are tokenized, e.g. with the answer appended
for teacher forcing) and ``__call__(logits, batch) -> Tensor[rows]``. Rows may repeat prompts (batched
ablation repeats each prompt once per ablated head): per-prompt targets are looked up through
``batch.prompt_indices``, so ``encode`` must be called first. See ``docs/methods/ablation_scoring.md`` §2 (Metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _per_prompt(values, n: int, what: str) -> list[str]:
    if isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} prompts")
    return values


class AnswerTokens:
    """Teacher-forced answer tokens appended to each prompt: their summed log-prob, or exact match.

    Parameters
    ----------
    answers : str or sequence of str
        Continuation of each prompt, tokenized without special tokens and appended to the prompt's ids
        (include the leading space if the model writes one, e.g. ``" 417"``).
    reduce : {"logprob", "exact_match"}, default="logprob"
        ``logprob``: sum over answer tokens of log p(token | prefix). ``exact_match``: 1.0 when every answer
        token is the argmax at its position, i.e. when greedy decoding would start with the answer.
    """

    def __init__(self, answers: str | Sequence[str], *, reduce: str = "logprob"):
        self.answers = answers
        self.reduce = reduce

    @property
    def name(self) -> str:
        return "answer_logprob" if self.reduce == "logprob" else "answer_exact_match"

    def encode(self, model, prompts: Sequence[str]):
        if self.reduce not in ("logprob", "exact_match"):
            raise ValueError(f"reduce must be 'logprob' or 'exact_match', got {self.reduce!r}")
        answers = _per_prompt(self.answers, len(prompts), "answers")
        ids, spans = [], []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            prompt_ids = model.token_ids(p, index=i)
            answer_ids = list(model.tokenizer(a, add_special_tokens=False)["input_ids"])
            if not answer_ids:
                raise ValueError(f"answer {i} ({a!r}) has no tokens")
            spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
            ids.append(prompt_ids + answer_ids)
        self.targets_ = [torch.tensor(x[s:e]) for x, (s, e) in zip(ids, spans)]
        self.spans_ = spans
        return model.batch_from_ids(ids, list(range(len(prompts))))

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        out = []
        for row, p in enumerate(batch.prompt_indices):
            s, e = self.spans_[p]
            pred = logits[row, s - 1 : e - 1].float()  # position t predicts token t+1
            tgt = self.targets_[p].to(pred.device)
            if self.reduce == "logprob":
                out.append(pred.log_softmax(-1).gather(-1, tgt[:, None]).sum())
            else:
                out.append((pred.argmax(-1) == tgt).all().to(pred.dtype))
        return torch.stack(out)


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


class TailLogProb:
    """Summed log-prob of the last tokens of token-id prompts (teacher forced): ``prompts`` are
    ``(ids, answer_start)`` pairs and ``ids[answer_start:]`` is scored. What ``attnlab ablate --prompts`` and the
    app's ablation view score on a user's own prompts (their answers, or each prompt's last token)."""

    name = "answer_logprob"

    def encode(self, model, prompts):
        ids = [list(p[0]) for p in prompts]
        self.spans_ = [(int(p[1]), len(p[0])) for p in prompts]
        for i, (s, e) in enumerate(self.spans_):
            if not 1 <= s < e:
                raise ValueError(f"prompt {i} has no answer tokens to score")
        self.targets_ = [torch.tensor(x[s:e]) for x, (s, e) in zip(ids, self.spans_)]
        return model.batch_from_ids(ids, list(range(len(ids))))

    def __call__(self, logits, batch):
        out = []
        for row, p in enumerate(batch.prompt_indices):
            s, e = self.spans_[p]
            pred = logits[row, s - 1 : e - 1].float().log_softmax(-1)
            out.append(pred.gather(-1, self.targets_[p].to(pred.device)[:, None]).sum())
        return torch.stack(out)


class CallableMetric:
    """Any ``fn(logits, batch) -> Tensor[rows]``; prompts encoded with ``model.encode``."""

    def __init__(self, fn: Callable, *, name: str = "custom"):
        self.fn = fn
        self.name = name

    def encode(self, model, prompts: Sequence[str]):
        return model.encode(list(prompts))

    def __call__(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return self.fn(logits, batch)


def as_metric(metric):
    """A metric object from a metric object or a bare callable."""
    if hasattr(metric, "encode") and callable(metric):
        return metric
    if callable(metric):
        return CallableMetric(metric, name=getattr(metric, "__name__", "custom"))
    raise TypeError(f"metric must be a metric object or a callable fn(logits, batch), got {type(metric).__name__}")
