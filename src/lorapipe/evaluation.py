"""Evaluation: the same test prompts through the base model and the adapter, then metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapipe.config import EvalCfg
from lorapipe.errors import PipelineError
from lorapipe.generation import generate
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.scoring import score


def evaluate_models(
    cfg: EvalCfg, base_dir: Path, adapter_dir: Path, examples: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate for `examples` with the base model, then with the adapter on the same base.

    Returns `metrics` ({"base": {...}, "adapter": {...}, "examples": n}) and one prediction
    row per example (id, prompt, reference, each model's output and per-example scores).
    """
    from peft import PeftModel

    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise PipelineError("the test split is empty: nothing to evaluate (check data.splits)")
    prompts = [ex["prompt"] for ex in examples]
    references = [ex["reference"] for ex in examples]
    tokenizer = load_tokenizer(base_dir)
    model = load_base_model(base_dir, dtype="float32")
    outputs = {
        "base": generate(
            model, tokenizer, prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
        )
    }
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    outputs["adapter"] = generate(
        model, tokenizer, prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
    )

    metrics: dict[str, Any] = {"examples": len(examples)}
    per_example: dict[str, list[dict[str, float]]] = {}
    for name, preds in outputs.items():
        aggregate, rows = score(
            preds, references, use_stemmer=cfg.use_stemmer, ignore_case=cfg.ignore_case
        )
        metrics[name] = {k: round(v, 6) for k, v in aggregate.items()}
        per_example[name] = rows
    predictions = [
        {
            "id": ex["id"],
            "prompt": ex["prompt"],
            "reference": ex["reference"],
            **{name: outputs[name][i] for name in outputs},
            "scores": {name: per_example[name][i] for name in outputs},
        }
        for i, ex in enumerate(examples)
    ]
    return metrics, predictions
