"""``PromptSet``: the inputs of a scan — texts or token ids (and images for VLMs) plus per-prompt metadata — and
``fingerprint`` of the token ids a scan ran on.

Kept in the heads layer because runs record and re-open their inputs (``attnlab.heads.inputs``); the data sets
layer re-exports both from ``attnlab.datasets.base``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptSet:
    """Prompts for a scan.

    Exactly one of ``texts`` and ``token_ids`` is set: texts are tokenized under the model's BOS policy, token ids
    are used as given (builders that make token ids, e.g. repeated random tokens, include BOS themselves).
    """

    name: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    images: list[Any] | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.token_ids is None):
            raise ValueError("a PromptSet holds either texts or token_ids")

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


def fingerprint(token_ids: list[list[int]]) -> str:
    """Short hash of the exact token ids a scan ran on (so results on different inputs are never confused)."""
    h = hashlib.sha256()
    for seq in token_ids:
        h.update(len(seq).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in seq))
    return h.hexdigest()[:16]
