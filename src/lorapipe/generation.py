"""Batched generation: left-padded prompts, greedy by default (seeded sampling on request),
stopping at EOS."""

from __future__ import annotations

from typing import Any

import torch


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

    Prompts are sorted by length so each batch carries little padding; padding is on the left
    so every prompt ends where generation starts. A `streamer` (transformers' TextStreamer)
    receives the tokens as they come; it follows one sequence, so it needs one prompt.
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer follows one sequence: pass one prompt, got {len(prompts)}")
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
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
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            **sampling,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        ended = (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text, end in zip(idx, texts, ended, strict=True):
            outputs[i], stopped[i] = text.strip(), bool(end)
    return outputs, stopped
