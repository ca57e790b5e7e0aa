"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer, loss on completions only.

The formatted data is a prompt/completion dataset, so TRL masks the prompt (labels -100) and
supervises the completion including its closing EOS (`completion_only_loss=True`).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorapipe.checkpoints import prepare_checkpoints, remove_checkpoints, resumable, run_inputs
from lorapipe.config import Params, TrainCfg
from lorapipe.errors import PipelineError
from lorapipe.fused_lora import fuse_lora_updates
from lorapipe.io import numbered_jsonl, read_jsonl
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.packing import unpackable, use_packed_attention
from lorapipe.runtime import fix_mmap_threshold, keep_freed_memory, peak_rss_mib

# Logged values that measure the machine, not the model (eval_runtime, ..._per_second): left out
# of the curves, which are a DVC output and must hash the same on every identical run.
TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second")
# Summary keys that vary from run to run; stages/train.py writes them with lorapipe.runtime.
RUNTIME_KEYS = ("train_seconds", "wall_seconds", "peak_rss_mib", "peak_cuda_mib")

# The dtype the base weights load in for each precision; LoRA weights train in fp32 regardless.
MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TrainingError(PipelineError, RuntimeError):
    """Training cannot start or went wrong in a way the user can fix; the message says how."""


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the layers LoRA can adapt: Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name
    }
    return sorted(names)


def check_target_modules(model: torch.nn.Module, target_modules: str | list[str]) -> None:
    """Raise TrainingError unless every requested target name matches a layer of `model`.

    PEFT silently adapts only the names that exist, so a Llama name list on GPT-2 would train
    zero parameters; this stops before training and lists the names the model has.
    """
    available = adaptable_module_names(model)
    if target_modules == "all-linear":
        return
    if isinstance(target_modules, str):  # PEFT treats a string as a full-match regex
        full_names = [n for n, m in model.named_modules() if n]
        if not any(re.fullmatch(target_modules, n) for n in full_names):
            hint = f"adaptable layers are named: {', '.join(available)}"
            if any(re.search(target_modules, n) for n in full_names):  # `q_proj`: a part only
                hint = (
                    "a string is a regex that must match a module's full name (such as "
                    f"{next(n for n in full_names if re.search(target_modules, n))}); for "
                    f"layer names give a list, lora.target_modules=[{target_modules}], or "
                    f"match the end, '.*{target_modules}'"
                )
            raise TrainingError(
                f"lora.target_modules: regex {target_modules!r} matches no module; {hint}"
            )
        return
    missing = [t for t in target_modules if t not in available]
    if missing:
        verb = "matches" if len(missing) == 1 else "match"
        raise TrainingError(
            f"lora.target_modules: {', '.join(missing)} {verb} no layer of this model "
            f"(adaptable layers: {', '.join(available)})"
        )


def check_layers(base_dir: Path, layers: list[int] | None) -> None:
    """Raise TrainingError when a `lora.layers_to_transform` index is not a layer of the base
    (peft raises its own error after loading); read from the base's config, before it loads."""
    if not layers:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir).get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        return  # a config without a layer count: peft says what it finds
    outside = [i for i in layers if not 0 <= i < count]
    if outside:
        raise TrainingError(
            f"lora.layers_to_transform: {', '.join(map(str, outside))} is not a layer of this "
            f"model (its layers are 0-{count - 1})"
        )


def check_modules_to_save(model: torch.nn.Module, names: list[str] | None) -> None:
    """Raise TrainingError unless each `lora.modules_to_save` name ends some module's name.

    PEFT skips names that match nothing, so a typo would silently train and ship nothing extra.
    """
    full_names = [n for n, _ in model.named_modules() if n]
    missing = [
        name
        for name in names or []
        if not any(n == name or n.endswith(f".{name}") for n in full_names)
    ]
    if missing:
        top = sorted({n.rsplit(".", 1)[-1] for n in full_names})
        raise TrainingError(
            f"lora.modules_to_save: {', '.join(missing)} match no module of this model "
            f"(module names: {', '.join(top)})"
        )


