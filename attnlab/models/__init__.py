"""Loading models (hub id, local checkpoint, bundled alias) into a TransformerLens bridge, and the bundled models."""

from attnlab.lazy import lazy_exports
from attnlab.models.bundled import BUNDLED, bundled_path, list_models

__all__ = ["BUNDLED", "bundled_path", "list_models", "load", "LoadedModel"]
__getattr__ = lazy_exports(
    "attnlab.models", {"load": "attnlab.models.loading", "LoadedModel": "attnlab.models.loading"}
)
