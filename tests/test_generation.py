"""Batched generation gives what one-at-a-time generation gives."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_a_batch_prefilled_in_chunks_generates_what_one_pass_does(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prompt its own prefill pass (`PREFILL_TOKENS` of 1), then all decoded together:
    the cache holds what one whole-batch pass computes, and the answers are the same."""
    import torch

    from lorapipe import generation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(24, seed=5)]
    one_pass = generate(model, tok, prompts, batch_size=24, max_new_tokens=12)
    assert len(set(one_pass)) > 1
    tok.padding_side = "left"
    enc = tok(sorted(prompts, key=len), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert generation._prefilled(model, ids, mask) is None  # one pass holds all 24
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 1)
    cache = generation._prefilled(model, ids, mask)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    positions = (mask[:, :-1].cumsum(-1) - 1).masked_fill(mask[:, :-1] == 0, 0)
    with torch.no_grad():
        whole = model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions
        ).past_key_values
    real = mask[:, :-1].bool()
    for chunked, full in zip(cache.layers, whole.layers, strict=True):
        for kind in ("keys", "values"):
            a, b = getattr(chunked, kind), getattr(full, kind)  # [rows, heads, tokens, dim]
            assert torch.allclose(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5)
    assert generate(model, tok, prompts, batch_size=24, max_new_tokens=12) == one_pass
    one_token = mask.clone()
    one_token[0, :-1] = 0  # a prompt of one token leaves nothing to fill: generate fills it
    assert generation._prefilled(model, ids, one_token) is None


def test_the_output_layer_on_a_contiguous_input_gives_the_same_logits(tiny_base: Path) -> None:
    import torch

    from lorapipe.generation import _contiguous_output_layer

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    tok.padding_side = "left"
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(6, seed=1)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        strided = model(**enc, logits_to_keep=1).logits
        with _contiguous_output_layer(model):
            contiguous = model(**enc, logits_to_keep=1).logits
    assert strided.shape == contiguous.shape == (6, 1, model.config.vocab_size)
    assert torch.allclose(strided, contiguous, atol=1e-5)
