"""Batched generation: left-padded prompts, greedy by default (seeded sampling on request),
stopping at EOS."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

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
            ids, mask, cache = _prefilled(
                model, enc["input_ids"], enc["attention_mask"], room=max_new_tokens
            )
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
            cache.crop(seqs.shape[1] - 1 - cache.get_seq_length())  # (a negative count)
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


@contextmanager
def _grouped_attention(device: torch.device) -> Iterator[None]:
    """On CPU, for the duration: grouped-query attention (several query heads to a key head,
    SmolLM2's 9 to 3) computed by PyTorch's attention kernel itself (`enable_gqa`).

    Written here because transformers (5.x) lets the kernel take the groups only without a mask
    (a limit of CUDA's kernels) and otherwise copies every key and value once per query head
    that reads it (`repeat_kv`); the CPU kernel takes the groups with a mask. transformers' own
    switch is the environment variable `TRANSFORMERS_SDPA_FORCE_GQA`, read at every call. A
    prefill pass of 50 prompts over the cache (22 x 39 positions): 1.43 against 1.96 ms a
    layer. Only for prefill: decoding one token a row, transformers folds a key head's queries
    into one row of queries instead, faster still (200 rows: 0.81 against 1.04 ms a layer).
    """
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or name in os.environ:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        del os.environ[name]


def _prefilled(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor, *, room: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The batch's `input_ids` and `mask` laid out for generation, and a KV cache holding every
    prompt token but the last (`generate` computes the last one, and from it the first new
    token), with `room` more columns set aside for the tokens to come (`_Preallocated`); the
    cache is None when one pass holds the whole batch and nothing is shared, or the model's
    cache is not one of full-length layers (sliding windows, recurrent state): then `generate`
    fills it itself from the batch as given.

    Written by hand: transformers' `generate` pads a batch to its longest prompt and fills the
    cache in one pass; it has neither chunked prefill nor a shared prefix on this path.
    - Shared prefix: the tokens every prompt of the batch begins with (a chat template's system
      turn: 17 of the default's ~39 tokens a prompt) pass through the model once, as one row,
      and their keys and values are copied to every row. For that the batch is laid out
      prefix first, then each row's padding, then the rest of its prompt (`_prefix_first`):
      the padding is masked out wherever it sits, and `generate` counts positions over the
      unmasked tokens, so every real token keeps the position it has left-padded.
    - Chunks: the rest of the prompts (consecutive rows, sorted by length) go through in chunks
      of about `PREFILL_TOKENS` tokens, each padded only to its own longest row, with the
      positions `generate` gives them, over the prefix (`_filled`); each pass writes its keys
      and values straight into the batch's cache at its rows and columns.
    Every real token's cache entry is what a whole-batch pass computes, and the answers are the
    same (tests/test_generation.py).
    """
    rows, width = input_ids.shape
    if rows < 2 or int(mask.sum(dim=1).min()) < 2:  # a row needs a token to fill
        return input_ids, mask, None
    layers = _full_length_layers(model)
    if not layers:
        return input_ids, mask, None
    shared = _shared_prefix(input_ids, mask)
    per_pass = max(1, PREFILL_TOKENS // (width - shared))
    if not shared and rows <= per_pass:
        return input_ids, mask, None
    input_ids, mask = _prefix_first(input_ids, mask, shared)
    store: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    caches = _Caches(model.config, store, (rows, width - 1 + room))
    with _grouped_attention(input_ids.device):
        # The layers alone: no output layer, no logits to throw away.
        _filled(model.get_decoder(), caches, input_ids, mask, shared, per_pass)
    return input_ids, mask, caches(slice(None), width - 1)


class _Caches:
    """Caches (transformers' `DynamicCache`) of `_Preallocated` layers over one batch's `store`
    (per decoder layer its keys and values, set aside once for `size`: rows, columns)."""

    def __init__(self, config: Any, store: list[list[torch.Tensor]], size: tuple[int, int]):
        self.config, self.store, self.size = config, store, size

    def __call__(self, rows: slice, filled: int) -> Any:
        """A cache of the batch's `rows`, holding its first `filled` columns."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        cache.layers = [_Preallocated(kv, rows, filled, self.size) for kv in self.store]
        return cache


def _filled(
    decoder: Any,
    caches: _Caches,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    shared: int,
    per_pass: int,
) -> None:
    """Fills the cache of every token of a prefix-first batch but the last (zero where masked):
    the `shared` prefix computed once, in the first row, and copied to every row, then the rest
    of the rows computed by `decoder` over it, about `per_pass` rows a pass, spread evenly over
    the passes, each written at its rows and columns."""
    rows, width = input_ids.shape
    if shared:
        decoder(input_ids=input_ids[:1, :shared], cache=caches(slice(0, 1), 0), use_cache=True)
        for states in chain.from_iterable(caches.store):
            states[1:, :, :shared] = states[:1, :, :shared]
    per_pass = -(-rows // -(-rows // per_pass))  # as many passes as needed, rows spread evenly
    for first in range(0, rows, per_pass):
        part = mask[first : first + per_pass, shared:-1]
        lead = int((part.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # padding in every row
        ids, part = input_ids[first : first + per_pass, shared + lead : -1], part[:, lead:]
        n, cols = ids.shape
        for states in chain.from_iterable(caches.store):  # columns no pass writes: masked out,
            states[first : first + n, :, shared : shared + lead] = 0  # but they must be finite
        if not cols:  # every row of the chunk is its prefix and its last token
            continue
        decoder(
            input_ids=ids,
            attention_mask=mask[first : first + n, :-1],  # the prefix, padding, these tokens
            position_ids=(shared + part.long().cumsum(-1) - 1).masked_fill(part == 0, 0),
            cache=caches(slice(first, first + n), width - 1 - cols),
            use_cache=True,
        )


class _Preallocated(DynamicLayer):
    """One decoder layer's KV cache for some rows of a batch, kept in storage set aside once for
    the whole batch and every token to come (`store`: its keys and values, [rows, heads,
    columns, dim], made when the first keys arrive, shared by the caches of every prefill pass
    over the batch): new keys and values are written after the `filled` columns, and `keys` and
    `values` are views of what is filled.

    Written here because transformers' `DynamicLayer` concatenates the whole cache onto a fresh
    copy at every pass (10% of the adapter's decoding in the evaluate stage, a profile of
    2026-12-01) and its `StaticLayer` attends over every column it has set aside at every pass.
    Out of room (a longer generation than set aside for), the storage doubles.
    """

    def __init__(
        self, store: list[torch.Tensor], rows: slice, filled: int, size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.store, self.rows, self.filled, self.size = store, rows, filled, size
        if store:
            self.is_initialized, self.device = True, store[0].device
            self._view()

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = (s[self.rows, :, : self.filled] for s in self.store)
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if not self.store:  # the first keys of this decoder layer: set the batch's storage aside
            rows, columns = self.size
            # Not zeroed, but for the columns before these keys: every other column is written
            # before it is read, or zeroed by `_filled` when no pass writes it (masked padding).
            self.store.extend(
                s.new_empty(rows, s.shape[1], columns, s.shape[3])
                for s in (key_states, value_states)
            )
            for s in self.store:
                s[:, :, : self.filled] = 0
            self.is_initialized, self.device = True, key_states.device
        room = self.store[0].shape[2]
        if self.filled + new > room:
            grow = max(room, self.filled + new - room)
            self.store[:] = [
                torch.cat([s, s.new_zeros(*s.shape[:2], grow, s.shape[3])], 2) for s in self.store
            ]
        for s, states in zip(self.store, (key_states, value_states), strict=True):
            s[self.rows, :, self.filled : self.filled + new] = states
        self.filled += new
        return self._view()

    def get_seq_length(self) -> int:
        return self.filled

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes the number of tokens to remove, negated: got {tokens_to_remove}"
            )
        self.filled += tokens_to_remove
        self._view()

    def reset(self) -> None:
        self.filled = 0
        if self.store:
            self._view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda s: s[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda s: s.repeat_interleave(repeats, dim=0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def _rows(self, pick: Any) -> None:
        """This layer's rows of the storage, re-selected by `pick`, as its own storage."""
        self.store = [pick(s[self.rows]) for s in self.store]
        self.rows = slice(None)
        self._view()


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
