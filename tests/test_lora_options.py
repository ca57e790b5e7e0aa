"""Every lora.* key reaches peft, bad values stop at validation, and every initialisation ships an
adapter for the untouched base that later stages load (PiSSA and OLoRA rewrite the base while
training, so theirs is converted into a plain LoRA)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorapipe.config import ConfigError, Params, validate
from lorapipe.models import load_base_model
from lorapipe.params import compose
from lorapipe.training import train_adapter

ROOT = Path(__file__).resolve().parents[1]
PROBE = torch.tensor([[1, 5, 9, 14, 3, 7]])


def train(params: Params, base: Path, formatted: Path, out: Path, **kw: Any) -> dict[str, Any]:
    out.mkdir()
    return train_adapter(params, base, formatted, out, out.parent / f"{out.name}-curves", **kw)


class FinalLogits(TrainerCallback):
    """The trained model's logits on PROBE, as the trainer holds it when training ends."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROBE).logits


def test_every_lora_key_reaches_the_saved_adapter(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    params = train_params(
        "lora.target_modules=[q_proj,v_proj]",
        "lora.layers_to_transform=[1]",
        "lora.modules_to_save=[lm_head]",
        "lora.use_dora=true",
        "lora.use_rslora=true",
        "lora.init=gaussian",
        "lora.bias=lora_only",
    )
    train(params, tiny_base, formatted, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == [1]
    assert config["modules_to_save"] == ["lm_head"]
    assert config["use_dora"] and config["use_rslora"] and config["bias"] == "lora_only"
    assert config["init_lora_weights"] == "gaussian"
    names = list(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude
    assert any(n.startswith("base_model.model.lm_head") for n in names)  # saved in full
    lora_layers = {n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n}
    assert lora_layers == {"1"}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal", "mica"])
def test_every_init_ships_an_adapter_for_the_untouched_base(
    init: str,
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
) -> None:
    trained = FinalLogits()
    params = train_params(f"lora.init={init}", "lora.target_modules=[q_proj,v_proj,up_proj]")
    train(params, tiny_base, formatted, tmp_path / "a", callbacks=[trained])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    if init.startswith("pissa") or init == "olora":  # converted into a plain LoRA of rank 2r
        assert config["r"] == 2 * params.lora.r and config["init_lora_weights"] is True
    shipped = PeftModel.from_pretrained(load_base_model(tiny_base), tmp_path / "a").eval()
    with torch.no_grad():
        logits = shipped(input_ids=PROBE).logits
    assert trained.logits is not None
    torch.testing.assert_close(logits, trained.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layers", ["[99]", "[0,2]"])
def test_a_layer_the_base_lacks_is_one_line_with_its_range(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    layers: str,
) -> None:
    """peft raised NoMatchingPeftModuleError (a traceback) after the model loaded."""
    from lorapipe.training import TrainingError

    params = train_params("lora.target_modules=[q_proj]", f"lora.layers_to_transform={layers}")
    with pytest.raises(TrainingError) as err:
        train(params, tiny_base, formatted, tmp_path / "a")
    bad = layers.strip("[]").split(",")[-1]
    assert str(err.value) == (
        f"lora.layers_to_transform: {bad} is not a layer of this model (its layers are 0-1)"
    )


@pytest.fixture()
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"init": "pisa"}, "lora.init must be true, false, gaussian"),
        ({"init": "loftq"}, "'loftq' is not supported: re-quantises"),
        ({"init": "eva"}, "'eva' is not supported"),
        ({"layers_to_transform": [0]}, "needs lora.target_modules as a list"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"layers_to_transform": ["first"]}, "lora.layers_to_transform.0"),
        (
            {"layers_to_transform": [1, -1], "target_modules": ["q_proj"]},
            r"lora\.layers_to_transform\.1: Input should be greater than or equal to 0, got -1",
        ),
    ],
)
def test_lora_values_peft_would_reject_stop_at_validation(
    raw: dict[str, Any], changes: dict[str, Any], message: str
) -> None:
    bad = copy.deepcopy(raw)
    bad["lora"].update(changes)
    with pytest.raises(ConfigError, match=message):
        validate(bad)


PRESETS = sorted(p.stem for p in (ROOT / "conf" / "lora").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_validate(preset: str) -> None:
    params = validate(compose(ROOT / "conf", [f"lora={preset}"]))
    assert params.lora.r > 0 and params.lora.target_modules


def test_presets_cover_the_named_architectures() -> None:
    for arch in ("llama", "mistral", "qwen2", "falcon", "gpt2"):
        assert {f"{arch}_attention", f"{arch}_all"} <= set(PRESETS), arch
