"""Evaluation speed: the article's one-prompt-at-a-time sampling vs the pipeline's batched greedy.

make bench                                   # all test prompts, writes reports/bench_eval.json
python benchmarks/eval_speed.py --limit 64 --out /tmp/bench_eval.json

Both ways run in this one process on the test split (`<paths.formatted>/test.jsonl`) with the
trained adapter (`<paths.base>` + `<paths.adapter>`), `eval.max_new_tokens` new tokens at most:
(a) the article's way, one prompt at a time with `do_sample=True, temperature=0.7`;
(b) the pipeline's way, `lorapipe.generation.generate`, greedy in batches of `eval.batch_size`.
Both stop at the tokenizer's EOS and are decoded the same way, then scored for exact match.
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

from lorapipe.generation import generate
from lorapipe.io import read_jsonl, write_json
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.scoring import score


@torch.no_grad()
def article_generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float
) -> list[str]:
    """One prompt at a time, sampled at `temperature`, as the seed article evaluates."""
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
    a, b = result["article"], result["pipeline"]
    rows = [
        "| way | how | seconds | examples/s | exact match |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| article | one at a time, sampled (T={result['temperature']}) | {a['seconds']:.2f} | "
        f"{a['examples_per_s']:.2f} | {a['exact_match']:.3f} |",
        f"| pipeline | batched greedy (batch {result['batch_size']}) | {b['seconds']:.2f} | "
        f"{b['examples_per_s']:.2f} | {b['exact_match']:.3f} |",
    ]
    subset = (
        f"first {result['examples']} of {result['examples_total']} test prompts"
        if result["subset"]
        else f"all {result['examples']} test prompts"
    )
    return "\n".join(
        [
            *rows,
            "",
            f"speedup (article seconds / pipeline seconds): {result['speedup']:.1f}x on {subset}; "
            f"max_new_tokens {result['max_new_tokens']}, {result['threads']} torch threads, "
            f"torch {result['torch']}, {result['device']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--out", default="reports/bench_eval.json", help="where to write results")
    parser.add_argument("--limit", type=int, default=None, help="time only the first N prompts")
    parser.add_argument("--temperature", type=float, default=0.7, help="the article's (0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)

    params = yaml.safe_load(Path(args.params).read_text())
    paths, ev = params["paths"], params["eval"]
    test = Path(paths["formatted"]) / "test.jsonl"
    if not test.is_file() or not (Path(paths["adapter"]) / "adapter_config.json").is_file():
        print(
            f"bench: error: needs {test} and a trained {paths['adapter']}: run `make repro`",
            file=sys.stderr,
        )
        return 2
    examples = read_jsonl(test)
    if ev.get("max_examples") is not None:
        examples = examples[: ev["max_examples"]]
    total = len(examples)
    if args.limit is not None:
        examples = examples[: args.limit]
    prompts = [ex["prompt"] for ex in examples]
    references = [ex["reference"] for ex in examples]

    from peft import PeftModel

    base_dir = Path(paths["base"])
    tokenizer = load_tokenizer(base_dir)
    model = PeftModel.from_pretrained(
        load_base_model(base_dir, dtype="float32"), paths["adapter"]
    ).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    max_new, batch = int(ev["max_new_tokens"]), int(ev["batch_size"])

    # One untimed warm-up of each code path, so neither pays first-call costs.
    article_generate(model, tokenizer, prompts[:1], max_new_tokens=2, temperature=args.temperature)
    generate(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=2)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    article = article_generate(
        model, tokenizer, prompts, max_new_tokens=max_new, temperature=args.temperature
    )
    t_article = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipeline = generate(model, tokenizer, prompts, batch_size=batch, max_new_tokens=max_new)
    t_pipeline = time.perf_counter() - t0

    n = len(prompts)
    result: dict[str, Any] = {
        "examples": n,
        "examples_total": total,
        "subset": n < total,
        "max_new_tokens": max_new,
        "batch_size": batch,
        "temperature": args.temperature,
        "seed": args.seed,
        "article": {
            "seconds": round(t_article, 3),
            "examples_per_s": round(n / t_article, 3),
            "exact_match": round(exact_match(article, references), 6),
        },
        "pipeline": {
            "seconds": round(t_pipeline, 3),
            "examples_per_s": round(n / t_pipeline, 3),
            "exact_match": round(exact_match(pipeline, references), 6),
        },
        "speedup": round(t_article / t_pipeline, 2),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }
    write_json(Path(args.out), result)
    print(markdown(result))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
