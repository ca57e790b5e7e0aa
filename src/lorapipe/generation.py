"""Batched generation: left-padded prompts, greedy by default (seeded sampling on request),
stopping at EOS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lorapipe.runtime import keep_freed_memory

# Prompt tokens per forward pass when a batch's prompts enter the KV cache (`_prefilled`): on
# 2 CPU cores SmolLM2's prefill runs as fast per token from ~1,300 tokens a pass up (32-128
# prompts of ~41 tokens: 5.2-5.6 s per 128 prompts; 16 prompts a pass: 5.8 s; 8: 7.0 s).
PREFILL_TOKENS = 2048


def generate(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[str]:
    """Completions for `prompts` (see `generate_with_stops`, which also says where each ended)."""
    return generate_with_stops(model, tokenizer, prompts, **kwargs)[0]


@torch.no_grad()
def generate_with_stops(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    streamer: Any = None,
) -> tuple[list[str], list[bool]]:
    """Completions for `prompts`, decoded without special tokens, in input order, and for each
    whether it ended with the end-of-turn (EOS) token rather than at `max_new_tokens`.

    Greedy by default. With `do_sample`, tokens are sampled with `temperature` and `top_p`;
    `seed` (when given) seeds torch's generator once before the first batch, so the same seed,
    prompts and batch size give the same completions.

    Prompts are sorted by token count and padded on the left, so every prompt ends where generation
    starts. A batch of many prompts enters the KV cache in chunks of about `PREFILL_TOKENS`
    tokens, each padded only to its own longest prompt (`_prefilled`), and is then decoded
    together: one decoding step costs about the same for 64 rows as for 200 on a CPU (it reads
    every weight once either way), so large batches pay off, without the padding a large batch
    of mixed lengths would carry. Once half of a batch's rows have ended, the rest decode on
    without them (`_decode`): a pass costs in proportion to its rows, and short answers would
    otherwise be carried, finished, for as many passes as the longest needs. A `streamer`
    (transformers' TextStreamer) receives the tokens as they come; it follows one sequence, so
    it needs one prompt.
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer follows one sequence: pass one prompt, got {len(prompts)}")
    keep_freed_memory()  # each pass makes the tensors the last one freed: no fresh pages
    tokenizer.padding_side = "left"
    order = _shortest_first(tokenizer, prompts)
    outputs: list[str] = [""] * len(prompts)
    stopped: list[bool] = [False] * len(prompts)
    sampling: dict[str, Any] = {"do_sample": False}
    if do_sample:
        # Only passed when sampling: transformers warns about sampling knobs under greedy.
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            torch.manual_seed(seed)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with _contiguous_output_layer(model):
            cache = _prefilled(model, enc["input_ids"], enc["attention_mask"])
            new_tokens = _decode(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                cache,
                max_new_tokens=max_new_tokens,
                eos=tokenizer.eos_token_id,
                **sampling,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        texts = tokenizer.batch_decode([t.tolist() for t in new_tokens], skip_special_tokens=True)
        for i, text, tokens in zip(idx, texts, new_tokens, strict=True):
            outputs[i], stopped[i] = text.strip(), bool((tokens == tokenizer.eos_token_id).any())
    return outputs, stopped


def _shortest_first(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Indices of `prompts` by token count, shortest first (ties in input order). Each prefill
    chunk is padded to its own longest prompt; sorted by characters instead, the default's 200
    test prompts carried twice the padding (7.7% of the prefill's positions against 3.8%)."""
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    return sorted(range(len(prompts)), key=lengths.__getitem__)


def _decode(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    *,
    max_new_tokens: int,
    eos: int,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """Each row's new tokens (up to and including its EOS, then any padding), from `generate`
    called until every row has ended or made `max_new_tokens`.

    Written by hand around `generate`, which decodes every row of a batch until the last one
    ends, so a finished row costs a full share of every pass after it (the adapter's answers on
    SmolLM2: 153 of 200 end after 2 tokens, 47 after 10). Each call ends once half of its rows
    have ended (`_HalfEnded`); the rows still going, their tokens so far and their slice of the
    cache (`batch_select_indices`) go into the next call, which feeds each row's last token as
    the cache expects. Greedy rows get the tokens one call would give them
    (tests/test_generation.py). Only for caches of full-length layers (`_full_length_layers`);
    other caches, and a single row, decode in one call.
    """
    from transformers import StoppingCriteriaList

    rows, width = input_ids.shape
    done: list[torch.Tensor | None] = [None] * rows
    going = torch.arange(rows)
    shrinks = _full_length_layers(model) > 0
    ids, budget = input_ids, max_new_tokens
    while True:
        shrinking = shrinks and len(going) > 1
        stop = StoppingCriteriaList([_HalfEnded(width, eos)]) if shrinking else None
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=budget,
            stopping_criteria=stop,
            eos_token_id=eos,
            return_dict_in_generate=True,
            **kwargs,
        )
        seqs, cache = out.sequences, out.cache
        made = seqs.shape[1] - ids.shape[1]
        budget -= made
        finished = (seqs[:, width:] == eos).any(dim=1) | (budget <= 0)
        for row in finished.nonzero().flatten().tolist():
            done[int(going[row])] = seqs[row, width:]
        keep = (~finished).nonzero().flatten()
        if keep.numel() == 0:
            return [t for t in done if t is not None]
        if cache.get_seq_length() > seqs.shape[1] - 1:  # holds every token but the last
            cache.crop(seqs.shape[1] - 1)
        cache.batch_select_indices(keep)
        ids, going = seqs[keep], going[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), made)], dim=1)[keep]


class _HalfEnded:
    """A stopping criterion for `generate` (transformers' `StoppingCriteria` interface): every
    row is done once at least half of the rows have made `eos` after position `start`."""

    def __init__(self, start: int, eos: int) -> None:
        self.start, self.eos = start, eos

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        ended = (input_ids[:, self.start :] == self.eos).any(dim=1)
        return torch.full_like(ended, bool(2 * int(ended.sum()) >= ended.numel()))


@contextmanager
def _contiguous_output_layer(model: Any) -> Iterator[None]:
    """The output layer fed a contiguous input for the duration.

    Written here because transformers (5.x) projects only the last position of a prompt
    through the output layer by slicing the hidden states (`hidden[:, -1:, :]`), a strided view
    that `torch.matmul` does not fold into one product: it runs a batched matrix-vector product
    over a copy of the weight expanded per row, ~0.2 s per batch of 64 prompts on SmolLM2
    (576 x 49,152) against ~0.02 s for the same product on a contiguous input. Same values.
    """
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _prefilled(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """A KV cache holding every prompt token but the last (`generate` computes the last one,
    and from it the first new token), filled `PREFILL_TOKENS` at a time; None when one pass
    holds the whole batch, or the model's cache is not one of full-length layers (sliding
    windows, recurrent state): then `generate` fills it itself.

    Written by hand: transformers' `generate` pads a batch to its longest prompt and fills the
    cache in one pass; it has no chunked prefill on this path. Each chunk (consecutive rows,
    sorted by length) is padded only to its own longest prompt, with the positions `generate`
    gives a left-padded row (counting from its first real token), then its keys and values are
    zero-padded on the left to the batch's length: those columns are masked out, so every real
    token's cache entry is what a whole-batch pass computes (tests/test_generation.py).
    """
    from transformers import DynamicCache

    rows, width = input_ids.shape
    per_pass = max(1, PREFILL_TOKENS // width)
    if rows <= per_pass or int(mask.sum(dim=1).min()) < 2:  # a chunk needs a token to fill
        return None
    layers = _full_length_layers(model)
    if not layers:
        return None
    chunks: list[tuple[int, Any]] = []
    for first in range(0, rows, per_pass):
        ids, part = input_ids[first : first + per_pass, :-1], mask[first : first + per_pass, :-1]
        lead = int((part.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # padding in every row
        ids, part = ids[:, lead:], part[:, lead:]
        positions = (part.long().cumsum(-1) - 1).masked_fill(part == 0, 0)  # as generate's
        out = model(
            input_ids=ids,
            attention_mask=part,
            position_ids=positions,
            cache=DynamicCache(config=model.config),
            use_cache=True,
            logits_to_keep=1,
        )
        chunks.append((lead, out.cache))
    pad = torch.nn.functional.pad
    merged = [
        tuple(
            torch.cat([pad(getattr(c.layers[i], kind), (0, 0, lead, 0)) for lead, c in chunks])
            for kind in ("keys", "values")
        )
        for i in range(layers)
    ]
    return DynamicCache(ddp_cache_data=merged, config=model.config)


def _full_length_layers(model: Any) -> int:
    """The layers of `generate`'s cache for `model` when it is a DynamicCache of full-length
    layers only (no sliding windows or recurrent state), which can be filled in chunks and cut
    by row; 0 otherwise."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layout = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot lay a cache out for: leave it to generate
        return 0
    full = all(type(layer) is DynamicLayer for layer in layout.layers)
    return len(layout.layers) if full else 0
