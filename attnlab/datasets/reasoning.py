"""Reasoning traces as prompts: a prompt and its response as one token sequence, with the response span marked.

``reasoning_prompt_set`` builds the ``PromptSet`` the ``preplan_anchor`` probe reads (``meta["prompt_len"]`` /
``["response_len"]``); the ``arithmetic`` dataset uses it with worked solutions as responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnlab.datasets.base import PromptSet
from attnlab.errors import AttnlabError


def _ids(model, x, *, prompt: bool) -> list[int]:
    if isinstance(x, str):
        if prompt:
            return model.token_ids(x)
        return list(model.tokenizer(x, add_special_tokens=False)["input_ids"])
    return [int(t) for t in x]


def reasoning_prompt_set(model, pairs: Sequence[tuple[Any, Any]], *, name: str = "reasoning"):
    """PromptSet of prompt + response token ids with ``meta["prompt_len"]`` / ``["response_len"]``.

    Each pair is (prompt, response), each text or token ids. A text prompt is tokenized under the model's BOS
    policy; a text response is tokenized on its own without special tokens and appended (as sampled response
    tokens are in RL), so the response span is exact.
    """
    ids, meta = [], []
    for prompt, response in pairs:
        p, r = _ids(model, prompt, prompt=True), _ids(model, response, prompt=False)
        if not r:
            raise AttnlabError("empty response")
        ids.append(p + r)
        meta.append({"prompt_len": len(p), "response_len": len(r)})
    return PromptSet(name=name, token_ids=ids, meta=meta)
