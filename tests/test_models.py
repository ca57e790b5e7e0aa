"""The base stage's three sources: the tiny build, a local folder, a hub pin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorapipe.config import ModelCfg
from lorapipe.models import ModelSourceError, build_base, load_base_model, source_of
from tests.conftest import SMALL_ARCH


def test_tiny_build_is_seeded_and_pinned(tmp_path: Path, tiny_base: Path) -> None:
    again = tmp_path / "again"
    pin = build_base(
        ModelCfg(kind="tiny", name="tiny-test", seed=0, architecture=SMALL_ARCH), again
    )
    assert (again / "model.safetensors").read_bytes() == (
        tiny_base / "model.safetensors"
    ).read_bytes()
    assert pin == json.loads((tiny_base / "pin.json").read_text())
    other = build_base(
        ModelCfg(kind="tiny", name="tiny-test", seed=1, architecture=SMALL_ARCH), tmp_path / "s1"
    )
    assert other["config_hash"] != pin["config_hash"]


def test_local_folder_is_copied_and_hashed(tmp_path: Path, tiny_base: Path) -> None:
    pin = build_base(ModelCfg(kind="local", name=str(tiny_base)), tmp_path / "base")
    assert pin["kind"] == "local" and "model.safetensors" in pin["files_md5"]
    assert source_of(tmp_path / "base") == (str(tmp_path / "base"), None, False)
    assert load_base_model(tmp_path / "base").config.num_hidden_layers == 2


def test_local_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        build_base(ModelCfg(kind="local", name=str(tmp_path)), tmp_path / "base")


def test_unreachable_hub_model_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelCfg(kind="hub", name="TinyLlama/TinyLlama-1.1B-Chat-v1.0", revision="main")
    with pytest.raises(ModelSourceError, match="kind: local"):
        build_base(cfg, tmp_path / "base")
