"""Soft injection of task embeddings (SITE; Park & Rhee, arXiv 2507.20906; see ``docs/methods/soft_injection.md``).

1. **Task embedding** ``e_bar`` ``[L, H, d_head]``: the mean over ``n_prompts`` random ``n_shots``-shot prompts
   (``Q: x\\nA: y\\n\\n`` demonstrations from the task's *train* items) of every query head's output
   ``z_{l,h}`` (``blocks.{l}.attn.hook_z``, the ``o_proj`` input) at the prompt's last token.
2. **Soft head selection**: ``alpha = alpha_scale * sigmoid(theta)`` per (layer, head); at the last prompt token
   of a 0-shot prompt every head's output becomes ``(1 - alpha) * z + alpha * e_bar`` (all layers at once); the
   model's own ``o_proj`` then maps the mixed z. Other positions are untouched.
3. **Fitting**: model frozen; Adam on theta (``lr`` 0.2, ``n_steps`` 400, ``batch_size`` 1, init 0); a step's loss
   is the cross-entropy of the first answer token at the last position of random 0-shot *train* queries; every
   ``val_every`` steps the CE on the first ``n_val`` *valid* items is measured and ``select="best"`` keeps the
   theta with the lowest one (``"last"``: the final theta, the reference code's behaviour).

Identity: ``alpha_scale=0`` (or theta -> -inf) gives ``z' = z`` exactly.

Which token is "the last prompt token" (``position``):

- ``"cue"`` (default): the last occurrence of the answer cue (``cue``, ``"\\nA:"``; matched as token ids, read
  from ``embed.hook_in``) in each row. The evaluation harness decodes greedily by re-running prompt + generated
  tokens, so the injection stays at the prompt's end instead of wandering to the newest token; a KV-cached
  decoding step (only new tokens, no cue) and rows without the cue are not modified.
- ``"last"``: the prompt's last real token (prompts in other formats), as the reference injects: a forward pass
  that continues a prompt seen earlier inside the same ``apply`` (greedy decoding that re-runs prompt + generated
  tokens) is injected at that prompt's last token, not at the newest token
  (``attnlab.interventions.continuation``); KV-cached decoding steps are not modified.

Data (``attnlab.datasets.specs.load_task``): ``"icl:TASK"`` (attnlab's ICL train / valid pools), a function-vectors
JSON file ``[{"input": x, "output": y}, ...]`` (split seeded 70 / 9 / 21 like FV), a directory holding ``train.json``
and ``valid.json`` (and optionally ``test.json``) in that format, or a dict ``{"train": ..., "valid": ...}`` of pairs.
Only train (embedding, steps) and valid (selection) items are seen by ``fit``; ``fit_split_`` records the 0-shot
prompts of both so ``check_disjoint`` refuses a test set that shares one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attnlab.datasets.icl import format_prompt
from attnlab.datasets.specs import TaskData, load_task
from attnlab.errors import InputError
from attnlab.hooks import attn_hook
from attnlab.interventions.base import Intervention, prompt_digest, real_keys_from_scores
from attnlab.interventions.continuation import PromptMemory, prompt_mask
from attnlab.params import STRING, Interval, Options

POSITIONS = ("cue", "last", "answer")
LOSSES = ("first_token", "answer")
SELECTS = ("best", "last")
EMBED_IN = "embed.hook_in"


# ---- prompts ------------------------------------------------------------------------------------------------------


def zero_shot(x: str) -> str:
    return format_prompt([], x)


# ---- the operator -----------------------------------------------------------------------------------------------


def inject(z: torch.Tensor, pos: torch.Tensor, e: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``z`` ``[batch, seq, heads, d_head]`` with row b's position ``pos[b]`` mixed toward ``e`` ``[heads, d_head]``.

    ``pos[b] < 0`` leaves row b unchanged. Differentiable in ``alpha`` ``[heads]``.
    """
    rows = torch.nonzero(pos >= 0).flatten()
    if rows.numel() == 0:
        return z
    p = pos[rows]
    a = alpha.to(z.dtype).view(1, -1, 1)
    cur = z[rows, p]  # [n, heads, d_head]
    out = z.clone()
    out[rows, p] = (1 - a) * cur + a * e.to(z.dtype).unsqueeze(0)
    return out


