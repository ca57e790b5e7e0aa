"""Evaluation speed: a tutorial's one-prompt-at-a-time sampling vs the pipeline's batched greedy.

make bench                                   # runs this: the first 128 test prompts
python benchmarks/eval_speed.py --limit 16 --out /tmp/bench_eval.json

Both ways run in this one process on the test split (`<paths.formatted>/test.jsonl`), first with
the base model (`<paths.base>`), then with the trained adapter on it (`<paths.adapter>`): the
`evaluate` stage generates with both (base before training, adapter after), so both are timed
and reported apart. At most `eval.max_new_tokens` new tokens for both ways (the tutorial's own
default is 200):
(a) the tutorial's way, one prompt at a time with `do_sample=True, temperature=0.7`, on every
    `--tutorial-every`-th prompt of them (default 6: a sixth; each prompt's cost is its own, so
    the seconds per prompt are compared, their spread reported beside);
(b) the pipeline's way, `lorapipe.generation.generate_with_stops` (the evaluate stage's), greedy
    in batches of `eval.batch_size`, the adapter folded into the weights as the stage does
    (`lorapipe.evaluation.adapter_folded`); for the adapter also unfolded, that lever alone.
Both stop at the tokenizer's EOS and are decoded the same way, then scored for exact match.
The base model answers at length (it explains first), so one-at-a-time decoding pays its per-step
cost for every token of every prompt, which batching shares: its target is the speed-up (>= 10x).
The adapter answers in a few tokens, so its batched evaluation is mostly the prompts' forward pass:
its target is efficiency, the FLOPs of (b) over all the test prompts, as the stage runs it
(benchmarks/flops.py `batched_generation_flops`, counted over real tokens, each batch's shared
prompt beginning once; the new tokens are the answer re-tokenised, plus EOS where it stopped) per
second, the median of `STAGE_RUNS` runs, against the fp32 matmul peak measured in this run
(>= 50%), the one-at-a-time ratio beside. `--limit N` times both on the first N prompts (0:
all).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from flops import batched_generation_flops, matmul_peak
from output import publish

from lorapipe.errors import PipelineError
from lorapipe.evaluation import adapter_folded
from lorapipe.generation import generate_with_stops
from lorapipe.io import read_jsonl
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.scoring import score

MODELS = ("base", "adapter")
TARGET_BASE_SPEEDUP = 10.0
TARGET_ADAPTER_PEAK_FRACTION = 0.5
STAGE_RUNS = 3  # the adapter's stage generation is timed this many times; the median counts


@torch.no_grad()
def article_generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float
) -> tuple[list[str], list[float]]:
    """One prompt at a time, sampled at `temperature`, as the common LoRA tutorial evaluates:
    the answers and each prompt's seconds."""
    outputs, seconds = [], []
    model.eval()
    for prompt in prompts:
        started = time.perf_counter()
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = generated[0, enc["input_ids"].shape[1] :]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        seconds.append(time.perf_counter() - started)
    return outputs, seconds


def exact_match(predictions: list[str], references: list[str]) -> float:
    aggregate, _ = score(predictions, references)
    return aggregate["exact_match"]


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| model | way | how | prompts | seconds | examples/s | exact match | GFLOP/s | of matmul "
        "peak |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in MODELS:
        r = result["models"][name]
        for way, how in (
            ("tutorial", f"one at a time, sampled (T={result['temperature']})"),
            ("pipeline", f"batched greedy (batch {result['batch_size']})"),
        ):
            w = r[way]
            flops = (
                f"{w['flops_per_s'] / 1e9:.1f} | {100 * w['matmul_peak_fraction']:.1f}%"
                if "flops_per_s" in w
                else " | "
            )
            rows.append(
                f"| {name} | {way} | {how} | {w['examples']} | {w['seconds']:.2f} | "
                f"{w['examples_per_s']:.2f} | {w['exact_match']:.3f} | {flops} |"
            )
        rows.append(f"| {name} | speed-up, examples/s | | | {r['speedup']:.1f}x | | | | |")
    subset = (
        f"first {result['examples']} of {result['examples_total']} test prompts"
        if result["subset"]
        else f"all {result['examples']} test prompts"
    )
    base, adapter = result["models"]["base"], result["models"]["adapter"]
    st = adapter["stage"]
    rows.append(
        f"| adapter | stage: all {st['examples']} test prompts | batched greedy, folded, median "
        f"of {', '.join(f'{t:.2f}' for t in st['runs_seconds'])} s (unfolded: "
        f"{st['unfolded_seconds']:.2f} s, same answers {st['same_answers_unfolded']}"
        f"/{st['examples']}) | {st['examples']} | {st['seconds']:.2f} | "
        f"{st['examples'] / st['seconds']:.2f} | {st['exact_match']:.3f} | "
        f"{st['flops_per_s'] / 1e9:.1f} | {100 * st['matmul_peak_fraction']:.1f}% |"
    )
    verdict = {True: "holds", False: "does not hold"}
    holds = result["holds"]
    return "\n".join(
        [
            *rows,
            "",
            f"{subset}, {_sample(result)} "
            f"(each prompt's cost is its own, so examples/s are compared; the relative standard "
            f"error of their one-at-a-time mean: base {_error(base)}, adapter {_error(adapter)})"
            f"; max_new_tokens {result['max_new_tokens']}; fp32 matmul peak "
            f"{result['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s; {result['threads']} torch "
            f"threads, torch {result['torch']}, {result['device']}. Base: batched "
            f"{base['speedup']:.1f}x faster than one at a time (target "
            f"{TARGET_BASE_SPEEDUP:g}x: {verdict[holds['base_speedup']]}). Adapter: batched "
            f"greedy over all {st['examples']} prompts at "
            f"{100 * st['matmul_peak_fraction']:.1f}% of the matmul peak (target "
            f"{100 * TARGET_ADAPTER_PEAK_FRACTION:g}%: "
            f"{verdict[holds['adapter_peak_fraction']]}), {adapter['speedup']:.1f}x one at a time.",
        ]
    )


