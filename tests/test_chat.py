"""Chat formatting: prompt/completion split, EOS handling, one prompt builder for all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorapipe.chat import (
    FormatError,
    build_examples,
    build_prompt,
    conversation,
    messages_for,
    render_prompt,
)
from lorapipe.formatting import format_rows, mask_audit
from lorapipe.models import load_tokenizer


def one_example(tok: Any, instruction: str, response: str, system_prompt: str | None = None) -> Any:
    """The single training example of a one-turn conversation."""
    messages = [*messages_for(instruction), {"role": "assistant", "content": response}]
    (example,) = build_examples(tok, messages, system_prompt)
    return example


def test_example_splits_at_generation_prompt(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    ex = one_example(tok, "What does `'abc'.upper()` return?", "'ABC'")
    assert ex.prompt == "<|user|>\nWhat does `'abc'.upper()` return?</s>\n<|assistant|>\n"
    # The completion ends exactly at EOS: the template's newline after it is not supervised.
    assert ex.completion == "'ABC'</s>"


def test_system_prompt_goes_first(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    ex = one_example(tok, "Q?", "A", system_prompt="Answer with a value.")
    assert ex.prompt.startswith("<|system|>\nAnswer with a value.</s>\n<|user|>\nQ?</s>")


def test_evaluation_prompt_is_the_training_prompt(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    row = {"id": "x", "instruction": "Evaluate `[3, 1][0]`.", "response": "3"}
    formatted = format_rows([row], tok, None)[0]
    assert formatted["prompt"] == build_prompt(tok, row["instruction"])
    assert formatted["reference"] == "3"
    train_ids = tok(formatted["prompt"] + formatted["completion"])["input_ids"]
    eval_ids = tok(build_prompt(tok, row["instruction"]))["input_ids"]
    assert train_ids[: len(eval_ids)] == eval_ids


def test_mask_audit_counts_supervised_tokens_and_truncation(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    ex = {"prompt": build_prompt(tok, "Q?"), "completion": "abc</s>"}
    audit = mask_audit(ex, tok, max_length=256)
    assert audit["completion_tokens"] == 4  # a, b, c, EOS: the tokenizer is byte-level
    assert audit["supervised_tokens"] == 4
    short = mask_audit(ex, tok, max_length=audit["prompt_tokens"])
    assert short["truncated"] == 1 and short["supervised_tokens"] == 0


def test_tokenizer_without_template_is_refused(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    tok.chat_template = None
    with pytest.raises(FormatError, match="no chat template"):
        build_prompt(tok, "Q?")


def test_multi_turn_evaluation_prompt_is_the_training_prompt(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    row = {
        "id": "m",
        "messages": [
            {"role": "user", "content": "Pick a digit."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Add one."},
            {"role": "assistant", "content": "8"},
        ],
    }
    system = "Answer with digits."
    formatted = format_rows([row], tok, system)
    assert [ex["id"] for ex in formatted] == ["m-1", "m-2"]
    history = [{"role": "system", "content": system}, *conversation(row)]
    for ex, upto in zip(formatted, (1, 3), strict=True):
        # What evaluation or inference renders for the conversation so far...
        eval_prompt = render_prompt(tok, history[: upto + 1])
        assert ex["prompt"] == eval_prompt
        # ...tokenizes to exactly the tokens training sees before the supervised completion.
        train_ids = tok(ex["prompt"] + ex["completion"])["input_ids"]
        eval_ids = tok(eval_prompt)["input_ids"]
        assert train_ids[: len(eval_ids)] == eval_ids
        assert tok.decode(train_ids[len(eval_ids) :]) == ex["reference"] + "</s>"
    assert formatted[1]["prompt"].count("<|system|>") == 1
    assert "<|assistant|>\n7</s>" in formatted[1]["prompt"]
    last = format_rows([row], tok, system, train_on="last_assistant")
    assert last == [{**formatted[1], "id": "m"}]
