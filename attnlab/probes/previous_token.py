"""Previous-token heads: attention from each token to the one before it (Elhage et al. 2021; TransformerLens
``head_detector`` pattern ``P[i, i-1] = 1``)."""

from __future__ import annotations

import torch

from attnlab.probes.pattern_match import PatternMatchProbe


class PreviousTokenHeads(PatternMatchProbe):
    """Previous-token score: attention on the immediately preceding token."""

    name = "previous_token"

    def target(self, input_ids, q_pos, first):
        keys = torch.arange(input_ids.shape[1], device=input_ids.device)
        t = (keys[None, None, :] == q_pos[None, :, None] - 1) & (keys[None, None, :] >= first[:, None, None])
        return t.expand(input_ids.shape[0], -1, -1)
