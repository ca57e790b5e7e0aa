"""The benchmarks' real-model paths on CPU: the batch they build from the training data, the GPU
script's LoRA and QLoRA steps on SmolLM2-135M-Instruct, and the memory benchmark's
per-variant subprocess. The base is the session's `smol_base` (built from the GGUF file as the
base stage builds models/base), so nothing here depends on a `dvc repro` having run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the benchmark scripts importable as they import each other (from their folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


@pytest.fixture()
def real_params(smol_base: Path, tmp_path: Path) -> Path:
    """params.yaml with `paths.base` at the session's SmolLM2 base and `paths.formatted` at an
    empty folder, so the benchmarks format the first rows of data/raw/pyqa.jsonl themselves."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {**raw["paths"], "base": str(smol_base), "formatted": str(tmp_path / "none")}
    raw["data"] = {**raw["data"], "path": str(ROOT / raw["data"]["path"])}
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def load_params(path: Path) -> Any:
    from lorapipe.config import validate

    return validate(yaml.safe_load(path.read_text()))


def test_the_real_batch_is_the_first_examples_with_labels_on_completions_padded_or_packed(
    benchmarks: None, real_params: Path, smol_base: Path, tmp_path: Path
) -> None:
    from train_memory import batch_tensors, packed_tensors, real_batch, real_examples

    from lorapipe.io import write_jsonl
    from lorapipe.models import load_tokenizer

    params = load_params(real_params)
    tokenizer = load_tokenizer(smol_base)
    examples, where = real_examples(params, tokenizer, 8)
    assert len(examples) == 8 and where.endswith("pyqa.jsonl, formatted")
    assert examples[0]["prompt"].startswith("<|im_start|>system\n" + params.format.system_prompt)
    # A formatted split, when there is one, is read as it is: its first rows, in order.
    formatted = tmp_path / "formatted"
    write_jsonl(formatted / "train.jsonl", examples[::-1])
    params = params.model_copy(
        update={"paths": params.paths.model_copy(update={"formatted": str(formatted)})}
    )
    again, where = real_examples(params, tokenizer, 3)
    assert again == examples[::-1][:3] and where == str(formatted / "train.jsonl")

    batch = real_batch(tokenizer, examples)
    width = batch["seq_len"]
    assert width == max(batch["lengths"]) and min(batch["lengths"]) < width  # padding happens
    tensors = batch_tensors(batch)
    assert tensors["input_ids"].shape == tensors["labels"].shape == (8, width)
    assert tensors["attention_mask"].sum(dim=1).tolist() == batch["lengths"]
    pad = tokenizer.pad_token_id
    for row, ex in enumerate(examples):
        n, s = batch["lengths"][row], batch["supervised"][row]
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert ids[:n] == tokenizer(ex["prompt"] + ex["completion"])["input_ids"]
        assert ids[n:] == [pad] * (width - n) and labels[n:] == [-100] * (width - n)
        assert labels[: n - s] == [-100] * (n - s) and labels[n - s : n] == ids[n - s : n]
        assert tokenizer.decode(ids[n - s : n]) == ex["completion"]  # the answer and <|im_end|>
    # The train stage's padding-free layout: the same real tokens and labels end to end in one
    # row, positions restarting at each example, the bounds of each.
    packed = packed_tensors(batch)
    real = tensors["attention_mask"].bool()
    assert packed["input_ids"].tolist() == [tensors["input_ids"][real].tolist()]
    assert packed["labels"].tolist() == [tensors["labels"][real].tolist()]
    assert packed["position_ids"].tolist() == [[i for n in batch["lengths"] for i in range(n)]]
    bounds = [0]
    for n in batch["lengths"]:
        bounds.append(bounds[-1] + n)
    assert packed["cu_seq_lens_q"].tolist() == bounds and packed["max_length_q"] == width


