"""Induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads"): attention from a token to the
token that *followed* an earlier copy of it — ``I[i, j] = 1`` if ``tok_i == tok_{j-1}`` and ``j <= i``, the
TransformerLens ``head_detector`` induction pattern. Strongest on repeated random-token sequences
(``--dataset repeated-random``)."""

from __future__ import annotations

from attnlab.probes.pattern_match import PatternMatchProbe, duplicate_target


class InductionHeads(PatternMatchProbe):
    """Induction score: attention on the successor of an earlier copy of the current token."""

    name = "induction"

    def target(self, input_ids, q_pos, first):
        return duplicate_target(input_ids, q_pos, first, shift=1)