def lora_config(params: Params) -> Any:
    """The peft LoraConfig for `params.lora`: every key of the schema is passed through."""
    from peft import LoraConfig, TaskType

    cfg = params.lora
    targets = cfg.target_modules
    # A plain dict: peft's hints say int alpha and literal inits; the schema already checked both.
    options: dict[str, Any] = {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(targets) if isinstance(targets, list) else targets,
        "bias": cfg.bias,
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": cfg.init,
        "layers_to_transform": list(cfg.layers_to_transform) if cfg.layers_to_transform else None,
        "task_type": TaskType.CAUSAL_LM,
    }
    return LoraConfig(**options)


def resolve_precision(requested: str) -> str:
    """fp32, bf16 or fp16 for `train.precision`; `auto` picks by device.

    auto: bf16 on a GPU that supports it, fp16 (with loss scaling) on older GPUs, fp32 on CPU,
    where bf16 matrix products are ~300x slower. Raises TrainingError for fp16 without a GPU.
    """
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise TrainingError(
            "train.precision: fp16 needs a CUDA GPU (its loss scaling runs there); "
            "use auto or fp32 on CPU"
        )
    if requested == "bf16" and not cuda:
        print("train: warning: bf16 on CPU is far slower than fp32 here (train.precision: auto)")
    return requested


def device_name() -> str:
    """`cpu`, or the CUDA device's name (what the trainer will run on)."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def process_rank() -> tuple[int, int]:
    """(global rank of this process, number of processes): (0, 1) for a plain run, otherwise
    what `accelerate launch` / torchrun set up (accelerate's PartialState reads it)."""
    from accelerate import PartialState

    # cpu as the trainer will set it (use_cpu): on CPU, accelerate only sees the processes
    # (gloo) when told so, and the trainer's later PartialState must agree with this one.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes


def fsdp_on_cpu() -> bool:
    """Let accelerate shard with FSDP over CPU processes, as `accelerate launch` with
    conf/accelerate/fsdp.yaml asks (ACCELERATE_USE_FSDP=true) on a machine without a GPU. Call
    before the trainer makes its Accelerator; True when it applied.

    accelerate 1.15 only turns on FSDP when the processes are GPUs (AcceleratorState checks
    for MULTI_GPU and friends); on CPU (gloo) it keeps MULTI_CPU and silently wraps the model
    in DDP instead. torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, so the shared
    state is marked MULTI_GPU for the one check that decides; AcceleratorState then records
    FSDP (as on GPUs, and writes that back to this shared state) and the device stays cpu.
    `check_sharding` fails loudly if an upgrade makes this stop working. DeepSpeed needs no
    such help: accelerate enables it on CPU (deepspeed's CPU accelerator, gloo).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    if torch.cuda.is_available() or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return True


def check_sharding(trainer: Any) -> None:
    """Raise TrainingError when the launcher asked for FSDP or DeepSpeed but the trainer will
    not use it: accelerate then falls back to DDP without a word, and the run that was meant
    to shard a base too large for one device replicates it instead."""
    from accelerate.utils import parse_flag_from_env

    for flag, enabled, name in (
        ("ACCELERATE_USE_FSDP", trainer.is_fsdp_enabled, "FSDP"),
        ("ACCELERATE_USE_DEEPSPEED", trainer.is_deepspeed_enabled, "DeepSpeed"),
    ):
        if parse_flag_from_env(flag) and not enabled:
            raise TrainingError(
                f"accelerate launch asked for {name} ({flag}=true), but accelerate "
                f"{_version('accelerate')} did not enable it on {device_name()} (it would run "
                "plain DDP instead); see docs/sweeps-and-scale-out.md for the configs run here"
            )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _trainables_to_fp32(model: torch.nn.Module) -> None:
    """Cast trainable weights to fp32: fp16 loss scaling and fp32 training need them so, and
    bf16 LoRA weights on CPU make every step many times slower."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _mutates_base(init: bool | str) -> bool:
    """PiSSA and OLoRA move part of the base weights into the adapter at initialisation."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


class NonFiniteLossGuard(TrainerCallback):
    """Stops training with TrainingError as soon as a logged train or eval loss is NaN or inf."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingError(
                    f"{key} is {value} at step {state.global_step} (logged every "
                    f"{args.logging_steps} steps): training diverged. Lower train.learning_rate, "
                    "keep train.max_grad_norm set, or use train.precision: fp32"
                )


