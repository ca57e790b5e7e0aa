"""The output layer over a few scored positions, with their logits kept, on CPU.

TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`) never keeps the `[positions,
vocabulary]` logits: it projects the vocabulary in tiles, folds each into running statistics
(log-sum-exp, entropy, top-1), and in its backward projects every tile again before the input
gradient. That bounds memory where many positions are scored. Under
`training.score_only_supervised_positions` a CPU step scores only the supervised positions, ~34
in a batch of 8 on SmolLM2: their logits are 6 MiB, and the second projection costs more than
keeping them. So where the scored positions' logits fit in `WHOLE_MAX_BYTES`, on CPU in float32,
`whole_logprobs` computes the same outputs from the whole logits with torch operators and
autograd differentiates them: one product forward and one back instead of three, and no tile
loop. Anywhere else TRL's kernel runs. Same outputs and gradients as TRL's kernel to float
rounding (tests/test_whole_head.py). Written here because neither TRL nor transformers has a
path that scores only some positions and keeps their logits; measured in
docs/training-performance.md.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

WHOLE_MAX_BYTES = 64 * 2**20  # the scored positions' logits: ~340 positions at SmolLM2's vocabulary


def whole_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `whole_logprobs` takes these positions: CPU, float32, no autocast, logits small."""
    if hidden.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return hidden.shape[0] * weight.shape[0] * 4 <= WHOLE_MAX_BYTES


def whole_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    final_logit_softcapping: float | None = None,
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
) -> tuple[torch.Tensor | None, ...]:
    """`ChunkedLogProbFunction.apply`'s outputs (log-probabilities of `targets`, then entropy,
    log of the summed squared probabilities, mean logit and whether the target is the first
    argmax, each `None` unless in `outputs`) from the whole logits; the first two differentiable,
    as TRL's."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    if temperature != 1.0:
        z = z / temperature
    log_z = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(1, targets.unsqueeze(1)).squeeze(1) - log_z
    probabilities = {"entropy", "log_sum_sq_probs"} & set(outputs)
    p = torch.exp(z - log_z.unsqueeze(1)) if probabilities else None
    entropy = log_z - (p * z).sum(-1) if p is not None and "entropy" in outputs else None
    with torch.no_grad():
        sq = torch.log((p * p).sum(-1)) if p is not None and "log_sum_sq_probs" in outputs else None
        mean = z.mean(-1) if "mean_logits" in outputs else None
        top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
    return logprobs, entropy, sq, mean, top1


class WholeOrChunked:
    """Stands in for TRL's `ChunkedLogProbFunction` where `trl.trainer.utils` calls it (the same
    `apply`): `whole_logprobs` where `whole_fits`, TRL's kernel otherwise."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ) -> Any:
        if whole_fits(hidden, weight):
            return whole_logprobs(
                hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                outputs,
            )  # fmt: skip
        return ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
            logit_scale, outputs,
        )  # fmt: skip