def test_gpu_script_runs_the_real_model_on_cpu(
    benchmarks: None, real_params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpu_train import main

    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--real-only", "--steps", "1", "--warmup", "0", "--real-batch", "2"]
    assert main([*args, "--params", str(real_params), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| lora-fp32 |" in printed and printed.rstrip().endswith(f"written to {out}")
    result = json.loads(out.read_text())
    assert result["variants"] == {}  # --real-only: no TinyLlama-shape rows
    real = result["real_model"]
    assert real["compute_dtype"] == "float32" and real["batch"] == 2
    assert real["compact_lm_head"]  # the train stage's loss: the head at supervised positions
    assert real["tokens"] <= real["padded_tokens"] == 2 * real["seq_len"]
    variants = real["variants"]
    assert set(variants) == {"lora-fp32", "qlora-nf4"}
    for r in variants.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and math.isfinite(r["loss"])
        assert 0 < r["loss"] < 20  # a trained model on its own kind of data, not a random one
    # The train stage's step: its padding-free row, and LoRA's fused update in every adapted
    # layer (q k v o gate up down, 30 layers), plain or 4-bit (float32 compute on CPU).
    assert all(r["padding_free"] for r in variants.values())
    assert all(r["fused_lora_layers"] == 7 * 30 for r in variants.values())
    assert not variants["lora-fp32"]["recomputes_activations"]
    assert variants["qlora-nf4"]["recomputes_activations"]  # quant=nf4, gradient_checkpointing auto
    # Same model, adapters and batch, so the same FLOPs per token: QLoRA's 4-bit layers are
    # counted by their logical shape, not their packed storage.
    lora, qlora = variants["lora-fp32"], variants["qlora-nf4"]
    assert lora["model_flops_per_token"] == qlora["model_flops_per_token"] > 0
    for r in variants.values():
        ratio = r["model_flops_per_s"] / r["tokens_per_s"]
        assert ratio == pytest.approx(r["model_flops_per_token"], rel=1e-3)


def test_memory_benchmark_measures_a_real_model_step_in_its_own_process(
    benchmarks: None, real_params: Path, smol_base: Path, tmp_path: Path
) -> None:
    from train_memory import _subprocess, real_batch, real_examples

    from lorapipe.models import load_tokenizer

    tokenizer = load_tokenizer(smol_base)
    examples, _ = real_examples(load_params(real_params), tokenizer, 2)
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps(real_batch(tokenizer, examples)))
    r = _subprocess(
        "--child",
        "lora-fp32",
        "--base",
        str(smol_base),
        "--params",
        str(real_params),
        "--batch-file",
        str(batch_file),
        "--real-steps",
        "2",
    )
    assert r["variant"] == "lora-fp32" and r["steps"] == 2 and r["compact_lm_head"]
    assert r["padding_free"]  # the train stage's batches: SmolLM2's attention takes packed rows
    assert not r["gradient_checkpointing"] and math.isfinite(r["loss"])
    # The fp32 base (134.5 M parameters) is in the process, and the step peaks above the load.
    assert 500 < r["base_weights_mib"] < 530
    assert r["rss_after_imports_mib"] < r["load"]["peak_rss_mib"] <= r["peak_rss_mib"]
    first, second = r["peak_rss_by_step_mib"]
    assert first <= second <= r["peak_rss_mib"]
    assert r["step_seconds"] > 0 and r["first_step_seconds"] > 0


def test_gpu_script_gives_a_base_without_weights_random_ones_at_its_shape(
    benchmarks: None, real_params: Path, smol_base: Path, tmp_path: Path
) -> None:
    """A lent GPU machine gets the base's config and tokenizer, not its weights (the model file
    is larger than what travels; scripts/gpu_kit.sh): `--real-base` on such a folder trains the
    same architecture, tied embeddings and all, with random weights, and says so."""
    import shutil

    from gpu_train import main, parse_args

    kit = tmp_path / "kit"
    kit.mkdir()
    with pytest.raises(SystemExit):  # not a model folder: refused before anything loads
        parse_args(["--device", "cpu", "--real-only", "--real-base", str(kit)])
    for path in smol_base.iterdir():
        if not path.name.endswith(".safetensors"):
            shutil.copy2(path, kit / path.name)
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--real-only", "--steps", "1", "--warmup", "0", "--real-batch", "2"]
    args += ["--variants", "lora-bf16", "--real-base", str(kit)]
    assert main([*args, "--params", str(real_params), "--out", str(out)]) == 0
    real = json.loads(out.read_text())["real_model"]
    assert "random weights at its shape" in real["base"] and str(kit) in real["base"]
    pin = json.loads((smol_base / "pin.json").read_text())
    assert real["parameters"] == pin["parameters"]  # one embedding matrix, as the real model
    (r,) = real["variants"].values()
    assert r["padding_free"] and r["fused_lora_layers"] == 7 * 30
    assert math.isfinite(r["loss"]) and r["loss"] > 5  # random weights: no better than chance
