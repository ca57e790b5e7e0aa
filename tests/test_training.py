"""Training through the library: LoRA and QLoRA adapters, determinism, merge into full precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorapipe.config import Params, validate
from lorapipe.formatting import format_rows
from lorapipe.io import write_jsonl
from lorapipe.merging import merge_adapter
from lorapipe.models import load_tokenizer
from lorapipe.params import compose
from lorapipe.pyqa import generate
from lorapipe.training import train_adapter

ROOT = Path(__file__).resolve().parents[1]


def make_params(tmp: Path, *overrides: str) -> Params:
    raw = compose(
        ROOT / "conf",
        [
            "train.max_steps=4",
            "train.batch_size=4",
            "train.logging_steps=1",
            f"paths.checkpoints={tmp / 'ckpt'}",
            *overrides,
        ],
    )
    return validate(raw)


@pytest.fixture(scope="module")
def formatted(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("formatted")
    tok = load_tokenizer(tiny_base)
    rows = [{"id": str(i), **r} for i, r in enumerate(generate(40, seed=1))]
    write_jsonl(out / "train.jsonl", format_rows(rows[:32], tok, None))
    write_jsonl(out / "val.jsonl", format_rows(rows[32:], tok, None))
    return out


def train(params: Params, base: Path, formatted: Path, out: Path) -> dict:
    out.mkdir()
    return train_adapter(params, base, formatted, out, out.parent / f"{out.name}-curves")


def test_lora_training_is_deterministic_and_only_adapts_lora(
    tiny_base: Path, formatted: Path, tmp_path: Path
) -> None:
    params = make_params(tmp_path)
    first = train(params, tiny_base, formatted, tmp_path / "a")
    second = train(params, tiny_base, formatted, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["train_loss"] == second["train_loss"]
    # PEFT keeps all-linear's names in a set, whose order differs between processes.
    targets = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets) and "q_proj" in targets
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    # B starts at zero: a trained adapter has moved it.
    assert any(float(w.abs().max()) > 0 for n, w in weights.items() if "lora_B" in n)
    assert first["steps"] == 4 and first["trainable_params"] > 0


def test_qlora_nf4_trains_on_cpu_and_merges_into_full_precision(
    tiny_base: Path, formatted: Path, tmp_path: Path
) -> None:
    params = make_params(tmp_path, "quant=nf4")
    summary = train(params, tiny_base, formatted, tmp_path / "qlora")
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    tok = load_tokenizer(tiny_base)
    prompts = [tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)]
    report = merge_adapter(
        tiny_base,
        tmp_path / "qlora",
        tmp_path / "merged",
        dtype="float32",
        probe_prompts=prompts,
        max_logit_diff=1e-4,
    )
    assert report["passed"]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())  # not 4-bit
