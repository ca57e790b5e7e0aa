"""A base saved quantised by bitsandbytes (a `-bnb-4bit` checkpoint, as many hub repos ship
models for QLoRA) through the stages: the base stage takes it, LoRA trains on its 4-bit
weights, evaluation runs the adapter unfolded, and the merge dequantises the base and folds the
adapter into that."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorapipe.base_model import build_base
from lorapipe.evaluation import adapter_folded, foldable
from lorapipe.lineage import build_lineage, model_card
from lorapipe.merging import merge_adapter, merged_lineage
from lorapipe.models import ModelSourceError, load_base_model, load_tokenizer
from lorapipe.training import train_adapter
from tests.conftest import local_model_cfg, transformers_nf4

NF4 = "bitsandbytes nf4"


@pytest.fixture(scope="module")
def saved_nf4(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base loaded in NF4 (double quantisation) and saved so, with its tokenizer: the
    shape of a `-bnb-4bit` checkpoint."""
    out = tmp_path_factory.mktemp("nf4") / "tiny-bnb-4bit"
    transformers_nf4(tiny_base).save_pretrained(out)
    load_tokenizer(tiny_base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nf4_base(saved_nf4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base as the base stage makes it from `saved_nf4` (model kind local)."""
    out = tmp_path_factory.mktemp("base") / "base"
    build_base(local_model_cfg(saved_nf4), out)
    return out


def logits(model: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def refused(folder: Path, mode: str) -> str:
    """The one line that refuses `quant.mode` on the base saved quantised in `folder`."""
    return (
        f"quant.mode: the base in {folder} is saved quantised ({NF4}) and loads as saved; set "
        f"quant.mode: none (it is {mode}): LoRA on it is QLoRA already"
    )


def test_the_base_stage_takes_a_checkpoint_saved_in_4_bit(saved_nf4: Path, nf4_base: Path) -> None:
    """Its quantisation state unpacks only from the file's data, so the check that the weights
    fit the config reads them (on the meta device it failed: 'issues during automatic conversion
    of the weights'); the pin says how it is stored."""
    pin = json.loads((nf4_base / "pin.json").read_text())
    assert pin["saved_quantised"] == NF4 and pin["kind"] == "local"
    model = load_base_model(nf4_base, dtype="float32").train()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(saved_nf4, device_map={"": "cpu"}).train()
    assert torch.equal(logits(model, IDS), logits(source, IDS))


def test_its_4_bit_layers_keep_their_training_layout_on_a_cpu(
    nf4_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes switches a 4-bit layer that runs in eval mode to
    an inference layout with no backward (`models.keep_4bit_layout_on_cpu`, which QLoRA's load
    has always applied); a base saved in 4-bit gets the same. This CPU lacks the instructions,
    so the layers are made here as on one that has them."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = load_base_model(nf4_base, dtype="float32")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 7 * 2
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quant_mode_on_a_base_saved_quantised_is_refused_in_one_line(
    nf4_base: Path, mode: str
) -> None:
    """transformers would load the checkpoint's own quantisation whatever `quant` asks."""
    from lorapipe.config import QuantCfg

    quant = QuantCfg(mode=mode, compute_dtype="auto", double_quant=mode == "nf4")
    with pytest.raises(ModelSourceError) as err:
        load_base_model(nf4_base, quant=quant)
    assert str(err.value) == refused(nf4_base, mode)


def test_a_local_folder_saved_quantised_refuses_quant_mode_at_validation(
    saved_nf4: Path, tmp_path: Path
) -> None:
    """`dvc exp run -S model.name=<folder> -S quant=nf4` changes the base and asks for QLoRA at
    once: no base is built yet, so the `check` stage, which `dvc repro` runs first, reads the
    folder itself (as validation reads it for its weights and tokenizer) and refuses before DVC
    removes the train stage's outputs. So does every stage, and `lorapipe.params --check`."""
    from lorapipe.config import ConfigError, validate
    from lorapipe.params import compose
    from tests.conftest import ROOT, run_stage

    reports = tmp_path / "reports"
    local = [*trained_on(saved_nf4), f"paths.base={tmp_path / 'not built'}"]
    status, err = run_stage("stages.check", *local, f"paths.reports={reports}", "quant=nf4")
    assert (status, err) == (2, [f"check: error: {refused(saved_nf4, 'nf4')}"])
    assert not reports.exists()
    with pytest.raises(ConfigError) as caught:
        validate(compose(ROOT / "conf", [*local, "experiment=qlora"]))
    assert str(caught.value) == refused(saved_nf4, "nf4")
    assert run_stage("stages.check", *local, f"paths.reports={reports}")[0] == 0


def test_the_check_stage_refuses_it_for_a_built_base_saved_quantised(
    nf4_base: Path, tmp_path: Path
) -> None:
    """A hub model saved quantised (`snapshot: true` keeps its config.json in models/base) is
    known only once the base stage has pinned it: `check` refuses `quant.mode` when the base in
    paths.base was made from these `model` params (the base stage will not rebuild it). Here
    models/base as the base stage would pin TinyLlama's commit, its files the 4-bit tiny ones."""
    from lorapipe.config import ModelCfg
    from lorapipe.provenance import sections
    from tests.conftest import conf_group, run_stage

    base = tmp_path / "base"
    shutil.copytree(nf4_base, base)
    pin = json.loads((base / "pin.json").read_text())
    pin["made_with"] = sections(model=ModelCfg(**conf_group("model", "tinyllama")))
    (base / "pin.json").write_text(json.dumps(pin))
    reports = tmp_path / "reports"
    hub = ["model=tinyllama", f"paths.base={base}", f"paths.reports={reports}"]
    status, err = run_stage("stages.check", *hub, "quant=nf4")
    assert (status, err) == (2, [f"check: error: {refused(base, 'nf4')}"])
    assert not reports.exists()
    assert run_stage("stages.check", *hub)[0] == 0
    # Other `model` params: the base stage makes another base, so this one has no say.
    assert run_stage("stages.check", *hub, "quant=nf4", "model.seed=1")[0] == 0


def test_a_4_bit_checkpoint_missing_a_quantisation_tensor_is_refused_in_one_line(
    saved_nf4: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in saved_nf4.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith(".weight.absmax"))
    del weights[key]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError) as err:
        build_base(local_model_cfg(broken), tmp_path / "base")
    assert str(err.value) == (
        f"model.name: the weights in {broken} cannot be read as saved: 1 tensor(s) fail to "
        f"convert ({key.removesuffix('.absmax')}); is a quantised checkpoint missing part of a "
        "weight's quantisation state? Copy it again"
    )


def test_an_adapter_on_a_4_bit_base_is_evaluated_unfolded(nf4_base: Path, tmp_path: Path) -> None:
    """Folding into packed 4-bit weights dequantises, adds and quantises again: the folded
    model's logits were off the unfolded ones by 12% of their norm, and the base stayed changed
    once the adapter was taken out. Evaluation leaves such an adapter unfolded; a float base
    still folds (tests/test_eval_adapters.py)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    made = get_peft_model(load_base_model(nf4_base, dtype="float32"), config)
    made.save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(
        load_base_model(nf4_base, dtype="float32"), str(tmp_path / "adapter")
    ).eval()
    assert not foldable(model)
    with model.disable_adapter():
        base = logits(model, IDS)
    apart = logits(model, IDS)
    assert not torch.allclose(apart, base, atol=1e-3)  # the adapter changes the logits
    with adapter_folded(model) as folded:
        assert torch.equal(logits(folded, IDS), apart)
    with model.disable_adapter():
        assert torch.equal(logits(model, IDS), base)


def trained_on(saved: Path) -> list[str]:
    """The overrides `trained` trains with: the base stage's local model at `saved`, 4 steps."""
    return [
        "model=tiny",
        "model.kind=local",
        f"model.name={saved}",
        "model.architecture=null",
        "train.max_steps=4",
        "train.batch_size=4",
    ]


@pytest.fixture(scope="module")
def trained(
    nf4_base: Path, saved_nf4: Path, formatted: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An adapter trained 4 steps on the 4-bit base (quant.mode none: the weights come 4-bit),
    with the lineage the train stage writes."""
    from lorapipe.config import validate
    from lorapipe.io import write_json
    from lorapipe.params import compose
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("trained")
    params = validate(
        compose(
            ROOT / "conf",
            [*trained_on(saved_nf4), f"paths.checkpoints={out / 'ckpt'}"],
        )
    )
    summary = train_adapter(params, nf4_base, formatted, out / "adapter", out / "curves")
    assert summary["steps"] == 4
    write_json(out / "adapter" / "lineage.json", build_lineage(params, {}, nf4_base, summary))
    return out / "adapter"


def test_lora_trains_on_the_4_bit_weights_and_its_card_says_so(
    trained: Path,
) -> None:
    adapter = trained
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["base_model"]["saved_quantised"] == NF4
    card = model_card(lineage)
    assert "- qlora" in card.splitlines()
    assert f"the base's weights are stored quantised ({NF4})" in card


def test_the_merge_dequantises_the_base_and_keeps_what_was_trained(
    nf4_base: Path, trained: Path, tmp_path: Path
) -> None:
    """The merged model (float32, no quantization_config) gives the logits of the 4-bit base
    with the adapter, the function training optimised."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorapipe.models import check_merge_dtype

    check_merge_dtype(nf4_base, "float32")  # the stage's check before loading lets it through
    adapter = trained
    tok = load_tokenizer(nf4_base)
    probes = [tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)]
    report = merge_adapter(
        nf4_base, adapter, tmp_path / "merged", dtype="float32", probe_prompts=probes
    )
    assert report["passed"] and report["base_dequantised_from"] == NF4
    assert merged_lineage(adapter, report)["merge"]["base_dequantised_from"] == NF4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    four_bit = PeftModel.from_pretrained(
        load_base_model(nf4_base, dtype="float32"), str(adapter)
    ).eval()
    torch.testing.assert_close(logits(merged, IDS), logits(four_bit, IDS), rtol=0, atol=1e-5)


def test_the_merge_stage_as_its_own_process_keeps_bitsandbytes_for_it(
    nf4_base: Path, saved_nf4: Path, trained: Path, tmp_path: Path
) -> None:
    """`python -m stages.merge`, as DVC runs it, leaves bitsandbytes out only for a base saved
    unquantised (`runtime.needs_bitsandbytes`; tests/test_merge.py): here it keeps it, loads
    the 4-bit base, dequantises it and merges; report and card say so."""
    import shutil

    from lorapipe.params import write_params
    from tests.conftest import ROOT
    from tests.test_merge import stage_overrides
    from tests.test_params import imported_modules, stage_process

    adapter = trained
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    write_params(project, [])
    overrides = [*stage_overrides(nf4_base, adapter, tmp_path), *trained_on(saved_nf4)]
    done = stage_process(project, "stages.merge", *overrides, python=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {m for m in imported_modules(done.stderr) if m.startswith("bitsandbytes.")}
    report = json.loads((tmp_path / "reports" / "merge.json").read_text())
    assert report["passed"] and report["base_dequantised_from"] == NF4
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"fine-tuned with QLoRA (base saved quantised: {NF4}), merged" in card


def test_a_base_saved_in_int8_is_taken_and_merges_dequantised(
    tiny_base: Path, tmp_path: Path
) -> None:
    """bitsandbytes' 8-bit checkpoints the same way: pinned, evaluated unfolded, dequantised to
    merge."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = tmp_path / "tiny-8bit"
    AutoModelForCausalLM.from_pretrained(
        tiny_base, device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    ).save_pretrained(saved)
    load_tokenizer(tiny_base).save_pretrained(saved)
    base = tmp_path / "base"
    assert build_base(local_model_cfg(saved), base)["saved_quantised"] == "bitsandbytes int8"
    torch.manual_seed(2)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_base_model(base, dtype="float32"), config).save_pretrained(tmp_path / "a")
    model = PeftModel.from_pretrained(load_base_model(base, dtype="float32"), str(tmp_path / "a"))
    assert not foldable(model)
    tok = load_tokenizer(base)
    probes = [tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)]
    report = merge_adapter(
        base, tmp_path / "a", tmp_path / "m", dtype="float32", probe_prompts=probes
    )
    assert report["passed"] and report["base_dequantised_from"] == "bitsandbytes int8"
    assert report["adapter_max_abs_logit_effect"] > 100 * report["merged_max_abs_logit_diff"]
