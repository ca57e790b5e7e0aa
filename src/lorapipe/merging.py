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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lorapipe.config import quantisation_name
from lorapipe.errors import PipelineError
from lorapipe.lineage import LINEAGE_FILE, file_md5
from lorapipe.models import load_base_model, load_tokenizer, resolve_dtype

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
PROBE_LOGITS_BYTES = 64 * 2**20  # a probe batch's float64 logits (SmolLM2's 16 probes: 5 batches)


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


def probe_batches(lengths: list[int], vocab: int) -> list[list[int]]:
    """The probe prompts (indices, shortest first) in batches whose padded float64 logits, rows
    x longest x `vocab` x 8 bytes, stay within `PROBE_LOGITS_BYTES`; a prompt alone always runs."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * lengths[i] * vocab * 8 <= PROBE_LOGITS_BYTES:
            batches[-1].append(i)  # sorted: prompt i is the batch's longest
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def iter_probe_logits(
    model: Any, tokenizer: Any, prompts: list[str]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, float64 logits at the prompt's own positions) for every prompt, a batch at a
    time. The prompts run together, right-padded with an attention mask (`probe_batches`): under
    causal attention a prompt's positions never see the padding after them, so it plays no part,
    and each pass upcasts every block once for the whole batch instead of once per prompt
    (measured in docs/merge-and-ship.md)."""
    model.eval()
    ids = [tokenizer(prompt, return_tensors="pt")["input_ids"][0] for prompt in prompts]
    vocab = model.get_output_embeddings().weight.shape[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with float64_forward(model):
        for batch in probe_batches([len(x) for x in ids], vocab):
            longest = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])], mask[row, : len(ids[i])] = ids[i], 1
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)
            ).logits
            for row, i in enumerate(batch):
                yield i, logits[row, : len(ids[i])].to(torch.float64).cpu()


def probe_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """float64 logits of each prompt at its own positions (`iter_probe_logits`)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    for i, logits in iter_probe_logits(model, tokenizer, prompts):
        out[i] = logits.clone()  # not a view that keeps the whole padded batch
    return out


def max_diff_to(reference: list[torch.Tensor], probes: Iterable[tuple[int, torch.Tensor]]) -> float:
    """Largest absolute difference of `iter_probe_logits`' logits from `reference`'s, compared as
    they come (only the reference is kept)."""
    return _nan_max([(reference[i] - logits).abs().max() for i, logits in probes])


def _nan_max(values: list[torch.Tensor]) -> float:
    """The largest value, NaN if any is (Python's `max` keeps or drops a NaN by its position)."""
    return float(torch.stack(values).max())


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} logits against {len(b)}")
    return max_diff_to(a, enumerate(b))


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
    weights, never into the 4-bit ones. A base saved quantised by bitsandbytes has no others:
    its weights are dequantised into `dtype` first (transformers' `dequantize`), the very values
    the adapter was trained against, and the report names the quantisation
    (`base_dequantised_from`). `max_logit_diff` None means the dtype's default.
    Writes safetensors shards of at most `max_shard_size`, the tokenizer and the generation
    config. Returns the merge report (deterministic: no times, no memory); raises
    MergeCheckError, after writing nothing, when the merged logits drift beyond the tolerance.
    """
    from peft import PeftModel

    if not probe_prompts:
        raise ValueError("merge needs at least one probe prompt")
    tokenizer = load_tokenizer(base_dir)
    base = load_base_model(base_dir, dtype=dtype)
    dequantised_from = None
    if getattr(base, "hf_quantizer", None) is not None:  # asked for none: saved so (a hub pin too)
        dequantised_from = quantisation_name(base.config.to_dict()) or "quantised"
        base = base.dequantize(dtype=resolve_dtype(dtype))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with_adapter = probe_logits(model, tokenizer, probe_prompts)
    with model.disable_adapter():
        effect = max_diff_to(with_adapter, iter_probe_logits(model, tokenizer, probe_prompts))
    merged = model.merge_and_unload()
    diff = max_diff_to(with_adapter, iter_probe_logits(merged, tokenizer, probe_prompts))
    scale = _nan_max([x.abs().max() for x in with_adapter])
    allowed = allowed_logit_diff(dtype, max_logit_diff, scale)
    report: dict[str, Any] = {
        "dtype": dtype,
        "base_dequantised_from": dequantised_from,
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
            for key in (
                "dtype",
                "base_dequantised_from",
                "merged_max_abs_logit_diff",
                "max_logit_diff_allowed",
                "passed",
            )
        },
    }
    return lineage
