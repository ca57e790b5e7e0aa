"""Batched generation gives what one-at-a-time generation gives."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def test_prompts_are_batched_by_token_count_and_answered_in_input_order(tiny_base: Path) -> None:
    """Batches and prefill chunks take the prompts shortest first by tokens, not characters (the
    byte-level tokenizer makes each "é" two tokens), and the answers come back in input order,
    each what its prompt alone gives."""
    from lorapipe.generation import _shortest_first

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    prompts = [build_prompt(tok, text) for text in ("é" * 6, "abcdefgh", "xyz")]
    chars = sorted(range(3), key=lambda i: len(prompts[i]))
    assert chars == [2, 0, 1] and _shortest_first(tok, prompts) == [2, 1, 0]
    batched = generate(model, tok, prompts, batch_size=2, max_new_tokens=6)
    alone = [generate(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and len(set(alone)) > 1


@pytest.mark.parametrize("grouped", [False, True], ids=["heads", "grouped-query"])
def test_a_batch_prefilled_in_chunks_generates_what_one_pass_does(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch, grouped: bool
) -> None:
    """The prompts' shared beginning (the chat template's system turn) computed once, the rest
    of each prompt in its own prefill pass (`PREFILL_TOKENS` of 1), then all decoded together:
    every real token keeps its place in order, the cache holds at every real token what one
    whole-batch pass computes, and the answers are the same. Also with grouped-query attention
    (4 query heads to 2 key heads, as SmolLM2's 9 to 3), which the prefill passes hand to the
    attention kernel whole (`_grouped_attention`) and a whole-batch pass copies per head."""
    import torch

    from lorapipe import generation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    if grouped:
        from transformers import AutoModelForCausalLM

        config = model.config
        config.num_attention_heads, config.num_key_value_heads = 4, 2
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(24, seed=5)]
    one_pass = generate(model, tok, prompts, batch_size=24, max_new_tokens=12)
    alone = [generate(model, tok, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert one_pass == alone and len(set(one_pass)) > 1
    tok.padding_side = "left"
    enc = tok(sorted(prompts, key=len), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    shared = generation._shared_prefix(ids, mask)
    assert 5 <= shared < int(mask.sum(dim=1).min()) - 1  # the system turn, not every token
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 1)
    laid, laid_mask, cache = generation._prefilled(model, ids, mask)
    assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
    assert (laid_mask[:, :shared] == 1).all() and (laid[:, :shared] == laid[:1, :shared]).all()
    assert (laid_mask[:, -1] == 1).all()  # every row still ends where generation starts
    for row in range(len(ids)):  # the same tokens in the same order, padding moved
        assert laid[row][laid_mask[row] == 1].tolist() == ids[row][mask[row] == 1].tolist()
    positions = (mask[:, :-1].cumsum(-1) - 1).masked_fill(mask[:, :-1] == 0, 0)
    with torch.no_grad():
        whole = model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions
        ).cache
    for chunked, full in zip(cache.layers, whole.layers, strict=True):
        for kind in ("keys", "values"):
            a, b = getattr(chunked, kind), getattr(full, kind)  # [rows, heads, tokens, dim]
            a, b = (
                a.transpose(1, 2)[laid_mask[:, :-1].bool()],
                b.transpose(1, 2)[mask[:, :-1].bool()],
            )
            assert torch.allclose(a, b, atol=1e-5)
    assert generate(model, tok, prompts, batch_size=24, max_new_tokens=12) == one_pass
    one_token = mask.clone()
    one_token[0, :-1] = 0  # a prompt of one token leaves nothing to fill: generate fills it
    assert generation._prefilled(model, ids, one_token)[2] is None


def test_prompts_without_a_shared_beginning_are_left_as_they_are(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing shared (no BOS, each prompt its own first word): the batch keeps its layout; one
    pass that holds every prompt is left to `generate`, and chunks (one prompt each) decode to
    what one `generate` call over the batch gives."""
    import torch

    from lorapipe import generation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    words = ("alpha", "beta", "gamma", "delta", "omega", "zeta")
    texts = [
        f"{w} {r['instruction']}" for w, r in zip(words, make_questions(6, seed=2), strict=True)
    ]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert generation._shared_prefix(ids, mask) == 0
    laid, laid_mask, cache = generation._prefilled(model, ids, mask)
    assert cache is None and laid is ids and laid_mask is mask
    monkeypatch.setattr(generation, "PREFILL_TOKENS", 1)
    laid, laid_mask, cache = generation._prefilled(model, ids, mask)
    assert cache is not None and laid.equal(ids) and laid_mask.equal(mask)
    eos, greedy = tok.eos_token_id, {"do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, **greedy)[:, ids.shape[1] :]
        got = generation._decode(model, laid, laid_mask, cache, max_new_tokens=8, eos=eos, **greedy)
    assert _until_eos(got, eos) == _until_eos(want, eos) and len(set(_until_eos(want, eos))) > 1


def test_prompts_that_differ_only_in_their_last_token_decode_from_the_prefix_alone(
    tiny_base: Path,
) -> None:
    """All but the last token shared: the cache is the prefix, computed once, and every row
    gets the tokens one `generate` call over the batch gives it."""
    import torch

    from lorapipe import generation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    stem = tok("def add(a, b): return", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*stem, last] for last in (11, 12, 13, 14)])
    mask = torch.ones_like(ids)
    laid, laid_mask, cache = generation._prefilled(model, ids, mask)
    assert cache is not None and cache.get_seq_length() == len(stem) and laid.equal(ids)
    eos, greedy = tok.eos_token_id, {"do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **greedy)
        got = generation._decode(model, laid, laid_mask, cache, max_new_tokens=6, eos=eos, **greedy)
    want = want[:, ids.shape[1] :]
    assert _until_eos(got, eos) == _until_eos(want, eos) and len(set(_until_eos(want, eos))) > 1


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


def test_rows_that_end_leave_the_batch_and_the_rest_decode_as_in_one_call(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_decode` ends each `generate` call once half of its rows have ended and goes on with
    the rest alone (their tokens and their part of the cache): every row gets the tokens one
    `generate` call over the whole batch gives it. The tiny model never makes its EOS, so a
    token it makes mid-answer in about half of the rows stands in for it."""
    import torch

    from lorapipe import generation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    tok.padding_side = "left"
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(24, seed=5)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask, width = enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1]
    eos = tok.convert_tokens_to_ids("q")  # made by 13 of the 24 rows, first after 6-11 tokens
    greedy = {"do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        whole = model.generate(**enc, max_new_tokens=12, eos_token_id=eos, **greedy)[:, width:]
    ended = (whole == eos).any(dim=1)
    assert 8 <= int(ended.sum()) <= 16  # some rows end early, some run to the cap
    calls: list[int] = []
    real = model.generate

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(len(kwargs["input_ids"]))  # type: ignore[arg-type]
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    with torch.no_grad():
        rows = generation._decode(model, ids, mask, None, max_new_tokens=12, eos=eos, **greedy)
    assert calls[0] == 24 and len(calls) >= 2 and calls[-1] <= 12  # the batch shrank
    for got, want, end in zip(rows, whole, ended, strict=True):
        n = int((want == eos).nonzero()[0]) + 1 if end else 12
        assert got[:n].tolist() == want[:n].tolist()
        assert len(got) <= 12 and set(got[n:].tolist()) <= {tok.pad_token_id}


def _until_eos(rows: Iterable[Any], eos: int) -> list[tuple[int, ...]]:
    """Each row's tokens (tensors) up to and including its first `eos` (then padding follows)."""
    out = []
    for row in rows:
        tokens = row.tolist()
        out.append(tuple(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens))
    return out


def test_a_preallocated_cache_layer_holds_what_transformers_dynamic_layer_holds() -> None:
    """`_Preallocated` writes into storage set aside once instead of concatenating: after the
    same updates, crops and row selections it returns what transformers' `DynamicLayer`
    returns, whether the room set aside suffices or has to grow, and two layers over different
    rows of one batch's storage write into their own rows of it."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from lorapipe.generation import _Preallocated

    torch.manual_seed(0)

    def states(rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, 3, tokens, 8), torch.randn(rows, 3, tokens, 8)

    for room in (12, 4):  # enough for every token, and too little (the storage grows)
        store: list[torch.Tensor] = []
        layer, reference = _Preallocated(store, slice(None), 0, (5, room)), DynamicLayer()
        for step in (states(5, 4), states(5, 1), states(5, 1)):
            got, want = layer.update(*step), reference.update(*step)
            assert all(a.equal(b) for a, b in zip(got, want, strict=True))
        assert layer.get_seq_length() == reference.get_seq_length() == 6
        layer.crop(-2)
        reference.crop(-2)
        keep = torch.tensor([0, 3, 4])
        layer.batch_select_indices(keep)
        reference.batch_select_indices(keep)
        step = states(3, 2)
        got, want = layer.update(*step), reference.update(*step)
        assert all(a.equal(b) for a, b in zip(got, want, strict=True))
        assert got[0].shape == (3, 3, 6, 8)
    with pytest.raises(ValueError, match="negated"):
        layer.crop(2)
    store = []
    top, bottom = (_Preallocated(store, rows, 0, (4, 6)) for rows in (slice(0, 2), slice(2, 4)))
    upper, lower = states(2, 3), states(2, 3)
    top.update(*upper)
    bottom.update(*lower)
    assert store[0][:2, :, :3].equal(upper[0]) and store[1][2:, :, :3].equal(lower[1])
