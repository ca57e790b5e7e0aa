"""GPU training throughput and model FLOP utilisation at TinyLlama-1.1B's shape: LoRA in bf16
and QLoRA (NF4, bf16 compute).

python benchmarks/gpu_train.py                        # on a CUDA machine, under 8 minutes
python benchmarks/gpu_train.py --device cpu --tiny    # the same code on a tiny shape, on CPU

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
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from flops import matmul_peak, train_flops
from output import publish
from shapes import build_random_base

VARIANTS = ("lora-bf16", "qlora-nf4")
# --tiny: a shape that runs in seconds on a CPU, for checking the code path.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def load_variant(base: Path, variant: str, params: Any, device: str) -> Any:
    """The base loaded as the pipeline's train stage loads it for `variant`, with LoRA."""
    import torch
    from peft import get_peft_model

    from lorapipe.config import QuantCfg
    from lorapipe.models import load_base_model
    from lorapipe.training import load_for_training, lora_config

    if variant == "qlora-nf4":
        quant = QuantCfg(mode="nf4", compute_dtype="bfloat16", double_quant=True)
        model, _ = load_for_training(base, params.model_copy(update={"quant": quant}), "bfloat16")
        model = get_peft_model(model, lora_config(params))
        trainable_dtype = torch.bfloat16  # what TRL casts QLoRA adapters to under bf16
    else:
        model = load_base_model(base, dtype="bfloat16").to(device)
        model = get_peft_model(model, lora_config(params))
        trainable_dtype = torch.float32  # lorapipe.training keeps LoRA weights in fp32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(trainable_dtype)
    return model


def time_variant(
    model: Any, *, device: str, batch: int, seq_len: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Seconds per training step on random tokens under bf16 autocast; tokens/s and memory."""
    import torch

    cuda = device.startswith("cuda")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
    ids = ids.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> float:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
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
    seconds = time.perf_counter() - t0
    flops = train_flops(model, [seq_len] * batch) * steps
    return {
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_s": round(batch * seq_len * steps / seconds, 1),
        "model_flops_per_s": round(flops / seconds, 0),
        "loss": round(loss, 4),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lorapipe.config import validate

    params = validate(yaml.safe_load(Path(args.params).read_text()))
    shape = TINY if args.tiny else {}
    started = time.perf_counter()
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
            model = load_variant(base, variant, params, args.device)
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
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "shape": "tiny" if args.tiny else "TinyLlama-1.1B",
        "parameters": info["parameters"],
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "bf16_matmul_peak_flops_per_s": round(peak, 0),
        "variants": results,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
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
            f"{result['bf16_matmul_peak_flops_per_s'] / 1e12:.1f} TFLOP/s; "
            f"{result['seconds']:.0f} s in all; torch {result['torch']}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench_gpu.json", help="where to write results")
    parser.add_argument("--params", default="params.yaml", help="params file (LoRA config)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape instead of TinyLlama's")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (8; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens each (512; tiny 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; tiny 1)")
    args = parser.parse_args(argv)
    defaults = {"batch": (8, 2), "seq_len": (512, 32), "steps": (20, 2), "warmup": (3, 1)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
        if getattr(args, key) < (0 if key == "warmup" else 1):
            parser.error(f"--{key.replace('_', '-')} must be positive")
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
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
