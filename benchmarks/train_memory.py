"""Training memory at TinyLlama-1.1B's real shape: a LoRA step in fp32 vs a QLoRA (NF4) step;
and the same two on the real default model (SmolLM2-135M-Instruct) with a batch of real examples.

python benchmarks/train_memory.py                          # writes reports/bench_train_memory.json
python benchmarks/train_memory.py --layers 2 --no-real --out /tmp/m.json   # a quick dry run
python benchmarks/train_memory.py --real-only --out /tmp/m.json            # the real model only

Builds a Llama with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key/value heads, vocab 32000; benchmarks/shapes.py) and random weights, saves it once as bf16
safetensors (the dtype TinyLlama is published in) to a temporary folder (or to `--base-dir`,
and there only if it holds none yet: `make bench` builds one for this and
benchmarks/merge_memory.py), then, each variant in a fresh subprocess so that each peak is its
own:

- fp32: the base loaded in float32, as `train.precision: auto` loads it on CPU;
- nf4:  `quant=nf4` (bitsandbytes 4-bit NormalFloat, double quantisation, float32 compute:
  `quant.compute_dtype: auto` on CPU),

each through `lorapipe.training.setup_model`, the train stage's own set-up: a converting load
reads the checkpoint one tensor at a time (`lorapipe.models.read_by_tensor`); a quantised base
gets glibc's fixed mmap threshold (`lorapipe.runtime.fix_mmap_threshold`), peft's
`prepare_model_for_kbit_training` and, with `train.gradient_checkpointing: auto`, recomputed
activations (fp32: none); then the pipeline's LoRA config (params.yaml `lora`), LoRA's update
fused into the base product (`lorapipe.fused_lora`: the plain and the 4-bit layers alike).
Then one training step: forward and backward on one sequence of `--seq-len` random tokens
(batch 1, labels = inputs) and one AdamW step on the LoRA weights. Peak RSS is the child's VmHWM:
the whole process (Python, torch, the libraries and the model), nothing subtracted. Acceptance:
NF4's peak at most 35% of fp32's.

Then the real default model beside it (`real_model` in the JSON; `--no-real` leaves it out,
`--real-only` runs only it): the base the base stage built (`paths.base`, SmolLM2-135M-Instruct
as fp32 safetensors; built from params.yaml `model` into the temporary folder when `paths.base`
has none), loaded the same way as `lora-fp32` (quant=none) and `qlora-nf4` (conf/quant/nf4.yaml:
float32 compute on CPU, recomputed activations), and `--real-steps` training steps on a real
batch: the first `train.batch_size` examples of `paths.formatted`/train.jsonl, tokenised
(prompt + completion), labels only on the completion tokens, laid end to end in one row as the
train stage's padding-free batches are (`packed_tensors`, `lorapipe.packing`; padded to the
longest for a model whose attention cannot take them), with the train stage's loss (TRL's
fused LM head, which SFTTrainer adds, projecting only the supervised positions:
`lorapipe.training.score_only_supervised_positions`; on CPU their logits kept,
`lorapipe.whole_head`). Step seconds are the last step's (the
first pays one-time costs). No target: reported.
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
from pathlib import Path
from typing import Any

from output import publish
from shapes import TINYLLAMA, random_base_at, random_base_in

ROOT = Path(__file__).resolve().parents[1]
BOUND = 0.35  # acceptance: NF4 peak RSS <= 35% of the fp32 peak
VARIANTS = ("fp32", "nf4")  # TinyLlama's shape
REAL_VARIANTS = ("lora-fp32", "qlora-nf4")  # the real default model
REAL_STEPS = 2  # the first step pays one-time costs; the last one's seconds are reported
# What SFTTrainer asks of its fused LM head (trl 1.16 sft_trainer.py); `is_top1` feeds a metric.
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def quant_for(variant: str) -> Any:
    """The pipeline's quant config for a variant: conf/quant/nf4.yaml for the NF4 ones,
    conf/quant/none.yaml for the others."""
    import yaml

    from lorapipe.config import QuantCfg

    option = "nf4" if variant.endswith("nf4") else "none"
    return QuantCfg(**yaml.safe_load((ROOT / "conf" / "quant" / f"{option}.yaml").read_text()))


def real_base(params: Any, work: Path, folder: Path | None = None) -> tuple[Path, str]:
    """The real default model's base folder and where it came from: `folder` (default
    `paths.base`) when it holds a model; a `folder` of a base's config and tokenizer alone gets
    random weights at its shape in `work`/base (`shapes.random_base_like`: a machine without
    the model file); with neither, the base built from `params.model` into `work`/base (the base
    stage's own code; about 20 s for the default's GGUF file)."""
    if folder is not None:
        from shapes import has_weights, random_base_like

        if has_weights(folder):
            return folder, str(folder)
        print(f"bench: {folder} has no weights; random ones at its shape ...", file=sys.stderr)
        built = random_base_like(folder, work / "base", dtype="float32")
        return work / "base", f"{built['name']} ({folder} has no weights)"
    base = Path(params.paths.base)
    if (base / "config.json").is_file():
        return base, str(base)
    from lorapipe.base_model import build_base

    print(f"bench: {base} has no model; building {params.model.name} ...", file=sys.stderr)
    build_base(params.model, work / "base")
    return work / "base", f"{params.model.name}, built into a temporary folder ({base} has none)"


def real_examples(params: Any, tokenizer: Any, count: int) -> tuple[list[dict[str, Any]], str]:
    """The first `count` training examples ({prompt, completion}) and where they came from:
    `paths.formatted`/train.jsonl, or, when the format stage has not run, the first rows of
    `data.path` (JSON Lines) formatted here with `format.*` (the prepare stage keeps the file's
    order, so for the default these are the same examples)."""
    from lorapipe.io import read_jsonl

    path = Path(params.paths.formatted) / "train.jsonl"
    if path.is_file():
        return read_jsonl(path)[:count], str(path)
    from lorapipe.formatting import format_rows

    raw = Path(params.data.path)
    if raw.suffix != ".jsonl" or not raw.is_file():
        raise FileNotFoundError(f"needs {path} (run `dvc repro format`) or {raw} as JSON Lines")
    rows = [{"id": str(i), **row} for i, row in enumerate(read_jsonl(raw)[:count])]
    fmt = params.format
    return format_rows(rows, tokenizer, fmt.system_prompt, fmt.train_on), f"{raw}, formatted"


def real_batch(tokenizer: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """One training batch of `examples` as the train stage's collator makes it: prompt +
    completion tokenised, right-padded to the longest with the pad token, labels -100 on the
    prompt and the padding. Lists (JSON-ready): input_ids, attention_mask, labels, and per
    sequence its `lengths` (real tokens) and `supervised` (labelled tokens); `seq_len`."""
    from lorapipe.formatting import common_prefix_length

    encoded = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"])["input_ids"]
        full = tokenizer(ex["prompt"] + ex["completion"])["input_ids"]
        encoded.append((full, common_prefix_length(prompt, full)))
    width = max(len(full) for full, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch: dict[str, Any] = {"input_ids": [], "attention_mask": [], "labels": []}
    for full, start in encoded:
        gap = width - len(full)
        batch["input_ids"].append(full + [pad] * gap)
        batch["attention_mask"].append([1] * len(full) + [0] * gap)
        batch["labels"].append([-100] * start + full[start:] + [-100] * gap)
    batch["lengths"] = [len(full) for full, _ in encoded]
    batch["supervised"] = [len(full) - start for full, start in encoded]
    batch["seq_len"] = width
    return batch


def batch_tensors(batch: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """input_ids, attention_mask and labels of a `real_batch` as tensors on `device`."""
    import torch

    keys = ("input_ids", "attention_mask", "labels")
    return {k: torch.tensor(batch[k], dtype=torch.long, device=device) for k in keys}


def packed_tensors(batch: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """A `real_batch` as the train stage feeds it when its attention takes packed rows
    (`lorapipe.packing`): TRL's padding-free collator lays the examples end to end in one row,
    with position ids and sequence bounds instead of an attention mask; labels as the batch's."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [
        {"input_ids": ids[:n], "labels": labels[:n]}
        for ids, labels, n in zip(
            batch["input_ids"], batch["labels"], batch["lengths"], strict=True
        )
    ]
    out = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def pipeline_loss(model: Any, device: str = "cpu") -> bool:
    """Give the peft `model` the train stage's loss: TRL's fused LM head, added as SFTTrainer
    adds it (to the model under the adapters), scoring only the supervised positions on this
    device as the train stage makes it (`score_only_supervised_positions`). Call the model with
    `fused_lm_head=True` and labels for it. Returns whether the head projects only the
    supervised positions (else every position; FLOP counts depend on it)."""
    import torch
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from lorapipe.training import score_only_supervised_positions

    score_only_supervised_positions()
    add_fused_lm_head(model.get_base_model(), outputs=FUSED_OUTPUTS)
    return bool(trl_utils._use_triton(torch.device(device)))


