"""GPU training throughput and model FLOP utilisation at TinyLlama-1.1B's shape and on the real
default model: LoRA in bf16 and QLoRA (NF4, bf16 compute).

python benchmarks/gpu_train.py                        # on a CUDA machine, under 8 minutes
python benchmarks/gpu_train.py --device cpu --tiny    # the same code on a tiny shape, on CPU
python benchmarks/gpu_train.py --device cpu --real-only --steps 1 --warmup 0 --real-batch 2
                                                      # the real model's code path, on CPU

On a machine with PyTorch alone and no way to download (a lent GPU): `scripts/gpu_kit.sh` here,
then carry `.gpukit` there and run what it prints (docs/training-performance.md).

Without CUDA (and without `--device cpu`) it prints "skipped: no CUDA device" and exits 0,
writing `{"skipped": ...}` to `--out`, so `make bench` on a CPU machine runs on.

Builds TinyLlama-1.1B's shape with random weights (benchmarks/shapes.py, bf16 safetensors in a
temporary folder), then per variant loads it the pipeline's way: `lorapipe.models.load_base_model`
with `dtype=bfloat16` for LoRA; for QLoRA the train stage's `lorapipe.training.load_for_training`
(`quant=nf4` with double quantisation, peft's `prepare_model_for_kbit_training` and, with
`train.gradient_checkpointing: auto`, recomputed activations, whose FLOPs the MFU does not
count). Then it adds the pipeline's LoRA (params.yaml `lora`) and times
`--steps` training steps (forward, backward, AdamW) on `--batch` random sequences of `--seq-len`
tokens under bf16 autocast, after `--warmup` untimed ones. LoRA weights train in fp32 (as
`train.precision: bf16` keeps them), QLoRA's in bf16 (as TRL casts them). Reported: tokens/s,
peak CUDA memory, model FLOP/s (benchmarks/flops.py: l * (4F + 6R) + 12 * layers * d * l^2 per
sequence) and model FLOP utilisation against a bf16 `torch.matmul` peak measured in this run.

The real default model (`real_model` in the JSON; `--no-real` leaves it out, `--tiny` too,
`--real-only` runs only it): the base stage's `paths.base` (SmolLM2-135M-Instruct as fp32
safetensors; built from params.yaml `model` into a temporary folder when `paths.base` has none,
as on a freshly lent machine), set up per variant in `--real-dtype` (bfloat16 on CUDA; on CPU
float32, since bf16 matmuls there are ~300x slower: the CPU run checks the code path, not the
speed) as the train stage sets it up (`stage_variant`: `lorapipe.training.setup_model`, whose
fused LoRA update runs where no autocast does, and the padding-free attention), the pipeline's
LoRA, and one batch of real examples: the first `--real-batch` (`train.batch_size`) of
`paths.formatted`/train.jsonl (or of `data.path`, formatted here), laid end to end in one
padding-free row as the train stage's batches are (padded to the longest where the model's
attention cannot take that), labels on the completions, with the train stage's loss (TRL's
fused LM head, as SFTTrainer adds it: the output layer projects only the supervised positions,
`train_memory.pipeline_loss`). Tokens/s counts the real tokens; the
model FLOPs (benchmarks/flops.py `performed_train_flops`) count the real tokens and the output
layer only where it runs, as often as it runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from flops import matmul_peak, performed_train_flops, pipeline_head, train_flops
from output import publish
from shapes import build_random_base

VARIANTS = ("lora-bf16", "qlora-nf4")
SHORT = {"bfloat16": "bf16", "float32": "fp32"}
# --tiny: a shape that runs in seconds on a CPU, for checking the code path.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def load_variant(
    base: Path, variant: str, params: Any, device: str, dtype: str = "bfloat16"
) -> tuple[Any, bool]:
    """The base loaded as the pipeline's train stage loads it for `variant` (LoRA: the base in
    `dtype`; QLoRA: conf/quant/nf4.yaml with `dtype` compute), with LoRA; and whether it
    recomputes activations (`train.gradient_checkpointing`, auto: for QLoRA)."""
    import torch
    from peft import get_peft_model
    from train_memory import quant_for

    from lorapipe.models import load_base_model
    from lorapipe.training import load_for_training, lora_config

    if variant.startswith("qlora"):
        quant = quant_for("nf4").model_copy(update={"compute_dtype": dtype})
        model, recompute = load_for_training(
            base, params.model_copy(update={"quant": quant}), dtype
        )
        model = get_peft_model(model, lora_config(params))
        # What TRL casts QLoRA adapters to under bf16; the train stage keeps fp32 otherwise.
        trainable_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    else:
        model = load_base_model(base, dtype=dtype).to(device)
        model = get_peft_model(model, lora_config(params))
        trainable_dtype = torch.float32  # lorapipe.training keeps LoRA weights in fp32
        recompute = False
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(trainable_dtype)
    return model, recompute


def stage_variant(
    base: Path, variant: str, params: Any, device: str, dtype: str
) -> tuple[Any, bool, bool]:
    """The real model as the train stage sets it up for `variant` (`train_memory.stage_model`:
    `setup_model`, whose fused LoRA update runs where no autocast does, the stage's trainable
    dtypes, the padding-free attention), in `dtype`; QLoRA with conf/quant/nf4.yaml and `dtype`
    compute. Returns (model, recomputes activations, padding-free)."""
    from train_memory import quant_for, stage_model

    quantized = variant.startswith("qlora")
    if quantized:
        quant = quant_for("nf4").model_copy(update={"compute_dtype": dtype})
        params = params.model_copy(update={"quant": quant})
    precision = "bf16" if dtype == "bfloat16" else "fp32"
    model, recompute, packed = stage_model(params, base, precision)
    return (model if quantized else model.to(device)), recompute, packed


def run_steps(
    model: Any, inputs: dict[str, Any], *, device: str, warmup: int, steps: int, autocast: bool
) -> dict[str, Any]:
    """`warmup` untimed then `steps` timed training steps (forward, backward, AdamW) on
    `inputs`, under bf16 autocast if `autocast`: seconds, the last loss, peak CUDA memory."""
    import torch

    cuda = device.startswith("cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> float:
        kind = "cuda" if cuda else "cpu"
        with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()  # float() synchronises with the device each step
    return {
        "seconds": time.perf_counter() - t0,
        "loss": loss,
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }


def time_variant(
    model: Any, *, device: str, batch: int, seq_len: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Seconds per training step on random tokens under bf16 autocast; tokens/s and memory."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    ids = ids.to(device)
    inputs = {"input_ids": ids, "labels": ids}
    run = run_steps(model, inputs, device=device, warmup=warmup, steps=steps, autocast=True)
    seconds = run["seconds"]
    flops = train_flops(model, [seq_len] * batch) * steps
    return {
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_s": round(batch * seq_len * steps / seconds, 1),
        "model_flops_per_s": round(flops / seconds, 0),
        "loss": round(run["loss"], 4),
        "peak_cuda_mib": run["peak_cuda_mib"],
    }


def measure_real(args: argparse.Namespace, params: Any, work: Path) -> dict[str, Any]:
    """The real default model (`paths.base`) per variant: set up as the train stage sets it up,
    the pipeline's LoRA, the first `--real-batch` training examples in one padding-free row (a
    padded batch where the model's attention cannot take that), the train stage's loss (TRL's
    fused LM head; `train_memory.pipeline_loss`), in `--real-dtype` (bf16 autocast when
    bfloat16); tokens/s over the real tokens, model FLOP/s and MFU against a `torch.matmul`
    peak in that dtype measured here."""
    import torch
    from train_memory import (
        batch_tensors,
        packed_tensors,
        pipeline_loss,
        real_base,
        real_batch,
        real_examples,
    )

    from lorapipe.fused_lora import fused_layers
    from lorapipe.models import load_tokenizer

    dtype = args.real_dtype
    base, source = real_base(params, work, args.real_base)
    tokenizer = load_tokenizer(base)
    examples, where = real_examples(params, tokenizer, args.real_batch or params.train.batch_size)
    batch = real_batch(tokenizer, examples)
    cuda = args.device.startswith("cuda")
    peak = matmul_peak(
        size=8192 if cuda else 1024, dtype=getattr(torch, dtype), device=args.device, repeats=10
    )
    tokens = sum(batch["lengths"])
    supervised = sum(batch["supervised"])
    results: dict[str, Any] = {}
    compact = False
    names = {"lora-bf16": f"lora-{SHORT[dtype]}", "qlora-nf4": "qlora-nf4"}
    for variant in (names[v] for v in args.variants):
        print(f"bench: real model, {variant} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        model, recompute, packed = stage_variant(base, variant, params, args.device, dtype)
        compact = pipeline_loss(model, args.device)
        load_seconds = time.perf_counter() - t0
        tensors = (packed_tensors if packed else batch_tensors)(batch, args.device)
        inputs = {**tensors, "fused_lm_head": True}
        cast = dtype == "bfloat16"  # bf16 autocast
        run = run_steps(
            model, inputs, device=args.device, warmup=args.warmup, steps=args.steps, autocast=cast
        )
        seconds = run["seconds"]
        flops = args.steps * performed_train_flops(
            model,
            batch["lengths"],
            batch["supervised"],
            head=pipeline_head(compact, args.device),
        )
        results[variant] = {  # 4 significant digits: on a CPU these are small numbers
            "seconds_per_step": float(f"{seconds / args.steps:.4g}"),
            "tokens_per_s": float(f"{tokens * args.steps / seconds:.4g}"),
            "supervised_tokens_per_s": float(f"{supervised * args.steps / seconds:.4g}"),
            "model_flops_per_s": round(flops / seconds, 0),
            "model_flops_per_token": round(flops / (tokens * args.steps), 0),
            "mfu": float(f"{flops / seconds / peak:.4g}"),
            "loss": round(run["loss"], 4),
            "peak_cuda_mib": run["peak_cuda_mib"],
            "load_seconds": round(load_seconds, 1),
            "recomputes_activations": recompute,
            "padding_free": packed,
            # under bf16 autocast the fused layers run peft's own forward (fused_lora)
            "fused_lora_layers": 0 if cast else fused_layers(model),
        }
        del model
        if cuda:
            torch.cuda.empty_cache()
    return {
        "model": params.model.name,
        "base": source,
        "parameters": json.loads((base / "pin.json").read_text()).get("parameters"),
        "compute_dtype": dtype,
        "examples": where,
        "batch": len(examples),
        "seq_len": batch["seq_len"],
        "tokens": tokens,
        "padded_tokens": len(examples) * batch["seq_len"],
        "supervised_tokens": supervised,
        "compact_lm_head": compact,
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_peak_flops_per_s": round(peak, 0),
        "variants": results,
    }


def measure_shape(args: argparse.Namespace, params: Any) -> dict[str, Any]:
    """TinyLlama's shape (or the tiny one), random weights, per variant; the result dict."""
    import torch

    shape: dict[str, Any] = TINY if args.tiny else {}
    peak = matmul_peak(
        size=512 if args.tiny else 8192, dtype=torch.bfloat16, device=args.device, repeats=10
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        base = Path(tmp) / "base"
        model, info = build_random_base(base, dtype="bfloat16", **shape)
        del model
        for variant in args.variants:
            print(f"bench: {variant} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            model, _ = load_variant(base, variant, params, args.device)
            load_seconds = time.perf_counter() - t0
            r = time_variant(
                model,
                device=args.device,
                batch=args.batch,
                seq_len=args.seq_len,
                warmup=args.warmup,
                steps=args.steps,
            )
            r["load_seconds"] = round(load_seconds, 1)
            # 4 significant digits, not 4 decimals: the tiny model on a CPU runs at ~1e-5 of peak.
            r["mfu"] = float(f"{r['model_flops_per_s'] / peak:.4g}")
            results[variant] = r
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {
        "shape": "tiny" if args.tiny else "TinyLlama-1.1B",
        "parameters": info["parameters"],
        "batch": args.batch,
        "seq_len": args.seq_len,
        "bf16_matmul_peak_flops_per_s": round(peak, 0),
        "variants": results,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The shape's variants (top-level keys; none with `--real-only`) and the real model's
    (`real_model`; none with `--no-real` or `--tiny`). Unless `--real-only`, an error in the real
    model's part is recorded in `real_model` (with its traceback) so the shape's rows survive."""
    import torch

    from lorapipe.config import validate

    params = validate(yaml.safe_load(Path(args.params).read_text()))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if args.real_only:
        result["variants"] = {}  # benchmarks/run_all.py reads it
    else:
        result.update(measure_shape(args, params))
    if args.real:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-real-") as tmp:
            try:
                result["real_model"] = measure_real(args, params, Path(tmp))
            except Exception as exc:  # unattended: keep what was measured
                if args.real_only:
                    raise
                import traceback

                error = f"{type(exc).__name__}: {exc}"
                print(f"bench: real model failed: {error}", file=sys.stderr)
                result["real_model"] = {"error": error, "traceback": traceback.format_exc()}
    result.update(
        seconds=round(time.perf_counter() - started, 1),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    return result


def shape_markdown(result: dict[str, Any]) -> str:
    rows = [
        "| variant | tokens/s | s/step | model TFLOP/s | MFU (of bf16 matmul peak) "
        "| peak CUDA MiB | load s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in result["variants"].items():
        cuda = "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        rows.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.3f} | "
            f"{r['model_flops_per_s'] / 1e12:.3g} | {100 * r['mfu']:.1f}% | {cuda} | "
            f"{r['load_seconds']:.1f} |"
        )
    return "\n".join(
        [
            *rows,
            "",
            f"{result['shape']} shape ({result['parameters']:,} params, random weights) on "
            f"{result['device']}: batch {result['batch']} x {result['seq_len']} tokens, "
            f"{result['steps']} timed steps after {result['warmup']}; bf16 matmul peak "
            f"{result['bf16_matmul_peak_flops_per_s'] / 1e12:.1f} TFLOP/s",
        ]
    )


def real_markdown(real: dict[str, Any], device: str) -> str:
    if "error" in real:
        return f"real model: FAILED: {real['error']}"
    dtype = SHORT[real["compute_dtype"]]
    rows = [
        f"| real model | tokens/s | supervised tokens/s | s/step | model TFLOP/s | MFU (of "
        f"{dtype} matmul peak) | peak CUDA MiB | load s | recomputes activations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in real["variants"].items():
        cuda = "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:.0f}"
        rows.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['supervised_tokens_per_s']:.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['model_flops_per_s'] / 1e12:.3g} | "
            f"{100 * r['mfu']:.1f}% | {cuda} | {r['load_seconds']:.1f} | "
            f"{'yes' if r['recomputes_activations'] else 'no'} |"
        )
    head = "the supervised positions" if real["compact_lm_head"] else "every position"
    note = "" if dtype == "bf16" else " (float32 compute: bf16 matmuls on this CPU are far slower)"
    return "\n".join(
        [
            *rows,
            "",
            f"{real['model']} ({real['parameters']:,} params; base: {real['base']}) on {device}"
            f", {real['compute_dtype']}{note}; params.yaml lora; batch {real['batch']} x "
            f"{real['seq_len']} tokens at most (the first examples of {real['examples']}; "
            f"{_layout(real)}: {real['tokens']} real tokens counted, "
            f"{real['supervised_tokens']} supervised); the train stage's loss (TRL's fused LM "
            f"head over {head}); "
            f"{real['steps']} timed steps after {real['warmup']}; {dtype} matmul peak "
            f"{real['matmul_peak_flops_per_s'] / 1e12:.3g} TFLOP/s",
        ]
    )


def _layout(real: dict[str, Any]) -> str:
    """How each variant fed the batch: LoRA's fused update and the padding-free row, or not."""
    parts = []
    for name, r in real["variants"].items():
        row = "one padding-free row" if r["padding_free"] else "padded to the longest"
        fused = f"LoRA fused in {r['fused_lora_layers']} layers" if r["fused_lora_layers"] else ""
        parts.append(f"{name}: {row}{', ' + fused if fused else ''}")
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    parts = [shape_markdown(result)] if result["variants"] else []
    if "real_model" in result:
        parts.append(real_markdown(result["real_model"], result["device"]))
    parts.append(f"{result['seconds']:.0f} s in all; torch {result['torch']}")
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench_gpu.json", help="where to write results")
    parser.add_argument("--params", default="params.yaml", help="params file (LoRA config)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape instead of TinyLlama's")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-real", action="store_true", help="leave out the real model")
    which.add_argument("--real-only", action="store_true", help="only the real default model")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (8; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens each (512; tiny 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny 1)")
    parser.add_argument(
        "--real-batch", type=int, default=None, help="real model: sequences (train.batch_size)"
    )
    parser.add_argument(
        "--real-base",
        type=Path,
        default=None,
        help="real model: this base folder instead of paths.base; with a config and tokenizer "
        "but no weights (scripts/gpu_kit.sh), random weights at its shape",
    )
    parser.add_argument(
        "--real-dtype",
        choices=tuple(SHORT),
        default=None,
        help="real model: bfloat16 (default on CUDA) or float32 (default on CPU)",
    )
    args = parser.parse_args(argv)
    if args.tiny and args.real_only:
        parser.error("--tiny is the tiny shape: it does not go with --real-only")
    defaults = {"batch": (8, 2), "seq_len": (512, 32), "steps": (20, 2), "warmup": (3, 1)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be positive")
    if args.real_batch is not None and args.real_batch < 1:
        parser.error("--real-batch must be positive")
    if args.real_base is not None and not (args.real_base / "config.json").is_file():
        parser.error(f"--real-base {args.real_base} has no config.json: not a model folder")
    args.real = not (args.no_real or args.tiny)
    if args.real_dtype is None:
        args.real_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from lorapipe.io import write_json

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        message = "skipped: no CUDA device (torch.cuda.is_available() is False); "
        message += "--device cpu --tiny runs the same code on a tiny shape"
        write_json(Path(args.out), {"skipped": message})
        print(message)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args)
    publish(args.out, result, markdown(result))
    return 1 if "error" in result.get("real_model", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
