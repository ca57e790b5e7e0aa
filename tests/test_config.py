"""The typed schema: every problem reported at once, by dotted key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import get_args

import pytest
import yaml

from lorapipe.config import ConfigError, Params, validate
from lorapipe.params import NOT_PARAMS, compose, groups
from tests.conftest import conf_group

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


def test_a_source_missing_a_key_points_at_the_page_that_lists_them(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["data"]["sources"] = {"seed": {"path": "data/raw/seed_qa.jsonl", "weight": 1}}
    with pytest.raises(ConfigError) as err:
        validate(bad)
    assert (
        "data.sources.seed.format: missing (every source gives path, format, fields, weight and "
        "rows, null where unused; see docs/data.md)"
    ) in str(err.value)


def test_tiny_model_needs_an_architecture(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["model"] = {**bad["model"], "kind": "tiny", "file": None, "package": None, "sha256": None}
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
    raw["quant"] = conf_group("quant", quant)
    params = validate(raw)
    assert params.train.checkpointing(params.quant) is recompute


def test_gradient_checkpointing_takes_auto_or_a_boolean(raw: dict) -> None:
    raw["train"]["gradient_checkpointing"] = "sometimes"
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing"):
        validate(raw)


def _groups(model: type) -> list[type]:
    """`model` and every schema class nested in its fields."""
    from pydantic import BaseModel

    found = [model]
    for field in model.model_fields.values():
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += _groups(kind)
    return found


def test_no_default_is_stated_in_the_schema() -> None:
    """conf/ states every value once (with its reason); the schema holds types and limits only,
    so a key conf/ forgets is an error, not a second, silent default."""
    with_defaults = [
        f"{group.__name__}.{name}"
        for group in _groups(Params)
        for name, field in group.model_fields.items()
        if not field.is_required()
    ]
    assert with_defaults == []


@pytest.mark.parametrize(
    "choice",
    [
        f"{group}={path.stem}"
        for group in groups(ROOT / "conf")
        if group not in NOT_PARAMS
        for path in sorted((ROOT / "conf" / group).glob("*.yaml"))
    ],
)
def test_every_conf_option_states_every_key(choice: str) -> None:
    validate(compose(ROOT / "conf", [choice]))
