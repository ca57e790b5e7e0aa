"""Training speed on the default model: the pipeline vs the seed tutorial's recipe vs a plain loop.

python benchmarks/train_speed.py                     # writes reports/bench_train.json
python benchmarks/train_speed.py --examples 160 --rounds 1 --out /tmp/t.json   # a quick look

Four sides, the same base (`paths.base`) and the same examples (the first
`--examples` of `paths.formatted`/train.jsonl), validation loss always on the whole val split
with `lorapipe.evaluation.completion_loss` (the evaluate stage's):

- recipe: the seed tutorial's settings, LoRA r 8 (alpha 16, dropout 0.05) on q_proj and
  v_proj, batch 2 x gradient accumulation 4, lr 2e-4, warm-up 0.1, cosine, one epoch, trained
  by the pipeline's own `lorapipe.training.train_adapter` (TRL's SFTTrainer, completion-only loss,
  padding to the longest) with TRL's CPU default of projecting every position through the
  output layer. Its validation loss after the epoch is the target.
- pipeline: params.yaml's `lora` and `train` as they are (and every lever the train stage
  applies), same trainer, stopped as soon as its validation loss, measured every
  `--check-every` optimizer steps, is at or below the recipe's. The headline is its training
  seconds to that point (the pauses to measure validation loss excluded) against the recipe's
  seconds for its epoch.
- plain loop: the twenty lines anyone could write (peft model with the pipeline's LoRA, the
  model's own loss over every position, backward, AdamW on the LoRA weights), same batch size,
  rate and examples (shuffled, padded to the longest), `--plain-steps` steps after an untimed
  first.
- pipeline's steps: the train stage's step alone (params.yaml, the pipeline's trainer, every
  lever), the same number of steps after an untimed first, nothing in between (the time-to-loss
  runs pause for validation every few steps). Its all-token throughput against the plain loop's
  is the throughput ratio, its FLOPs per second the step's efficiency.

The recipe and the pipeline run `--rounds` times each in ABBA order (recipe, pipeline, pipeline,
recipe, ...), so a machine that speeds up or slows down weighs on both alike; after each
pipeline run the two steady sides run, each in a fresh Python process (`--only`), in turn first,
as a user's script and the train stage start: the plain loop with glibc's allocator as a new
process has it, the pipeline's steps with the train stage's own setting of it
(`lorapipe.runtime.keep_freed_memory`, one of its levers, process-wide once set). Their tokens
and FLOPs are counted from the batches each step was given. The ratios use the means.

Efficiency: FLOPs each side actually performs (benchmarks/flops.py `performed_train_flops`: per
sequence l * (4(F - H) + 6R) + 12 * layers * d * l^2 plus the output layer at each position
where it runs: 6H for TRL's fused LM head, which projects again in its backward, at every
position with a next token for the recipe; 4H at the supervised ones for the pipeline, which
keeps their logits on CPU (`lorapipe.whole_head`); 4H at every position for the plain loop's
own loss), over real tokens only, per second of training,
as a fraction of the fp32 `torch.matmul` peak measured in the same run: the best of every
reading, before and after the whole part and before and after each fresh process's steps (on a
shared VM one reading can come out well below the machine's speed: a 129 GFLOP/s reading with
183 in the evaluation part of the same run, 2026-12-04). Beside it, the most such a step
could reach: the pipeline's second step recorded, its matrix products run again alone at
their shapes (benchmarks/products.py), their FLOPs per second against the same peak.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from flops import matmul_peak, performed_train_flops
from output import publish
from products import Product, ProductRecorder, replay_seconds, summary
from transformers import TrainerCallback

# The seed tutorial's LoraConfig and TrainingArguments ("LoraConfig", "Training with SFTTrainer").
RECIPE_LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
RECIPE_TRAIN = {
    "batch_size": 2,
    "grad_accum": 4,
    "learning_rate": 2e-4,
    "warmup_ratio": 0.1,
    "lr_scheduler": "cosine",
    "epochs": 1,
}
TARGET_TIME_RATIO = 3.0  # pipeline's time to the recipe's loss: at most a third of the recipe's
TARGET_PEAK_FRACTION = 0.6
TARGET_PLAIN_RATIO = 1.2
STEADY_SIDES = ("pipeline steps", "plain loop")  # each alone in a fresh process, in turn first


def bench_params(raw: dict[str, Any], work: Path, *, lora: Any = None, **train: Any) -> Any:
    """Validated params for one benchmark run: no checkpoints, no logging, `train` overrides."""
    from lorapipe.config import validate

    changed = {
        **raw,
        "lora": {**raw["lora"], **(lora or {})},
        "train": {
            **raw["train"],
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


@contextmanager
def output_layer_everywhere() -> Iterator[None]:
    """Run the trainer with TRL's CPU default, the output layer at every position through TRL's
    kernel (what a user of the recipe gets), by holding TRL's own choice and kernel in place of
    the pipeline's `score_only_supervised_positions` for the duration."""
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction

    saved = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    original = TRL_CHOICE

    def keep(device: Any) -> bool:
        return bool(original(device))

    keep.lorapipe_compact = True  # type: ignore[attr-defined]  # the lever sees itself applied
    held: Any = trl_utils  # its kernel is a class, which mypy will not let be assigned to
    held._use_triton, held._ChunkedLogProbFunction = keep, ChunkedLogProbFunction
    try:
        yield
    finally:
        held._use_triton, held._ChunkedLogProbFunction = saved


