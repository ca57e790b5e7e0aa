"""Merge: fold the adapter into the base (`merge_and_unload`) and prove the result is the same.

The equivalence check runs a probe set of prompts through base+adapter before merging and
through the merged model after, and records the largest absolute logit difference. Both
forward passes run in float64 on the very weights being compared (base+adapter as loaded, the
merged weights as saved in `merge.dtype`), so the difference measures the merge itself, not the
float32 rounding noise of two different kernels, which on a random-weight model alone exceeds
1e-4. The up- and down-casts are exact, so the saved weights are untouched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lorapipe.errors import PipelineError
from lorapipe.models import load_base_model, load_tokenizer


class MergeCheckError(PipelineError, RuntimeError):
    """The merged model's logits differ from base+adapter's by more than the tolerance."""


@torch.no_grad()
def probe_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """float64 logits of each prompt, one at a time so padding plays no part.

    The model is cast to float64 for the forward pass and back to its dtype afterwards
    (exact for float32, float16 and bfloat16 weights).
    """
    dtype = next(model.parameters()).dtype
    model.eval()
    model.to(torch.float64)
    try:
        out = []
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].cpu())
        return out
    finally:
        model.to(dtype)


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str,
    probe_prompts: list[str],
    max_logit_diff: float,
) -> dict[str, Any]:
    """Merge `adapter_dir` into the base loaded in `dtype` on CPU and save to `out_dir`.

    The base is always loaded unquantised, so a QLoRA adapter merges into full-precision
    weights, never into the 4-bit ones. Returns the merge report; raises MergeCheckError
    (after writing nothing) when the merged logits drift beyond `max_logit_diff`.
    """
    from peft import PeftModel

    if not probe_prompts:
        raise ValueError("merge needs at least one probe prompt")
    started = time.perf_counter()
    tokenizer = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(load_base_model(base_dir, dtype=dtype), str(adapter_dir))
    with_adapter = probe_logits(model, tokenizer, probe_prompts)
    merged = model.merge_and_unload()
    after = probe_logits(merged, tokenizer, probe_prompts)
    diff = max_abs_diff(with_adapter, after)
    report = {
        "dtype": dtype,
        "probe_prompts": len(probe_prompts),
        "merged_max_abs_logit_diff": diff,
        "max_logit_diff_allowed": max_logit_diff,
        "passed": diff <= max_logit_diff,
    }
    if not diff <= max_logit_diff:  # written so that a NaN difference fails too
        raise MergeCheckError(
            f"merged model's logits differ from base+adapter by {diff:.3g} "
            f"(> merge.max_logit_diff {max_logit_diff:g}); nothing was written"
        )
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    report["merge_seconds"] = round(time.perf_counter() - started, 2)
    return report
