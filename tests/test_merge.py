"""Merge: per-dtype tolerances, corrupted adapters in every dtype, sharding, the stage's reports
and lineage, and the hub push's checks and dry run."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lorapipe import merging
from lorapipe.config import ConfigError, Params, validate
from lorapipe.hub import HubPushError, push_folder
from lorapipe.io import write_json, write_jsonl
from lorapipe.lineage import LINEAGE_FILE, build_lineage, file_md5, require_trained_with
from lorapipe.merging import (
    RELATIVE_MAX_LOGIT_DIFF,
    MergeCheckError,
    float64_forward,
    merge_adapter,
    probe_batches,
    probe_logits,
)
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.params import compose, write_params
from lorapipe.provenance import ProvenanceError
from lorapipe.runtime import leave_out_bitsandbytes, needs_bitsandbytes
from tests.conftest import broken_adapter, run_stage, tiny_model_overrides
from tests.test_params import imported_modules, stage_process

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_test_secret_do_not_leak_0123456789"


def random_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """An r=4 all-linear adapter with random, non-zero A and B (a merge changes every weight)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_base_model(base), config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def probes(tiny_base: Path) -> list[str]:
    tok = load_tokenizer(tiny_base)
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False)
        for q in ("What does `sorted([3, 1, 2])` return?", "hi")
    ]


def test_float64_forward_matches_a_whole_model_cast_and_leaves_weights_alone(
    tiny_base: Path, adapter: Path, probes: list[str]
) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(tiny_base, dtype="bfloat16"), str(adapter))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blockwise = probe_logits(model, load_tokenizer(tiny_base), probes)
    after = dict(model.named_parameters())
    assert all(
        torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before
    )
    model.to(torch.float64)  # the memory-hungry reference: every weight in float64 at once
    assert not any(m._forward_pre_hooks for m in model.modules())
    whole = probe_logits(model, load_tokenizer(tiny_base), probes)  # the same batch, upcasts no-ops
    assert all(torch.equal(a, b) for a, b in zip(blockwise, whole, strict=True))
    with float64_forward(model):
        pass  # hooks come off again
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_probe_batches_hold_each_pass_within_its_logits_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(merging, "PROBE_LOGITS_BYTES", 30 * 100 * 8)  # rows x longest <= 30
    # shortest first: 4, 9 and 10 tokens fit (3 x 10), 12 starts another, 30 runs alone
    assert probe_batches([10, 4, 12, 9, 30], vocab=100) == [[1, 3, 0], [2], [4]]
    assert probe_batches([31], vocab=100) == [[0]]  # over the budget alone: still runs


def test_probe_prompts_run_in_batches_with_the_logits_each_has_alone(
    tiny_base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right padding plays no part in a prompt's logits, and every block is upcast once a batch."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(tiny_base), str(adapter))
    tok = load_tokenizer(tiny_base)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": "x " * n}], tokenize=False)
        for n in (1, 7, 3, 12, 5)
    ]
    alone = [probe_logits(model, tok, [p])[0] for p in prompts]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(merging, "PROBE_LOGITS_BYTES", 3 * max(lengths) * vocab * 8)
    passes: list[int] = []
    hook = model.get_base_model().register_forward_pre_hook(lambda m, a: passes.append(1))
    batched = probe_logits(model, tok, prompts)
    hook.remove()
    assert len(passes) == len(probe_batches(lengths, vocab)) == 2  # 5 prompts, at most 3 a pass
    for a, b in zip(alone, batched, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-10)


