"""Merge: fold the adapter into the base (`merge_and_unload`) and prove the result is the same.

The equivalence check runs a probe set of prompts through base+adapter before merging and
through the merged model after, and records the largest absolute logit difference. Both
forward passes run in float64 on the very weights being compared (base+adapter as loaded, the
merged weights as saved in `merge.dtype`), so the difference measures the merge itself, not the
float32 rounding noise of two different kernels, which on a random-weight model alone exceeds
1e-4. The up-casts are exact and the original tensors are put back, so the saved weights are
untouched.

Memory: the float64 pass upcasts one block at a time (a decoder layer, the embedding, the
head), never the whole model, so a merge peaks near one copy of the model in `merge.dtype`
(see benchmarks/merge_memory.py); `merge_and_unload` folds each LoRA pair into its base weight in
place, and safetensors writes shards straight from the tensors' memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lorapipe.errors import PipelineError
from lorapipe.lineage import LINEAGE_FILE, file_md5
from lorapipe.models import load_base_model, load_tokenizer

# The tolerance when `merge.max_logit_diff` is null: float32 an absolute 1e-4 (the measured
# difference is ~4e-6); bfloat16 / float16 a fraction of the largest |logit| base+adapter gives
# on the probe set. In half precision the merged weight W + BA is rounded once more to the dtype
# (relative error up to 2^-9 / 2^-12), which base+adapter never sees; that error is relative, so
# the logit difference grows with the logits' scale (scale the head by c and both scale by c),
# and with depth. Measured, as a fraction of max |logit| (docs/merge-and-ship.md): bf16 0.0062 on
# the tiny model's trained adapter (4 layers), 0.0068 on SmolLM2's (30 layers, 0.296 of 43.7),
# 0.022 on the TinyLlama-shaped benchmark (22 layers, random
# r=16 adapter); fp16 0.0013 and 0.0026. The fractions below leave 2.3x (bf16) and 3x (fp16)
# over the 22-layer figure and stay far below an adapter's own effect on the logits (recorded
# as `adapter_max_abs_logit_effect`), so a merge that lost the adapter still fails. Deeper
# models may need `merge.max_logit_diff` set explicitly.
ABSOLUTE_MAX_LOGIT_DIFF = {"float32": 1e-4}
RELATIVE_MAX_LOGIT_DIFF = {"bfloat16": 0.05, "float16": 0.008}


class MergeCheckError(PipelineError, RuntimeError):
    """The merged model's logits differ from base+adapter's by more than the tolerance."""


def allowed_logit_diff(dtype: str, max_logit_diff: float | None, max_abs_logit: float) -> float:
    """`max_logit_diff` when set, else the default for `dtype`: absolute for float32, a fraction
    of `max_abs_logit` (base+adapter's largest |logit| on the probes) for bfloat16 / float16."""
    if max_logit_diff is not None:
        return max_logit_diff
    if dtype in ABSOLUTE_MAX_LOGIT_DIFF:
        return ABSOLUTE_MAX_LOGIT_DIFF[dtype]
    return RELATIVE_MAX_LOGIT_DIFF[dtype] * max_abs_logit


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules upcast together: each entry of a ModuleList (a decoder layer with its LoRA
    pairs) and each other module that owns parameters (embedding, final norm, head)."""
    if isinstance(module, torch.nn.ModuleList):
        return list(module)
    if next(module.parameters(recurse=False), None) is not None:
        return [module]
    return [block for child in module.children() for block in _blocks(child)]


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.float64)
    if isinstance(value, tuple):
        return tuple(_to_float64(v) for v in value)
    return value


@contextmanager
def float64_forward(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model` computes in float64, one block's weights upcast at a time.

    Casting the whole model (`model.to(float64)`) would hold a float64 copy of every weight:
    four times a bf16 model. Hooks instead swap each block's parameters for float64 copies just
    before it runs and put the original tensors back right after (torch has no such mode; the
    hooks are the few lines it takes). Shared (tied) weights are upcast once per use.
    """
    originals: dict[torch.nn.Parameter, torch.Tensor] = {}

    def upcast(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for param in module.parameters():
            if param.is_floating_point() and param not in originals:
                originals[param] = param.data
                param.data = param.data.to(torch.float64)
        return _to_float64(args), {k: _to_float64(v) for k, v in kwargs.items()}

    def restore(module: torch.nn.Module, args: tuple, output: Any) -> None:
        for param in module.parameters():
            if param in originals:
                param.data = originals.pop(param)

    handles = []
    for block in _blocks(model):
        handles.append(block.register_forward_pre_hook(upcast, with_kwargs=True))
        handles.append(block.register_forward_hook(restore))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for param, data in originals.items():  # a forward that raised midway
            param.data = data
        originals.clear()


@torch.no_grad()
def probe_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """float64 logits of each prompt, one at a time so padding plays no part."""
    model.eval()
    out = []
    with float64_forward(model):
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].to(torch.float64).cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str,
    probe_prompts: list[str],
    max_logit_diff: float | None = None,
    max_shard_size: int | str = "5GB",
) -> dict[str, Any]:
    """Merge `adapter_dir` into the base loaded in `dtype` on CPU and save to `out_dir`.

    The base is always loaded unquantised, so a QLoRA adapter merges into full-precision
    weights, never into the 4-bit ones. `max_logit_diff` None means the dtype's default.
    Writes safetensors shards of at most `max_shard_size`, the tokenizer and the generation
    config. Returns the merge report (deterministic: no times, no memory); raises
    MergeCheckError, after writing nothing, when the merged logits drift beyond the tolerance.
    """
    from peft import PeftModel

    if not probe_prompts:
        raise ValueError("merge needs at least one probe prompt")
    tokenizer = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(load_base_model(base_dir, dtype=dtype), str(adapter_dir))
    with model.disable_adapter():
        base = probe_logits(model, tokenizer, probe_prompts)
    with_adapter = probe_logits(model, tokenizer, probe_prompts)
    effect = max_abs_diff(base, with_adapter)
    del base
    merged = model.merge_and_unload()
    after = probe_logits(merged, tokenizer, probe_prompts)
    diff = max_abs_diff(with_adapter, after)
    scale = max(float(x.abs().max()) for x in with_adapter)
    allowed = allowed_logit_diff(dtype, max_logit_diff, scale)
    report = {
        "dtype": dtype,
        "probe_prompts": len(probe_prompts),
        "merged_max_abs_logit_diff": diff,
        "max_logit_diff_allowed": allowed,
        "adapter_max_abs_logit_effect": effect,
        "max_abs_logit": scale,
        "passed": diff <= allowed,
    }
    if not diff <= allowed:  # written so that a NaN difference fails too
        raise MergeCheckError(
            f"merged model's logits differ from base+adapter by {diff:.3g} "
            f"(> merge.max_logit_diff {allowed:g} for {dtype}); nothing was written. "
            "NaN or inf means a corrupted adapter; a small excess in half precision on a deep "
            "model may need merge.max_logit_diff set (docs/merge-and-ship.md)"
        )
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)  # save_pretrained wrote generation_config.json
    report["files"] = {
        p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.suffix == ".safetensors"
    }
    return report


def merged_lineage(adapter_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The merged model's lineage: the adapter's (data md5s, params, base pin, git, libraries)
    plus what the merge added: the adapter weights' md5 and the check's dtype and result."""
    lineage = dict(json.loads((adapter_dir / LINEAGE_FILE).read_text(encoding="utf-8")))
    weights = adapter_dir / "adapter_model.safetensors"
    lineage["merge"] = {
        "adapter_weights_md5": file_md5(weights),
        **{
            key: report[key]
            for key in ("dtype", "merged_max_abs_logit_diff", "max_logit_diff_allowed", "passed")
        },
    }
    return lineage
