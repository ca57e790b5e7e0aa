"""Shared fixtures: a tiny Llama base built the way the base stage builds the default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/base-like folder: the small tiny Llama, its tokenizer and pin.json."""
    from lorapipe.config import ModelCfg
    from lorapipe.models import build_base

    out = tmp_path_factory.mktemp("base")
    build_base(ModelCfg(kind="tiny", name="tiny-test", seed=0, architecture=SMALL_ARCH), out)
    return out