class MemorySampler:
    """Peak RSS of this process from /proc/self/status, and its split into anonymous memory and
    file-backed pages, sampled every few milliseconds by a daemon thread.

    VmHWM (the kernel's own high-water mark, per address space) is the peak RSS. It includes
    the pages of memory-mapped files, such as the safetensors checkpoint while it loads: the
    kernel can drop those clean pages at any time, so the sampled peak of RssAnon is reported
    beside it as what the process itself needed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.peak_anon_kib = 0
        self.file_at_peak_kib = 0
        self._peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        """VmHWM, VmRSS, RssAnon and RssFile of this process, in KiB."""
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
        return fields

    def sample(self) -> None:
        s = self.status()
        self.peak_anon_kib = max(self.peak_anon_kib, s["RssAnon"])
        if s["VmRSS"] > self._peak_rss_kib:
            self._peak_rss_kib, self.file_at_peak_kib = s["VmRSS"], s["RssFile"]

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def snapshot(self) -> dict[str, float]:
        """Peaks so far, in MiB."""
        self.sample()
        return {
            "peak_rss_mib": round(self.status()["VmHWM"] / 1024, 1),
            "peak_anon_mib": round(self.peak_anon_kib / 1024, 1),
            "file_pages_at_peak_mib": round(self.file_at_peak_kib / 1024, 1),
        }


def stage_model(
    params: Any, base_dir: Path, precision: str, *, pack: bool = True
) -> tuple[Any, bool, bool]:
    """The model as the train stage sets it up (`train_adapter`): `setup_model`, trainable
    weights in fp32 but QLoRA's under bf16 (TRL casts those), and, when `pack` and the model's
    attention takes it, the padding-free attention (`lorapipe.packing`). Returns (model,
    recomputes activations, padding-free)."""
    import torch

    from lorapipe.packing import unpackable, use_packed_attention
    from lorapipe.training import setup_model

    model, recompute, _, _ = setup_model(params, base_dir, precision)
    quantized_bf16 = params.quant.mode != "none" and precision == "bf16"
    trainable_dtype = torch.bfloat16 if quantized_bf16 else torch.float32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(trainable_dtype)
    packed = pack and unpackable(model) is None
    if packed:
        use_packed_attention(model)
    return model, recompute, packed


def child(
    base_dir: Path,
    variant: str,
    seq_len: int,
    params_file: Path,
    batch_file: Path | None = None,
    steps: int = 1,
) -> dict[str, Any]:
    """Load the base the pipeline's way, add LoRA, run `steps` training steps; the measurements.

    Without `batch_file`: one sequence of `seq_len` random tokens, the model's own loss (labels
    = inputs). With it: the `real_batch` it holds, the train stage's loss (`pipeline_loss`).
    """
    import torch
    import yaml

    from lorapipe.config import validate

    if batch_file is not None:
        import trl.trainer.utils  # noqa: F401  (the train stage has TRL loaded too)

    params = validate(yaml.safe_load(params_file.read_text()))
    params = params.model_copy(update={"quant": quant_for(variant)})
    sampler = MemorySampler()
    after_imports = sampler.snapshot()
    t0 = time.perf_counter()
    # the train stage's own set-up, with its padding-free batches for the real batch
    model, recompute, packed = stage_model(params, base_dir, "fp32", pack=batch_file is not None)
    fused = pipeline_loss(model) if batch_file is not None else None
    load_seconds = time.perf_counter() - t0
    after_load = sampler.snapshot()
    loaded_rss = sampler.status()
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.train.learning_rate)
    if batch_file is None:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator())
        inputs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids,
        }
    else:
        batch = json.loads(batch_file.read_text())
        tensors = packed_tensors(batch) if packed else batch_tensors(batch)
        inputs = {**tensors, "fused_lm_head": True}
    model.train()
    seconds, peaks = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        peaks.append(sampler.snapshot()["peak_rss_mib"])
    extra: dict[str, Any] = {}
    if batch_file is not None:
        extra.update(compact_lm_head=fused, padding_free=packed, steps=steps)
    if steps > 1:  # the first step pays one-time costs; a later one can peak higher
        extra.update(first_step_seconds=round(seconds[0], 2), peak_rss_by_step_mib=peaks)
    return {
        "variant": variant,
        "rss_after_imports_mib": after_imports["peak_rss_mib"],
        "load": after_load,
        "rss_after_load_mib": round(loaded_rss["VmRSS"] / 1024, 1),
        **sampler.snapshot(),
        "load_seconds": round(load_seconds, 2),
        "step_seconds": round(seconds[-1], 2),
        **extra,
        "loss": round(float(loss), 4),
        "gradient_checkpointing": recompute,
        "base_weights_mib": round(base_bytes / 2**20, 1),
        "trainable_params": sum(p.numel() for p in trainable),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _subprocess(*args: str) -> dict[str, Any]:
    """This script with `args` in a fresh interpreter; the JSON its last line prints.

    Every measurement runs in its own process, so each peak (and each process's allocator
    settings: `fix_mmap_threshold` is for the process's lifetime) is that variant's alone.
    """
    src = Path(__file__).resolve().parents[1] / "src"
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def tinyllama_markdown(result: dict[str, Any]) -> str:
    rows = [
        "| variant | base weights (MiB) | peak RSS (MiB) | % of fp32 | of which file pages "
        "| peak anonymous (MiB) | % of fp32 | load s | step s | recomputes activations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    fp32 = result["variants"]["fp32"]
    for name, v in result["variants"].items():
        rows.append(
            f"| {name} | {v['base_weights_mib']:.0f} | {v['peak_rss_mib']:.0f} | "
            f"{100 * v['peak_rss_mib'] / fp32['peak_rss_mib']:.1f}% | "
            f"{v['file_pages_at_peak_mib']:.0f} | {v['peak_anon_mib']:.0f} | "
            f"{100 * v['peak_anon_mib'] / fp32['peak_anon_mib']:.1f}% | "
            f"{v['load_seconds']:.1f} | {v['step_seconds']:.1f} | "
            f"{'yes' if v['gradient_checkpointing'] else 'no'} |"
        )
    verdict = "PASS" if result["within_bound"] else "FAIL"
    return "\n".join(
        [
            *rows,
            "",
            f"TinyLlama-1.1B shape, {result['layers']} layers, {result['parameters']:,} params, "
            f"{result['checkpoint_dtype']} safetensors; load + one LoRA step (params.yaml lora) "
            f"at sequence length {result['seq_len']}, batch 1; each variant a fresh process "
            f"({fp32['rss_after_imports_mib']:.0f} MiB after imports), peak RSS = VmHWM, file "
            f"pages = the mapped checkpoint's resident pages at that peak; "
            f"{result['threads']} torch threads, torch {result['torch']}. "
            f"{verdict}: NF4/fp32 peak RSS = {result['ratio']:.3f} "
            f"{'<=' if result['within_bound'] else '>'} {BOUND} "
            f"(peak anonymous memory: {result['anon_ratio']:.3f})",
        ]
    )


def real_markdown(real: dict[str, Any]) -> str:
    rows = [
        "| real model | base weights (MiB) | peak RSS (MiB) | % of LoRA fp32 | of which file "
        "pages | peak anonymous (MiB) | load s | step s | recomputes activations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lora = real["variants"]["lora-fp32"]
    for name, v in real["variants"].items():
        rows.append(
            f"| {name} | {v['base_weights_mib']:.0f} | {v['peak_rss_mib']:.0f} | "
            f"{100 * v['peak_rss_mib'] / lora['peak_rss_mib']:.1f}% | "
            f"{v['file_pages_at_peak_mib']:.0f} | {v['peak_anon_mib']:.0f} | "
            f"{v['load_seconds']:.1f} | {v['step_seconds']:.2f} | "
            f"{'yes' if v['gradient_checkpointing'] else 'no'} |"
        )
    head = "only the supervised positions" if lora["compact_lm_head"] else "every position"
    layout = "in one row, no padding" if lora.get("padding_free") else "padded to the longest"
    return "\n".join(
        [
            *rows,
            "",
            f"{real['model']} ({real['parameters']:,} params; base: {real['base']}), "
            f"fp32 safetensors; params.yaml lora ({lora['trainable_params']:,} trainable); "
            f"batch {real['batch']}, up to {real['seq_len']} tokens each (the first "
            f"{real['batch']} examples of {real['examples']}, {layout}: {real['tokens']} real "
            f"tokens, {real['supervised_tokens']} supervised), {real['steps']} steps, step s = "
            f"the last; the train stage's loss (TRL's fused LM head over {head}); qlora-nf4 = "
            f"conf/quant/nf4.yaml (float32 compute on CPU); each variant a fresh process "
            f"({lora['rss_after_imports_mib']:.0f} MiB after imports). No target: QLoRA/LoRA "
            f"peak RSS = {real['ratio']:.3f} (peak anonymous memory: {real['anon_ratio']:.3f})",
        ]
    )


def markdown(result: dict[str, Any]) -> str:
    parts = []
    if "variants" in result:
        parts.append(tinyllama_markdown(result))
    if "real_model" in result:
        parts.append(real_markdown(result["real_model"]))
    return "\n\n".join(parts)


def measure_tinyllama(
    *,
    layers: int,
    seq_len: int,
    params_file: Path,
    checkpoint_dtype: str = "bfloat16",
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Build the random base once (at `base_dir` unless one is there already; else in a
    temporary folder), run each variant in its own process; the result dict."""
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-") as tmp:
        base = base_dir or Path(tmp) / "base"
        info = _subprocess(
            "--build", str(base), "--layers", str(layers), "--dtype", checkpoint_dtype
        )
        variants = {
            v: _subprocess(
                "--child",
                v,
                "--base",
                str(base),
                "--seq-len",
                str(seq_len),
                "--params",
                str(params_file),
            )
            for v in VARIANTS
        }
    fp32, nf4 = variants["fp32"], variants["nf4"]
    ratio = nf4["peak_rss_mib"] / fp32["peak_rss_mib"]
    return {
        "shape": {**TINYLLAMA, "num_hidden_layers": layers},
        "layers": layers,
        "parameters": info["parameters"],
        "checkpoint_dtype": checkpoint_dtype,
        "seq_len": seq_len,
        "batch_size": 1,
        "variants": variants,
        "ratio": round(ratio, 4),
        "anon_ratio": round(nf4["peak_anon_mib"] / fp32["peak_anon_mib"], 4),
        "bound": BOUND,
        "within_bound": ratio <= BOUND,
    }


def measure_real(
    *, params_file: Path, batch_size: int | None = None, steps: int = REAL_STEPS
) -> dict[str, Any]:
    """The real default model's LoRA (fp32) and QLoRA (NF4) steps, each in its own process, on
    the first `batch_size` (default `train.batch_size`) training examples; the result dict."""
    import yaml

    from lorapipe.config import validate
    from lorapipe.models import load_tokenizer

    params = validate(yaml.safe_load(params_file.read_text()))
    size = batch_size or params.train.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-real-") as tmp:
        base, source = real_base(params, Path(tmp))
        tokenizer = load_tokenizer(base)
        examples, where = real_examples(params, tokenizer, size)
        batch = real_batch(tokenizer, examples)
        batch_file = Path(tmp) / "batch.json"
        batch_file.write_text(json.dumps(batch))
        args = ("--base", str(base), "--params", str(params_file), "--batch-file", str(batch_file))
        steps_arg = ("--real-steps", str(steps))
        variants = {v: _subprocess("--child", v, *args, *steps_arg) for v in REAL_VARIANTS}
        config = json.loads((base / "config.json").read_text())
        parameters = json.loads((base / "pin.json").read_text()).get("parameters")
    lora, qlora = variants["lora-fp32"], variants["qlora-nf4"]
    return {
        "model": params.model.name,
        "base": source,
        "parameters": parameters,
        "layers": config.get("num_hidden_layers"),
        "examples": where,
        "batch": len(examples),
        "seq_len": batch["seq_len"],
        "tokens": sum(batch["lengths"]),
        "supervised_tokens": sum(batch["supervised"]),
        "lengths": batch["lengths"],
        "steps": steps,
        "variants": variants,
        "ratio": round(qlora["peak_rss_mib"] / lora["peak_rss_mib"], 4),
        "anon_ratio": round(qlora["peak_anon_mib"] / lora["peak_anon_mib"], 4),
    }


def measure(
    *,
    layers: int,
    seq_len: int,
    params_file: Path,
    checkpoint_dtype: str = "bfloat16",
    tinyllama: bool = True,
    real: bool = True,
    real_batch_size: int | None = None,
    real_steps: int = REAL_STEPS,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """TinyLlama's shape (the top-level keys) and the real model (`real_model`), as asked."""
    result: dict[str, Any] = {}
    if tinyllama:
        result.update(
            measure_tinyllama(
                layers=layers,
                seq_len=seq_len,
                params_file=params_file,
                checkpoint_dtype=checkpoint_dtype,
                base_dir=base_dir,
            )
        )
    if real:
        result["real_model"] = measure_real(
            params_file=params_file, batch_size=real_batch_size, steps=real_steps
        )
    first = next(iter((result.get("variants") or result["real_model"]["variants"]).values()))
    result.update(
        threads=first["threads"],
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        cpu_count=os.cpu_count(),
        torch=first["torch"],
        python=platform.python_version(),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench_train_memory.json", help="result JSON")
    parser.add_argument("--params", default="params.yaml", help="params file (LoRA config)")
    parser.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"])
    parser.add_argument("--seq-len", type=int, default=256)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-real", action="store_true", help="TinyLlama's shape only")
    which.add_argument("--real-only", action="store_true", help="the real default model only")
    parser.add_argument(
        "--real-batch", type=int, default=None, help="real model: sequences (train.batch_size)"
    )
    parser.add_argument(
        "--real-steps", type=int, default=REAL_STEPS, help="real model: training steps"
    )
    parser.add_argument(
        "--base-dir",
        help="TinyLlama's shape: the random base in this folder, built there if it has none "
        "(make bench shares one with merge_memory.py)",
    )
    parser.add_argument("--child", choices=(*VARIANTS, *REAL_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.real_steps < 1 or (args.real_batch is not None and args.real_batch < 1):
        parser.error("--real-steps and --real-batch must be positive")
    if args.base_dir and not args.real_only:
        try:
            random_base_at(Path(args.base_dir), dtype=args.dtype, layers=args.layers)
        except FileExistsError as exc:
            parser.error(f"--base-dir: {exc}")

    if args.build:
        _, info = random_base_in(Path(args.build), dtype=args.dtype, layers=args.layers)
        print(json.dumps(info))
        return 0
    if args.child:
        batch_file = Path(args.batch_file) if args.batch_file else None
        steps = args.real_steps if batch_file else 1
        measured = child(
            Path(args.base), args.child, args.seq_len, Path(args.params), batch_file, steps
        )
        print(json.dumps(measured))
        return 0

    try:
        result = measure(
            layers=args.layers,
            seq_len=args.seq_len,
            params_file=Path(args.params),
            tinyllama=not args.real_only,
            real=not args.no_real,
            real_batch_size=args.real_batch,
            real_steps=args.real_steps,
            base_dir=Path(args.base_dir) if args.base_dir else None,
        )
    except (RuntimeError, FileNotFoundError) as exc:  # a subprocess failed, or a missing input
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
