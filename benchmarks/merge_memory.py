"""Merge memory and time at TinyLlama-1.1B's real shape, on CPU, with no download.

python benchmarks/merge_memory.py                      # bf16, writes reports/bench_merge.json
python benchmarks/merge_memory.py --dtype float32 --out /tmp/bench_merge.json

Builds a Llama with TinyLlama-1.1B's published shape (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 key/value heads, vocab 32000; benchmarks/shapes.py) and random weights, saves it in
the merge dtype to a temporary folder (or to `--base-dir`, and there only if it holds none yet:
`make bench` builds one for this and benchmarks/train_memory.py) with a random LoRA adapter
(r=16 on all linear layers, B non-zero so the merge changes every targeted weight), then runs
`lorapipe.merging.merge_adapter` (the merge stage's code, float64 equivalence check included) in
a fresh process and reports its wall time and peak RSS (the whole process: Python, torch and
all, nothing subtracted) against the model's size in the merge dtype. The acceptance bound is a
peak of at most 2.5x that size.
Measured: README, "Merge, try, ship".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from output import publish  # light: no torch, this process stays small
from shapes import TINYLLAMA, random_base_at

BOUND = 2.5  # acceptance: peak RSS <= 2.5x the model's size in the merge dtype
PROBES = 2  # probe prompts for the equivalence check (each runs three float64 passes)

QUESTIONS = ["What does `sorted([3, 1, 2])` return?", "What is `len('merge')`?"]


def merge(work: Path, base: Path, dtype: str) -> dict[str, Any]:
    """The merge alone, as the stage runs it, of `base` and `work`/adapter into `work`/merged:
    timed, and this process's peak RSS read after."""
    import time

    import torch

    from lorapipe.chat import build_prompt
    from lorapipe.merging import merge_adapter
    from lorapipe.models import load_tokenizer
    from lorapipe.runtime import peak_rss_mib

    tokenizer = load_tokenizer(base)
    probes = [build_prompt(tokenizer, q) for q in QUESTIONS[:PROBES]]
    start_rss = peak_rss_mib()
    t0 = time.perf_counter()
    report = merge_adapter(
        base, work / "adapter", work / "merged", dtype=dtype, probe_prompts=probes
    )
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_imports_mib": start_rss,
        "probe_prompts": len(probes),
        "report": report,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def build(work: Path, base: Path, dtype: str, layers: int) -> dict[str, Any]:
    """The random TinyLlama-shaped base at `base` (benchmarks/shapes.py; built unless there) and
    a random r=16 all-linear adapter saved to `work`/adapter; returns the base's parameter count
    and size in `dtype`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from shapes import random_base_in

    from lorapipe.models import load_base_model

    model, info = random_base_in(base, dtype=dtype, layers=layers)
    if model is None:  # built before (make bench: by train_memory.py)
        model = load_base_model(base, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)  # the same adapter whether the base was built here or before
    get_peft_model(model, lora).save_pretrained(str(work / "adapter"))
    return info


def markdown(result: dict[str, Any]) -> str:
    r = result
    return "\n".join(
        [
            "| model | merge dtype | size in dtype (MiB) | peak RSS (MiB) | ratio | bound | "
            "seconds | logit diff (allowed) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
            f"| TinyLlama-1.1B shape, {r['layers']} layers, {r['parameters']:,} params | "
            f"{r['dtype']} | {r['model_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['ratio']:.2f} | "
            f"{BOUND} | {r['seconds']:.1f} | {r['merged_max_abs_logit_diff']:.3g} "
            f"({r['max_logit_diff_allowed']:.3g}) |",
            "",
            f"peak RSS is the merge subprocess's whole peak ({r['rss_after_imports_mib']:.0f} MiB "
            f"of it already after importing torch and lorapipe); {r['threads']} torch threads, "
            f"torch {r['torch']}; {'PASS' if r['within_bound'] else 'FAIL'}: "
            f"{r['ratio']:.2f} {'<=' if r['within_bound'] else '>'} {BOUND}",
        ]
    )


def run_child(*args: str) -> dict[str, Any]:
    """Run `build` or `merge` in a fresh interpreter and return what it prints as JSON.

    Each runs alone because Linux carries a parent's peak RSS into a child's `ru_maxrss`
    across fork/exec: had this process built the 1.1B model, the merge's peak would read as at
    least that. So this process never imports torch, and the model is built in a process of
    its own.
    """
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: error: {args[0]} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        step, work, base, dtype, *rest = sys.argv[2:]
        if step == "build":
            print(json.dumps(build(Path(work), Path(base), dtype, int(rest[0]))))
        else:
            print(json.dumps(merge(Path(work), Path(base), dtype)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="reports/bench_merge.json", help="where to write results")
    parser.add_argument(
        "--layers", type=int, default=TINYLLAMA["num_hidden_layers"], help="fewer for a dry run"
    )
    parser.add_argument(
        "--base-dir",
        help="the random base in this folder, built there if it has none (make bench shares one "
        "with train_memory.py)",
    )
    args = parser.parse_args(argv)
    if args.base_dir:
        try:
            random_base_at(Path(args.base_dir), dtype=args.dtype, layers=args.layers)
        except FileExistsError as exc:
            parser.error(f"--base-dir: {exc}")

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        base = args.base_dir or str(Path(tmp) / "base")
        built = run_child("build", tmp, base, args.dtype, str(args.layers))
        child = run_child("merge", tmp, base, args.dtype)
    model_mib = built["model_bytes"] / 2**20
    result: dict[str, Any] = {
        "shape": {**TINYLLAMA, "num_hidden_layers": args.layers},
        "layers": args.layers,
        "parameters": built["parameters"],
        "dtype": args.dtype,
        "model_mib": round(model_mib, 1),
        "peak_rss_mib": round(child["peak_rss_mib"], 1),
        "rss_after_imports_mib": round(child["rss_after_imports_mib"], 1),
        "ratio": round(child["peak_rss_mib"] / model_mib, 3),
        "bound": BOUND,
        "within_bound": child["peak_rss_mib"] <= BOUND * model_mib,
        "seconds": round(child["seconds"], 1),
        "probe_prompts": child["probe_prompts"],
        **{
            k: child["report"][k]
            for k in (
                "merged_max_abs_logit_diff",
                "max_logit_diff_allowed",
                "adapter_max_abs_logit_effect",
                "max_abs_logit",
            )
        },
        "shards": len(child["report"]["files"]),
        "threads": child["threads"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": child["torch"],
        "python": platform.python_version(),
    }
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
