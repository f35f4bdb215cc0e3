"""``PromptSet`` and ``fingerprint``: the inputs of a scan (defined in ``attnlab.heads.prompts``, below the data
sets, because runs keep their inputs; re-exported here for the dataset builders)."""

from __future__ import annotations

from attnlab.heads.prompts import PromptSet, fingerprint

__all__ = ["PromptSet", "fingerprint"]
