"""Parity: HeadHunter's greedy head search (Ahn et al. 2025, Alg. 1) against an independent re-implementation of the
reference loop: each round, score ``S + {h}`` for every head ``h`` not yet chosen, then add the top k (the reference
regenerates chosen heads but excludes them from ranking; ties keep the pool's layer-major order, as a stable sort
does). Checked on a synthetic objective with interactions (pure algorithm) and on organism-dit with a cheap
image objective (SoftPAG guidance as the generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.interventions.headhunter import HeadHunter, greedy_head_search

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_search(pool, score, rounds, k):
    chosen, per_round = [], []
    for _ in range(rounds):
        scored = []
        for head in pool:  # every head is regenerated ...
            s = score(chosen + [head]) if head not in chosen else None
            scored.append((head, s))
        ranked = sorted([(h, s) for h, s in scored if s is not None], key=lambda r: -r[1])  # ... chosen excluded
        new = [h for h, _ in ranked[:k]]
        chosen += new
        per_round.append(new)
    return chosen, per_round


def test_greedy_search_equals_the_reference_loop_with_interactions_and_ties():
    rng = np.random.default_rng(0)
    pool = [(l, h) for l in range(4) for h in range(3)]
    w = {p: float(rng.integers(0, 4)) for p in pool}  # integer weights: many ties
    bonus = {((0, 1), (2, 2)): 5.0, ((1, 0), (3, 1)): 4.0}  # pairs that only help together

    def score(heads):
        s = sum(w[h] for h in heads)
        return s + sum(v for (a, b), v in bonus.items() if a in heads and b in heads)

    got, history = greedy_head_search(pool, score, rounds=3, k=2)
    ref, per_round = reference_search(pool, score, 3, 2)
    assert got == ref
    assert [[tuple(p) for p in r["chosen"]] for r in history] == per_round
    assert len(set(got)) == 6


SHIPPED = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-dit"


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="organism-dit not bundled")
def test_headhunter_on_organism_dit_equals_the_reference_loop():
    pytest.importorskip("diffusers")
    from attnlab.interventions.softpag import SoftPAG, attention_modules
    from attnlab.models import dit

    org = dit.load(SHIPPED)
    labels = torch.tensor([7])

    def ink(images, labels_):  # per-image mean intensity: cheap, deterministic
        return images.flatten(1).mean(1).numpy()

    hh = HeadHunter(ink, rounds=2, k=2, classes=(7,), n_per_class=1, num_steps=1, scale=3.0, u=1.0).fit(org)
    mods = attention_modules(org.transformer)
    pool = [(l, h) for l in range(len(mods)) for h in range(mods[l].heads)]

    def score(heads):
        images = SoftPAG(heads, u=1.0, scale=3.0).sample(org, labels, num_steps=1, seed=0)
        return float(ink(images, labels).mean())

    ref, _ = reference_search(pool, score, 2, 2)
    assert list(hh.heads_) == ref
