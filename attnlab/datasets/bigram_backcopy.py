"""The Bigram-Backcopy (BB) task of Guo et al. 2024 ("Active-Dormant Attention Heads: Mechanistically Demystifying
Extreme-Token Phenomena in LLMs", arXiv 2410.13835, section 2).

A sequence starts with BOS. Its first token is drawn from ``initial`` (never a trigger); after that, each token
follows a bigram Markov chain ``transition[prev, next]`` over ``vocab_size`` states, **except** after one of the
few *trigger* states, where the next token copies the token *before* the trigger (back-copy)::

    BOS  x1  x2  T  x2  x5 ...      (T a trigger: the token after it repeats x2, the one before it)

So a model must predict the bigram successor at ordinary positions and copy at trigger positions. A transformer
trained on it (with Adam) grows a head that is *active* at trigger positions (attends to the previous token and
copies it) and *dormant* elsewhere (parks its attention on BOS, whose value state is nearly zero): the three
extreme-token phenomena — attention sink, value-state drain, residual-state peak — in a model small enough to
train on a CPU. ``attnlab.models.training.sink`` trains it; this module is the task.

Tokens after a trigger are always copies of ordinary states: the state before a trigger was produced either by the
chain from an ordinary state (triggers' own rows are never used) or is the first token (never a trigger), so a
trigger never follows a trigger and copies never loop.

Differences from the paper's code (``GuoTianYu2000/Active-Dormant-Attention``, ``BBM/data.py``): its chain is the
character bigram of a Shakespeare corpus (65 characters) with the 3 most frequent characters as triggers; ours is
a seeded random chain (rows ``(1 - trigger_rate) * Dirichlet(concentration)`` over the ordinary states plus
``trigger_rate`` split over the triggers), so nothing is downloaded and the trigger frequency is a parameter. The
first token is uniform over the ordinary states (the paper: the character marginal without triggers).

States map to token ids as ``id = state + token_offset``; the tokenizer the trainer builds names ordinary states
``t0 ..`` and triggers ``T0 ..``. The task is saved beside a model as ``bigram_backcopy.json`` (parameters, trigger
states, ids) + ``bigram_backcopy.safetensors`` (``transition``, ``initial``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnlab.datasets.base import PromptSet
from attnlab.errors import AttnlabError
from attnlab.heads.io import read_arrays, read_json, write_arrays, write_json

TASK_JSON = "bigram_backcopy.json"
TASK_ARRAYS = "bigram_backcopy.safetensors"


@dataclass(frozen=True)
class BigramBackcopy:
    """One BB task: the chain, its triggers and how states map to token ids.

    Attributes
    ----------
    transition : ndarray of shape (vocab_size, vocab_size)
        ``transition[i, j]`` = P(next = j | current = i) for ordinary states i; the rows of triggers are zero
        (never used: the successor of a trigger is a copy).
    initial : ndarray of shape (vocab_size,)
        Distribution of the first token after BOS (zero on triggers).
    triggers : tuple of int
        Trigger states.
    token_offset : int
        Token id of state 0 (ids below it are the tokenizer's special tokens).
    bos_id : int
        Token id of BOS.
    params : dict
        How the task was made (``make_task``'s arguments).
    """

    transition: np.ndarray
    initial: np.ndarray
    triggers: tuple[int, ...]
    token_offset: int
    bos_id: int
    params: dict

    @property
    def vocab_size(self) -> int:
        return int(self.transition.shape[0])

    @property
    def trigger_ids(self) -> list[int]:
        """Token ids of the triggers."""
        return [s + self.token_offset for s in self.triggers]

    def token_names(self) -> list[str]:
        """Names of the states in order: ``t0, t1, ..`` for ordinary states, ``T0, T1, ..`` for triggers."""
        trig = {s: i for i, s in enumerate(self.triggers)}
        ordinary = iter(range(self.vocab_size))
        names = []
        for s in range(self.vocab_size):
            names.append(f"T{trig[s]}" if s in trig else f"t{next(ordinary)}")
        return names

    # ---- sampling --------------------------------------------------------------------------------------------

    def sample(self, n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """``[n, seq_len]`` token ids: BOS then ``seq_len - 1`` states of the task (as token ids)."""
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (BOS and one token), got {seq_len}")
        is_trigger = np.zeros(self.vocab_size, dtype=bool)
        is_trigger[list(self.triggers)] = True
        cum = np.cumsum(self.transition, axis=1)
        states = np.empty((n, seq_len - 1), dtype=np.int64)
        states[:, 0] = rng.choice(self.vocab_size, size=n, p=self.initial)
        for t in range(1, seq_len - 1):
            prev = states[:, t - 1]
            u = rng.random(n)[:, None]
            drawn = np.minimum((cum[prev] < u).sum(1), self.vocab_size - 1)  # inverse-CDF sample per row
            copy = is_trigger[prev]  # never at t = 1: the first state is not a trigger
            states[:, t] = np.where(copy, states[:, max(t - 2, 0)], drawn)
        return np.concatenate([np.full((n, 1), self.bos_id, dtype=np.int64), states + self.token_offset], axis=1)

    def trigger_mask(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask (shape of ``ids``): positions holding a trigger, i.e. whose *next* token is a copy."""
        return np.isin(np.asarray(ids), self.trigger_ids)

    def bigram_mask(self, ids: np.ndarray) -> np.ndarray:
        """Bool mask: ordinary positions after BOS whose next token follows the chain (not BOS, not a trigger).

        The last position has no next token in the sequence and is excluded too.
        """
        ids = np.asarray(ids)
        mask = ~self.trigger_mask(ids) & (ids != self.bos_id)
        mask[..., -1] = False
        return mask

    def oracle_nll(self, ids: np.ndarray) -> np.ndarray:
        """``[n, seq_len - 1]``: -log P(next | current) under the true chain at bigram positions, NaN elsewhere.

        Its mean over ``bigram_mask`` positions is the best loss any model can reach there (the chain's
        conditional entropy on these samples); a trained model's excess over it measures what it has not learnt.
        """
        ids = np.asarray(ids)
        cur, nxt = ids[:, :-1] - self.token_offset, ids[:, 1:] - self.token_offset
        ok = self.bigram_mask(ids)[:, :-1]
        p = self.transition[np.where(ok, cur, 0), np.where(ok, nxt, 0)]
        with np.errstate(divide="ignore"):
            return np.where(ok, -np.log(p), np.nan)

    # ---- files -----------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``bigram_backcopy.json`` + ``bigram_backcopy.safetensors`` into ``directory`` (atomically)."""
        d = Path(directory)
        write_arrays(d / TASK_ARRAYS, {"transition": self.transition, "initial": self.initial})
        write_json(
            d / TASK_JSON,
            {
                "task": "bigram-backcopy",
                "reference": "Guo et al. 2024, arXiv 2410.13835, section 2",
                "vocab_size": self.vocab_size,
                "triggers": list(self.triggers),
                "trigger_ids": self.trigger_ids,
                "token_offset": self.token_offset,
                "bos_id": self.bos_id,
                "token_names": self.token_names(),
                "params": self.params,
                "arrays": TASK_ARRAYS,
            },
        )

    @classmethod
    def load(cls, directory: str | Path) -> BigramBackcopy:
        """Read a task saved by ``save`` (e.g. from organism-sink's checkpoint directory)."""
        d = Path(directory).resolve()
        meta = read_json(d / TASK_JSON)
        arrays_path = (d / meta.get("arrays", TASK_ARRAYS)).resolve()
        if arrays_path.parent != d:
            raise ValueError(f"{d / TASK_JSON} names an arrays file outside its directory")
        arrays = read_arrays(arrays_path)
        return cls(
            transition=np.asarray(arrays["transition"], dtype=np.float64),
            initial=np.asarray(arrays["initial"], dtype=np.float64),
            triggers=tuple(int(s) for s in meta["triggers"]),
            token_offset=int(meta["token_offset"]),
            bos_id=int(meta["bos_id"]),
            params=dict(meta.get("params", {})),
        )


def make_task(
    *,
    vocab_size: int = 64,
    n_triggers: int = 3,
    concentration: float = 0.2,
    trigger_rate: float = 0.2,
    seed: int = 0,
    token_offset: int = 4,
    bos_id: int = 1,
) -> BigramBackcopy:
    """A seeded BB task (see the module docstring).

    Parameters
    ----------
    vocab_size : int, default=64
        States, triggers included.
    n_triggers : int, default=3
        The last ``n_triggers`` states are the triggers (the paper: 3).
    concentration : float, default=0.2
        Dirichlet concentration of each ordinary row over the ordinary states; small = peaked rows, so the bigram
        is predictable and a head that leaks other tokens' values into it costs loss.
    trigger_rate : float, default=0.2
        Probability that an ordinary state is followed by a trigger (split over the triggers by a flat Dirichlet).
    seed : int, default=0
    token_offset, bos_id : int
        Token ids of state 0 and of BOS in the model's tokenizer.
    """
    if not 0 < n_triggers < vocab_size - 1:
        raise ValueError(f"n_triggers must be in [1, vocab_size - 2], got {n_triggers}")
    if not 0.0 < trigger_rate < 1.0:
        raise ValueError(f"trigger_rate must be in (0, 1), got {trigger_rate}")
    if concentration <= 0:
        raise ValueError(f"concentration must be > 0, got {concentration}")
    rng = np.random.default_rng(seed)
    n_ord = vocab_size - n_triggers
    triggers = tuple(range(n_ord, vocab_size))
    transition = np.zeros((vocab_size, vocab_size))
    transition[:n_ord, :n_ord] = (1.0 - trigger_rate) * rng.dirichlet(np.full(n_ord, concentration), size=n_ord)
    transition[:n_ord, n_ord:] = trigger_rate * rng.dirichlet(np.ones(n_triggers), size=n_ord)
    initial = np.zeros(vocab_size)
    initial[:n_ord] = 1.0 / n_ord
    params = dict(
        vocab_size=vocab_size,
        n_triggers=n_triggers,
        concentration=concentration,
        trigger_rate=trigger_rate,
        seed=seed,
    )
    return BigramBackcopy(transition, initial, triggers, token_offset, bos_id, params)


def task_of(model) -> BigramBackcopy:
    """The BB task saved beside a loaded model (organism-sink); a one-line AttnlabError when it has none."""
    path = Path(getattr(model, "path", "") or "")
    if not (path / TASK_JSON).is_file():
        raise AttnlabError(
            f"dataset bigram-backcopy needs a model trained on the task (organism-sink, organism-sink-sgd); "
            f"{getattr(model, 'name', path)} has no {TASK_JSON}"
        )
    return BigramBackcopy.load(path)


def bigram_backcopy_prompts(model, n_prompts: int = 16, seed: int = 0, *, seq_len: int = 64) -> PromptSet:
    """``n_prompts`` BB sequences of ``seq_len`` tokens for the model's own task, as token ids.

    Per-prompt ``meta``: ``trigger_positions`` (positions holding a trigger, whose next token is a copy) — also
    under ``domain_positions`` with ``domain_label = "trigger"``, which the ``domain_sink`` probe reads by default.
    """
    task = task_of(model)
    ids = task.sample(n_prompts, seq_len, np.random.default_rng(seed))
    meta = []
    for row in task.trigger_mask(ids):
        pos = [int(i) for i in np.flatnonzero(row)]
        meta.append({"trigger_positions": pos, "domain_positions": pos, "domain_label": "trigger"})
    return PromptSet(
        name=f"bigram-backcopy(n={n_prompts},len={seq_len},seed={seed})",
        token_ids=[list(map(int, r)) for r in ids],
        meta=meta,
        seed=seed,
    )
