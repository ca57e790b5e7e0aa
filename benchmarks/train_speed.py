"""Training throughput and efficiency: the pipeline's settings vs the seed tutorial's recipe.

python benchmarks/train_speed.py                    # writes reports/bench_train.json
python benchmarks/train_speed.py --examples 600 --out /tmp/t.json    # a quicker subset
python benchmarks/train_speed.py --sweep 4,1 8,1 16,1 32,1          # candidate settings too

Both sides train the same LoRA adapter (params.yaml `lora`) on the same base (`paths.base`) and
the same examples (`paths.formatted`/train.jsonl, the first `--examples` of it or all) for one
epoch (`--epochs`), through the pipeline's own `lorapipe.training.train_adapter` (TRL's
SFTTrainer with `completion_only_loss` on prompt/completion data, TRL's collator padding each
batch to its longest example: today's equivalent of the seed tutorial's
DataCollatorForCompletionOnlyLM), one after the other in this process. They differ only in the
training settings:

- tutorial recipe (`article` in the code): per-device batch 2, gradient accumulation 4,
  warm-up ratio 0.1, cosine schedule;
- pipeline: `train.*` from params.yaml (batch, accumulation, warm-up, schedule);

and both use `train.learning_rate`. The seed tutorial's 2e-4 is for a pretrained 1.1B model; the
default base here is a random 4-layer model, for which the pipeline's rate is already that
recipe scaled up (README: 2e-4 again for a real model), so one rate keeps the comparison about
the settings. Equal work: the same examples, one epoch each.

Measured: seconds of the training loop (`train_seconds`: trainer.train(), no in-loop
evaluation), supervised (completion) tokens per second, then the completion-only loss on the
whole validation split with `lorapipe.evaluation.completion_loss` (the evaluate stage's), the
same function for both. Efficiency: model FLOPs of the run (benchmarks/flops.py: per sequence
l * (4F + 6R) + 12 * layers * d * l^2 over the real tokens) per second, as a fraction of the
fp32 `torch.matmul` peak measured here with the same threads.
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
from transformers import TrainerCallback

# The seed tutorial's TrainingArguments (seed tutorial, "Training with SFTTrainer").
ARTICLE = {"batch_size": 2, "grad_accum": 4, "warmup_ratio": 0.1, "lr_scheduler": "cosine"}
VAL_LOSS_TOLERANCE = 1e-3  # relative: "equal" validation loss (see measure)


def bench_params(raw: dict[str, Any], work: Path, epochs: float = 1, **train: Any) -> Any:
    """Validated params for one benchmark run: `epochs`, no checkpoints, `train` overrides."""
    from lorapipe.config import validate

    changed = {
        **raw,
        "train": {
            **raw["train"],
            "epochs": epochs,
            "max_steps": -1,
            "save_strategy": "no",
            "resume": False,
            "early_stopping_patience": None,
            "logging_steps": 10_000,
            **train,
        },
        "paths": {**raw["paths"], "checkpoints": str(work / "checkpoints")},
    }
    return validate(changed)


def encoded_lengths(tokenizer: Any, examples: list[dict[str, Any]]) -> tuple[list[int], int]:
    """Token length of each example (prompt + completion) and the supervised tokens of all,
    counted the way TRL masks them."""
    from lorapipe.formatting import mask_audit

    audits = [mask_audit(ex, tokenizer, max_length=10**9) for ex in examples]
    return [a["total_tokens"] for a in audits], sum(a["supervised_tokens"] for a in audits)


class CpuClock(TrainerCallback):
    """CPU seconds of this process (all its threads) inside trainer.train(): unlike wall time,
    barely moved by other processes competing for the cores."""

    def __init__(self) -> None:
        self.started = self.seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.process_time()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.process_time() - self.started


def run_side(
    name: str,
    params: Any,
    base: Path,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    work: Path,
) -> dict[str, Any]:
    """Train one side with the pipeline's trainer; its timings and validation loss."""
    import torch
    from peft import PeftModel

    from lorapipe.evaluation import completion_loss
    from lorapipe.io import write_jsonl
    from lorapipe.models import load_base_model, load_tokenizer
    from lorapipe.training import train_adapter

    data = work / name / "formatted"
    data.mkdir(parents=True)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", [])  # no evaluation inside the timed loop
    clock = CpuClock()
    summary = train_adapter(
        params, base, data, work / name / "adapter", work / name / "curves", callbacks=[clock]
    )
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_base_model(base), str(work / name / "adapter"))
    with torch.no_grad():
        val_loss = completion_loss(model, tokenizer, val, batch_size=64)
    cfg = params.train
    return {
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "effective_batch": cfg.batch_size * cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "warmup_ratio": cfg.warmup_ratio,
        "lr_scheduler": cfg.lr_scheduler,
        "optimizer_steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": round(clock.seconds, 1),
        "wall_seconds": summary["wall_seconds"],
        "train_loss": summary["train_loss"],
        "val_loss": round(val_loss, 6),
    }


