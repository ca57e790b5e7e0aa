"""Model FLOPs of a LoRA training step, and this machine's matrix-multiply peak.

Counted per token, over the real (non-padding) tokens, matrix products only (norms, RoPE,
softmax and the optimizer are left out, as in the usual model-FLOPs-utilisation convention):

- F = weights of the frozen linear layers (attention and MLP projections and lm_head),
  R = LoRA weights (A and B of every adapted layer: r * (in + out) each).
- forward: 2F + 2R (a multiply-add per weight).
- backward: 2F for the activation gradients through the frozen layers (their weight gradients
  are never computed), 2R activation gradients + 2R weight gradients through the adapters.
- attention, per layer and sequence of length l: QK^T and PV, 2 * 2 * l^2 * d forward
  (d = heads * head_dim) and twice that backward (dQ, dK, dV, dP), the full l x l products as
  the CPU kernels compute them (a causal flash kernel on a GPU skips about half).

So one sequence of l tokens costs l * (4F + 6R) + 12 * layers * d * l^2. The first layer's
input gradient is not needed yet counted (< 1/layers of 2F), so this slightly overstates.

`performed_train_flops` counts what a step actually computes: the output layer (H weights,
part of F) only at the positions where it runs, and as often as it runs there. A model's own
loss (a plain loop) projects all l positions once forward and once back: 4H * l. TRL's fused
LM head (SFTTrainer's loss: the recipe and the pipeline) keeps no logits and projects each
scored position again in its backward before the input gradient: 6H per position, at the l - 1
positions that have a next token by TRL's CPU default (the recipe, padded), at the s supervised
ones with the pipeline's `score_only_supervised_positions` on a GPU. On CPU the pipeline keeps
those few positions' logits instead (`lorapipe.whole_head`): 4H per supervised position. So a
pipeline sequence costs l * (4(F - H) + 6R) + 4H * s + 12 * layers * d * l^2 on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


def linear_weights(model: Any) -> tuple[int, int]:
    """(F, R): frozen linear weights and LoRA weights of a peft model (bitsandbytes 4-bit layers
    counted by their logical shape, not their packed storage)."""
    import torch

    frozen = lora = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if not isinstance(module, torch.nn.Linear) or in_f is None or out_f is None:
            continue
        if ".lora_A." in f".{name}." or ".lora_B." in f".{name}." or leaf.startswith("lora_"):
            lora += in_f * out_f
        else:
            frozen += in_f * out_f
    return frozen, lora


def attention_width(config: Any) -> tuple[int, int]:
    """(layers, heads * head_dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def train_flops(model: Any, lengths: Iterable[int]) -> float:
    """Model FLOPs of one forward + backward over sequences of `lengths` tokens (see above)."""
    frozen, lora = linear_weights(model)
    config = model.config
    layers, width = attention_width(config)
    total = 0.0
    for length in lengths:
        total += length * (4 * frozen + 6 * lora) + 12 * layers * width * length**2
    return total


def matmul_peak(
    *, size: int = 2048, repeats: int = 5, dtype: Any = None, device: str = "cpu"
) -> float:
    """Best FLOP/s of `torch.matmul` on two `size` x `size` matrices (fp32 unless `dtype`),
    with this process's thread count: the reference for the achieved FLOP/s."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up: allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def lm_head_weights(model: Any) -> int:
    """Weights of the output layer (its logical in x out)."""
    head = model.get_output_embeddings()
    return int(head.in_features * head.out_features)


HEADS = ("model", "trl", "trl-supervised", "supervised")


def performed_train_flops(
    model: Any, lengths: Iterable[int], supervised: Iterable[int], *, head: str
) -> float:
    """FLOPs a training pass over sequences of `lengths` real tokens actually performs: as
    `train_flops`, but the output layer counted where it is computed and as often as it is, by
    the loss that runs it (`head`): "model", a model's own loss (4H at all l positions of each
    sequence); "trl", TRL's fused LM head as TRL runs it on CPU, at the l - 1 positions of a
    padded sequence that have a next token; "trl-supervised", that head at the `supervised`
    positions only (the pipeline's `score_only_supervised_positions` on a GPU). TRL's head
    keeps no logits and projects again in its backward: 6H a position. "supervised": the
    supervised positions' logits kept (the pipeline on CPU, `lorapipe.whole_head`), 4H a
    position. Padding positions are not counted (so this understates the work of a padded
    batch)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    lengths = list(lengths)
    if head == "model":  # `train_flops` counts the output layer as a model's own loss runs it
        return train_flops(model, lengths)
    scored = sum(n - 1 for n in lengths) if head == "trl" else sum(supervised)
    per_position = 4 if head == "supervised" else 6
    weights = lm_head_weights(model)
    return train_flops(model, lengths) + weights * (per_position * scored - 4 * sum(lengths))


def pipeline_head(compact: bool, device: str) -> str:
    """`performed_train_flops`' `head` for the pipeline's loss on `device` ("cpu", "cuda"):
    whether TRL's head projects only the supervised positions (`compact`), and whether their
    logits are kept (on CPU, where `lorapipe.whole_head` takes a batch's few positions)."""
    if not compact:
        return "trl"
    return "supervised" if device == "cpu" else "trl-supervised"


def generation_flops(
    model: Any, prompt_lengths: Iterable[int], new_tokens: Iterable[int], *, shared: int = 0
) -> float:
    """FLOPs of greedy generation with a KV cache, over real tokens only, for one batch whose
    prompts all begin with the same `shared` tokens, computed once (`lorapipe.generation`
    prefills a batch's shared beginning as one row): that prefix pass, 2(F - H) * S plus
    attention's full S x S products, 4 * layers * d * S^2; then per prompt of P tokens that
    generated g new ones, the rest of its prefill (every linear layer but the output layer at
    its P - S other positions, the output layer at the last one: 2(F - H) * (P - S) + 2H;
    attention of those P - S positions over all P, 4 * layers * d * (P - S) * P) and g - 1
    decoding passes of one token each (2F, and attention over the P + t cached positions,
    4 * layers * d * (P + t)). With nothing shared (S = 0) a prompt's prefill is
    2(F - H) * P + 2H + 4 * layers * d * P^2. Rows of a batch that already ended, and padding,
    are computed by `generate` but not counted."""
    frozen, lora = linear_weights(model)
    weights, head = frozen + lora, lm_head_weights(model)
    layers, width = attention_width(model.config)
    total = 2.0 * (weights - head) * shared + 4 * layers * width * shared * shared
    for p, g in zip(prompt_lengths, new_tokens, strict=True):
        if p <= shared:
            raise ValueError(f"a prompt of {p} tokens cannot share {shared} and leave its last")
        total += (
            2 * (weights - head) * (p - shared) + 2 * head + 4 * layers * width * (p - shared) * p
        )
        total += sum(2 * weights + 4 * layers * width * (p + t) for t in range(1, g))
    return total


def batched_generation_flops(
    model: Any, prompt_ids: list[list[int]], new_tokens: list[int], *, batch_size: int
) -> float:
    """`generation_flops` over the batches `lorapipe.generation.generate_with_stops` forms:
    prompts by token count (ties in input order), `batch_size` at a time, each batch's shared
    beginning (its prompts' common first tokens, leaving each its last) counted once."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    total = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [prompt_ids[i] for i in batch]
        shared = 0  # counted independently of generation's own rule; the test ties the two
        while len(rows) > 1 and all(
            len(r) > shared + 1 and r[shared] == rows[0][shared] for r in rows
        ):
            shared += 1
        made = [new_tokens[i] for i in batch]
        total += generation_flops(model, [len(r) for r in rows], made, shared=shared)
    return total