class LogAtCheckpoints(TrainerCallback):
    """Logs the training loss at every step that saves a checkpoint, so a run resumed from one
    starts a fresh logging window there: its curves, `train_loss` and metrics are then a
    straight run's (`_mean_train_loss`). Without it a checkpoint between two logging steps
    (save_steps 5, logging_steps 10) splits a window, and the resumed run logs a different
    mean. Written here: the trainer has no such option."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # after the trainer's own flow callback has decided to save; before it logs and saves
        if control.should_save:
            control.should_log = True

    on_epoch_end = on_step_end


class TrainingCurves(TrainerCallback):
    """Train and eval curves to dvclive, x = the optimizer step, so both share one axis.

    A resumed run first replays the checkpoint's log history, so the curves are whole.
    """

    def __init__(self, live: Any) -> None:
        self.live = live

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.live.log_params(args.to_dict())
        for entry in state.log_history:
            self._log(entry["step"], entry)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self._log(state.global_step, logs or {})

    def _log(self, step: int, logs: dict[str, Any]) -> None:
        from dvclive.plots import Metric
        from dvclive.utils import standardize_metric_name

        if "train_runtime" in logs:
            return  # the run's closing summary, not a point on a curve (reports/train.json has it)
        self.live.step = step
        for key, value in logs.items():
            if key != "step" and not key.endswith(TIMING_KEYS) and Metric.could_log(value):
                self.live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), value)
        self.live.sync()


def token_count(trainer: Any) -> TrainerCallback:
    """Keeps TRL's running count of training tokens (`num_tokens` in the logs, the curves and
    metrics.json) in the checkpoints, so that a resumed run counts on from the checkpoint's count
    as a straight run does. SFTTrainer keeps the count on itself (`_total_train_tokens`) and
    starts it at 0 in every process; neither it nor transformers saves it (written by hand).

    transformers saves an `ExportableState` callback's `state()` with each checkpoint and, on
    resume (`restore_callback_states_from_checkpoint`), replaces the callback with a new one made
    from its class and saved args, before `on_train_begin`; so the class is made per trainer and
    holds it."""
    from transformers.trainer_callback import ExportableState

    class TokenCount(TrainerCallback, ExportableState):
        def __init__(self, num_tokens: int = 0) -> None:
            self.num_tokens = num_tokens

        def state(self) -> dict[str, Any]:
            return {"args": {"num_tokens": int(trainer._total_train_tokens)}, "attributes": {}}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer._total_train_tokens = self.num_tokens

    return TokenCount()


def _mean_train_loss(log_history: list[dict[str, Any]], result: Any, resumed_step: int) -> float:
    """The mean training loss over the whole run, also when this call resumed at `resumed_step`.

    The trainer averages only the steps of this call; the steps before come from the logged
    windows in the checkpoint's history (exact when the checkpoint step was a logging step).
    """
    if resumed_step == 0:
        return float(result.training_loss)
    weighted, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] <= resumed_step:
            weighted += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    this_call = result.global_step - resumed_step
    return (weighted + float(result.training_loss) * this_call) / max(previous + this_call, 1)


def score_only_supervised_positions() -> None:
    """Make TRL's fused LM head project only the positions that have a label, on every device.

    TRL 1.16's SFTTrainer computes the loss with a fused LM head that skips the `-100` positions
    on CUDA/XPU (Triton) but, elsewhere, projects every position through the output layer and
    masks afterwards, to keep tile shapes fixed for backends that recompile on a new shape. On
    CPU nothing recompiles, and about 90% of a chat example's positions are prompt: the output
    layer (576 x 49,152 on SmolLM2) over all of them took ~40% of each training step. The
    compact path is TRL's own, computes the same sum over the same supervised positions (the
    loss is equal, tests/test_training.py), and here makes a step 1.6x faster. TRL has no
    switch for it, so its choice is replaced here; an upgrade that renames it fails loudly.
    On CPU the few scored positions' logits are then kept rather than projected again in the
    backward (`lorapipe.whole_head`, in place of TRL's kernel where TRL's trainer calls it).
    """
    import trl.trainer.utils as trl_utils

    from lorapipe.whole_head import WholeOrChunked

    choose = trl_utils._use_triton
    if getattr(choose, "lorapipe_compact", False):
        return

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or bool(choose(device))

    compact.lorapipe_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    if trl_utils._ChunkedLogProbFunction is not WholeOrChunked:  # fails loudly if renamed
        setattr(trl_utils, "_ChunkedLogProbFunction", WholeOrChunked)  # noqa: B010  # not its type


CHECKPOINTING = {"use_reentrant": False}  # non-reentrant: works with frozen inputs under PEFT


def load_for_training(base_dir: Path, params: Params, dtype: str) -> tuple[Any, bool]:
    """The base as training takes it, before LoRA: in `dtype`, or quantised per `params.quant`
    and prepared by peft's prepare_model_for_kbit_training (norms in fp32, input gradients),
    with glibc's mmap threshold fixed first (`fix_mmap_threshold`); unquantised, glibc keeps
    freed memory for the next step once it is loaded (`keep_freed_memory`: the plain loop's step
    on SmolLM2 1.33 -> 1.26 s). Returns the model and whether training recomputes activations
    (`train.gradient_checkpointing`, auto resolved)."""
    from peft import prepare_model_for_kbit_training

    quantized = params.quant.mode != "none"
    if quantized:
        fix_mmap_threshold()
    model = load_base_model(base_dir, dtype=dtype, quant=params.quant)
    if not quantized:
        keep_freed_memory()
    recompute = params.train.checkpointing(params.quant)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recompute, gradient_checkpointing_kwargs=CHECKPOINTING
        )
    if recompute:
        # The KV cache is useless in training and clashes with recomputing activations.
        model.config.use_cache = False
    return model, recompute


def _datasets(formatted_dir: Path, cfg: TrainCfg) -> tuple[Any, Any, dict[str, Path]]:
    """The formatted train and val splits as datasets, and their files."""
    from datasets import Dataset

    files = {split: formatted_dir / f"{split}.jsonl" for split in ("train", "val")}
    train = Dataset.from_list(read_jsonl(files["train"]))
    val = Dataset.from_list(read_jsonl(files["val"]))
    if cfg.early_stopping_patience is not None and not len(val):
        raise TrainingError("train.early_stopping_patience needs a non-empty val split")
    return train, val, files


def setup_model(params: Params, base_dir: Path, precision: str) -> tuple[Any, bool, int, int]:
    """The base with LoRA attached: (peft model, recomputes activations, trainable, total).
    Raises TrainingError when a LoRA name matches nothing or no parameter would train."""
    from peft import get_peft_model

    check_layers(base_dir, params.lora.layers_to_transform)
    model, recompute = load_for_training(base_dir, params, MODEL_DTYPES[precision])
    check_target_modules(model, params.lora.target_modules)
    check_modules_to_save(model, params.lora.modules_to_save)
    model = get_peft_model(model, lora_config(params))
    fuse_lora_updates(model)  # LoRA inside the base product, also over 4-bit layers
    # peft's count: a 4-bit weight holds two values a byte, and counts both (numel() would count
    # bytes, so QLoRA's total was LoRA's less half of every quantised weight).
    trainable, total = model.get_nb_trainable_parameters()
    print(f"train: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if trainable == 0:
        raise TrainingError(
            "no parameter is trainable; adaptable layers are named: "
            + ", ".join(adaptable_module_names(model))
            + " (check lora.target_modules and lora.layers_to_transform)"
        )
    return model, recompute, trainable, total


def trainer_arguments(
    params: Params, precision: str, recompute: bool, has_val: bool, packed: bool = False
) -> Any:
    """TRL's SFTConfig for `params.train`: completion-only loss, per-epoch evaluation when there
    is a val split, checkpoints to `paths.checkpoints`, no reporting integrations; with `packed`,
    padding-free batches (`lorapipe.packing`). TRL does not truncate: the format stage fitted
    every example to `train.max_length` and `check_lengths` holds training to it."""
    from trl import SFTConfig

    cfg = params.train
    early = cfg.early_stopping_patience is not None
    return SFTConfig(
        output_dir=params.paths.checkpoints,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a fraction < 1 is a ratio of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=None,  # check_lengths: an example too long stops training, not truncated
        padding_free=packed,
        completion_only_loss=True,
        eval_strategy="epoch" if has_val else "no",
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count resumes too
        activation_checkpointing=recompute,
        activation_checkpointing_kwargs=CHECKPOINTING if recompute else None,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN step must reach the logged loss, not be averaged away
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def check_lengths(trainer: Any, limit: int, files: dict[str, Path]) -> None:
    """Raise TrainingError naming the first example (file and line) the trainer tokenised to
    more than `limit` tokens: the format stage fits every example to `train.max_length`, so one
    longer was formatted under another value, and cutting it here would drop its closing EOS."""
    for split, dataset in (("train", trainer.train_dataset), ("val", trainer.eval_dataset)):
        if dataset is None:
            continue
        lengths = [len(ids) for ids in dataset["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            text = files[split].read_text(encoding="utf-8")
            line = numbered_jsonl(text, str(files[split]))[over[0]][0]
            raise TrainingError(
                f"{files[split]}:{line}: {lengths[over[0]]} tokens, more than "
                f"train.max_length {limit} ({len(over)} of {len(lengths)} examples); the data "
                "was formatted with another train.max_length: format it with this one"
            )


def resume_point(args: Any, params: Params, inputs: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, if one was made with the same `inputs`. Rank 0 first
    clears stale checkpoints; the other processes then only read which one to resume."""
    checkpoints, resume = Path(params.paths.checkpoints), params.train.resume
    with args.main_process_first(local=False, desc="checkpoint folder"):
        if args.process_index == 0:
            return prepare_checkpoints(checkpoints, inputs, resume=resume)
        return resumable(checkpoints, inputs, resume=resume)