def inject_span(
    z: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor | None, e_span: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """``z`` with positions ``pos[b] + 1 + j`` (``j < len(e_span)``, inside row b's ``lengths[b]``) mixed toward
    ``e_span[j]`` ``[heads, d_head]``: the answer tokens after the cue (``position="answer"``)."""
    for j in range(e_span.shape[0]):
        p = torch.where(pos >= 0, pos + 1 + j, torch.full_like(pos, -1))
        inside = (p >= 0) & (p < z.shape[1])
        if lengths is not None:
            inside &= p < lengths.to(p.device)
        if not bool(inside.any()):
            break
        z = inject(z, torch.where(inside, p, torch.full_like(p, -1)), e_span[j], alpha)
    return z


def last_occurrence(ids: torch.Tensor, cue: Sequence[int]) -> torch.Tensor:
    """Per row of ``ids`` ``[batch, seq]``: index of the last token of the last occurrence of ``cue``; -1 if none."""
    n = len(cue)
    b, s = ids.shape
    out = torch.full((b,), -1, dtype=torch.long, device=ids.device)
    if n == 0 or s < n:
        return out
    c = torch.tensor(list(cue), dtype=ids.dtype, device=ids.device)
    hit = ids.unfold(1, n, 1).eq(c).all(-1)  # [batch, s - n + 1]
    idx = torch.arange(hit.shape[1], device=ids.device) + n - 1
    found = hit.any(1)
    last = (hit.long() * (idx + 1)).argmax(1) + n - 1
    out[found] = last[found]
    return out


def cue_ids(model, cue: str) -> list[int]:
    """Token ids the 0-shot template's ``cue`` tail becomes in context (suffix beyond the shared prefix)."""
    full = model.token_ids(zero_shot("x"))
    head = model.token_ids(zero_shot("x")[: -len(cue)])
    k = 0
    while k < min(len(full), len(head)) and full[k] == head[k]:
        k += 1
    return full[k:] or full[-1:]


# ---- the intervention -------------------------------------------------------------------------------------------


class SoftInjection(Intervention):
    """SITE: inject a few-shot task embedding into every head's last-prompt-token output with learned weights.

    Parameters
    ----------
    n_prompts, n_shots : int, default=50, 10
        Few-shot prompts (train items) averaged into the task embedding.
    lr, n_steps, batch_size : float, int, int, default=0.2, 400, 1
        Adam on theta; random 0-shot train queries per step.
    val_every, n_val : int, default=50, 100
        Validation CE on the first ``n_val`` valid items every ``val_every`` steps (and after the last step).
    select : {"best", "last"}, default="best"
        Keep the theta with the lowest validation CE, or the last one (reference parity).
    theta_init : float, default=0.0
    alpha_scale : float, default=1.0
        ``alpha = alpha_scale * sigmoid(theta)``; 0 is the identity.
    position : {"cue", "last"}, default="cue"
        Which token is injected (module docstring). ``"answer"`` (not in the spec, an attnlab variant): the cue
        as in ``"cue"`` *and* the answer tokens after it, offset j with its own embedding ``e_span_[j-1]`` (mean z
        at offset j of the same few-shot prompts teacher-forced with their answers), one shared alpha per head.
        Needs full-recompute decoding (the evaluation harness's); a KV-cached decode step is not modified.
    cue : str, default="\\nA:"
    loss : {"first_token", "answer"}, default="first_token"
        ``"first_token"`` (the spec, SITE's ``optimize_head_selection``): CE of the answer's first token at the
        injected position. ``"answer"``: mean CE over all answer tokens, teacher forced (prompt + answer in one
        pass; with ``position="cue"`` the injection is still only at the prompt's last token, later tokens see it
        through attention). Identical for one-token answers. Use it where the first token says little: organism-lm
        splits digits, so the first token of ``" 41"`` is ``" 4"``, which the 0-shot model already copies from the
        query (first-token CE ~0.06 nats on successor: nothing to fit).
    top_k : int, default=10
        Heads listed as "selected" (largest alpha) in ``summary``.
    seed : int, default=0
    data_seed : int, default=42
        Seed of ``load_task`` (the split of a single file, the ICL export).

    Attributes
    ----------
    task_ : str
    e_bar_ : ndarray (L, H, d_head)
    e_span_ : ndarray (K, L, H, d_head)
        Only with ``position="answer"``: embeddings of the K answer offsets after the cue (K = longest train answer
        in tokens, plus its line end).
    theta_ : ndarray (L, H)
    history_ : list of dict
        Validation CE per checkpoint (``step``, ``val_loss``) and the mean train loss since the previous one.
    best_step_ : int
    baseline_val_loss_ : float
        Validation CE of the plain 0-shot model.
    selected_heads_ : list of [layer, head, alpha]
    fit_split_ : dict
    """

    name = "soft-injection"
    _parameter_constraints = {
        "n_prompts": [Interval(int, 1, None)],
        "n_shots": [Interval(int, 0, None)],
        "lr": [Interval(float, 0, None, closed="neither")],
        "n_steps": [Interval(int, 0, None)],
        "batch_size": [Interval(int, 1, None)],
        "val_every": [Interval(int, 1, None)],
        "n_val": [Interval(int, 1, None)],
        "select": [Options(SELECTS)],
        "theta_init": [Interval(float, None, None)],
        "alpha_scale": [Interval(float, 0, None)],
        "position": [Options(POSITIONS)],
        "cue": [STRING],
        "loss": [Options(LOSSES)],
        "top_k": [Interval(int, 0, None)],
        "seed": [Interval(int, None, None)],
        "data_seed": [Interval(int, None, None)],
    }

    def __init__(
        self,
        *,
        n_prompts: int = 50,
        n_shots: int = 10,
        lr: float = 0.2,
        n_steps: int = 400,
        batch_size: int = 1,
        val_every: int = 50,
        n_val: int = 100,
        select: str = "best",
        theta_init: float = 0.0,
        alpha_scale: float = 1.0,
        position: str = "cue",
        cue: str = "\nA:",
        loss: str = "first_token",
        top_k: int = 10,
        seed: int = 0,
        data_seed: int = 42,
    ):
        self.n_prompts = n_prompts
        self.n_shots = n_shots
        self.lr = lr
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.val_every = val_every
        self.n_val = n_val
        self.select = select
        self.theta_init = theta_init
        self.alpha_scale = alpha_scale
        self.position = position
        self.cue = cue
        self.loss = loss
        self.top_k = top_k
        self.seed = seed
        self.data_seed = data_seed
        self._state: dict[str, Any] = {}

    # ---- fitting ---------------------------------------------------------------------------------------------

    def _fit_data(self, model, data) -> TaskData:
        """The task (anything ``load_task`` reads): embedding and steps from train, selection from valid."""
        if data is None:
            raise InputError(
                "SoftInjection.fit needs task data (icl:TASK, a function-vectors JSON path, a directory or a dict)"
            )
        task = load_task(data, seed=self.data_seed)
        if len(task.train) <= self.n_shots:
            raise InputError(
                f"{task.name}: {self.n_shots}-shot prompts need more than {self.n_shots} train items, "
                f"got {len(task.train)}"
            )
        return task

    def _fit_split(self, task: TaskData, split: str | None) -> dict[str, Any]:
        """The 0-shot prompts of the train items and of the valid items used for selection."""
        seen = [zero_shot(x) for x, _ in task.train + task.valid[: self.n_val]]
        return {
            "name": split or f"{task.name}: train (embedding, steps) + valid (selection)",
            "n": len(seen),
            "n_train": len(task.train),
            "n_valid": min(len(task.valid), self.n_val),
            "digests": [prompt_digest(p) for p in seen],
        }

    def _fit(self, model, task: TaskData) -> None:
        self.task_ = task.name
        emb = self.task_embedding(model, task.train)
        self.e_bar_ = emb[0].numpy()
        if self.position == "answer":
            self.e_span_ = emb[1:].numpy()
        e = self._embeddings(model)
        params = list(model.bridge.parameters())
        was = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            self._optimise(model, task, e)
        finally:
            for p, w in zip(params, was):
                p.requires_grad_(w)
        alpha = self.alpha_scale / (1 + np.exp(-self.theta_.astype(np.float64)))
        order = np.argsort(-alpha, axis=None, kind="stable")[: self.top_k]
        self.selected_heads_ = [
            [int(i // alpha.shape[1]), int(i % alpha.shape[1]), float(alpha.flat[i])] for i in order
        ]

    @torch.no_grad()
    def task_embedding(self, model, train: Sequence[tuple[str, str]], *, batch_size: int = 16) -> torch.Tensor:
        """Mean z of every head over ``n_prompts`` seeded ``n_shots``-shot prompts (train items, organism-lm's
        ``Q: x\\nA: y\\n\\n`` ICL format): ``[1 + K, L, H, d_head]``; index 0 is the prompt's last token (the spec's
        ``e_bar``), 1..K (``position="answer"`` only) the answer tokens, teacher forced, averaged over the
        prompts whose answer reaches that offset."""
        rng = random.Random(f"site-embed:{self.seed}")
        rows, ends = [], []
        for _ in range(self.n_prompts):
            pick = rng.sample(range(len(train)), self.n_shots + 1)
            x, y = train[pick[-1]]
            ids = model.token_ids(format_prompt([train[i] for i in pick[:-1]], x))
            ends.append(len(ids) - 1)
            if self.position == "answer":  # the answer and its line end: offsets 1..len(answer)
                ids = ids + model.tokenizer(" " + y + "\n", add_special_tokens=False)["input_ids"][:-1]
            rows.append(ids)
        span = max(len(r) - 1 - e for r, e in zip(rows, ends))
        count = torch.zeros(1 + span)
        sums: dict[int, torch.Tensor] = {}

        def keep(layer, pos, valid):
            def hook(z, hook=None):
                b = torch.arange(z.shape[0], device=z.device).unsqueeze(1).expand_as(pos)
                v = z[b, pos.clamp(max=z.shape[1] - 1).to(z.device)].float() * valid.to(z.device)[..., None, None]
                sums[layer] = sums.get(layer, 0) + v.sum(0).cpu()  # [1 + span, H, d]

            return hook

        for s in range(0, len(rows), batch_size):
            chunk, last = rows[s : s + batch_size], torch.tensor(ends[s : s + batch_size])
            batch = model.batch_from_ids(chunk, list(range(len(chunk))), padding_side="right").to(model.device)
            pos = last.unsqueeze(1) + torch.arange(1 + span)
            valid = (pos < torch.tensor([len(r) for r in chunk]).unsqueeze(1)).float()
            count += valid.sum(0)
            with model.bridge.hooks(
                fwd_hooks=[(attn_hook(l, "hook_z"), keep(l, pos, valid)) for l in range(model.n_layers)]
            ):
                model.forward(batch)
        total = torch.stack([sums[l] for l in range(model.n_layers)], 1)  # [1 + span, L, H, d]
        return total / count.clamp(min=1).view(-1, 1, 1, 1)

    def _embeddings(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = torch.as_tensor(np.asarray(self.e_bar_), device=model.device)
        span = getattr(self, "e_span_", None) if self.position == "answer" else None
        return e, (torch.as_tensor(np.asarray(span), device=model.device) if span is not None else None)

    def _alpha(self, theta: torch.Tensor) -> torch.Tensor:
        return self.alpha_scale * torch.sigmoid(theta)

    def _ce(self, model, pairs, theta, e) -> torch.Tensor:
        """Mean CE with injection of the answer's first token (``loss="first_token"``) or of all its tokens
        (``"answer"``, teacher forced in one pass; tokens, not items, are averaged)."""
        prompts = [zero_shot(x) for x, _ in pairs]
        answers = [model.tokenizer(" " + y, add_special_tokens=False)["input_ids"] for _, y in pairs]
        if self.loss == "first_token":
            answers = [a[:1] for a in answers]
        ids = [model.token_ids(p) for p in prompts]
        batch = model.batch_from_ids(
            [i + a[:-1] for i, a in zip(ids, answers)], list(range(len(pairs))), padding_side="right"
        ).to(model.device)
        with model.bridge.hooks(fwd_hooks=self._hooks_for(model, theta, e)):
            logits = model.forward(batch)
        self._reset_state()
        rows = torch.cat([torch.full((len(a),), b) for b, a in enumerate(answers)]).to(logits.device)
        cols = torch.cat([torch.arange(len(i) - 1, len(i) - 1 + len(a)) for i, a in zip(ids, answers)]).to(
            logits.device
        )
        targets = torch.tensor([t for a in answers for t in a], device=logits.device)
        return torch.nn.functional.cross_entropy(logits[rows, cols].float(), targets)

    def _optimise(self, model, task: TaskData, e: torch.Tensor) -> None:
        torch.manual_seed(self.seed)
        rng = random.Random(f"site-steps:{self.seed}")
        theta = torch.full(
            (model.n_layers, model.n_heads), float(self.theta_init), device=model.device, requires_grad=True
        )
        opt = torch.optim.Adam([theta], lr=self.lr)
        valid = task.valid[: self.n_val]

        def validate(th) -> float:
            with torch.no_grad():
                chunks = [valid[s : s + 32] for s in range(0, len(valid), 32)]
                return sum(float(self._ce(model, c, th, e)) * len(c) for c in chunks) / len(valid)

        self.baseline_val_loss_ = validate(torch.full_like(theta, float("-inf")))
        best = (validate(theta.detach()), 0, theta.detach().clone())
        history = [{"step": 0, "val_loss": best[0]}]
        losses = []
        for step in range(1, self.n_steps + 1):
            pairs = [task.train[rng.randrange(len(task.train))] for _ in range(self.batch_size)]
            loss = self._ce(model, pairs, theta, e)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % self.val_every == 0 or step == self.n_steps:
                v = validate(theta.detach())
                history.append({"step": step, "val_loss": v, "train_loss": float(np.mean(losses))})
                losses = []
                if self.select == "last" or v < best[0]:
                    best = (v, step, theta.detach().clone())
        self.history_ = history
        self.best_step_ = best[1]
        self.best_val_loss_ = best[0]
        self.theta_ = best[2].cpu().numpy().astype(np.float32)

    # ---- hooks -----------------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._state = {}

    def hooks(self, model) -> list:
        theta = torch.as_tensor(np.asarray(self.theta_), device=model.device)
        return self._hooks_for(model, theta, self._embeddings(model))

    def _hooks_for(self, model, theta: torch.Tensor, embeddings: tuple) -> list:
        alpha = self._alpha(theta)
        e, e_span = embeddings
        by_cue = self.position in ("cue", "answer")
        cue = cue_ids(model, self.cue) if by_cue else []
        state = self._state

        memory = state.setdefault("memory", PromptMemory())

        def ids_hook(ids, hook=None):
            state["ids"] = ids
            state["pos"] = last_occurrence(ids, cue) if by_cue else None
            return None

        def scores_hook(scores, hook=None):
            if self.position == "last":
                valid = real_keys_from_scores(scores)
                if scores.shape[-2] != scores.shape[-1]:  # a cached decoding step: never injected (reference)
                    state["pos"] = torch.full((valid.shape[0],), -1, dtype=torch.long, device=valid.device)
                    return None
                ids = state.get("ids")
                if ids is not None and ids.shape == valid.shape:  # the prompt's last token, also in continuations
                    valid = prompt_mask(valid, memory.prompt_lengths(ids, valid))
                idx = torch.arange(valid.shape[1], device=valid.device)
                state["pos"] = torch.where(
                    valid.any(1),
                    (valid.long() * (idx + 1)).argmax(1),
                    torch.full_like(idx[:1], -1).expand(valid.shape[0]),
                )
            return None

        def z_hook(layer):
            def hook(z, hook=None):
                pos = state.get("pos")
                if pos is None or pos.shape[0] != z.shape[0]:
                    return None
                out = inject(z, pos.to(z.device), e[layer], alpha[layer])
                if e_span is not None:
                    out = inject_span(out, pos.to(z.device), None, e_span[:, layer], alpha[layer])
                return out

            return hook

        out = [(EMBED_IN, ids_hook), (attn_hook(0, "hook_attn_scores"), scores_hook)]
        return out + [(attn_hook(l, "hook_z"), z_hook(l)) for l in range(model.n_layers)]

    # ---- reporting -------------------------------------------------------------------------------------------

    @property
    def alpha_(self) -> np.ndarray:
        return self.alpha_scale / (1 + np.exp(-np.asarray(self.theta_, dtype=np.float64)))

    def summary(self) -> dict[str, Any]:
        """What was fitted, for reports: the task, the selected heads (largest alpha), the validation curve."""
        self._check_fitted()
        a = self.alpha_
        return {
            "method": self.name,
            "task": self.task_,
            "select": self.select,
            "best_step": self.best_step_,
            "best_val_loss": self.best_val_loss_,
            "baseline_val_loss": self.baseline_val_loss_,
            "selected_heads": self.selected_heads_,
            "mean_alpha": float(a.mean()),
            "n_alpha_above_half": int((a > 0.5).sum()),
            "history": self.history_,
            "fit_split": {k: v for k, v in self.fit_split_.items() if k != "digests"},
        }


def head_overlap(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Jaccard overlap of two selected-head lists (``[layer, head, ...]`` rows)."""
    sa, sb = {(int(r[0]), int(r[1])) for r in a}, {(int(r[0]), int(r[1])) for r in b}
    return len(sa & sb) / max(1, len(sa | sb))


__all__ = [
    "SoftInjection",
    "inject",
    "inject_span",
    "last_occurrence",
    "cue_ids",
    "head_overlap",
]