def _sample(result: dict[str, Any]) -> str:
    every, n = result["tutorial_every"], result["models"]["base"]["tutorial"]["examples"]
    if every == 1:
        return "one at a time on all of them"
    nth = {2: "second", 3: "third", 4: "fourth", 6: "sixth"}.get(every, f"{every}th")
    return f"one at a time on every {nth} of them ({n})"


def _error(model: dict[str, Any]) -> str:
    error = model["tutorial"]["relative_standard_error"]
    return "n/a" if error is None else f"{100 * error:.1f}%"


def _time(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def new_token_counts(tokenizer: Any, outputs: list[str], stopped: list[bool]) -> list[int]:
    """Tokens each answer took: the decoded answer re-tokenised, plus EOS where it stopped."""
    return [
        len(tokenizer(text, add_special_tokens=False)["input_ids"]) + int(end)
        for text, end in zip(outputs, stopped, strict=True)
    ]


def run(
    params_path: Path = Path("params.yaml"),
    *,
    limit: int | None = None,
    temperature: float = 0.7,
    seed: int = 0,
    tutorial_every: int = 6,
) -> dict[str, Any]:
    """Time both ways on the test split for the base model, then for base + adapter.

    The pipeline's evaluation generates for both models (base before training, adapter after),
    so both are timed, each way on the same loaded weights. Raises PipelineError when the
    pipeline's outputs are missing.
    """
    from peft import PeftModel

    params = yaml.safe_load(Path(params_path).read_text())
    paths, ev = params["paths"], params["eval"]
    test = Path(paths["formatted"]) / "test.jsonl"
    if not test.is_file() or not (Path(paths["adapter"]) / "adapter_config.json").is_file():
        raise PipelineError(f"needs {test} and a trained {paths['adapter']}: run `make repro`")
    examples = read_jsonl(test)
    if ev.get("max_examples") is not None:
        examples = examples[: ev["max_examples"]]
    total, every = len(examples), examples
    if limit is not None:
        examples = examples[:limit]
    prompts = [ex["prompt"] for ex in examples]
    references = [ex["reference"] for ex in examples]
    max_new, batch = int(ev["max_new_tokens"]), int(ev["batch_size"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak(device=device)

    base_dir = Path(paths["base"])
    tokenizer = load_tokenizer(base_dir)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    base = load_base_model(base_dir, dtype="float32").to(device).eval()
    models: dict[str, Any] = {}

    def stage_generate(
        model: Any, name: str, texts: list[str] = prompts
    ) -> tuple[list[str], list[bool]]:
        """As the evaluate stage generates: the adapter folded into the weights."""
        with adapter_folded(model) if name == "adapter" else nullcontext(model) as m:
            return generate_with_stops(
                m, tokenizer, texts, batch_size=batch, max_new_tokens=max_new
            )

    def stage_run(model: Any) -> dict[str, Any]:
        """The adapter's batched generation over every test prompt, as the stage runs it
        (folding included in the time), STAGE_RUNS times (the median counts: one run on this
        shared machine can be 10-20% off the next), then unfolded: the folding lever alone."""
        texts = [ex["prompt"] for ex in every]
        ids = [tokenizer(p)["input_ids"] for p in texts]
        runs = [_time(lambda: stage_generate(model, "adapter", texts)) for _ in range(STAGE_RUNS)]
        if any(out != runs[0][0] for out, _ in runs):
            raise PipelineError("the stage's runs gave different answers: greedy must repeat")
        (folded, stops), times = runs[0][0], sorted(t for _, t in runs)
        seconds = times[len(times) // 2]
        (apart, _), apart_seconds = _time(
            lambda: generate_with_stops(
                model, tokenizer, texts, batch_size=batch, max_new_tokens=max_new
            )
        )
        made = new_token_counts(tokenizer, folded, stops)
        flops = batched_generation_flops(model, ids, made, batch_size=batch)
        return {
            "examples": len(texts),
            "seconds": round(seconds, 3),
            "runs_seconds": [round(t, 3) for t in times],
            "flops": flops,
            "flops_per_s": round(flops / seconds),
            "exact_match": round(exact_match(folded, [ex["reference"] for ex in every]), 6),
            "unfolded_seconds": round(apart_seconds, 3),
            "folding_speedup": round(apart_seconds / seconds, 3),
            "same_answers_unfolded": sum(a == b for a, b in zip(apart, folded, strict=True)),
        }

    timed = prompts[::tutorial_every]  # one at a time on these; each prompt's cost is its own
    for name in MODELS:
        model = base if name == "base" else PeftModel.from_pretrained(base, paths["adapter"])
        model.eval()
        # One untimed warm-up of each code path, so neither pays first-call costs.
        article_generate(model, tokenizer, prompts[:1], max_new_tokens=2, temperature=temperature)
        generate_with_stops(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=2)
        torch.manual_seed(seed)
        tutorial, each = article_generate(
            model, tokenizer, timed, max_new_tokens=max_new, temperature=temperature
        )
        (pipeline, stopped), t_pipeline = _time(lambda m=model, n=name: stage_generate(m, n))
        new_tokens = new_token_counts(tokenizer, pipeline, stopped)
        flops = batched_generation_flops(model, prompt_ids, new_tokens, batch_size=batch)
        models[name] = {
            way: {
                "examples": len(outputs),
                "seconds": round(seconds, 3),
                "seconds_per_prompt": round(seconds / len(outputs), 6),
                "examples_per_s": round(len(outputs) / seconds, 3),
                "exact_match": round(exact_match(outputs, refs), 6),
            }
            for way, outputs, refs, seconds in (
                ("tutorial", tutorial, references[::tutorial_every], sum(each)),
                ("pipeline", pipeline, references, t_pipeline),
            )
        }
        # The one-at-a-time seconds per prompt are a mean over a sample of the prompts: its
        # standard error, relative to it, says how far the ratio can be off for that.
        models[name]["tutorial"]["relative_standard_error"] = (
            round(statistics.stdev(each) / math.sqrt(len(each)) / statistics.mean(each), 4)
            if len(each) > 1
            else None
        )
        models[name]["pipeline"].update(
            new_tokens=sum(new_tokens),
            stopped_at_eos=sum(stopped),
            flops=flops,
            flops_per_s=round(flops / t_pipeline),
            matmul_peak_fraction=round(flops / t_pipeline / peak, 4),
        )
        models[name]["speedup"] = round(sum(each) / len(each) / (t_pipeline / len(prompts)), 2)
        if name == "adapter":
            models[name]["stage"] = stage_run(model)
    peak = max(peak, matmul_peak(device=device))
    for w in (
        models["base"]["pipeline"],
        models["adapter"]["pipeline"],
        models["adapter"]["stage"],
    ):
        w["matmul_peak_fraction"] = round(w["flops_per_s"] / peak, 4)  # the better peak
    return {
        "examples": len(prompts),
        "examples_total": total,
        "subset": len(prompts) < total,
        "prompt_tokens": sum(map(len, prompt_ids)),
        "tutorial_every": tutorial_every,
        "max_new_tokens": max_new,
        "batch_size": batch,
        "temperature": temperature,
        "seed": seed,
        "models": models,
        "matmul_peak_flops_per_s": round(peak),
        "holds": {
            "base_speedup": models["base"]["speedup"] >= TARGET_BASE_SPEEDUP,
            "adapter_peak_fraction": models["adapter"]["stage"]["matmul_peak_fraction"]
            >= TARGET_ADAPTER_PEAK_FRACTION,
        },
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--out", default="reports/bench_eval.json", help="where to write results")
    parser.add_argument("--limit", type=int, default=128, help="the first N prompts (128; 0: all)")
    parser.add_argument("--temperature", type=float, default=0.7, help="the tutorial's (0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--tutorial-every",
        type=int,
        default=6,
        help="one at a time on every Nth of the prompts (6: a sixth of them; 1: all)",
    )
    args = parser.parse_args(argv)
    if args.tutorial_every < 1:
        parser.error(f"--tutorial-every must be at least 1, got {args.tutorial_every}")
    try:
        result = run(
            Path(args.params),
            limit=args.limit or None,
            temperature=args.temperature,
            seed=args.seed,
            tutorial_every=args.tutorial_every,
        )
    except PipelineError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
