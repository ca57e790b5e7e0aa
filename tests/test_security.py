"""Security defaults: safetensors only, trust_remote_code recorded, the hub token from the
environment only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lorapipe.base_model import build_base
from lorapipe.config import validate
from lorapipe.lineage import model_card, require_adapter
from lorapipe.models import ModelSourceError, hub_token
from tests.conftest import local_model_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_local_base_never_copies_pickle_files(tmp_path: Path, tiny_base: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_base, src)
    (src / "pytorch_model.bin").write_bytes(b"a pickle that must never be read")
    (src / "training_args.pt").write_bytes(b"another pickle")
    pin = build_base(local_model_cfg(str(src)), tmp_path / "base")
    copied = {p.name for p in (tmp_path / "base").iterdir()}
    assert "model.safetensors" in copied and "pytorch_model.bin" not in copied
    assert "training_args.pt" not in copied and "pytorch_model.bin" not in pin["files_md5"]


def test_adapter_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelSourceError, match=r"adapter_model\.bin: pickle files are never"):
        require_adapter(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
    require_adapter(tmp_path)


def test_trust_remote_code_is_warned_and_recorded(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = build_base(local_model_cfg(str(tiny_base), trust_remote_code=True), tmp_path / "b")
    assert pin["trust_remote_code"] is True
    assert "trust_remote_code is on" in capsys.readouterr().err
    params = validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    lineage = {
        "params": params.model_dump(mode="json"),
        "base_model": pin,
        "data": {},
    }
    assert "trust_remote_code: true" in model_card(lineage)
    assert "trust_remote_code" not in model_card(
        {**lineage, "base_model": {**pin, "trust_remote_code": False}}
    )


def test_hub_token_comes_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token file from `hf auth login` is not used: no environment token means no token."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "token").write_text("hf_" + "FromTheTokenFile" * 2)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert hub_token() is False
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert hub_token() == "hf_legacy"
    monkeypatch.setenv("HF_TOKEN", "hf_current")
    assert hub_token() == "hf_current"
