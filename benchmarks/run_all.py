"""`make bench`: every benchmark, one after the other, then one table of the targets.

python benchmarks/run_all.py [--only eval,overhead] [--out reports/bench.json]

Each benchmark runs as its own process (so each peak-memory figure is its own, and one that
fails does not stop the rest) and writes its JSON; this driver gathers them into
`reports/bench.json` (every figure) and `reports/bench.md` (the targets table, then each
benchmark's own table). Every comparison inside a benchmark runs both sides in that one
process, so machine noise cancels in the ratio. Nothing here is a test: no target failing
makes this exit non-zero; a benchmark that crashes does (exit 1), after the others ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.io import write_json

HERE = Path(__file__).resolve().parent

Row = tuple[str, str, str, bool | None]  # target, measured, wanted, holds


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    args: tuple[str, ...]
    targets: Callable[[dict[str, Any]], list[Row]]


def _eval_targets(r: dict[str, Any]) -> list[Row]:
    base, adapter = r["models"]["base"], r["models"]["adapter"]
    return [
        (
            "evaluation, base: batched greedy vs one prompt at a time, sampled",
            f"{base['speedup']:.1f}x ({base['tutorial']['seconds_per_prompt']:.2f} s vs "
            f"{base['pipeline']['seconds_per_prompt']:.3f} s a prompt; batched on "
            f"{base['pipeline']['examples']} prompts, one at a time on "
            f"{base['tutorial']['examples']} of them)",
            ">= 10x",
            bool(r["holds"]["base_speedup"]),
        ),
        (
            "evaluation, adapter: batched greedy FLOP/s / measured fp32 matmul peak",
            f"{100 * adapter['stage']['matmul_peak_fraction']:.1f}% of "
            f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s over all "
            f"{adapter['stage']['examples']} test prompts (batched {adapter['speedup']:.1f}x "
            f"one at a time, per prompt)",
            ">= 50%",
            bool(r["holds"]["adapter_peak_fraction"]),
        ),
    ]


# What an eval-only params change may re-run: `check` validates params.yaml after any change
# (dvc.yaml), then `evaluate`; the check stage came after the first overhead benchmark.
EVAL_CHANGE_RUNS = ["check", "evaluate"]


def _overhead_targets(r: dict[str, Any]) -> list[Row]:
    noop, ev = r["noop_repro"], r["eval_only_change"]
    return [
        (
            "no-op `dvc repro`",
            f"{noop['seconds']:.2f} s, stages run: {', '.join(noop['stages_ran']) or 'none'}",
            "<= 10 s, none run",
            noop["seconds"] <= 10 and not noop["stages_ran"],
        ),
        (
            f"`dvc repro` after `{ev['change']}`",
            f"{ev['seconds']:.1f} s, stages run: {', '.join(ev['stages_ran']) or 'none'}",
            "evaluate only (after `check`)",
            sorted(ev["stages_ran"]) == EVAL_CHANGE_RUNS,
        ),
    ]


def _merge_targets(r: dict[str, Any]) -> list[Row]:
    return [
        (
            f"merge of a TinyLlama-shaped model ({r['dtype']}): peak RSS / model size",
            f"{r['ratio']:.2f}x ({r['peak_rss_mib']:.0f} of {r['model_mib']:.0f} MiB, "
            f"{r['seconds']:.0f} s; logit diff {r['merged_max_abs_logit_diff']:.3g} "
            f"<= {r['max_logit_diff_allowed']:.3g})",
            f"<= {r['bound']}x",
            bool(r["within_bound"]),
        )
    ]


def _train_targets(r: dict[str, Any]) -> list[Row]:
    s, holds = r["sides"], r["holds"]
    recipe, pipeline, steps = s["recipe"], s["pipeline"], s["pipeline steps"]
    return [
        (
            "training: seconds to the tutorial recipe's final val loss, recipe / pipeline",
            f"{r['time_to_loss_ratio']:.2f}x ({recipe['seconds']:.0f} s vs "
            f"{pipeline['seconds']:.1f} s to val loss {recipe['val_loss']:.4f}; mean of "
            f"{r['rounds']} ABBA rounds)",
            ">= 3x",
            bool(holds["time_to_loss"]),
        ),
        (
            "training step: FLOPs performed per second / measured fp32 matmul peak",
            f"the pipeline's step {100 * steps['matmul_peak_fraction']:.1f}%, plain loop "
            f"{100 * s['plain loop']['matmul_peak_fraction']:.1f}%, recipe "
            f"{100 * recipe['matmul_peak_fraction']:.1f}% of "
            f"{r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s (the pipeline step's matrix "
            f"products run alone: {100 * r['products_alone']['matmul_peak_fraction']:.1f}%)",
            ">= 60%",
            bool(holds["matmul_peak_fraction"]),
        ),
        (
            "training: all-token throughput, pipeline / plain PyTorch loop",
            f"{r['plain_loop_ratio']:.2f}x ({steps['tokens_per_s']:.0f} vs "
            f"{s['plain loop']['tokens_per_s']:.0f} tokens/s; each alone, "
            f"{steps['optimizer_steps']} steps in a fresh process)",
            ">= 1.2x",
            bool(holds["plain_loop"]),
        ),
    ]


def _memory_targets(r: dict[str, Any]) -> list[Row]:
    v = r["variants"]
    return [
        (
            "TinyLlama-shaped LoRA step (seq 256, batch 1): NF4 peak RSS / fp32 peak RSS",
            f"{100 * r['ratio']:.1f}% ({v['nf4']['peak_rss_mib']:.0f} / "
            f"{v['fp32']['peak_rss_mib']:.0f} MiB; anonymous memory {100 * r['anon_ratio']:.1f}%)",
            f"<= {100 * r['bound']:.0f}%",
            bool(r["within_bound"]),
        ),
        *_real_memory_rows(r.get("real_model")),
    ]


def _real_memory_rows(real: dict[str, Any] | None) -> list[Row]:
    if not real or "variants" not in real:
        return []
    v = real["variants"]
    return [
        (
            f"{real['model']} training step (batch {real['batch']}, {real['tokens']} tokens"
            f"{' in one row' if v['lora-fp32'].get('padding_free') else ''}): "
            "peak RSS, LoRA fp32 / QLoRA nf4",
            f"{v['lora-fp32']['peak_rss_mib']:.0f} / {v['qlora-nf4']['peak_rss_mib']:.0f} MiB "
            f"({100 * real['ratio']:.1f}%)",
            "(reported)",
            None,
        )
    ]


def _gpu_targets(r: dict[str, Any]) -> list[Row]:
    if "skipped" in r:
        return [("GPU: LoRA bf16 / QLoRA tokens/s and MFU", r["skipped"], "(reported)", None)]
    return [
        (
            f"GPU {name}: tokens/s, MFU",
            f"{v['tokens_per_s']:.0f} tokens/s, MFU {100 * v['mfu']:.1f}%",
            "(reported)",
            None,
        )
        for name, v in {
            **r["variants"],
            **{
                f"{k} (default model)": x
                for k, x in r.get("real_model", {}).get("variants", {}).items()
            },
        }.items()
    ]


BENCHES = [
    Bench("train", "train_speed.py", (), _train_targets),
    Bench("eval", "eval_speed.py", (), _eval_targets),
    Bench("overhead", "overhead.py", (), _overhead_targets),
    # One random TinyLlama-shaped base for both (built by the first, ~20 s; {tmp}: this run's
    # temporary folder).
    Bench("memory", "train_memory.py", ("--base-dir", "{tmp}/tinyllama"), _memory_targets),
    Bench("merge", "merge_memory.py", ("--base-dir", "{tmp}/tinyllama"), _merge_targets),
    Bench("gpu", "gpu_train.py", (), _gpu_targets),
]


def _markdown(results: dict[str, Any], tables: dict[str, str], rows: list[Row]) -> str:
    mark = {True: "yes", False: "**no**", None: "n/a"}
    out = [
        "# Benchmarks (`make bench`)",
        "",
        f"{results['machine']['cpu_count']} CPUs, torch threads {results['machine']['threads']}, "
        f"python {results['machine']['python']}; {results['total_seconds']:.0f} s in all.",
        "",
        "| target | measured | wanted | holds |",
        "| --- | --- | --- | --- |",
        *(f"| {t} | {m} | {w} | {mark[h]} |" for t, m, w, h in rows),
    ]
    for name, table in tables.items():
        out += ["", f"## {name}", "", table.strip()]
    for name, error in results["failed"].items():
        out += ["", f"## {name}: failed", "", "```", error.strip()[-2000:], "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench.json", help="all figures (JSON)")
    parser.add_argument("--md", default="reports/bench.md", help="the tables (Markdown)")
    parser.add_argument(
        "--only", default="", help="comma-separated names: " + ", ".join(b.name for b in BENCHES)
    )
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]

    import torch

    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "benchmarks": {},
        "failed": {},
    }
    tables: dict[str, str] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for bench in chosen:
            out = Path(tmp) / f"{bench.name}.json"
            print(f"bench: {bench.name} ...", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    str(HERE / bench.script),
                    *(a.replace("{tmp}", tmp) for a in bench.args),
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - t0
            if done.returncode != 0 or not out.is_file():
                results["failed"][bench.name] = done.stderr or done.stdout
                print(f"bench: {bench.name} failed (exit {done.returncode})", file=sys.stderr)
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            result = json.loads(out.read_text(encoding="utf-8"))
            result["bench_seconds"] = round(seconds, 1)
            results["benchmarks"][bench.name] = result
            tables[bench.name] = done.stdout.split("written to")[0]
            rows += bench.targets(result)
            print(done.stdout, flush=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = [
        {"target": t, "measured": m, "wanted": w, "holds": h} for t, m, w, h in rows
    ]
    write_json(Path(args.out), results)
    md = _markdown(results, tables, rows)
    Path(args.md).write_text(md, encoding="utf-8")
    print(md)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