def test_bf16_merge_passes_its_stated_tolerance_which_float32s_would_fail(
    tiny_base: Path, adapter: Path, probes: list[str], tmp_path: Path
) -> None:
    report = merge_adapter(
        tiny_base, adapter, tmp_path / "bf16", dtype="bfloat16", probe_prompts=probes
    )
    allowed = RELATIVE_MAX_LOGIT_DIFF["bfloat16"] * report["max_abs_logit"]
    assert report["passed"] and report["max_logit_diff_allowed"] == pytest.approx(allowed)
    # The extra bf16 rounding of W + BA is real and measured: above float32's bound, under
    # bf16's, and far below what the adapter itself does to the logits.
    assert 1e-4 < report["merged_max_abs_logit_diff"] <= allowed
    assert allowed < report["adapter_max_abs_logit_effect"] / 10
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    with pytest.raises(MergeCheckError, match=r"> merge.max_logit_diff 0.0001 for bfloat16"):
        merge_adapter(
            tiny_base,
            adapter,
            tmp_path / "strict",
            dtype="bfloat16",
            probe_prompts=probes,
            max_logit_diff=1e-4,
        )
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_corrupted_adapter_fails_the_check_in_every_dtype(
    dtype: str, tiny_base: Path, adapter: Path, probes: list[str], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in weights if "lora_B" in n)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(MergeCheckError, match="nothing was written"):
        merge_adapter(tiny_base, broken, tmp_path / "merged", dtype=dtype, probe_prompts=probes)
    assert not (tmp_path / "merged").exists()