def combine(side_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's repeated runs as one: mean seconds, each run's seconds beside; the same
    validation loss every time (training is deterministic), else the worst of them."""
    first = side_runs[0]
    seconds = [r["train_seconds"] for r in side_runs]
    losses = [r["val_loss"] for r in side_runs]
    return {
        **first,
        "train_seconds": round(sum(seconds) / len(seconds), 2),
        "train_cpu_seconds": round(
            sum(r["train_cpu_seconds"] for r in side_runs) / len(seconds), 1
        ),
        "runs_seconds": seconds,
        "val_loss": max(losses),
        "runs_val_loss": losses,
    }


def measure(
    params_file: Path,
    *,
    examples: int | None,
    sweep: list[tuple[int, int]],
    epochs: float = 1,
    rounds: int = 2,
) -> dict[str, Any]:
    """Run the seed tutorial's recipe and the pipeline's settings `rounds` times each, then each
    `sweep` (batch, accumulation) once, on the same data; the result dict."""
    import torch
    from peft import get_peft_model

    from lorapipe.io import read_jsonl
    from lorapipe.models import load_base_model, load_tokenizer
    from lorapipe.training import lora_config

    raw = yaml.safe_load(params_file.read_text())
    base = Path(raw["paths"]["base"])
    formatted = Path(raw["paths"]["formatted"])
    for path in (base / "config.json", formatted / "train.jsonl", formatted / "val.jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"needs {path}: run `make repro` (or dvc repro format)")
    train = read_jsonl(formatted / "train.jsonl")
    total = len(train)
    train = train[:examples] if examples else train
    val = read_jsonl(formatted / "val.jsonl")
    tokenizer = load_tokenizer(base)
    lengths, supervised = encoded_lengths(tokenizer, train)
    load_before = os.getloadavg()
    peak = matmul_peak()  # again after the runs; the better of the two is the reference

    settings: dict[str, dict[str, Any]] = {"article": ARTICLE, "pipeline": {}}
    settings.update({f"batch {b} x {a}": {"batch_size": b, "grad_accum": a} for b, a in sweep})
    # Rounds in ABBA order (article, pipeline, pipeline, article, ...): a machine that speeds up
    # or slows down during the benchmark weighs on both sides alike. The sweep runs once.
    pair = ("article", "pipeline")
    order = [name for r in range(rounds) for name in (pair if r % 2 == 0 else pair[::-1])]
    order += [name for name in settings if name not in ("article", "pipeline")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        for i, name in enumerate(order):
            print(f"bench: training {name} ...", file=sys.stderr, flush=True)
            folder = f"{i}_{name.replace(' ', '_')}"
            params = bench_params(raw, work / folder, epochs, **settings[name])
            runs[name].append(run_side(folder, params, base, train, val, work))
        # FLOPs: the pipeline's LoRA model, counted once (same adapters on both sides).
        params = bench_params(raw, work)
        model = get_peft_model(load_base_model(base), lora_config(params))
        flops = train_flops(model, lengths) * epochs
    peak = max(peak, matmul_peak())
    sides = {name: combine(side_runs) for name, side_runs in runs.items()}
    for side in sides.values():
        side["supervised_tokens_per_s"] = round(supervised * epochs / side["train_seconds"], 1)
        side["examples_per_s"] = round(len(train) * epochs / side["train_seconds"], 2)
        side["model_flops_per_s"] = round(flops / side["train_seconds"], 0)
        side["matmul_peak_fraction"] = round(flops / side["train_seconds"] / peak, 4)
    article, pipeline = sides["article"], sides["pipeline"]
    speedup = article["train_seconds"] / pipeline["train_seconds"]
    # "Equal" validation loss: the pipeline's micro-batch of 8 and the seed tutorial's 4 accumulated
    # batches of 2 take the same optimizer steps, and differ only in float summation order.
    equal_loss = pipeline["val_loss"] <= article["val_loss"] * (1 + VAL_LOSS_TOLERANCE)
    return {
        "rounds": rounds,
        "examples": len(train),
        "examples_total": total,
        "subset": len(train) < total,
        "epochs": epochs,
        "val_examples": len(val),
        "supervised_tokens": supervised,  # per epoch
        "tokens": sum(lengths),  # per epoch
        "train_flops": flops,
        "matmul_peak_flops_per_s": round(peak, 0),
        "sides": sides,
        "speedup": round(speedup, 3),
        "val_loss_delta": round(pipeline["val_loss"] - article["val_loss"], 6),
        "target_speedup": 2.0,
        "val_loss_tolerance": VAL_LOSS_TOLERANCE,
        "holds": speedup >= 2.0 and equal_loss,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| settings | micro-batch x accumulation | lr | warm-up | optimizer steps | train s "
        "| CPU s | supervised tokens/s | vs tutorial | val loss | model GFLOP/s | of matmul peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    article = result["sides"]["article"]["train_seconds"]
    for name, s in result["sides"].items():
        each = f" ({', '.join(f'{x:.1f}' for x in s['runs_seconds'])})"
        each = each if len(s["runs_seconds"]) > 1 else ""
        rows.append(
            f"| {name} | {s['batch_size']} x {s['grad_accum']} | {s['learning_rate']:g} | "
            f"{s['warmup_ratio']:g} | {s['optimizer_steps']} | {s['train_seconds']:.1f}{each} | "
            f"{s['train_cpu_seconds']:.1f} | "
            f"{s['supervised_tokens_per_s']:.1f} | {article / s['train_seconds']:.2f}x | "
            f"{s['val_loss']:.4f} | {s['model_flops_per_s'] / 1e9:.1f} | "
            f"{100 * s['matmul_peak_fraction']:.1f}% |"
        )
    subset = (
        f"the first {result['examples']} of {result['examples_total']} training examples"
        if result["subset"]
        else f"all {result['examples']} training examples"
    )
    verdict = "PASS" if result["holds"] else "FAIL"
    return "\n".join(
        [
            *rows,
            "",
            f"Article and pipeline trained {result['rounds']} times each in ABBA order (train s: "
            f"the mean, each run's in brackets); "
            f"{result['epochs']:g} epoch(s) over {subset} ({result['supervised_tokens']:,} "
            f"supervised of {result['tokens']:,} tokens an epoch) per row, val loss on "
            f"{result['val_examples']} validation examples; fp32 matmul peak "
            f"{result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; {result['threads']} torch "
            f"threads, load average {result['loadavg_before'][0]:.2f} before, "
            f"{result['loadavg_after'][0]:.2f} after; torch {result['torch']}. {verdict}: "
            f"pipeline {result['speedup']:.2f}x the seed tutorial's tokens/s (target 2x), val loss "
            f"{result['val_loss_delta']:+.6f} vs the seed tutorial's (equal: within "
            f"{100 * result['val_loss_tolerance']:g}%)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--out", default="reports/bench_train.json", help="where to write results")
    parser.add_argument("--examples", type=int, default=None, help="train on the first N only")
    parser.add_argument("--epochs", type=float, default=1, help="epochs for every side (1)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="tutorial-recipe/pipeline runs each, ABBA order (2)"
    )
    parser.add_argument(
        "--sweep",
        nargs="*",
        default=[],
        metavar="BATCH,ACCUM",
        help="also time these micro-batch,accumulation settings (with the pipeline's others)",
    )
    args = parser.parse_args(argv)
    sweep = [tuple(int(x) for x in item.split(",")) for item in args.sweep]
    if any(len(s) != 2 or min(s) < 1 for s in sweep):
        parser.error("--sweep takes BATCH,ACCUM pairs of positive integers, e.g. 8,1 16,1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    pairs = [(b, a) for b, a in sweep]
    try:
        result = measure(
            Path(args.params),
            examples=args.examples,
            sweep=pairs,
            epochs=args.epochs,
            rounds=args.rounds,
        )
    except FileNotFoundError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"bench: train speed took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sys.exit(code)
