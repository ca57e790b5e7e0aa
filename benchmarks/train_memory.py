"""Training memory at TinyLlama-1.1B's real shape: a LoRA step in fp32 vs a QLoRA (NF4) step.

python benchmarks/train_memory.py                          # writes reports/bench_train_memory.json
python benchmarks/train_memory.py --layers 2 --out /tmp/m.json   # a quick dry run

Builds a Llama with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key/value heads, vocab 32000; benchmarks/shapes.py) and random weights, saves it once as bf16
safetensors (the dtype TinyLlama is published in) to a temporary folder, then, each variant in
a fresh subprocess so that each peak is its own:

- fp32: the base loaded in float32, as `train.precision: auto` loads it on CPU;
- nf4:  `quant=nf4` (bitsandbytes 4-bit NormalFloat, double quantisation, float32 compute:
  `quant.compute_dtype: auto` on CPU),

each through `lorapipe.training.load_for_training`, the train stage's own loading: a converting
load reads the checkpoint one tensor at a time (`lorapipe.models.read_by_tensor`); a quantised
base gets glibc's fixed mmap threshold (`lorapipe.runtime.fix_mmap_threshold`), peft's
`prepare_model_for_kbit_training` and, with `train.gradient_checkpointing: auto`, recomputed
activations (fp32: none). Then `get_peft_model` with the pipeline's LoRA config (params.yaml
`lora`) and one training step: forward and backward on one sequence of `--seq-len` random tokens
(batch 1, labels = inputs) and one AdamW step on the LoRA weights. Peak RSS is the child's VmHWM:
the whole process (Python, torch, the libraries and the model), nothing subtracted. Acceptance:
NF4's peak at most 35% of fp32's.
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
from shapes import TINYLLAMA, build_random_base

BOUND = 0.35  # acceptance: NF4 peak RSS <= 35% of the fp32 peak
VARIANTS = ("fp32", "nf4")


def quant_for(variant: str) -> Any:
    """The pipeline's quant config for a variant: conf/quant/none.yaml or conf/quant/nf4.yaml."""
    from lorapipe.config import QuantCfg

    if variant == "nf4":
        return QuantCfg(mode="nf4", compute_dtype="auto", double_quant=True)
    return QuantCfg(mode="none", compute_dtype="auto", double_quant=False)


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


def child(base_dir: Path, variant: str, seq_len: int, params_file: Path) -> dict[str, Any]:
    """Load the base the pipeline's way, add LoRA, run one training step; the measurements."""
    import torch
    import yaml
    from peft import get_peft_model

    from lorapipe.config import validate
    from lorapipe.training import _trainables_to_fp32, load_for_training, lora_config

    params = validate(yaml.safe_load(params_file.read_text()))
    params = params.model_copy(update={"quant": quant_for(variant)})
    sampler = MemorySampler()
    after_imports = sampler.snapshot()
    t0 = time.perf_counter()
    model, recompute = load_for_training(base_dir, params, "float32")  # as the train stage
    model = get_peft_model(model, lora_config(params))
    _trainables_to_fp32(model)
    load_seconds = time.perf_counter() - t0
    after_load = sampler.snapshot()
    loaded_rss = sampler.status()
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.train.learning_rate)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator())
    model.train()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "rss_after_imports_mib": after_imports["peak_rss_mib"],
        "load": after_load,
        "rss_after_load_mib": round(loaded_rss["VmRSS"] / 1024, 1),
        **sampler.snapshot(),
        "load_seconds": round(load_seconds, 2),
        "step_seconds": round(step_seconds, 2),
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


def markdown(result: dict[str, Any]) -> str:
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


def measure(
    *, layers: int, seq_len: int, params_file: Path, checkpoint_dtype: str = "bfloat16"
) -> dict[str, Any]:
    """Build the random base once, run each variant in its own process; the result dict."""
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-") as tmp:
        base = Path(tmp) / "base"
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
        "threads": fp32["threads"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": fp32["torch"],
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench_train_memory.json", help="result JSON")
    parser.add_argument("--params", default="params.yaml", help="params file (LoRA config)")
    parser.add_argument("--layers", type=int, default=TINYLLAMA["num_hidden_layers"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.build:
        _, info = build_random_base(
            Path(args.build), dtype=args.dtype, num_hidden_layers=args.layers
        )
        print(json.dumps(info))
        return 0
    if args.child:
        print(json.dumps(child(Path(args.base), args.child, args.seq_len, Path(args.params))))
        return 0

    try:
        result = measure(layers=args.layers, seq_len=args.seq_len, params_file=Path(args.params))
    except RuntimeError as exc:  # a subprocess failed: its stderr tail is in the message
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