def test_sharded_merge_loads_back_to_the_same_model_with_tokenizer_and_generation_config(
    tiny_base: Path, adapter: Path, probes: list[str], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    merge_adapter(tiny_base, adapter, tmp_path / "one", dtype="float32", probe_prompts=probes)
    report = merge_adapter(
        tiny_base,
        adapter,
        tmp_path / "sharded",
        dtype="float32",
        probe_prompts=probes,
        max_shard_size="100KB",
    )
    sharded = tmp_path / "sharded"
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(report["files"]) == set(shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        assert (sharded / name).is_file(), name
    one = load_file(tmp_path / "one" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert set(one) <= set(reloaded)
    assert all(torch.equal(one[k], reloaded[k]) for k in one)


def stage_overrides(tiny_base: Path, adapter: Path, tmp_path: Path, *overrides: str) -> list[str]:
    """The merge stage's overrides for `adapter` on `tiny_base`, its inputs and outputs under
    `tmp_path` (test prompts written there once), and `overrides` last."""
    formatted = tmp_path / "formatted"
    if not (formatted / "test.jsonl").exists():
        from lorapipe.formatting import format_rows
        from lorapipe.pyqa import generate

        rows = [{"id": str(i), **r} for i, r in enumerate(generate(4, seed=3))]
        write_jsonl(formatted / "test.jsonl", format_rows(rows, load_tokenizer(tiny_base), None))
    return [
        *tiny_model_overrides(),
        f"paths.base={tiny_base}",
        f"paths.adapter={adapter}",
        f"paths.formatted={formatted}",
        f"paths.merged={tmp_path / 'merged'}",
        f"paths.reports={tmp_path / 'reports'}",
        "merge.probe_examples=2",
        *overrides,
    ]


def stage_params(tiny_base: Path, adapter: Path, tmp_path: Path, *overrides: str) -> Params:
    return validate(
        compose(ROOT / "conf", stage_overrides(tiny_base, adapter, tmp_path, *overrides))
    )


@pytest.fixture()
def adapter_with_lineage(tiny_base: Path, adapter: Path, tmp_path: Path) -> Path:
    """The random adapter with the lineage the train stage writes beside every adapter."""
    out = tmp_path / "adapter"
    out.mkdir()
    for item in adapter.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    params = stage_params(tiny_base, out, tmp_path)
    write_json(out / LINEAGE_FILE, build_lineage(params, {}, tiny_base))
    return out


def test_merge_stage_keeps_runtime_out_of_its_report_and_dry_runs_a_push(
    tiny_base: Path,
    adapter_with_lineage: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from stages.merge import run

    monkeypatch.setenv("HF_TOKEN", SECRET)  # present, and must not leak anywhere
    params = stage_params(
        tiny_base,
        adapter_with_lineage,
        tmp_path,
        "merge.push_to_hub=true",
        "merge.hub_repo_id=someone/tiny-merged",
        "merge.push_dry_run=true",
    )
    run(params)  # HF_HUB_OFFLINE=1 (conftest): any hub call would raise
    printed = capsys.readouterr().out
    reports = tmp_path / "reports"
    report = json.loads((reports / "merge.json").read_text())
    assert report["passed"] and report["max_logit_diff_allowed"] == 1e-4
    assert not {"merge_seconds", "seconds", "peak_rss_mib"} & set(report)
    runtime = json.loads((reports / "runtime" / "merge.json").read_text())
    assert runtime["seconds"] > 0 and runtime["peak_rss_mib"] > 100
    merged = tmp_path / "merged"
    lineage = json.loads((merged / LINEAGE_FILE).read_text())
    assert lineage["params"]["lora"] == params.model_dump(mode="json")["lora"]
    assert lineage["merge"]["dtype"] == "float32" and lineage["merge"]["passed"]
    # Each fact once: train-time params hold no merge/eval/paths values to contradict these.
    assert not {"merge", "eval", "paths"} & set(lineage["params"])
    # The model card the hub shows: a plain transformers model, with the merge check's result.
    _, front, body = (merged / "README.md").read_text().split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert meta["base_model"] == lineage["base_model"]["name"]
    assert "no peft needed" in body and "weights in float32" in body
    assert f"{report['merged_max_abs_logit_diff']:.3g} (allowed 0.0001)" in body
    assert file_md5(adapter_with_lineage / "adapter_model.safetensors") in body
    size = (merged / "model.safetensors").stat().st_size
    assert "would upload" in printed and "someone/tiny-merged" in printed
    assert f"{size / 2**20:10.2f} MiB  model.safetensors" in printed
    assert "README.md" in printed  # the card goes up with the weights
    for path in [*merged.rglob("*"), *reports.rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in printed


def test_a_stage_process_without_a_quantised_model_never_imports_bitsandbytes(
    tiny_base: Path, adapter_with_lineage: Path, tmp_path: Path
) -> None:
    """The merge stage as its own process (`python -m stages.merge`, as DVC runs it) imports
    peft but never bitsandbytes (`runtime.needs_bitsandbytes`: no quant, a base saved
    unquantised), and merges the same bytes as the stage run here, where bitsandbytes is
    imported and stays so: this process's program is pytest, not the stage."""
    import bitsandbytes

    from stages.merge import run

    assert not leave_out_bitsandbytes("stages.merge")
    assert sys.modules["bitsandbytes"] is bitsandbytes

    overrides = stage_overrides(tiny_base, adapter_with_lineage, tmp_path)
    run(stage_params(tiny_base, adapter_with_lineage, tmp_path))
    merged = tmp_path / "merged" / "model.safetensors"
    here = merged.read_bytes()
    merged.unlink()
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    write_params(project, [])
    done = stage_process(project, "stages.merge", *overrides, python=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-3000:]
    imported = imported_modules(done.stderr)
    assert "peft" in imported and "torch" in imported
    # The refused import is listed under the package's name alone; importing it lists its modules.
    assert not {m for m in imported if m.startswith("bitsandbytes.")}
    assert merged.read_bytes() == here


def test_bitsandbytes_is_kept_for_a_quantised_model_or_an_unreadable_base(
    tiny_base: Path, adapter: Path, tmp_path: Path
) -> None:
    """A stage keeps bitsandbytes when it may load a quantised model: QLoRA (quant.mode), a
    base saved quantised, or a base whose config it cannot read."""
    assert not needs_bitsandbytes(stage_params(tiny_base, adapter, tmp_path), ROOT)
    assert needs_bitsandbytes(stage_params(tiny_base, adapter, tmp_path, "quant=nf4"), ROOT)
    quantised = tmp_path / "quantised"
    shutil.copytree(tiny_base, quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    assert needs_bitsandbytes(stage_params(quantised, adapter, tmp_path), ROOT)
    (quantised / "config.json").write_text("{not json")
    assert needs_bitsandbytes(stage_params(quantised, adapter, tmp_path), ROOT)
    assert needs_bitsandbytes(stage_params(tmp_path / "missing", adapter, tmp_path), ROOT)


def test_an_adapter_is_checked_against_the_training_params_its_lineage_records(
    train_params: Callable[..., Params], tiny_base: Path, tmp_path: Path
) -> None:
    """Every model, data, format, lora, quant and train key counts; evaluation, merge, retain
    and paths keys and the overrides' record do not (they cannot shape an adapter)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    params = train_params()
    require_trained_with(adapter, params)  # no lineage (not made here): not checked
    write_json(adapter / LINEAGE_FILE, build_lineage(params, {}, tiny_base))
    require_trained_with(adapter, params)
    others = ("eval.max_examples=3", "merge.dtype=float16", "retain.batch_size=2", "paths.merged=x")
    require_trained_with(adapter, train_params(*others))
    with pytest.raises(ProvenanceError) as err:
        require_trained_with(adapter, train_params("lora.r=4", "data.max_chars=10", *others))
    assert str(err.value).startswith(
        f"{adapter} was made from other params ({adapter / LINEAGE_FILE}): data.max_chars is 10 "
        f"here, {params.data.max_chars} there; lora.r is 4 here, {params.lora.r} there. "
    )


def test_a_push_without_token_or_repo_id_stops_before_merging(
    tiny_base: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.merge import run

    with pytest.raises(ConfigError, match=r"merge.hub_repo_id is required"):
        stage_params(tiny_base, adapter, tmp_path, "merge.push_to_hub=true")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # A base that does not exist: had the merge started, that would be the error.
    params = stage_params(
        tmp_path / "no-base",
        adapter,
        tmp_path,
        "merge.push_to_hub=true",
        "merge.hub_repo_id=someone/tiny-merged",
    )
    with pytest.raises(HubPushError, match="HF_TOKEN environment variable is not set"):
        run(params)
    assert not (tmp_path / "merged").exists()


def test_hub_errors_name_the_repo_and_never_show_the_token(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubPushError, match="someone/tiny-merged") as err:
        push_folder(tmp_path, "someone/tiny-merged", token=SECRET, private=True)  # offline
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("merge.max_shard_size=5 GB", "merge.max_shard_size must be"),
        ("merge.max_shard_size=0", "merge.max_shard_size must be"),
        ("merge.push_dry_run=true", "set merge.push_to_hub: true"),
        ("merge.max_logit_diff=0", "merge.max_logit_diff"),
    ],
)
def test_merge_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose(ROOT / "conf", [override]))


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("json", "adapter_config.json: not valid JSON (Expecting property name"),
        ("truncated", "adapter_model.safetensors: unreadable: truncated or not safetensors"),
    ],
)
def test_a_corrupt_adapter_stops_merge_in_one_line_before_loading(
    tiny_base: Path, adapter: Path, tmp_path: Path, how: str, problem: str
) -> None:
    """A cut adapter_config.json or weights file: one line naming it, exit 2, nothing merged
    (it was a traceback from peft's JSON parsing or safetensors' loader)."""
    bad = broken_adapter(adapter, tmp_path / "adapter", how)
    stage_params(tiny_base, bad, tmp_path)  # writes the probe prompts: a merge could start
    args = [
        *tiny_model_overrides(),
        f"paths.base={tiny_base}",
        f"paths.adapter={bad}",
        f"paths.formatted={tmp_path / 'formatted'}",
        f"paths.merged={tmp_path / 'merged'}",
        f"paths.reports={tmp_path / 'reports'}",
        "merge.probe_examples=2",
    ]
    status, err = run_stage("stages.merge", *args)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"merge: error: {bad}/{problem}"), err
    assert err[0].endswith("; rerun the train stage (`dvc repro train`)"), err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "reports").exists()
