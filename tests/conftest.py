"""Shared fixtures: tiny random checkpoints of real architectures (built once per session) and loaded models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import BUILDERS  # noqa: E402

TEXT_ARCHS = ("gpt2", "llama-gqa", "qwen2", "bert")
ALL_ARCHS = TEXT_ARCHS + ("llava",)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """Directory of tiny checkpoints, one sub-directory per architecture."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


@pytest.fixture(scope="session")
def loaded(checkpoint_dir):
    """``loaded(name)`` -> LoadedModel, cached per session."""
    import attnlab

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = attnlab.load(str(checkpoint_dir / name)) if name != "minilm" else attnlab.load("minilm")
        return cache[name]

    return get


SHORT_SENTENCES = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "I like to read books in the evening.",
    "The weather was cold, so we stayed inside.",
    "She opened the door and walked into the room.",
    "Water boils at one hundred degrees.",
]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny forwards (~8x faster than two on a busy 2-core host); restored
    afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
