"""Evaluation speed: a tutorial's one-prompt-at-a-time sampling vs the pipeline's batched greedy.

make bench                                   # all test prompts, writes reports/bench_eval.json
python benchmarks/eval_speed.py --limit 64 --out /tmp/bench_eval.json

Both ways run in this one process on the test split (`<paths.formatted>/test.jsonl`), first with
the base model (`<paths.base>`), then with the trained adapter on it (`<paths.adapter>`): the
`evaluate` stage generates with both (base before training, adapter after), so both are timed.
At most `eval.max_new_tokens` new tokens for both ways (the tutorial's own default is 200):
(a) the tutorial's way, one prompt at a time with `do_sample=True, temperature=0.7`;
(b) the pipeline's way, `lorapipe.generation.generate`, greedy in batches of `eval.batch_size`.
Both stop at the tokenizer's EOS and are decoded the same way, then scored for exact match.
The base model rarely emits EOS, so it runs to the token cap: there one-at-a-time decoding pays
its per-step overhead `max_new_tokens` times per prompt, which batching shares.
`--limit N` times both on the first N prompts only (the output says so).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from output import publish

from lorapipe.errors import PipelineError
from lorapipe.generation import generate
from lorapipe.io import read_jsonl
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.scoring import score

MODELS = ("base", "adapter")


@torch.no_grad()
def article_generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float
) -> list[str]:
    """One prompt at a time, sampled at `temperature`, as the common LoRA tutorial evaluates."""
    outputs = []
    model.eval()
    for prompt in prompts:
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
    return outputs


def exact_match(predictions: list[str], references: list[str]) -> float:
    aggregate, _ = score(predictions, references)
    return aggregate["exact_match"]


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| model | way | how | seconds | examples/s | exact match |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name in MODELS:
        r = result["models"][name]
        for way, how in (
            ("article", f"one at a time, sampled (T={result['temperature']})"),
            ("pipeline", f"batched greedy (batch {result['batch_size']})"),
        ):
            w = r[way]
            rows.append(
                f"| {name} | {way} | {how} | {w['seconds']:.2f} | {w['examples_per_s']:.2f} | "
                f"{w['exact_match']:.3f} |"
            )
        rows.append(f"| {name} | speedup | | {r['speedup']:.1f}x | | |")
    subset = (
        f"first {result['examples']} of {result['examples_total']} test prompts"
        if result["subset"]
        else f"all {result['examples']} test prompts"
    )
    return "\n".join(
        [
            *rows,
            "",
            f"evaluation speedup (base + adapter, one-at-a-time seconds / pipeline seconds): "
            f"{result['speedup']:.1f}x on {subset}; max_new_tokens {result['max_new_tokens']}, "
            f"{result['threads']} torch threads, torch {result['torch']}, {result['device']}",
        ]
    )


def _time(fn: Any) -> tuple[list[str], float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run(
    params_path: Path = Path("params.yaml"),
    *,
    limit: int | None = None,
    temperature: float = 0.7,
    seed: int = 0,
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
    total = len(examples)
    if limit is not None:
        examples = examples[:limit]
    prompts = [ex["prompt"] for ex in examples]
    references = [ex["reference"] for ex in examples]
    max_new, batch = int(ev["max_new_tokens"]), int(ev["batch_size"])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base_dir = Path(paths["base"])
    tokenizer = load_tokenizer(base_dir)
    base = load_base_model(base_dir, dtype="float32").to(device).eval()
    models: dict[str, Any] = {}
    for name in MODELS:
        model = base if name == "base" else PeftModel.from_pretrained(base, paths["adapter"])
        model.eval()
        # One untimed warm-up of each code path, so neither pays first-call costs.
        article_generate(model, tokenizer, prompts[:1], max_new_tokens=2, temperature=temperature)
        generate(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=2)
        torch.manual_seed(seed)
        article, t_article = _time(
            lambda m=model: article_generate(
                m, tokenizer, prompts, max_new_tokens=max_new, temperature=temperature
            )
        )
        pipeline, t_pipeline = _time(
            lambda m=model: generate(
                m, tokenizer, prompts, batch_size=batch, max_new_tokens=max_new
            )
        )
        models[name] = {
            way: {
                "seconds": round(seconds, 3),
                "examples_per_s": round(len(prompts) / seconds, 3),
                "exact_match": round(exact_match(outputs, references), 6),
            }
            for way, outputs, seconds in (
                ("article", article, t_article),
                ("pipeline", pipeline, t_pipeline),
            )
        }
        models[name]["speedup"] = round(t_article / t_pipeline, 2)
    article_total = sum(models[n]["article"]["seconds"] for n in MODELS)
    pipeline_total = sum(models[n]["pipeline"]["seconds"] for n in MODELS)
    return {
        "examples": len(prompts),
        "examples_total": total,
        "subset": len(prompts) < total,
        "max_new_tokens": max_new,
        "batch_size": batch,
        "temperature": temperature,
        "seed": seed,
        "models": models,
        "article_seconds": round(article_total, 3),
        "pipeline_seconds": round(pipeline_total, 3),
        "speedup": round(article_total / pipeline_total, 2),
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
    parser.add_argument("--limit", type=int, default=None, help="time only the first N prompts")
    parser.add_argument("--temperature", type=float, default=0.7, help="the tutorial's (0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    try:
        result = run(
            Path(args.params), limit=args.limit, temperature=args.temperature, seed=args.seed
        )
    except PipelineError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
