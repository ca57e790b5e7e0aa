"""Batched generation: left-padded prompts, greedy by default, stopping at EOS."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy completions for `prompts`, decoded without special tokens, in input order.

    Prompts are sorted by length so each batch carries little padding; padding is on the left
    so every prompt ends where generation starts.
    """
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        for i, text in zip(
            idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
        ):
            outputs[i] = text.strip()
    return outputs
