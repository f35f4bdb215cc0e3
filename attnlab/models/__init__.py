"""Loading models (hub id, local checkpoint, bundled alias) into a TransformerLens bridge, and the bundled models."""

from attnlab.models.bundled import BUNDLED, bundled_path, list_models

__all__ = ["BUNDLED", "bundled_path", "list_models", "load", "LoadedModel"]


def __getattr__(name: str):
    if name in ("load", "LoadedModel"):
        from attnlab.models import loading

        value = getattr(loading, name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(name)