def trainer_callbacks(cfg: TrainCfg, live: Any) -> list[TrainerCallback]:
    """The loss guard, a log at every checkpoint, the curves (rank 0 only: `live` is None
    elsewhere), early stopping."""
    from transformers import EarlyStoppingCallback

    callbacks: list[TrainerCallback] = [NonFiniteLossGuard(), LogAtCheckpoints()]
    if live is not None:
        callbacks.append(TrainingCurves(live))
    if cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    return callbacks


def train_adapter(
    params: Params,
    base_dir: Path,
    formatted_dir: Path,
    out_dir: Path | None,
    curves_dir: Path | None,
    *,
    callbacks: Sequence[TrainerCallback] = (),
    pack: bool = True,
) -> dict[str, Any]:
    """Train a LoRA adapter on `formatted_dir/{train,val}.jsonl` and save it to `out_dir`.

    Checkpoints in `params.paths.checkpoints` from an interrupted run with the same params, data,
    base, code and libraries are resumed (`resume_point`) and removed once the adapter is saved.
    Under `accelerate launch` every process calls this; only global rank 0 gets `out_dir` and
    `curves_dir` and writes anything. `callbacks` are added to the trainer's. Batches are
    padding-free (`lorapipe.packing`) when `pack` and the model's attention allows it. Returns
    the run summary (`fit`); raises TrainingError as `setup_model`, `check_lengths` and `fit` do.
    """
    from dvclive import Live

    started = time.perf_counter()
    score_only_supervised_positions()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    precision = resolve_precision(params.train.precision)
    train, val, data_files = _datasets(formatted_dir, params.train)
    torch.manual_seed(params.train.seed)
    tokenizer = load_tokenizer(base_dir)
    model, recompute, trainable, total = setup_model(params, base_dir, precision)
    packed = pack and unpackable(model) is None
    if packed:
        use_packed_attention(model)
    args = trainer_arguments(params, precision, recompute, bool(len(val)), packed)
    main = args.process_index == 0  # the trainer's own view of the distributed set-up
    if main and (out_dir is None or curves_dir is None):
        raise TrainingError("rank 0 needs an output folder for the adapter and its curves")
    resume_from = resume_point(args, params, run_inputs(params, data_files, base_dir, precision))
    live = Live(str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None) if main else None
    with tempfile.TemporaryDirectory(prefix="lorapipe-init-") as initial:
        if main and _mutates_base(params.lora.init):
            model.save_pretrained(initial)  # the adapter before training, to convert it back later
        from trl import SFTTrainer

        fsdp_on_cpu()  # before the trainer's Accelerator is made
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=val if len(val) else None,
            processing_class=tokenizer,
            callbacks=[*trainer_callbacks(params.train, live), *callbacks],
        )
        trainer.add_callback(token_count(trainer))
        check_sharding(trainer)
        check_lengths(trainer, params.train.max_length, data_files)
        # TRL casts QLoRA adapters to bf16 (the QLoRA paper's recipe); keep that only under bf16.
        if not (params.quant.mode != "none" and precision == "bf16"):
            _trainables_to_fp32(model)
        summary = fit(trainer, resume_from, bool(len(val)))
        summary.update(trainable_params=trainable, total_params=total, precision=precision)
        summary["gradient_checkpointing"] = recompute
        summary["padding_free"] = packed
        if not save(trainer, params, out_dir, initial if main else None):
            return summary
    assert live is not None and out_dir is not None
    live.end()
    tokenizer.save_pretrained(out_dir)
    _sort_target_modules(out_dir / "adapter_config.json")
    remove_checkpoints(Path(params.paths.checkpoints))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if torch.cuda.is_available():
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary


def fit(trainer: Any, resume_from: Path | None, has_val: bool) -> dict[str, Any]:
    """Train (from `resume_from` when given) and evaluate once more; the summary: train loss
    over the whole run, steps, epochs, resumed step, device, seconds, eval loss, and for a
    distributed run the world size and this process's rank; after early stopping, the step of the
    epoch it kept (`kept_step`: steps and epochs are how far it ran). Raises TrainingError when
    the loss is not finite."""
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    resumed_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    train_loss = _mean_train_loss(trainer.state.log_history, result, resumed_step)
    if not math.isfinite(train_loss):
        raise TrainingError(f"training loss is {train_loss} at step {result.global_step}")
    summary: dict[str, Any] = {
        "train_loss": round(train_loss, 6),
        "steps": int(result.global_step),
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "resumed_from_step": resumed_step,
        "device": device_name(),
        "train_seconds": round(seconds, 1),
    }
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:  # early stopping restored an earlier epoch
        summary["kept_step"] = int(Path(best).name.split("-")[-1])
    if trainer.args.world_size > 1:  # recorded in lineage: who wrote the adapter, out of how many
        summary.update(world_size=trainer.args.world_size, writer_rank=trainer.args.process_index)
        summary["sharding"] = sharding(trainer)
    if has_val:
        trainer.remove_callback(TrainingCurves)  # the curves already hold each epoch's eval
        summary["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 6)
    return summary


def sharding(trainer: Any) -> str:
    """How the processes split the model: fsdp1/fsdp2, deepspeed-zero<stage>, or ddp."""
    state = trainer.accelerator.state
    if trainer.is_fsdp_enabled:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    if trainer.is_deepspeed_enabled:
        return f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    return "ddp"


def save(trainer: Any, params: Params, out_dir: Path | None, initial: str | None) -> bool:
    """Save the adapter to `out_dir` on rank 0 (True); False on the other processes.

    FSDP and DeepSpeed shard the weights: gathering them takes every process, and the trainer's
    save_model then writes on rank 0 only. PiSSA/OLoRA adapters are saved as a plain LoRA (rank
    2r) that applies to the untouched base, converted against `initial`.
    """
    main = trainer.args.process_index == 0
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:
        trainer.save_model(str(out_dir) if main else None)
    if not main:
        return False
    assert out_dir is not None  # rank 0 always has one (train_adapter checks)
    if sharded:  # save_model also pickles the TrainingArguments there: not part of an adapter
        (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)
    else:
        trainer.model.save_pretrained(
            out_dir,
            safe_serialization=True,
            path_initial_model_for_weight_conversion=(
                initial if _mutates_base(params.lora.init) else None
            ),
        )
    return True


def _sort_target_modules(config_path: Path) -> None:
    """Write PEFT's target_modules in sorted order.

    PEFT stores the names it resolved from `all-linear` as a set, whose order changes with
    Python's hash seed; sorting keeps the adapter folder byte-identical (and its DVC hash
    stable) across identical runs. Nothing in PEFT or TRL does this.
    """
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
