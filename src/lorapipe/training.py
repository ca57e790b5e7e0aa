"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer, loss on completions only.

The formatted data is a prompt/completion dataset, so TRL masks the prompt (labels -100) and
supervises the completion including its closing EOS (`completion_only_loss=True`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from lorapipe.config import Params
from lorapipe.errors import PipelineError
from lorapipe.io import read_jsonl
from lorapipe.models import load_base_model, load_tokenizer


class TrainingError(PipelineError, RuntimeError):
    """Training cannot start or went wrong in a way the user can fix; the message says how."""


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the layers LoRA can adapt: Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name
    }
    return sorted(names)


def check_target_modules(model: torch.nn.Module, target_modules: str | list[str]) -> None:
    """Raise TrainingError unless every requested target name matches a layer of `model`.

    PEFT silently adapts only the names that exist, so a Llama name list on GPT-2 would train
    zero parameters; this stops before training and lists the names the model has.
    """
    available = adaptable_module_names(model)
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):  # PEFT treats a string as a full-match regex
        full_names = [n for n, m in model.named_modules() if n]
        if not any(re.fullmatch(target_modules, n) for n in full_names):
            raise TrainingError(
                f"lora.target_modules: regex {target_modules!r} matches no module; "
                f"adaptable layers are named: {', '.join(available)}"
            )
        return
    missing = [t for t in target_modules if t not in available]
    if missing:
        raise TrainingError(
            f"lora.target_modules: {', '.join(missing)} match no layer of this model "
            f"(adaptable layers: {', '.join(available)})"
        )


def lora_config(params: Params) -> Any:
    from peft import LoraConfig, TaskType

    cfg = params.lora
    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        bias=cfg.bias,
        task_type=TaskType.CAUSAL_LM,
    )


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train_adapter(
    params: Params, base_dir: Path, formatted_dir: Path, out_dir: Path, curves_dir: Path
) -> dict[str, Any]:
    """Train a LoRA adapter on `formatted_dir/{train,val}.jsonl` and save it to `out_dir`.

    Returns the training summary (losses, steps, trainable parameters, seconds).
    Raises TrainingError when no parameter would train or the loss is not finite.
    """
    from datasets import Dataset
    from dvclive import Live
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers.integrations import DVCLiveCallback
    from trl import SFTConfig, SFTTrainer

    cfg = params.train
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base_dir)
    model = load_base_model(base_dir, quant=params.quant)
    check_target_modules(model, params.lora.target_modules)
    quantized = params.quant.mode != "none"
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(params))
    trainable, total = trainable_parameters(model)
    print(f"train: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if trainable == 0:
        raise TrainingError(
            "no parameter is trainable; adaptable layers are named: "
            + ", ".join(adaptable_module_names(model))
        )

    train = Dataset.from_list(read_jsonl(formatted_dir / "train.jsonl"))
    val = Dataset.from_list(read_jsonl(formatted_dir / "val.jsonl"))
    use_bf16 = model.dtype == torch.bfloat16 or (
        quantized
        and params.quant.compute_dtype in ("auto", "bfloat16")
        and torch.cuda.is_available()
    )
    args = SFTConfig(
        output_dir=params.paths.checkpoints,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a fraction < 1 is a ratio of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        completion_only_loss=True,
        eval_strategy="epoch" if len(val) else "no",
        save_strategy="no",
        logging_steps=cfg.logging_steps,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    live = Live(dir=str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val if len(val) else None,
        processing_class=tokenizer,
        callbacks=[DVCLiveCallback(live=live, log_model=None)],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    if not torch.isfinite(torch.tensor(result.training_loss)):
        raise TrainingError(f"training loss is {result.training_loss} at step {result.global_step}")
    summary: dict[str, Any] = {
        "train_loss": round(float(result.training_loss), 6),
        "steps": int(result.global_step),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(seconds, 1),
    }
    if len(val):
        summary["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 6)
    live.end()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _sort_target_modules(out_dir / "adapter_config.json")
    return summary


def _sort_target_modules(config_path: Path) -> None:
    """Write PEFT's target_modules in sorted order.

    PEFT stores the names it resolved from `all-linear` as a set, whose order changes with
    Python's hash seed; sorting keeps the adapter folder byte-identical (and its DVC hash
    stable) across identical runs. Nothing in PEFT or TRL does this.
    """
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
