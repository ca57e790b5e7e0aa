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

KV = list[tuple[torch.Tensor, torch.Tensor]]  # keys and values, [rows, heads, tokens, dim] a layer


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

    Prompts are sorted by token count and padded on the left, so every prompt ends where
    generation starts. What every prompt of a batch begins with (a chat template's system turn)
    enters the KV cache once; the rest of a batch of many prompts enters it in chunks of about
    `PREFILL_TOKENS` tokens, each padded only to its own longest prompt (`_prefilled`), and the
    batch is then decoded together: one decoding step costs about the same for 64 rows as for
    200 on a CPU (it reads every weight once either way), so large batches pay off, without the
    padding a large batch of mixed lengths would carry. Once half of a batch's rows have ended,
    the rest decode on without them (`_decode`): a pass costs in proportion to its rows, and
    short answers would otherwise be carried, finished, for as many passes as the longest needs.
    A `streamer` (transformers' TextStreamer) receives the tokens as they come; it follows one
    sequence, so it needs one prompt.
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
            ids, mask, cache = _prefilled(model, enc["input_ids"], enc["attention_mask"])
            new_tokens = _decode(
                model,
                ids,
                mask,
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


def _prefilled(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The batch's `input_ids` and `mask` laid out for generation, and a KV cache holding every
    prompt token but the last (`generate` computes the last one, and from it the first new
    token); the cache is None when one pass holds the whole batch and nothing is shared, or the
    model's cache is not one of full-length layers (sliding windows, recurrent state): then
    `generate` fills it itself from the batch as given.

    Written by hand: transformers' `generate` pads a batch to its longest prompt and fills the
    cache in one pass; it has neither chunked prefill nor a shared prefix on this path.
    - Shared prefix: the tokens every prompt of the batch begins with (a chat template's system
      turn: 17 of the default's ~39 tokens a prompt) pass through the model once, as one row,
      and their keys and values are repeated for every row. For that the batch is laid out
      prefix first, then each row's padding, then the rest of its prompt (`_prefix_first`):
      the padding is masked out wherever it sits, and `generate` counts positions over the
      unmasked tokens, so every real token keeps the position it has left-padded.
    - Chunks: the rest of the prompts (consecutive rows, sorted by length) go through in chunks
      of about `PREFILL_TOKENS` tokens, each padded only to its own longest row, with the
      positions `generate` gives them, over the prefix (`_filled`); their keys and values are
      written at the batch's columns, zero where a row is padded (masked out).
    Every real token's cache entry is what a whole-batch pass computes, and the answers are the
    same (tests/test_generation.py).
    """
    from transformers import DynamicCache

    rows, width = input_ids.shape
    if rows < 2 or int(mask.sum(dim=1).min()) < 2:  # a row needs a token to fill
        return input_ids, mask, None
    if not _full_length_layers(model):
        return input_ids, mask, None
    shared = _shared_prefix(input_ids, mask)
    per_pass = max(1, PREFILL_TOKENS // (width - shared))
    if not shared and rows <= per_pass:
        return input_ids, mask, None
    input_ids, mask = _prefix_first(input_ids, mask, shared)
    decoder = model.get_decoder()  # the layers alone: no output layer, no logits to throw away
    prefix: KV = []
    if shared:
        out = decoder(
            input_ids=input_ids[:1, :shared],
            cache=DynamicCache(config=model.config),
            use_cache=True,
        )
        prefix = [(layer.keys, layer.values) for layer in out.cache.layers]
    store = _filled(decoder, model.config, input_ids, mask, prefix, per_pass)
    return input_ids, mask, DynamicCache(ddp_cache_data=store, config=model.config)


def _filled(
    decoder: Any,
    config: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    prefix: KV,
    per_pass: int,
) -> KV:
    """The cache of every token of a prefix-first batch but the last (zero where masked): the
    shared `prefix`'s keys and values (one row) in every row, then the rest of the rows computed
    by `decoder` over the prefix, about `per_pass` rows a pass, spread evenly over the passes."""
    from transformers import DynamicCache

    rows, width = input_ids.shape
    shared = prefix[0][0].shape[2] if prefix else 0
    store: KV = []

    def put(kv: KV, at_rows: slice, at_cols: slice) -> None:
        if not store:
            store.extend(
                (
                    k.new_zeros(rows, k.shape[1], width - 1, k.shape[3]),
                    v.new_zeros(rows, v.shape[1], width - 1, v.shape[3]),
                )
                for k, v in kv
            )
        for (k, v), (to_k, to_v) in zip(kv, store, strict=True):
            to_k[at_rows, :, at_cols], to_v[at_rows, :, at_cols] = k, v

    if prefix:
        put(prefix, slice(None), slice(0, shared))
    per_pass = -(-rows // -(-rows // per_pass))  # as many passes as needed, rows spread evenly
    for first in range(0, rows, per_pass):
        ids = input_ids[first : first + per_pass, shared:-1]
        part = mask[first : first + per_pass, shared:-1]
        lead = int((part.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # padding in every row
        ids, part = ids[:, lead:], part[:, lead:]
        n, cols = ids.shape
        if not cols:  # every row of the chunk is its prefix and its last token
            continue
        held = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix]
        out = decoder(
            input_ids=ids,
            attention_mask=torch.cat([part.new_ones(n, shared), part], dim=1),
            position_ids=(shared + part.long().cumsum(-1) - 1).masked_fill(part == 0, 0),
            cache=DynamicCache(ddp_cache_data=held or None, config=config),
            use_cache=True,
        )
        put(
            [
                (layer.keys[:, :, shared:], layer.values[:, :, shared:])
                for layer in out.cache.layers
            ],
            slice(first, first + n),
            slice(width - 1 - cols, width - 1),
        )
    return store


def _shared_prefix(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many tokens every row of a left-padded batch begins with, leaving each row at least
    its last token (which `generate` computes)."""
    rows, width = input_ids.shape
    lengths = mask.sum(dim=1)
    span = int(lengths.min()) - 1
    if rows < 2 or span < 1:
        return 0
    starts = (width - lengths).unsqueeze(1) + torch.arange(span, device=mask.device)
    tokens = input_ids.gather(1, starts)
    return int((tokens == tokens[:1]).all(dim=0).long().cumprod(dim=0).sum())


def _prefix_first(
    input_ids: torch.Tensor, mask: torch.Tensor, shared: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch laid out as its `shared` first tokens, then each row's padding, then
    the rest of each row."""
    rows, width = input_ids.shape
    lead = (mask == 0).sum(dim=1, keepdim=True)
    cols = torch.arange(width, device=mask.device).expand(rows, width)
    source = torch.where(
        cols < shared, cols + lead, torch.where(cols < shared + lead, cols - shared, cols)
    )
    return input_ids.gather(1, source), mask.gather(1, source)


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
