"""Padding-free training batches (`lorapipe.packing`): a packed row gives the padded batch's loss
and gradients, with grouped-query attention too; training packs and ends where padded training
does; models whose attention cannot take packed rows are left padded; an example longer than
train.max_length stops training by file and line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

from lorapipe.config import Params
from lorapipe.io import read_jsonl
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.packing import ATTENTION, unpackable, use_packed_attention
from lorapipe.training import TrainingError, score_only_supervised_positions, train_adapter


def grouped_query_base(tiny_base: Path) -> Any:
    """The tiny base's architecture with half as many key/value heads as query heads (SmolLM2
    has 3 for 9), random weights."""
    config = load_base_model(tiny_base).config
    config.num_key_value_heads = config.num_attention_heads // 2
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sft_trainer(model: Any, tiny_base: Path, formatted: Path, tmp: Path, packed: bool) -> Any:
    """TRL's trainer over the formatted training examples, padding-free or padded."""
    return SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp),
            completion_only_loss=True,
            padding_free=packed,
            max_length=None,
            report_to="none",
            use_cpu=True,
        ),
        train_dataset=Dataset.from_list(read_jsonl(formatted / "train.jsonl")),
        processing_class=load_tokenizer(tiny_base),
    )


def batch_from(model: Any, tiny_base: Path, formatted: Path, tmp: Path, packed: bool) -> Any:
    """The trainer and six training examples as its collator gives them: one packed row, or
    padded."""
    trainer = sft_trainer(model, tiny_base, formatted, tmp, packed)
    return trainer, trainer.data_collator([trainer.train_dataset[i] for i in range(6)])


@pytest.mark.parametrize("grouped", [False, True])
def test_a_packed_row_gives_the_padded_batch_loss_and_gradients(
    tiny_base: Path, formatted: Path, tmp_path: Path, grouped: bool
) -> None:
    base = grouped_query_base(tiny_base) if grouped else load_base_model(tiny_base)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian")
    model = get_peft_model(base, lora)
    score_only_supervised_positions()
    trainer, padded = batch_from(model, tiny_base, formatted, tmp_path, packed=False)
    assert unpackable(model) is None
    use_packed_attention(model)
    assert model.get_base_model().config._attn_implementation == ATTENTION
    _, packed = batch_from(model, tiny_base, formatted, tmp_path, packed=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # the padding is gone

    def loss_and_grads(batch: dict[str, Any]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # The padded batch through the packed attention's own fallback (SDPA with its mask).
    want_loss, want_grads = loss_and_grads(padded)
    loss, grads = loss_and_grads(packed)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads)

    # ... and the fallback is SDPA's: the same logits as the model's own attention.
    with torch.no_grad():
        inputs = {k: padded[k] for k in ("input_ids", "attention_mask")}
        through_packed = model(**inputs).logits
        model.get_base_model().set_attn_implementation("sdpa")
        torch.testing.assert_close(model(**inputs).logits, through_packed)


def test_training_packs_and_ends_where_padded_training_does(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    params = train_params()
    runs = {}
    for pack in (True, False):
        out = tmp_path / str(pack)
        out.mkdir()
        summary = train_adapter(
            params, tiny_base, formatted, out, tmp_path / f"{pack}-curves", pack=pack
        )
        assert summary["padding_free"] is pack
        runs[pack] = summary, load_file(out / "adapter_model.safetensors")
    (packed, packed_weights), (padded, padded_weights) = runs[True], runs[False]
    assert packed["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-5)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-5)
    assert packed_weights.keys() == padded_weights.keys()
    for name, weight in packed_weights.items():
        torch.testing.assert_close(weight, padded_weights[name], rtol=1e-3, atol=1e-5)


def test_attention_that_cannot_take_packed_rows_is_left_padded(tiny_base: Path) -> None:
    model = load_base_model(tiny_base)
    assert unpackable(model) is None
    model.set_attn_implementation("eager")
    assert unpackable(model) == "attention is 'eager', not sdpa"
    model.set_attn_implementation("sdpa")
    model.config.sliding_window = 16
    assert unpackable(model) == "its config sets sliding_window"


def test_an_example_longer_than_max_length_stops_training_by_file_and_line(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    trainer = sft_trainer(load_base_model(tiny_base), tiny_base, formatted, tmp_path, False)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    limit = max(lengths) - 1
    assert 0 < sum(n > limit for n in lengths) < len(lengths)
    (tmp_path / "out").mkdir()
    with pytest.raises(TrainingError) as caught:
        train_adapter(
            train_params(f"train.max_length={limit}"),
            tiny_base,
            formatted,
            tmp_path / "out",
            tmp_path / "curves",
        )
    first = next(i for i, n in enumerate(lengths) if n > limit)
    assert str(caught.value) == (
        f"{formatted / 'train.jsonl'}:{first + 1}: {lengths[first]} tokens, more than "
        f"train.max_length {limit} ({sum(n > limit for n in lengths)} of 32 examples); the "
        "data was formatted with another train.max_length: format it with this one"
    )
    assert not any((tmp_path / "out").iterdir())
