"""The one place that builds TransformerLens hook names (``blocks.{l}.attn.hook_pattern`` etc.)."""

from __future__ import annotations

ATTN_SITES = ("hook_pattern", "hook_attn_scores", "hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k")
RESID_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def attn_hook(layer: int, site: str) -> str:
    """Name of an attention hook, e.g. ``attn_hook(3, "hook_pattern") == "blocks.3.attn.hook_pattern"``."""
    if site not in ATTN_SITES:
        raise ValueError(f"unknown attention hook site {site!r}; expected one of {ATTN_SITES}")
    return f"blocks.{layer}.attn.{site}"


def block_hook(layer: int, site: str) -> str:
    """Name of a residual-stream hook, e.g. ``block_hook(0, "hook_resid_post") == "blocks.0.hook_resid_post"``."""
    if site not in RESID_SITES:
        raise ValueError(f"unknown residual hook site {site!r}; expected one of {RESID_SITES}")
    return f"blocks.{layer}.{site}"


def embed_hook(site: str = "hook_in") -> str:
    """Name of a token-embedding hook: ``"embed.hook_in"`` sees the input ids, ``"embed.hook_out"`` the embeddings."""
    if site not in ("hook_in", "hook_out"):
        raise ValueError(f"unknown embedding hook site {site!r}; expected 'hook_in' or 'hook_out'")
    return f"embed.{site}"


def layer_of(hook_name: str) -> int:
    """Layer index of a ``blocks.{l}....`` hook name."""
    parts = hook_name.split(".")
    if len(parts) < 2 or parts[0] != "blocks":
        raise ValueError(f"not a per-layer hook name: {hook_name!r}")
    return int(parts[1])


def kv_cache(kwargs: dict):
    """The KV cache a forward was called with, under either of its names.

    transformers < 5.24 passes it as ``past_key_values``; 5.24 renamed it ``cache`` (the old name is deprecated).
    """
    cache = kwargs.get("past_key_values")
    return cache if cache is not None else kwargs.get("cache")
