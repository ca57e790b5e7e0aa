"""Batched generation gives what one-at-a-time generation gives."""

from __future__ import annotations

from pathlib import Path

from lorapipe.chat import build_prompt
from lorapipe.generation import generate
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.pyqa import generate as make_questions


def test_batched_greedy_equals_batch_size_one_in_fp32(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(24, seed=3)]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 3  # batches really need padding
    batched = generate(model, tok, prompts, batch_size=8, max_new_tokens=12)
    one_by_one = generate(model, tok, prompts, batch_size=1, max_new_tokens=12)
    assert batched == one_by_one
    assert (
        len(set(batched)) > 1
    )  # the outputs depend on the prompt, so the comparison means something
