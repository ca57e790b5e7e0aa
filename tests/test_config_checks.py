"""Bad configs fail before any model loads, with one message per problem, each naming its key."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorapipe.base_model import pin_warning
from lorapipe.config import ConfigError, validate
from lorapipe.models import ModelSourceError, check_merge_dtype
from lorapipe.params import write_params
from tests.conftest import conf_group
from tests.test_params import imported_modules, stage_process

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefgh"


@pytest.fixture()
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def local_base(
    tiny_base: Path,
    dest: Path,
    *,
    template: bool = True,
    pickle: bool = False,
    tokenizer: bool = True,
) -> str:
    """A copy of the tiny base as a `kind: local` folder, optionally broken."""
    shutil.copytree(tiny_base, dest)
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (dest / name).unlink()
    if not template:
        (dest / "chat_template.jinja").unlink()
        config = json.loads((dest / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if pickle:
        (dest / "model.safetensors").rename(dest / "pytorch_model.bin")
    return str(dest)


def setter(key: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def apply(raw: dict[str, Any], _: Path) -> None:
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    return apply


def local_model(**kwargs: bool) -> Callable[[dict[str, Any], Path], None]:
    def apply(raw: dict[str, Any], tmp: Path) -> None:
        tiny = tmp / "tiny_base"
        folder = local_base(tiny, tmp / "local", **kwargs)
        raw["model"] = conf_group("model", "tiny", kind="local", name=folder, architecture=None)

    return apply


# (mutation, the key the one message must name, words the message must hold)
BAD = {
    "unknown key": (setter("lora.alhpa", 8), "lora.alhpa", "did you mean lora.alpha?"),
    "wrong type": (setter("train.learning_rate", "fast"), "train.learning_rate", "valid number"),
    # Refused, not converted (pydantic's lax mode made true 1, 1.0 and 'yes' True, '8' 8).
    "true as rank": (setter("lora.r", True), "lora.r", "valid integer, got True"),
    "text as rank": (setter("lora.r", "8"), "lora.r", "valid integer, got '8'"),
    "true as epochs": (setter("train.epochs", True), "train.epochs", "valid number, got True"),
    "true as a rate": (setter("train.learning_rate", True), "train.learning_rate", "valid number"),
    "1.0 as a switch": (setter("lora.use_dora", 1.0), "lora.use_dora", "valid boolean, got 1.0"),
    "yes as a switch": (setter("lora.use_dora", "yes"), "lora.use_dora", "valid boolean"),
    # numpy's seed (train.seed reaches it after the model loaded) takes [0, 2**32).
    "negative seed": (setter("train.seed", -1), "train.seed", "greater than or equal to 0"),
    "seed >= 2**32": (setter("train.seed", 2**32), "train.seed", "less than 4294967296"),
    "negative eval seed": (setter("eval.seed", -1), "eval.seed", "greater than or equal to 0"),
    "r <= 0": (setter("lora.r", 0), "lora.r", "greater than 0"),
    "alpha <= 0": (setter("lora.alpha", -16), "lora.alpha", "greater than 0"),
    "dropout = 1": (setter("lora.dropout", 1.0), "lora.dropout", "less than 1"),
    "dropout < 0": (setter("lora.dropout", -0.1), "lora.dropout", "greater than or equal to 0"),
    "negative steps": (setter("train.max_steps", -5), "train.max_steps", "-1 to train for"),
    "negative epochs": (setter("train.epochs", -1), "train.epochs", "greater than 0"),
    "learning rate 0": (setter("train.learning_rate", 0), "train.learning_rate", "greater than 0"),
    "batch size 0": (setter("train.batch_size", 0), "train.batch_size", "greater than 0"),
    "8-bit with a 4-bit option": (
        lambda raw, _: raw["quant"].update(mode="int8", double_quant=True),
        "quant",
        "double_quant is a 4-bit (nf4) option",
    ),
    # peft raised a TypeError after the model had loaded (found by audit).
    "PiSSA on a 4-bit base": (
        lambda raw, _: (raw["lora"].update(init="pissa_niter_4"), raw["quant"].update(mode="nf4")),
        "lora.init",
        "'pissa_niter_4' needs the base's float weights (peft takes their SVD), but quant.mode",
    ),
    "empty target list": (setter("lora.target_modules", []), "lora", "target_modules is empty"),
    "top_p > 1": (setter("eval.top_p", 1.5), "eval.top_p", "less than or equal to 1"),
    "splits not summing to 1": (
        setter("data.splits", {"train": 0.9, "val": 0.2, "test": 0.1}),
        "data",
        "sum to 1",
    ),
    "missing local model": (
        lambda raw, tmp: raw.update(
            model=conf_group(
                "model", "tiny", kind="local", name=str(tmp / "nowhere"), architecture=None
            )
        ),
        "model.name",
        "not found",
    ),
    "no chat template": (local_model(template=False), "model.name", "tok.chat_template ="),
    "no tokenizer": (local_model(tokenizer=False), "model.name", "has no tokenizer (none of"),
    "pickle weights only": (
        local_model(pickle=True),
        "model.name",
        "pytorch_model.bin: pickle files are never loaded",
    ),
    "branch under strict_pin": (
        lambda raw, _: raw.update(
            model=conf_group("model", "tinyllama", name="org/model", revision="main")
        ),
        "model",
        "not a commit sha",
    ),
    "token in params": (setter("model.revision", FAKE_TOKEN), "model.revision", "HF_TOKEN"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_config_gives_one_message_naming_its_key(
    kind: str, raw: dict[str, Any], tmp_path: Path, tiny_base: Path
) -> None:
    mutate, key, words = BAD[kind]
    shutil.copytree(tiny_base, tmp_path / "tiny_base")
    bad = copy.deepcopy(raw)
    mutate(bad, tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(bad)
    problems = str(err.value).splitlines()  # one problem: one line, no header
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ") and words in problems[0], problems[0]
    assert FAKE_TOKEN not in str(err.value)  # the token itself is never echoed


def test_4bit_and_8bit_keys_together_are_both_named(raw: dict[str, Any]) -> None:
    """BitsAndBytesConfig-style keys: the schema has one quant.mode, and says so for each."""
    bad = copy.deepcopy(raw)
    bad["quant"].update(load_in_4bit=True, load_in_8bit=True, double_quant=True)
    with pytest.raises(ConfigError) as err:
        validate(bad)
    problems = str(err.value).splitlines()[1:]
    assert [p.split(":")[0].strip() for p in problems] == [
        "quant.load_in_4bit",
        "quant.load_in_8bit",
        "quant",  # and the cross-field check still runs despite the unknown keys
    ]
    assert "use quant.mode: nf4" in problems[0] and "use quant.mode: int8" in problems[1]


def test_merge_dtype_the_base_cannot_load_in(tiny_base: Path, tmp_path: Path) -> None:
    base = Path(local_base(tiny_base, tmp_path / "base"))
    check_merge_dtype(base, "float16")  # a float32 base narrows to float16 fine
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.raises(ModelSourceError, match=r"merge\.dtype: float16 cannot hold .* bfloat16"):
        check_merge_dtype(base, "float16")
    check_merge_dtype(base, "bfloat16")
    quantized = {**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (base / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(ModelSourceError, match=r"merge\.dtype: .* gptq-quantised"):
        check_merge_dtype(base, "float32")


def test_branch_revision_is_warned_about_and_sha_is_not() -> None:
    from lorapipe.config import ModelCfg

    sha = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"
    warning = pin_warning(
        ModelCfg(
            **conf_group("model", "tinyllama", name="org/m", revision="main", strict_pin=False)
        ),
        sha,
    )
    assert warning is not None and "'main' is a branch or tag" in warning and sha in warning
    assert (
        pin_warning(
            ModelCfg(
                **conf_group("model", "tinyllama", name="org/m", revision=sha, strict_pin=False)
            ),
            sha,
        )
        is None
    )
    assert validate_model({"kind": "hub", "name": "org/m", "revision": sha, "strict_pin": True})


def validate_model(model: dict[str, Any]) -> bool:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return (
        validate({**raw, "model": conf_group("model", "tinyllama", **model)}).model.kind
        == (model["kind"])
    )


def test_train_stage_reports_every_problem_before_loading_anything(
    tmp_path: Path, tiny_base: Path
) -> None:
    """The heaviest stage, run as DVC runs it, with many problems and a base whose weights are
    garbage: had anything loaded them first, the error would be a safetensors one. The stage
    does not even import torch before the config is valid."""
    for name in ("conf", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name)
    base = Path(local_base(tiny_base, tmp_path / "models" / "base"))
    (base / "model.safetensors").write_bytes(b"\xff" * 64)
    write_params(tmp_path, ["model=tiny"])
    bad = {
        "lora.r": "0",
        "lora.alpha": "-1",
        "lora.dropout": "1.5",
        "train.learning_rate": "fast",
        "train.batch_size": "0",
        "train.max_steps": "-3",
        "+lora.lora_dropout": "0.1",
        "+quant.load_in_8bit": "true",
        "quant.double_quant": "true",
        "model.kind": "local",
        "model.name": str(tmp_path / "missing"),
    }
    started = time.perf_counter()
    # -X importtime lists every module the process imported (on stderr).
    done = stage_process(
        tmp_path, "stages.train", *(f"{k}={v}" for k, v in bad.items()), python=("-X", "importtime")
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "safetensors" not in done.stderr.lower()
    lines = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
    lines = [line for line in lines if not line.startswith("import time:")]
    keys = [line.split(":")[0] for line in lines]
    # One line per problem: model.kind/name is one (the folder), double_quant is named by group.
    expected = {k.lstrip("+") for k in bad} - {"model.kind", "quant.double_quant"} | {"quant"}
    assert sorted(keys) == sorted(expected), lines
    assert "train: error: invalid configuration:\n" in done.stderr
    # Nothing was created: no adapter, no temporary folder, no checkpoints, no reports.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["base"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "reports").exists()
    imported = imported_modules(done.stderr)
    assert "lorapipe.config" in imported and "hydra" in imported
    assert not {"torch", "transformers", "peft", "safetensors"} & imported  # nothing to load with
    assert elapsed < 60, elapsed
