"""Evaluation: the same test prompts through the base model and the adapter, then metrics;
and each model's completion-only loss on the validation split."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from lorapipe.config import EXAMPLES, RETAIN, VAL_EXAMPLES, EvalCfg
from lorapipe.errors import PipelineError
from lorapipe.formatting import common_prefix_length
from lorapipe.generation import PREFILL_TOKENS, generate_with_stops
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.scoring import score


def completion_loss(
    model: Any, tokenizer: Any, examples: list[dict[str, Any]], *, batch_size: int
) -> float:
    """Mean cross-entropy per completion token of `examples` (`{prompt, completion}`), with the
    prompt masked as in training: the completion starts where the tokens of the prompt and of
    prompt+completion diverge.

    The mean is over all supervised tokens of all examples (so equal to the model's own loss
    for a single example). Runs in the model's dtype under no_grad; raises ValueError if no
    example has a supervised token.

    What every example begins with before its completion (a chat template's system turn) goes
    through the model once, and each batch goes on from its keys and values (`_shared_start`);
    only the positions that predict a supervised token go through the output layer
    (`_keeps_logits`). The loss is what one pass over every position computes
    (tests/test_report.py).
    """
    import torch

    encoded: list[tuple[list[int], int]] = []
    for ex in examples:
        prompt_ids = tokenizer(ex["prompt"])["input_ids"]
        full_ids = tokenizer(ex["prompt"] + ex["completion"])["input_ids"]
        start = common_prefix_length(prompt_ids, full_ids)
        if start < len(full_ids):
            encoded.append((full_ids, start))
    if not encoded:
        raise ValueError("no example has a supervised completion token")
    encoded.sort(key=lambda e: len(e[0]))  # little padding per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        shared, prefix = _shared_start(model, encoded)
        compact = _keeps_logits(model)
        first = 0
        while first < len(encoded):
            # At most `batch_size` examples and about PREFILL_TOKENS tokens a pass.
            longest = len(encoded[min(first + batch_size, len(encoded)) - 1][0])  # sorted
            batch = encoded[first : first + max(1, min(batch_size, PREFILL_TOKENS // longest))]
            first += len(batch)
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(batch):  # right padding: positions stay 0..n-1
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, start : len(ids)] = torch.tensor(ids[start:])
            batch_total, batch_tokens = _batch_loss(
                model, input_ids, attention, labels, shared, prefix, compact=compact
            )
            total, tokens = total + batch_total, tokens + batch_tokens
    return total / tokens


def _shared_start(model: Any, encoded: list[tuple[list[int], int]]) -> tuple[int, Any]:
    """How many tokens every example begins with before the first position that predicts one of
    its completion tokens, and those tokens' KV cache (one row), computed here; (0, None) when
    none, or when the model's cache is not one of full-length layers.

    Written by hand, as the evaluation's generation does for prompts (`generation._prefilled`):
    transformers computes a shared beginning once per row. SmolLM2's default validation examples
    are ~44 tokens, 17 of them the same system turn and `<|im_start|>user`."""
    import torch
    from transformers import DynamicCache

    from lorapipe.generation import _full_length_layers

    reference = encoded[0][0]
    shared = min(start - 1 for _, start in encoded)  # position start-1 predicts token start
    for ids, _ in encoded[1:]:
        shared = min(shared, common_prefix_length(reference, ids))
    if shared < 1 or not _full_length_layers(model):
        return 0, None
    head = torch.tensor([reference[:shared]], device=model.device)
    cache = DynamicCache(config=model.config)
    model.get_decoder()(input_ids=head, cache=cache, use_cache=True)  # no output layer
    return shared, cache


def _batch_loss(
    model: Any,
    input_ids: Any,
    attention: Any,
    labels: Any,
    shared: int,
    prefix: Any,
    *,
    compact: bool,
) -> tuple[float, int]:
    """The summed cross-entropy of a right-padded batch over its supervised tokens, and their
    count, its first `shared` columns already in `prefix` (a one-row KV cache, or None);
    `compact` when the model takes `logits_to_keep` (`_keeps_logits`).

    Token t predicts token t+1, as in the models' own loss. Only the positions that predict a
    supervised token in some row go through the output layer (transformers' `logits_to_keep`,
    so whatever the model does to its logits still happens): the prompt is ~90% of a chat
    example, and the output layer (576 x 49,152 on SmolLM2) over every position was a fifth of
    the forward pass."""
    import torch
    from transformers import DynamicCache

    rows, width = input_ids.shape
    if compact:
        positions = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
        kept = {"logits_to_keep": (positions - shared).to(model.device)}
    else:
        positions, kept = torch.arange(shared, width - 1), {}
    if prefix is not None:
        held = [
            (layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
            for layer in prefix.layers
        ]
        kept["cache"] = DynamicCache(ddp_cache_data=held, config=model.config)
    logits = model(
        input_ids=input_ids[:, shared:].to(model.device),
        attention_mask=attention.to(model.device),
        **kept,
    ).logits[:, : len(positions)]
    targets = labels[:, positions + 1].to(logits.device)
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss.item(), int((targets != -100).sum())


def _keeps_logits(model: Any) -> bool:
    """Whether `model`'s forward takes transformers' `logits_to_keep` (a peft model's base's)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _val_metrics(loss: float) -> dict[str, float]:
    return {"val_loss": round(loss, 6), "val_perplexity": round(math.exp(min(loss, 700.0)), 6)}


def retain_scores(
    references: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, Sequence[str]],
    *,
    use_stemmer: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each model's answers (`outputs`: {name: answers in the order of `references`}) against
    the base's: `({"examples", "base": {...}, name: {...}}, rows)`.

    Every model's entry is `{"rougeL", "identical"}`: mean ROUGE-L F-measure, and the share of
    answers equal to the base's after stripping surrounding whitespace. The base's entry is
    1.0 for both by construction (the references are its answers). `rows` holds per example the
    id, the last user turn, the base's answer and each model's answer and scores.
    """
    refs = [str(r["reference"]) for r in references]
    metrics: dict[str, Any] = {EXAMPLES: len(refs), "base": {"rougeL": 1.0, "identical": 1.0}}
    per_model: dict[str, list[dict[str, float]]] = {}
    for name, answers in outputs.items():
        _, scored = score(list(answers), refs, use_stemmer=use_stemmer)
        same = [a.strip() == b.strip() for a, b in zip(answers, refs, strict=True)]
        per_model[name] = [
            {"rougeL": r["rougeL"], "identical": float(s)}
            for r, s in zip(scored, same, strict=True)
        ]
        metrics[name] = {
            "rougeL": round(sum(r["rougeL"] for r in scored) / len(scored), 6),
            "identical": round(sum(same) / len(same), 6),
        }
    rows: list[dict[str, Any]] = [
        {
            "id": ref["id"],
            "instruction": ref["messages"][-2]["content"],
            "base": ref["reference"],
            **{name: outputs[name][i] for name in outputs},
            "scores": {name: per_model[name][i] for name in outputs},
        }
        for i, ref in enumerate(references)
    ]
    return metrics, rows


def foldable(model: Any) -> bool:
    """Whether every LoRA layer of the PEFT `model` adapts a weight stored in floating point,
    one an update can be added to exactly (not bitsandbytes' packed 4-bit or int8 weights)."""
    from peft.tuners.lora import LoraLayer

    return all(
        layer.get_base_layer().weight.dtype.is_floating_point
        for layer in model.modules()
        if isinstance(layer, LoraLayer)
    )


@contextmanager
def adapter_folded(model: Any) -> Iterator[Any]:
    """The active adapter of a PEFT model folded into the base weights for the duration (PEFT's
    `merge_adapter`), then taken out again (`unmerge_adapter`).

    Unfolded, every adapted layer runs three products (the base's and LoRA's A and B, each tiny
    and poorly used by the CPU kernels) plus a scale and an add; folded, one. On the default
    model this makes the adapter's batched generation ~1.3x faster, with the same answers
    (tests/test_eval_adapters.py; `make bench` compares them on the real test prompts). Taking
    it out subtracts what was added, which can leave the base weights a rounding error (~1e-7
    relative) off: the base is always evaluated first, untouched.

    A base saved quantised (a bitsandbytes 4-bit checkpoint) is left unfolded: folding into a
    quantised weight dequantises it, adds the update and quantises again, which rounds much of
    the update away and leaves the base changed once it is taken out (on a tiny model saved in
    NF4: the folded logits off the unfolded by 12% of their norm, the base's by as much after;
    tests/test_quantised_base.py).
    """
    if not foldable(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def run_models(
    cfg: EvalCfg,
    base_dir: Path,
    adapters: Mapping[str, Path],
    prompts: list[str],
    val: list[dict[str, Any]],
    retain: tuple[list[str], int] | None = None,
) -> tuple[dict[str, list[str]], dict[str, list[bool]], dict[str, float], dict[str, list[str]]]:
    """Each model's completions for `prompts`, whether each stopped at EOS, its loss on `val`
    (when given) and each adapter's greedy answers to the retain prompts (`retain`: prompts and
    max_new_tokens; the base's own answers are the references, so it does not answer again):
    the base first, then each adapter of `adapters` attached in turn to the base loaded once
    (PEFT `load_adapter` / `set_adapter`)."""
    from peft import PeftModel

    gen_kwargs: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
    }
    tokenizer = load_tokenizer(base_dir)
    model = load_base_model(base_dir, dtype="float32")
    outputs, stops, losses, retained = {}, {}, {}, {}
    for name in ["base", *adapters]:
        if name == "adapter":
            model = PeftModel.from_pretrained(model, str(adapters[name]), adapter_name=name)
        elif name != "base":
            model.load_adapter(str(adapters[name]), adapter_name=name)
        if name != "base":
            model.set_adapter(name)
        with adapter_folded(model) if name != "base" else nullcontext(model) as folded:
            outputs[name], stops[name] = generate_with_stops(
                folded, tokenizer, prompts, **gen_kwargs
            )
            if val:
                losses[name] = completion_loss(folded, tokenizer, val, batch_size=cfg.batch_size)
            if retain is not None and name != "base":
                retain_prompts, max_new_tokens = retain  # greedy, as the base answered them
                retained[name] = generate_with_stops(
                    folded,
                    tokenizer,
                    retain_prompts,
                    batch_size=cfg.batch_size,
                    max_new_tokens=max_new_tokens,
                )[0]
    return outputs, stops, losses, retained


def evaluate_models(
    cfg: EvalCfg,
    base_dir: Path,
    adapter_dir: Path,
    examples: list[dict[str, Any]],
    val_examples: list[dict[str, Any]] | None = None,
    extra_adapters: Mapping[str, Path] | None = None,
    retain: tuple[Sequence[Mapping[str, Any]], int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate for `examples` with the base model, then with the adapter on the same base.

    `extra_adapters` ({name: folder}) are evaluated the same way on the same loaded base, one
    after the other (PEFT `load_adapter` / `set_adapter`: the base weights load once), each
    under its own name beside "base" and "adapter".

    Returns `metrics` ({"base": {...}, "adapter": {...}, "examples": n}) and one prediction
    row per example (id, prompt, reference, each model's output and per-example scores).
    With `val_examples` (formatted `{prompt, completion}` rows; the first
    `cfg.val_loss_examples` are used, all when None, none when 0), each model's entry also
    holds `val_loss` (mean completion-only loss per token) and `val_perplexity`, and
    `metrics["val_examples"]` their number.

    With `retain` (the references stage's rows, `{id, prompt, messages, reference}` with the
    base's greedy answers, and the max_new_tokens they were made with), every adapter answers
    the same prompts greedily within that budget, and `metrics["retain"]` holds each model's
    ROUGE-L against the base's answers and the share left identical
    (`lorapipe.evaluation.retain_scores`); the third value returned is its per-example rows (empty
    without `retain`).
    """
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise PipelineError("the test split is empty: nothing to evaluate (check data.splits)")
    val = list(val_examples or [])
    if cfg.val_loss_examples is not None:
        val = val[: cfg.val_loss_examples]
    prompts = [ex["prompt"] for ex in examples]
    references = [ex["reference"] for ex in examples]
    adapters = {"adapter": Path(adapter_dir), **(extra_adapters or {})}
    retain_job = None if retain is None else ([r["prompt"] for r in retain[0]], retain[1])
    outputs, stops, losses, retained = run_models(cfg, base_dir, adapters, prompts, val, retain_job)

    metrics: dict[str, Any] = {EXAMPLES: len(examples)}
    if val:
        metrics[VAL_EXAMPLES] = len(val)
    per_example: dict[str, list[dict[str, float]]] = {}
    for name, preds in outputs.items():
        aggregate, rows = score(
            preds, references, use_stemmer=cfg.use_stemmer, ignore_case=cfg.ignore_case
        )
        metrics[name] = {k: round(v, 6) for k, v in aggregate.items()}
        # The share of generations that ended with the end-of-turn token, not at max_new_tokens.
        metrics[name]["stopped_at_eos"] = round(sum(stops[name]) / len(stops[name]), 6)
        if name in losses:
            metrics[name].update(_val_metrics(losses[name]))
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
    retain_rows: list[dict[str, Any]] = []
    if retain is not None:
        metrics[RETAIN], retain_rows = retain_scores(
            retain[0], retained, use_stemmer=cfg.use_stemmer
        )
    return metrics, predictions, retain_rows