def _trl_choice() -> Any:
    """TRL's own choice where it is defined (the pipeline replaces the name TRL's trainer
    calls, `trl.trainer.utils._use_triton`, not this one), whatever ran in this process before."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton


TRL_CHOICE = _trl_choice()


class ValidationClock(TrainerCallback):
    """Training seconds (validation pauses excluded) and validation loss every `every` optimizer
    steps; stops training once the loss is at or below `target`."""

    def __init__(self, tokenizer: Any, val: list[dict[str, Any]], every: int, target: float):
        self.tokenizer, self.val, self.every, self.target = tokenizer, val, every, target
        self.started = self.paused = 0.0
        self.curve: list[dict[str, float]] = []
        self.reached: dict[str, float] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started, self.paused = time.perf_counter(), 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every:
            return
        from lorapipe.evaluation import completion_loss

        elapsed = time.perf_counter() - self.started - self.paused
        pause = time.perf_counter()
        model = kwargs["model"]
        loss = completion_loss(model, self.tokenizer, self.val, batch_size=64)
        model.train()
        self.paused += time.perf_counter() - pause
        point = {"step": state.global_step, "seconds": round(elapsed, 2), "val_loss": loss}
        self.curve.append(point)
        if loss <= self.target:
            self.reached = point
            control.should_training_stop = True


class StepWork(TrainerCallback):
    """Each training step's seconds and the sequences its forward passes were given: their real
    tokens and supervised positions, read by a forward pre-hook on the model (a padding-free row's
    sequences start where its position ids restart at 0; a padded batch's rows end at their
    attention mask). Forward passes in eval mode (validation) are not counted."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._hook: Any = None
        self._started = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._hook = kwargs["model"].register_forward_pre_hook(self._seen, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._hook.remove()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append({"lengths": [], "supervised": []})
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps[-1]["seconds"] = time.perf_counter() - self._started

    def _seen(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training or not self.steps:
            return
        step, labels = self.steps[-1], kwargs["labels"]
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is None:  # padding-free: one row of sequences laid end to end
            assert positions is not None  # the collator hands every row's positions then
            starts = [*(positions[0] == 0).nonzero().flatten().tolist(), positions.shape[1]]
            for a, b in itertools.pairwise(starts):
                step["lengths"].append(b - a)
                step["supervised"].append(int((labels[0, a:b] != -100).sum()))
            return
        for row in range(mask.shape[0]):
            real = mask[row] == 1
            step["lengths"].append(int(real.sum()))
            step["supervised"].append(int(((labels[row] != -100) & real).sum()))


def formatted_split(folder: Path, train: list[dict[str, Any]]) -> Path:
    """`folder`/formatted with `train` as its train split and an empty val split (validation,
    where a side has it, runs through a callback, outside the timing)."""
    from lorapipe.io import write_jsonl

    data = folder / "formatted"
    data.mkdir(parents=True)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", [])
    return data


class RecordStep(TrainerCallback):
    """Records the matrix products of optimizer step `step` (1-based; the first pays set-up)."""

    def __init__(self, step: int = 2):
        self.step = step
        self.recorder: ProductRecorder | None = None
        self.products: list[Product] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.step:
            self.recorder = ProductRecorder()
            self.recorder.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(None, None, None)
            self.products, self.recorder = self.recorder.products, None


def products_alone(
    raw: dict[str, Any], base: Path, train: list[dict[str, Any]], work: Path
) -> tuple[list[Product], float]:
    """The pipeline's second training step recorded (benchmarks/products.py) and its matrix
    products run again alone: (the products, their best seconds)."""
    from lorapipe.training import train_adapter

    data = formatted_split(work / "products", train)
    params = bench_params(raw, work / "products", max_steps=2)
    record = RecordStep(step=2)
    out = work / "products"
    train_adapter(params, base, data, out / "adapter", out / "curves", callbacks=[record])
    return record.products, replay_seconds(record.products)


def train_side(
    name: str,
    params: Any,
    base: Path,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    work: Path,
    clock: ValidationClock | None = None,
    pack: bool = True,
) -> dict[str, Any]:
    """Train one side with the pipeline's trainer (padding-free batches when `pack`, as the
    train stage; the recipe's padded to the longest): its seconds, steps and validation loss."""
    import torch
    from peft import PeftModel

    from lorapipe.evaluation import completion_loss
    from lorapipe.models import load_base_model, load_tokenizer
    from lorapipe.training import train_adapter

    data = formatted_split(work / name, train)
    callbacks = [clock] if clock is not None else []
    summary = train_adapter(
        params,
        base,
        data,
        work / name / "adapter",
        work / name / "curves",
        callbacks=callbacks,
        pack=pack,
    )
    seconds = summary["train_seconds"] - (clock.paused if clock else 0.0)
    out = {
        "optimizer_steps": summary["steps"],
        "train_seconds": round(seconds, 2),
        "train_loss": summary["train_loss"],
    }
    if clock is not None:
        out["curve"] = clock.curve
        out["reached"] = clock.reached
        out["val_loss"] = clock.curve[-1]["val_loss"] if clock.curve else None
    else:
        tokenizer = load_tokenizer(base)
        model = PeftModel.from_pretrained(load_base_model(base), str(work / name / "adapter"))
        with torch.no_grad():
            out["val_loss"] = completion_loss(model, tokenizer, val, batch_size=64)
    return out


def plain_loop(
    params: Any, base: Path, train: list[dict[str, Any]], steps: int, seed: int
) -> dict[str, Any]:
    """The reference loop: the model's own loss over all positions, backward, AdamW."""
    import torch
    from peft import get_peft_model

    from lorapipe.formatting import common_prefix_length
    from lorapipe.models import load_base_model, load_tokenizer
    from lorapipe.training import lora_config

    tokenizer = load_tokenizer(base)
    torch.manual_seed(seed)
    model = get_peft_model(load_base_model(base, dtype="float32"), lora_config(params))
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.train.learning_rate
    )
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    size = params.train.batch_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for first in range(0, min(len(order), (steps + 1) * size), size):
        rows = [train[i] for i in order[first : first + size]]
        encoded = []
        for ex in rows:
            prompt = tokenizer(ex["prompt"])["input_ids"]
            full = tokenizer(ex["prompt"] + ex["completion"])["input_ids"]
            encoded.append((full, common_prefix_length(prompt, full)))
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for row, (full, start) in enumerate(encoded):
            ids[row, : len(full)] = torch.tensor(full)
            mask[row, : len(full)] = 1
            labels[row, start : len(full)] = torch.tensor(full[start:])
        batches.append((ids, mask, labels))

    def step(ids: Any, mask: Any, labels: Any) -> None:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(*batches[0])  # warm-up, untimed (as the pipeline's steps' first)
    timed = batches[1 : steps + 1]
    started = time.perf_counter()
    for batch in timed:
        step(*batch)
    seconds = time.perf_counter() - started
    tokens = sum(int(mask.sum()) for _, mask, _ in timed)
    padded = sum(mask.numel() for _, mask, _ in timed)
    lengths = [int(n) for _, mask, _ in timed for n in mask.sum(dim=1)]
    supervised = [int(n) for _, _, labels in timed for n in (labels != -100).sum(dim=1)]
    return {
        "steps": len(timed),
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "padding_share": round(1 - tokens / padded, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "flops": performed_train_flops(model, lengths, supervised, head="model"),
    }


def pipeline_steps(
    raw: dict[str, Any], base: Path, train: list[dict[str, Any]], steps: int, work: Path
) -> dict[str, Any]:
    """The train stage's steps alone: `steps` optimizer steps of the pipeline's trainer after an
    untimed first (as the plain loop's), nothing in between (no validation), and the sequences
    they were given (`StepWork`): their real and supervised tokens, for the FLOP count."""
    from lorapipe.training import train_adapter

    data = formatted_split(work / "steps", train)
    params = bench_params(raw, work / "steps", max_steps=steps + 1)
    seen = StepWork()
    out = work / "steps"
    train_adapter(params, base, data, out / "adapter", out / "curves", callbacks=[seen])
    timed = seen.steps[1:]
    seconds = sum(s["seconds"] for s in timed)
    lengths = [n for s in timed for n in s["lengths"]]
    supervised = [n for s in timed for n in s["supervised"]]
    return {
        "steps": len(timed),
        "seconds": round(seconds, 2),
        "step_seconds": [round(s["seconds"], 3) for s in seen.steps],
        "lengths": lengths,
        "supervised": supervised,
        "tokens": sum(lengths),
        "supervised_tokens": sum(supervised),
        "tokens_per_s": round(sum(lengths) / seconds, 1),
    }


def apart(side: str, params_file: Path, examples: int | None, steps: int) -> dict[str, Any]:
    """`side` ("plain loop" or "pipeline steps") run by `--only` in a fresh Python process,
    with glibc's allocator as a new process has it: its result."""
    command = [sys.executable, __file__, "--only", side, "--params", str(params_file)]
    command += ["--examples", str(examples or 0), "--plain-steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {side} process failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def only(side: str, params_file: Path, examples: int | None, steps: int) -> dict[str, Any]:
    """One side alone, on the pipeline's settings (this process's share of `apart`)."""
    from lorapipe.io import read_jsonl

    raw = yaml.safe_load(params_file.read_text())
    base, formatted = Path(raw["paths"]["base"]), Path(raw["paths"]["formatted"])
    every = read_jsonl(formatted / "train.jsonl")
    train = every[:examples] if examples else every
    before = matmul_peak()  # this process's own readings, for the run's peak (`measure`)
    with tempfile.TemporaryDirectory(prefix="bench-apart-") as tmp:
        if side == "pipeline steps":
            result = pipeline_steps(raw, base, train, steps, Path(tmp))
        else:
            params = bench_params(raw, Path(tmp) / "pipeline")
            result = plain_loop(params, base, train, steps, raw["train"]["seed"])
    return {**result, "matmul_peaks": [round(before), round(matmul_peak())]}


def measure(
    params_file: Path,
    *,
    examples: int | None,
    rounds: int,
    check_every: int,
    plain_steps: int,
) -> dict[str, Any]:
    """The three sides, ABBA; the result dict (see the module docstring)."""
    import torch
    from peft import get_peft_model

    from lorapipe.formatting import mask_audit
    from lorapipe.io import read_jsonl
    from lorapipe.models import load_base_model, load_tokenizer
    from lorapipe.training import lora_config

    raw = yaml.safe_load(params_file.read_text())
    base, formatted = Path(raw["paths"]["base"]), Path(raw["paths"]["formatted"])
    for path in (base / "config.json", formatted / "train.jsonl", formatted / "val.jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"needs {path}: run `make repro` (or dvc repro format)")
    every = read_jsonl(formatted / "train.jsonl")
    train = every[:examples] if examples else every
    val = read_jsonl(formatted / "val.jsonl")
    tokenizer = load_tokenizer(base)
    audits = [mask_audit(ex, tokenizer, max_length=10**9) for ex in train]
    lengths = [a["total_tokens"] for a in audits]
    supervised = [a["supervised_tokens"] for a in audits]
    load_before = os.getloadavg()
    peak = matmul_peak()

    runs: dict[str, list[dict[str, Any]]] = {
        "recipe": [],
        "pipeline": [],
        "plain loop": [],
        "pipeline steps": [],
    }
    target = None
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        recipe_params = bench_params(raw, work / "recipe", lora=RECIPE_LORA, **RECIPE_TRAIN)
        pipeline_params = bench_params(raw, work / "pipeline")
        order = [
            name
            for r in range(rounds)
            for name in (("recipe", "pipeline") if r % 2 == 0 else ("pipeline", "recipe"))
        ]
        for i, name in enumerate(order):
            print(f"bench: training {name} ...", file=sys.stderr, flush=True)
            if name == "recipe":
                with output_layer_everywhere():
                    run = train_side(
                        f"{i}_recipe", recipe_params, base, train, val, work, pack=False
                    )
                target = run["val_loss"] if target is None else target
            else:
                assert target is not None  # the recipe runs first
                clock = ValidationClock(tokenizer, val, check_every, target)
                run = train_side(f"{i}_pipeline", pipeline_params, base, train, val, work, clock)
                # the two steady sides, each in a fresh process, in turn first
                turn = len(runs["plain loop"]) % 2
                for side in STEADY_SIDES[::-1] if turn else STEADY_SIDES:
                    print(f"bench: {side} ...", file=sys.stderr, flush=True)
                    runs[side].append(apart(side, params_file, examples, plain_steps))
            runs[name].append(run)
        print("bench: the step's products alone ...", file=sys.stderr, flush=True)
        products, products_seconds = products_alone(raw, base, train, work)
        models = {
            side: get_peft_model(load_base_model(base), lora_config(p))
            for side, p in (("recipe", recipe_params), ("pipeline", pipeline_params))
        }
        recipe_flops = performed_train_flops(models["recipe"], lengths, supervised, head="trl")
        pipeline_flops_per_example = performed_train_flops(
            models["pipeline"], lengths, supervised, head="supervised"
        ) / len(train)
        for steady in runs["pipeline steps"]:  # the sequences its timed steps were given
            seen = steady.pop("lengths"), steady.pop("supervised")
            flops = performed_train_flops(models["pipeline"], *seen, head="supervised")
            steady["flops"] = flops
    readings = [peak, matmul_peak()]
    readings += [p for side in STEADY_SIDES for run in runs[side] for p in run["matmul_peaks"]]
    peak = max(readings)  # the reference for every fraction below
    return summarise(
        runs,
        peak=peak,
        target=target,
        recipe_flops=recipe_flops,
        pipeline_flops_per_example=pipeline_flops_per_example,
        tokens_per_example=sum(lengths) / len(train),
        supervised_per_example=sum(supervised) / len(train),
        batch=pipeline_params.train.batch_size,
        extra={
            "rounds": rounds,
            "examples": len(train),
            "examples_total": len(every),
            "subset": len(train) < len(every),
            "val_examples": len(val),
            "check_every": check_every,
            "products_alone": summary(products, products_seconds, peak),
            "matmul_peak_readings": [round(r) for r in readings],
            "recipe_settings": {"lora": RECIPE_LORA, "train": RECIPE_TRAIN},
            "pipeline_settings": {"lora": raw["lora"], "train": raw["train"]},
            "model": raw["model"]["name"],
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    *,
    peak: float,
    target: float | None,
    recipe_flops: float,
    pipeline_flops_per_example: float,
    tokens_per_example: float,
    supervised_per_example: float,
    batch: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Means over the rounds, the ratios and whether each target holds."""
    recipe, pipeline, plain = runs["recipe"], runs["pipeline"], runs["plain loop"]
    alone = runs["pipeline steps"]
    recipe_s = _mean([r["train_seconds"] for r in recipe])
    reached = all(r["reached"] is not None for r in pipeline)
    to_target = [r["reached"]["seconds"] if r["reached"] else r["train_seconds"] for r in pipeline]
    pipeline_s = _mean(to_target)
    # Examples the pipeline trained on up to the target (every step is a full batch here).
    steps = [r["reached"]["step"] if r["reached"] else r["optimizer_steps"] for r in pipeline]
    pipeline_examples = _mean([s * batch for s in steps])
    pipeline_flops = pipeline_flops_per_example * pipeline_examples
    # The steady sides (the train stage's steps and the plain loop, each alone in a fresh
    # process, the same number of steps after an untimed first): throughput and FLOP/s.
    steps_tokens_per_s = _mean([a["tokens_per_s"] for a in alone])
    steps_flops_per_s = _mean([a["flops"] / a["seconds"] for a in alone])
    plain_tokens_per_s = _mean([p["tokens_per_s"] for p in plain])
    plain_flops_per_s = _mean([p["flops"] / p["seconds"] for p in plain])
    examples = extra["examples"]
    sides = {
        "recipe": {
            "seconds": round(recipe_s, 2),
            "runs_seconds": [r["train_seconds"] for r in recipe],
            "optimizer_steps": recipe[0]["optimizer_steps"],
            "val_loss": round(target, 6) if target is not None else None,
            "runs_val_loss": [round(r["val_loss"], 6) for r in recipe],
            "tokens_per_s": round(tokens_per_example * examples / recipe_s, 1),
            "supervised_tokens_per_s": round(supervised_per_example * examples / recipe_s, 1),
            "flops_per_s": round(recipe_flops / recipe_s),
            "matmul_peak_fraction": round(recipe_flops / recipe_s / peak, 4),
        },
        "pipeline": {
            "seconds": round(pipeline_s, 2),
            "runs_seconds": to_target,
            "optimizer_steps": round(_mean(steps), 1),
            "runs_steps": steps,
            "val_loss": [
                r["reached"]["val_loss"] if r["reached"] else r["val_loss"] for r in pipeline
            ],
            "curves": [r["curve"] for r in pipeline],
            "tokens_per_s": round(tokens_per_example * pipeline_examples / pipeline_s, 1),
            "supervised_tokens_per_s": round(
                supervised_per_example * pipeline_examples / pipeline_s, 1
            ),
            "flops_per_s": round(pipeline_flops / pipeline_s),
            "matmul_peak_fraction": round(pipeline_flops / pipeline_s / peak, 4),
        },
        "plain loop": {
            "seconds": round(_mean([p["seconds"] for p in plain]), 2),
            "runs_seconds": [p["seconds"] for p in plain],
            "optimizer_steps": plain[0]["steps"],
            "padding_share": plain[0]["padding_share"],
            "tokens_per_s": round(plain_tokens_per_s, 1),
            "flops_per_s": round(plain_flops_per_s),
            "matmul_peak_fraction": round(plain_flops_per_s / peak, 4),
        },
        "pipeline steps": {
            "seconds": round(_mean([a["seconds"] for a in alone]), 2),
            "runs_seconds": [a["seconds"] for a in alone],
            "optimizer_steps": alone[0]["steps"],
            "runs_step_seconds": [a["step_seconds"] for a in alone],
            "tokens_per_s": round(steps_tokens_per_s, 1),
            "supervised_tokens_per_s": round(
                _mean([a["supervised_tokens"] / a["seconds"] for a in alone]), 1
            ),
            "flops_per_s": round(steps_flops_per_s),
            "matmul_peak_fraction": round(steps_flops_per_s / peak, 4),
        },
    }
    time_ratio = recipe_s / pipeline_s
    plain_ratio = steps_tokens_per_s / plain_tokens_per_s
    fraction = sides["pipeline steps"]["matmul_peak_fraction"]
    return {
        **extra,
        "matmul_peak_flops_per_s": round(peak),
        "target_val_loss": target,
        "sides": sides,
        "reached_target": reached,
        "time_to_loss_ratio": round(time_ratio, 3),
        "plain_loop_ratio": round(plain_ratio, 3),
        "targets": {
            "time_to_loss_ratio": TARGET_TIME_RATIO,
            "matmul_peak_fraction": TARGET_PEAK_FRACTION,
            "plain_loop_ratio": TARGET_PLAIN_RATIO,
        },
        "holds": {
            "time_to_loss": reached and time_ratio >= TARGET_TIME_RATIO,
            "matmul_peak_fraction": fraction >= TARGET_PEAK_FRACTION,
            "plain_loop": plain_ratio >= TARGET_PLAIN_RATIO,
        },
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["sides"]
    r, p, q, a = s["recipe"], s["pipeline"], s["plain loop"], s["pipeline steps"]
    each = ", ".join

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    rows = [
        "| side | settings | optimizer steps | train s (each run) | all tokens/s "
        "| supervised tokens/s | val loss | GFLOP/s performed | of matmul peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| recipe | LoRA r 8 q/v, batch 2 x 4, lr 2e-4, one epoch | {r['optimizer_steps']} | "
        f"{r['seconds']:.1f} ({each(f'{x:.1f}' for x in r['runs_seconds'])}) | "
        f"{r['tokens_per_s']:.0f} | {r['supervised_tokens_per_s']:.1f} | {r['val_loss']:.4f} | "
        f"{r['flops_per_s'] / 1e9:.1f} | {pct(r['matmul_peak_fraction'])} |",
        f"| pipeline | params.yaml, to the recipe's val loss | "
        f"{each(str(x) for x in p['runs_steps'])} | "
        f"{p['seconds']:.1f} ({each(f'{x:.1f}' for x in p['runs_seconds'])}) | "
        f"{p['tokens_per_s']:.0f} | {p['supervised_tokens_per_s']:.1f} | "
        f"{each(f'{x:.4f}' for x in p['val_loss'])} | {p['flops_per_s'] / 1e9:.1f} | "
        f"{pct(p['matmul_peak_fraction'])} |",
        f"| plain loop | pipeline's LoRA, batch, rate; loss at every position | "
        f"{q['optimizer_steps']} | {q['seconds']:.1f} "
        f"({each(f'{x:.1f}' for x in q['runs_seconds'])}) | {q['tokens_per_s']:.0f} | | | "
        f"{q['flops_per_s'] / 1e9:.1f} | "
        f"{pct(q['matmul_peak_fraction'])} |",
        f"| pipeline's steps | the train stage's step alone, as the plain loop | "
        f"{a['optimizer_steps']} | {a['seconds']:.1f} "
        f"({each(f'{x:.1f}' for x in a['runs_seconds'])}) | {a['tokens_per_s']:.0f} | "
        f"{a['supervised_tokens_per_s']:.1f} | | {a['flops_per_s'] / 1e9:.1f} | "
        f"{pct(a['matmul_peak_fraction'])} |",
    ]
    subset = (
        f"the first {result['examples']} of {result['examples_total']} training examples"
        if result["subset"]
        else f"all {result['examples']} training examples"
    )
    h, alone = result["holds"], result["products_alone"]
    readings = result["matmul_peak_readings"]
    verdict = {True: "holds", False: "does not hold"}
    return "\n".join(
        [
            *rows,
            "",
            f"{result['model']}, {subset}; recipe and pipeline {result['rounds']} times each in "
            f"ABBA order; after each pipeline run the pipeline's steps and the plain loop, each "
            f"in a fresh process (glibc's allocator as a new process has it), in turn first, "
            f"{q['optimizer_steps']} steps after an untimed first, their tokens and FLOPs counted "
            f"from the batches they were given (the ratio and the step's fraction of the peak "
            f"are theirs); val loss on "
            f"{result['val_examples']} validation examples, the pipeline's every "
            f"{result['check_every']} steps (pauses excluded from its seconds); fp32 matmul "
            f"peak {result['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s, the best of "
            f"{len(readings)} readings (before and after the part and each fresh process's "
            f"steps; the lowest {min(readings) / 1e9:.0f}); {result['threads']} "
            f"torch threads, load average {result['loadavg_before'][0]:.2f} before, "
            f"{result['loadavg_after'][0]:.2f} after; torch {result['torch']}.",
            f"Time to the recipe's val loss: {result['time_to_loss_ratio']:.2f}x faster "
            f"(target {result['targets']['time_to_loss_ratio']:g}x: "
            f"{verdict[h['time_to_loss']]}); pipeline step at {pct(a['matmul_peak_fraction'])} "
            f"of the matmul peak (target {pct(result['targets']['matmul_peak_fraction'])}: "
            f"{verdict[h['matmul_peak_fraction']]}); all-token throughput "
            f"{result['plain_loop_ratio']:.2f}x the plain loop's (target "
            f"{result['targets']['plain_loop_ratio']:g}x: {verdict[h['plain_loop']]}).",
            f"The pipeline's second step recorded and its {alone['products']} matrix products "
            f"run again alone, at their shapes, with nothing in between "
            f"(benchmarks/products.py): {alone['seconds_alone']:.3f} s, "
            f"{alone['flops_per_s'] / 1e9:.1f} GFLOP/s over their own FLOPs (every row computed), "
            f"{pct(alone['matmul_peak_fraction'])} of the peak: the most a step made of these "
            f"products could reach.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--out", default="reports/bench_train.json", help="where to write results")
    parser.add_argument("--examples", type=int, default=400, help="the first N (400; 0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="recipe/pipeline runs each (2)")
    parser.add_argument("--check-every", type=int, default=2, help="pipeline val loss every N")
    parser.add_argument("--plain-steps", type=int, default=12, help="steady sides' steps (12)")
    parser.add_argument(
        "--only",
        choices=STEADY_SIDES,
        help="only this side, --plain-steps steps; its result (JSON) on stdout",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.check_every, args.plain_steps) < 1 or args.examples < 0:
        parser.error("--rounds, --check-every and --plain-steps must be at least 1")
    if args.only:
        result = only(args.only, Path(args.params), args.examples or None, args.plain_steps)
        print(json.dumps(result))
        return 0
    try:
        result = measure(
            Path(args.params),
            examples=args.examples or None,
            rounds=args.rounds,
            check_every=args.check_every,
            plain_steps=args.plain_steps,
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
