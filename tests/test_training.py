"""Training through the library: LoRA and QLoRA adapters, determinism, merge into full precision,
precision by device, the non-finite loss guard, gradient checkpointing and early stopping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorapipe.config import Params
from lorapipe.lineage import build_lineage
from lorapipe.merging import merge_adapter
from lorapipe.models import load_tokenizer
from lorapipe.training import TrainingError, resolve_precision, setup_model, train_adapter


def train(params: Params, base: Path, formatted: Path, out: Path, **kw: Any) -> dict[str, Any]:
    out.mkdir()
    return train_adapter(params, base, formatted, out, out.parent / f"{out.name}-curves", **kw)


class Spy(TrainerCallback):
    """Records whether the model recomputes activations, as seen when training starts."""

    checkpointing: bool | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.checkpointing = kwargs["model"].base_model.model.is_gradient_checkpointing


class LayerKinds(TrainerCallback):
    """Records the LoRA layer classes the trainer got, by name."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        modules = kwargs["model"].modules()
        self.kinds = {type(m).__name__ for m in modules if hasattr(m, "lora_A")}


def test_lora_training_is_deterministic_and_only_adapts_lora(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    params = train_params()
    kinds = LayerKinds()
    first = train(params, tiny_base, formatted, tmp_path / "a", callbacks=[kinds])
    assert kinds.kinds == {"FusedLoraLinear"}  # lorapipe.fused_lora: every layer
    second = train(params, tiny_base, formatted, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["train_loss"] == second["train_loss"]
    # PEFT keeps all-linear's (full) names in a set, whose order differs between processes.
    targets = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets) and any(t.endswith("q_proj") for t in targets)
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    # B starts at zero: a trained adapter has moved it.
    assert any(float(w.abs().max()) > 0 for n, w in weights.items() if "lora_B" in n)
    assert first["steps"] == 4 and first["trainable_params"] > 0


def test_qlora_nf4_trains_on_cpu_and_merges_into_full_precision(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    params = train_params("quant=nf4")
    kinds = LayerKinds()
    summary = train(params, tiny_base, formatted, tmp_path / "qlora", callbacks=[kinds])
    assert kinds.kinds == {"FusedLoraLinear4bit"}  # lorapipe.fused_lora over every 4-bit layer
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


def test_qlora_counts_the_parameters_lora_counts(
    tiny_base: Path, train_params: Callable[..., Params]
) -> None:
    """The same model has the same parameters quantised or not (reports/train.json, lineage and
    model card): a 4-bit weight's storage holds two values a byte."""
    lora = setup_model(train_params(), tiny_base, "fp32")
    qlora = setup_model(train_params("quant=nf4"), tiny_base, "fp32")
    assert lora[2:] == qlora[2:] and lora[2] < lora[3]


def test_a_diverging_run_stops_naming_the_step(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    # Step 1 is warm-up (lr 0); step 2's update at lr 1e30 overflows the LoRA weights.
    params = train_params("train.learning_rate=1e30")
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*train\.learning_rate"):
        train(params, tiny_base, formatted, tmp_path / "a")
    assert not any((tmp_path / "a").iterdir())  # no adapter written


def test_precision_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto") == "fp16"  # pre-Ampere: fp16 with loss scaling
    assert resolve_precision("fp32") == "fp32"


def test_gradient_checkpointing_recomputes_without_changing_the_result(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    plain, recomputed = Spy(), Spy()
    train(train_params(), tiny_base, formatted, tmp_path / "a", callbacks=[plain])
    params = train_params("train.gradient_checkpointing=true")
    train(params, tiny_base, formatted, tmp_path / "b", callbacks=[recomputed])
    assert plain.checkpointing is False and recomputed.checkpointing is True
    name = "adapter_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_early_stopping_stops_and_keeps_the_best_epoch(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    # A high learning rate on 32 examples overfits: eval loss turns up within a few epochs.
    params = train_params(
        "train.max_steps=-1",
        "train.epochs=8",
        "train.learning_rate=2e-2",
        "train.early_stopping_patience=1",
    )
    summary = train(params, tiny_base, formatted, tmp_path / "a")
    assert summary["epochs"] < 8 and summary["steps"] < 8 * 8
    rows = (tmp_path / "a-curves" / "plots" / "metrics" / "eval" / "loss.tsv").read_text()
    eval_losses = [float(line.split("\t")[1]) for line in rows.splitlines()[1:]]
    assert eval_losses[-1] > min(eval_losses)  # it stopped because the loss went up...
    assert summary["eval_loss"] == pytest.approx(min(eval_losses), rel=1e-6)  # ...and kept the best
    # The kept epoch's step is reported beside how far it ran (the reports said only the latter).
    steps = [int(line.split("\t")[0]) for line in rows.splitlines()[1:]]
    kept = summary["kept_step"]
    assert kept == steps[eval_losses.index(min(eval_losses))] < summary["steps"]
    files = {split: formatted / f"{split}.jsonl" for split in ("train", "val")}
    assert build_lineage(params, files, tiny_base, summary)["training"]["kept_step"] == kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("precision", "quant"), [("auto", "none"), ("fp16", "none"), ("auto", "nf4")]
)
def test_gpu_trains_in_half_precision_and_reports_cuda_memory(
    precision: str,
    quant: str,
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
) -> None:
    params = train_params(f"train.precision={precision}", f"quant={quant}")
    summary = train(params, tiny_base, formatted, tmp_path / "a")
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16", "fp16": "fp16"}
    assert summary["precision"] == expected[precision]
    assert summary["device"] != "cpu" and summary["peak_cuda_mib"] > 0
    assert torch.isfinite(torch.tensor(summary["train_loss"]))


def test_a_corrupted_adapter_fails_the_merge_check(tiny_base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from lorapipe.merging import MergeCheckError
    from lorapipe.models import load_base_model

    adapter = tmp_path / "adapter"
    model = get_peft_model(load_base_model(tiny_base), LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in weights if "lora_B" in n)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, adapter / "adapter_model.safetensors")
    tok = load_tokenizer(tiny_base)
    with pytest.raises(MergeCheckError, match="nothing was written"):
        merge_adapter(
            tiny_base,
            adapter,
            tmp_path / "merged",
            dtype="float32",
            probe_prompts=[
                tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
            ],
            max_logit_diff=1e-4,
        )
    assert not (tmp_path / "merged").exists()


def test_scoring_only_supervised_positions_gives_the_full_loss_and_gradients(
    tiny_base: Path, formatted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output layer over supervised positions only, their logits kept (what training runs
    on CPU), gives the loss and LoRA gradients of TRL's all-position kernel on the same batch."""
    import trl.trainer.utils as trl_utils
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer
    from trl.kernels import ChunkedLogProbFunction

    from lorapipe.io import read_jsonl
    from lorapipe.models import load_base_model
    from lorapipe.training import score_only_supervised_positions
    from lorapipe.whole_head import WholeOrChunked

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    model = get_peft_model(load_base_model(tiny_base), lora)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path), completion_only_loss=True, report_to="none", use_cpu=True
        ),
        train_dataset=Dataset.from_list(read_jsonl(formatted / "train.jsonl")[:6]),
        processing_class=load_tokenizer(tiny_base),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    assert (batch["labels"] == -100).float().mean() > 0.5  # mostly prompt and padding

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # TRL's CPU default: every position, through TRL's kernel
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    full_loss, full_grads = loss_and_grads()
    score_only_supervised_positions()
    assert trl_utils._use_triton(torch.device("cpu"))
    assert trl_utils._ChunkedLogProbFunction is WholeOrChunked  # the logits kept on CPU
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(full_loss, rel=1e-6)
    for got, want in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
