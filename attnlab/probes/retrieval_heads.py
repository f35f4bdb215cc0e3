"""Retrieval heads by the copy-paste criterion (Wu et al. 2024, "Retrieval Head Mechanistically Explains
Long-Context Factuality", arXiv 2404.15574; reference code ``nightdessert/Retrieval_Head``).

Per needle-in-a-haystack trial, with needle span ``[n_s, n_e)`` (the answer's tokens inside the prompt) and, at
each answer step t producing token y_t, the attention row ``a = A[l,h][query of step t, :]``:

    j* = argmax_j a[j];   if n_s <= j* < n_e and prompt_ids[j*] == y_t:   score[l,h] += 1 / (n_e - n_s)

A trial counts only if the model answered: ROUGE-1 recall of the reference answer by the response > 0.5, with
Porter stemming as the reference scores it (``rouge_stemmer=True``, the ``rouge_score`` package). The
head's retrieval score is the mean over the trials that passed; a head with score > 0.1 is a retrieval head.

Modes
-----
``"teacher_forced"`` (the default, and the only mode of the ``RetrievalHeads`` probe): one forward pass over
prompt + reference answer; attention rows are built only for the queries that predict answer tokens (the capture
engine's ``"rows"`` site with ``queries=``, so the fused long-context path works). The paper's condition
"generated token == copied token" becomes: the step counts only if the model's argmax at that position equals
the reference token y_t (``require_correct=True``) *and* ``prompt_ids[j*] == y_t``. The "response" for the ROUGE
gate is the decoded argmax predictions at the answer positions. Where the model is right at every step this is
exactly greedy decoding; after a wrong step, later steps are conditioned on the reference (a documented
difference from free generation).

``retrieval_scores_generate`` is the generation mode of the paper: greedy decoding (stop at a newline, EOS or
``max_new_tokens``), one forward per step without a KV cache (slow at long context), rows only for the last query.
Every generated token is scored, the first one included. On organism-lm, where every answer is right, both modes
give identical scores (tested).

Differences from the reference code (see ``docs/methods/retrieval_streaming_heads.md`` §1): failed trials are
counted and reported in the result's ``summary`` (per-trial ROUGE), a warning is raised when none pass (the
reference silently writes an empty file), runs never merge into earlier results, and ``dedup=True`` counts each
needle position at most once per head and trial (the reference does not, so scores can exceed 1; default off).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from attnlab.capture import Capture
from attnlab.errors import AttnlabError
from attnlab.models.decoding import greedy_decode
from attnlab.params import BOOLEAN, Interval
from attnlab.probes.base import Probe, ProbeContext

RETRIEVAL_THRESHOLD = 0.1
_WORD = re.compile(r"[a-z0-9]+")


def rouge1_recall(reference: str, response: str, *, stem: bool = True) -> float:
    """ROUGE-1 recall in [0, 1]: clipped unigram overlap / unigrams of ``reference``.

    ``stem=True`` (default) is the reference's gate: ``rouge_score``'s ``RougeScorer(["rouge1"], use_stemmer=True)``
    (lower-case, runs of ``[a-z0-9]``, Porter stemming of tokens longer than 3 characters), so "walking" matches
    "walk". ``stem=False``: the same tokenisation without stemming. Digit answers score the same either way.
    An empty reference gives 0.
    """
    if stem:
        return float(_stemmed_scorer().score(reference, response)["rouge1"].recall)
    ref = Counter(_WORD.findall(reference.lower()))
    if not ref:
        return 0.0
    resp = Counter(_WORD.findall(response.lower()))
    return sum(min(c, resp[w]) for w, c in ref.items()) / sum(ref.values())


@functools.lru_cache(maxsize=1)
def _stemmed_scorer():
    from rouge_score import rouge_scorer  # it imports nltk: loaded on the first trial scored (start-up time)

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def trial_retrieval_scores(
    jstar: np.ndarray,
    prompt_ids: Sequence[int],
    targets: Sequence[int],
    span: tuple[int, int],
    *,
    predictions: Sequence[int] | None = None,
    dedup: bool = False,
) -> np.ndarray:
    """Copy-paste retrieval scores of one trial.

    Parameters
    ----------
    jstar : int array (..., T)
        Argmax key position (counted from the prompt's first token) of each head's row at each answer step.
    prompt_ids : token ids of the sequence the keys index (prompt, or prompt + answer)
    targets : the token y_t of each step (T)
    span : ``(n_s, n_e)`` needle span in ``prompt_ids``
    predictions : the model's argmax at each step; when given, steps with ``predictions[t] != targets[t]`` count
        for nothing (the "generated token" condition in teacher-forced mode)
    dedup : count each needle position at most once per head

    Returns
    -------
    array of ``jstar.shape[:-1]``: sum over counted steps of ``1 / (n_e - n_s)``.
    """
    jstar = np.asarray(jstar, dtype=np.int64)
    n_s, n_e = int(span[0]), int(span[1])
    if n_e <= n_s:
        raise ValueError(f"empty needle span {span}")
    ids = np.asarray(prompt_ids, dtype=np.int64)
    y = np.asarray(targets, dtype=np.int64)
    if jstar.shape[-1] != len(y):
        raise ValueError(f"{jstar.shape[-1]} attention steps but {len(y)} target tokens")
    step_ok = np.ones(len(y), dtype=bool) if predictions is None else np.asarray(predictions, dtype=np.int64) == y
    in_span = (jstar >= n_s) & (jstar < n_e)
    safe = np.clip(jstar, 0, len(ids) - 1)
    copied = in_span & (ids[safe] == y) & step_ok
    if not dedup:
        return copied.sum(-1) / (n_e - n_s)
    flat_j = jstar.reshape(-1, jstar.shape[-1])
    flat_c = copied.reshape(-1, jstar.shape[-1])
    out = np.array([len(set(flat_j[k][flat_c[k]].tolist())) for k in range(flat_j.shape[0])], dtype=np.float64)
    return out.reshape(jstar.shape[:-1]) / (n_e - n_s)


def aggregate_trials(per_trial: np.ndarray, passed: Sequence[bool], shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Mean of the passed trials' score grids; NaN grid and a warning when none passed.

    Returns (scores, none_passed)."""
    passed = np.asarray(passed, dtype=bool)
    if len(passed) == 0 or not passed.any():
        warnings.warn(
            f"retrieval heads: none of {len(passed)} trials passed the ROUGE-1 gate (the model did not retrieve the "
            "needle); scores are NaN. Check the prompts, the answer format or use a model that solves the task.",
            RuntimeWarning,
            stacklevel=2,
        )
        return np.full(shape, np.nan), True
    return np.asarray(per_trial)[passed].mean(0), False


class RetrievalHeads(Probe):
    """Retrieval score of every query head (teacher-forced mode; see the module docstring).

    Needs a prompt set whose ``meta`` gives, per prompt, ``prompt_len``, ``answer_ids``, ``answer`` and
    ``needle_span`` (``attnlab.datasets.niah_set.niah_prompt_set``, or ``attnlab scan --dataset niah``).

    Parameters
    ----------
    rouge_threshold : float, default=0.5
        A trial counts if ROUGE-1 recall(answer, response) > this (the paper's 50 on a 0-100 scale).
    require_correct : bool, default=True
        Count a step only where the model's argmax equals the reference token.
    dedup : bool, default=False
        Count each needle position at most once per head and trial (reference behaviour: no dedup).
    rouge_stemmer : bool, default=True
        The gate's ROUGE-1 with Porter stemming (``rouge_score``, as the reference scores trials); ``False``
        compares unstemmed words, under which word answers ("walking" vs "walk") pass a different set of trials.
    """

    name = "retrieval_heads"
    _parameter_constraints = {
        "rouge_threshold": [Interval(float, 0, 1)],
        "require_correct": [BOOLEAN],
        "dedup": [BOOLEAN],
        "rouge_stemmer": [BOOLEAN],
    }

    def __init__(
        self,
        *,
        rouge_threshold: float = 0.5,
        require_correct: bool = True,
        dedup: bool = False,
        rouge_stemmer: bool = True,
    ):
        self.rouge_threshold = rouge_threshold
        self.require_correct = require_correct
        self.dedup = dedup
        self.rouge_stemmer = rouge_stemmer

    def _attach(self, capture, ctx: ProbeContext) -> None:
        need = ("prompt_len", "answer_ids", "answer", "needle_span")
        if not ctx.meta or not all(isinstance(m, dict) and all(k in m for k in need) for m in ctx.meta):
            raise AttnlabError(
                "the retrieval_heads probe needs NIAH prompts with reference answers and needle spans "
                f"(per-prompt meta {need}); use --dataset niah or attnlab.datasets.niah_set.niah_prompt_set"
            )
        self._meta = ctx.meta
        self._model = ctx.model
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._trials: list[dict] = []
        self._scores: list[np.ndarray] = []
        capture.on("rows", self._on_rows, queries=self._answer_queries)
        capture.on("batch_end", self._on_batch_end, logits=self._answer_queries)  # only the answer steps are unembedded

    def _steps(self, batch, b: int) -> torch.Tensor:
        """Absolute query positions whose rows predict prompt b's answer tokens."""
        m = self._meta[batch.prompt_indices[b]]
        start = int(batch.first_real[b]) + int(m["prompt_len"]) - 1
        return torch.arange(start, start + len(m["answer_ids"]))

    def _answer_queries(self, batch) -> torch.Tensor:
        return torch.unique(torch.cat([self._steps(batch, b) for b in range(batch.size)]))

    def _on_rows(self, layer: int, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> None:
        self._rows.setdefault(layer, []).append((q_pos.cpu(), rows.argmax(-1).cpu()))

    def _on_batch_end(self, batch, logits) -> None:
        n_layers, n_heads = self._model.n_layers, self._model.n_heads
        per_layer = {}
        for layer, chunks in self._rows.items():
            per_layer[layer] = (torch.cat([q for q, _ in chunks]), torch.cat([j for _, j in chunks], dim=-1))
        self._rows = {}
        for b in range(batch.size):
            p = batch.prompt_indices[b]
            m = self._meta[p]
            first = int(batch.first_real[b])
            steps = self._steps(batch, b)
            ids = batch.input_ids[b].cpu()
            targets = ids[steps + 1].numpy()
            preds = logits[b, steps.to(logits.device)].argmax(-1).cpu().numpy()
            response = _decode(self._model, preds)
            rouge = rouge1_recall(m["answer"], response, stem=self.rouge_stemmer)
            trial = {
                "prompt": p,
                "rouge1_recall": round(rouge, 4),
                "response": response,
                "steps_correct": int((preds == targets).sum()),
                "n_steps": len(targets),
                **{k: m[k] for k in ("length", "depth") if k in m},
            }
            span = m["needle_span"]
            trial["passed"] = bool(rouge > self.rouge_threshold and span is not None)
            if span is None:
                trial["reason"] = "needle span not found in the prompt ids"
            jstar = np.full((n_layers, n_heads, len(steps)), -1, dtype=np.int64)
            for layer, (q_all, j_all) in per_layer.items():
                idx = torch.stack([torch.nonzero(q_all == s).flatten()[0] for s in steps])
                jstar[layer] = (j_all[b][:, idx] - first).numpy()
            if span is not None:
                prompt_ids = ids[first : first + int(m["prompt_len"])].numpy()
                scores = trial_retrieval_scores(
                    jstar,
                    prompt_ids,
                    targets,
                    tuple(span),
                    predictions=preds if self.require_correct else None,
                    dedup=self.dedup,
                )
            else:
                scores = np.zeros((n_layers, n_heads))
            self._trials.append(trial)
            self._scores.append(scores)

    def results(self, ctx: ProbeContext):
        m = ctx.model
        shape = (m.n_layers, m.n_heads)
        order = np.argsort([t["prompt"] for t in self._trials], kind="stable")
        trials = [self._trials[i] for i in order]
        per_trial = np.stack([self._scores[i] for i in order]) if trials else np.zeros((0, *shape))
        passed = [t["passed"] for t in trials]
        scores, none_passed = aggregate_trials(per_trial, passed, shape)
        n_pass = int(np.sum(passed))
        summary = {
            "n_trials": len(trials),
            "n_passed": n_pass,
            "n_failed": len(trials) - n_pass,
            "none_passed": none_passed,
            "retrieval_threshold": RETRIEVAL_THRESHOLD,
            "n_retrieval_heads": int(np.nansum(scores > RETRIEVAL_THRESHOLD)) if not none_passed else 0,
            "mode": "teacher_forced",
            "trials": trials,
        }
        return [
            self.head_scores(
                ctx,
                "retrieval_heads",
                scores,
                description=(
                    f"copy-paste retrieval score (Wu et al. 2024), mean over {n_pass} of {len(trials)} NIAH trials "
                    f"passing ROUGE-1 > {self.rouge_threshold}"
                ),
                extra={"trial_scores": per_trial[np.asarray(passed, dtype=bool)] if trials else per_trial},
                summary=summary,
            )
        ]


def _decode(model, ids) -> str:
    tok = getattr(model, "tokenizer", None)
    ids = [int(i) for i in ids]
    return tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids))


