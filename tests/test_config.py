"""The typed schema: every problem reported at once, by dotted key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from lorapipe.config import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_validate(raw: dict) -> None:
    params = validate(raw)
    assert params.lora.r > 0 and params.model.kind == "gguf"
    assert params.model.sha256 is not None  # the default refuses any other file


def test_gguf_keys_belong_to_a_gguf_model(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["model"]["file"] = "weights.bin"
    with pytest.raises(ConfigError, match=r"model\.file: kind gguf needs a \.gguf file"):
        validate(bad)
    bad["model"].update(kind="local", name="some/folder", file=None)
    with pytest.raises(ConfigError, match="kind is 'local'"):
        validate(bad)


def test_every_problem_is_listed_by_key(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["lora"]["r"] = 0
    bad["lora"]["dropout"] = 1.5
    bad["train"]["learning_rate"] = "fast"
    bad["train"]["epochs_"] = 3
    bad["data"]["splits"] = {"train": 0.9, "val": 0.2, "test": 0.1}
    with pytest.raises(ConfigError) as err:
        validate(bad)
    message = str(err.value)
    assert "lora.r: Input should be greater than 0, got 0" in message
    assert "lora.dropout:" in message
    assert "train.learning_rate:" in message
    assert "train.epochs_: unknown key" in message
    assert "sum to 1" in message


def test_tiny_model_needs_an_architecture(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["model"] = {"kind": "tiny", "name": "tiny", "architecture": None}
    with pytest.raises(ConfigError, match=r"needs model\.architecture"):
        validate(bad)


@pytest.mark.parametrize(
    ("setting", "quant", "recompute"),
    [("auto", "none", False), ("auto", "nf4", True), (False, "nf4", False), (True, "none", True)],
)
def test_gradient_checkpointing_auto_is_on_for_qlora_only(
    raw: dict, setting: bool | str, quant: str, recompute: bool
) -> None:
    raw["train"]["gradient_checkpointing"] = setting
    raw["quant"] = {"mode": quant}
    params = validate(raw)
    assert params.train.checkpointing(params.quant) is recompute


def test_gradient_checkpointing_takes_auto_or_a_boolean(raw: dict) -> None:
    raw["train"]["gradient_checkpointing"] = "sometimes"
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
        validate(raw)
