"""Padding-free training batches with attention kept per sequence on every device.

A batch of 8 chat examples padded to its longest carries ~10% padding on the default data,
which every linear layer, norm and activation computes for nothing. TRL's padding-free
collator (`SFTConfig.padding_free`) lays a batch's examples end to end in one row and hands the
model each example's bounds (`cu_seq_lens_q`, `max_length_q`); flash attention uses them, but
SDPA, the attention of the CPU and the default elsewhere, gets a block-diagonal mask over the
whole row instead, so its kernel computes the packed length squared (8 examples of ~45 tokens:
~24 GFLOP more attention a step than the padding saves; docs/training-performance.md).

`packed_sdpa` is SDPA for such a row: each example's queries, keys and values go into a row of
their own (padded to the longest, only for the attention), SDPA runs causal over them (a
padded key comes after every real query, so causality alone keeps it out), and the real
positions are gathered back. Everything but attention sees no padding. transformers has no
such kernel for SDPA (its varlen path is flash attention's, CUDA only), so it is written here
and registered under `ATTENTION` with transformers' attention interface; a call without the
bounds (a padded batch, generation) is plain SDPA with its mask.

On SmolLM2 (batch 8) a trainer step is ~5% faster; the loss and gradients equal the padded
batch's to float rounding (tests/test_packing.py).
"""

from __future__ import annotations

from typing import Any

import torch

ATTENTION = "lorapipe_packed_sdpa"


def _sequence_rows(cu_seq_lens: torch.Tensor, longest: int) -> tuple[int, torch.Tensor]:
    """(examples, each packed position's index in the examples x `longest` layout)."""
    starts = cu_seq_lens.to(torch.long)
    lengths = starts.diff()
    total = int(starts[-1])
    device = cu_seq_lens.device
    example = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    offset = torch.arange(total, device=device) - starts[:-1][example]
    return lengths.numel(), example * longest + offset


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query [1, heads, packed, dim], key and
    value [1, kv heads, packed, dim]; returns [1, packed, heads, dim] (module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or kwargs.get("sliding_window"):
        raise ValueError(
            f"{ATTENTION} takes one packed row of self-attention without a sliding window "
            f"(query {tuple(query.shape)}, key {tuple(key.shape)})"
        )
    longest = int(kwargs["max_length_q"])
    examples, index = _sequence_rows(bounds, longest)

    # Positions move as whole rows of heads x dim (dim 0 of [positions, heads, dim], how the
    # projections lay them out), and back with `index_select`, whose gradient is an `index_add`:
    # `[index]` and copies along the head dimension took ~45 ms more a SmolLM2 step, same values.
    def per_example(x: torch.Tensor) -> torch.Tensor:
        heads, dim = x.shape[1], x.shape[3]
        rows = x.new_zeros(examples * longest, heads, dim)
        rows = rows.index_copy(0, index, x[0].transpose(0, 1))
        return rows.view(examples, longest, heads, dim).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(
        per_example(query),
        per_example(key),
        per_example(value),
        dropout_p=dropout,
        is_causal=True,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    heads, dim = out.shape[1], out.shape[3]
    rows = out.transpose(1, 2).reshape(examples * longest, heads, dim)
    return rows.index_select(0, index).unsqueeze(0), None


def _unwrapped(model: Any) -> Any:
    """The transformers model under a peft wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unpackable(model: Any) -> str | None:
    """Why `model`'s attention cannot take packed rows through `packed_sdpa`, or None when it
    can: its attention must be SDPA behind transformers' attention interface, causal, with no
    sliding window or logit soft-capping."""
    base = _unwrapped(model)
    config = base.config
    text = config.get_text_config()
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", ATTENTION):
        return f"attention is {attention!r}, not sdpa"
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not take transformers' attention functions"
    if config.is_encoder_decoder:
        return "an encoder-decoder model"
    for key in ("sliding_window", "attn_logit_softcapping"):
        if getattr(text, key, None):
            return f"its config sets {key}"
    return None


def use_packed_attention(model: Any) -> None:
    """Register `packed_sdpa` (and SDPA's masks for it) with transformers and make it `model`'s
    attention; `unpackable(model)` must be None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _unwrapped(model).set_attn_implementation(ATTENTION)
