"""Duplicate-token heads: attention from a token to earlier copies of itself (TransformerLens ``head_detector``
pattern ``D[i, j] = 1`` if ``tok_i == tok_j`` and ``j < i``)."""

from __future__ import annotations

from attnlab.probes.pattern_match import PatternMatchProbe, duplicate_target


class DuplicateTokenHeads(PatternMatchProbe):
    """Duplicate-token score: attention on earlier occurrences of the same token."""

    name = "duplicate_token"

    def target(self, input_ids, q_pos, first):
        return duplicate_target(input_ids, q_pos, first, shift=0)