def retrieval_scores_generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 50,
    rouge_threshold: float = 0.5,
    dedup: bool = False,
    rouge_stemmer: bool = True,
    attention: str = "auto",
    dataset: str = "",
):
    """Generation mode (the paper's procedure): greedy decoding per trial, scoring each generated token.

    ``prompts``: a PromptSet as made by ``niah_prompt_set`` (its token ids hold prompt + answer; only the first
    ``meta["prompt_len"]`` are used). Each step is one forward pass of the whole sequence (no KV cache) with
    attention rows built only for the last query; the token produced there is y_t. Every generated token is scored,
    the first included; decoding stops after a token containing a newline, at EOS or after ``max_new_tokens``.
    The response (decoded continuation) is gated by ROUGE-1 recall > ``rouge_threshold``. Returns a
    ``HeadScores`` named ``retrieval_heads_generate`` with the same summary fields as the probe.
    """
    probe = RetrievalHeads(
        rouge_threshold=rouge_threshold, require_correct=False, dedup=dedup, rouge_stemmer=rouge_stemmer
    )
    probe._validate_params()
    ctx = ProbeContext(model=model, dataset=dataset, n_prompts=len(prompts), meta=list(prompts.meta))
    shape = (model.n_layers, model.n_heads)
    trials, per_trial = [], []
    for p, (ids, m) in enumerate(zip(prompts.token_ids, prompts.meta)):
        seq = [int(t) for t in ids[: int(m["prompt_len"])]]
        rows: dict[int, torch.Tensor] = {}
        capture = Capture(model, attention=attention, progress=False)
        capture.on(
            "rows",
            lambda layer, r, q, b, rows=rows: rows.__setitem__(layer, r[0, :, -1].argmax(-1).cpu()),
            queries=lambda b: torch.tensor([b.seq_len - 1]),
        )
        jstar = []

        def step(batch, _step, capture=capture, rows=rows, jstar=jstar):
            logits = capture.run_batch(batch, logit_positions=torch.tensor([-1]))
            jstar.append(torch.stack([rows[l] for l in range(model.n_layers)]).numpy())  # [L, H]
            return logits

        with torch.inference_mode():
            (run,) = greedy_decode(model, [seq], max_new_tokens=max_new_tokens, keep_eos=True, forward=step)
        generated = run.tokens
        seq = seq + generated
        response = _decode(model, generated)
        rouge = rouge1_recall(m["answer"], response, stem=rouge_stemmer)
        span = m["needle_span"]
        trial = {
            "prompt": p,
            "rouge1_recall": round(rouge, 4),
            "response": response,
            "n_steps": len(generated),
            "passed": bool(rouge > rouge_threshold and span is not None),
            **{k: m[k] for k in ("length", "depth") if k in m},
        }
        if span is None:
            trial["reason"] = "needle span not found in the prompt ids"
            scores = np.zeros(shape)
        else:
            scores = trial_retrieval_scores(np.stack(jstar, -1), seq, generated, tuple(span), dedup=dedup)
        trials.append(trial)
        per_trial.append(scores)
    passed = [t["passed"] for t in trials]
    per_trial = np.stack(per_trial) if per_trial else np.zeros((0, *shape))
    scores, none_passed = aggregate_trials(per_trial, passed, shape)
    n_pass = int(np.sum(passed))
    summary = {
        "n_trials": len(trials),
        "n_passed": n_pass,
        "n_failed": len(trials) - n_pass,
        "none_passed": none_passed,
        "retrieval_threshold": RETRIEVAL_THRESHOLD,
        "n_retrieval_heads": 0 if none_passed else int(np.sum(scores > RETRIEVAL_THRESHOLD)),
        "mode": "generate",
        "trials": trials,
    }
    return probe.head_scores(
        ctx,
        "retrieval_heads_generate",
        scores,
        description=(
            "copy-paste retrieval score (Wu et al. 2024, greedy generation), "
            f"mean over {n_pass} of {len(trials)} trials"
        ),
        extra={"trial_scores": per_trial[np.asarray(passed, dtype=bool)]},
        summary=summary,
        params={**probe.record_params(), "mode": "generate", "max_new_tokens": max_new_tokens},
    )
