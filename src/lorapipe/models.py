"""Model loading: one way for every stage after `base` to load the base model and tokenizer.

The base stage (`lorapipe.base_model`) always writes `models/base/pin.json`. For built, copied,
converted (GGUF) and snapshot bases the weights and tokenizer sit beside it; for a hub model
without a snapshot the pin names the repo and the exact commit, and `from_pretrained` fetches
that commit.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapipe.config import (
    PICKLE_WEIGHTS,
    TOKEN_VARIABLES,
    ModelCfg,
    QuantCfg,
    quant_on_saved_quantised,
)
from lorapipe.errors import PipelineError
from lorapipe.provenance import differences, mismatch, sections

# torch is imported where it is used: every stage imports this module, and a typo in params
# should be reported before the seconds torch takes to import.
if TYPE_CHECKING:
    import torch

PIN_FILE = "pin.json"
MADE_WITH = "made_with"  # the pin's record of the `model` params the base stage ran with
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RETRAIN = "rerun the train stage (`dvc repro train`)"  # advice for the pipeline's own adapter


class ModelSourceError(PipelineError, RuntimeError):
    """The base model cannot be found, pinned or loaded; the message says what to do."""


def hub_token() -> str | bool:
    """The hub token from the environment (HF_TOKEN, then HUGGING_FACE_HUB_TOKEN), else False.

    False makes huggingface_hub send no token instead of falling back to a token file left by
    `hf auth login`: the pipeline takes secrets from the environment only, and passes them to
    the hub client without writing them anywhere.
    """
    for variable in TOKEN_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return False


def missing_safetensors(adapter_dir: Path) -> str | None:
    """Why `adapter_dir` has no weights this pipeline loads (None when its safetensors file is
    there): PEFT falls back to unpickling `adapter_model.bin` when no safetensors file is there;
    a pickle can run code, so this pipeline never lets it get that far."""
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return None
    pickled = sorted(p.name for p in adapter_dir.glob("*") if p.suffix in PICKLE_WEIGHTS)
    return f"{adapter_dir}: no {ADAPTER_WEIGHTS}" + (
        f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
    )


def refuse_quant_on_saved_quantised(base_dir: Path, quant: QuantCfg | None) -> None:
    """Raise ModelSourceError when `quant` asks to quantise a base saved quantised: it loads as
    saved (`config.quant_on_saved_quantised`). Reads config.json only."""
    if problem := quant_on_saved_quantised(base_dir, quant.mode if quant else None):
        raise ModelSourceError(problem)


def check_merge_dtype(base_dir: Path, dtype: str) -> None:
    """Raise ModelSourceError when the base cannot be loaded in `dtype` for merging.

    Reads only `config.json`: a base saved already quantised has no full-precision weights to
    fold the adapter into; bitsandbytes' can be dequantised (`merging.merge_adapter` does), the
    others' (GPTQ, AWQ, ...) not here. bfloat16 weights overflow float16 (largest value 65504
    against bfloat16's 3e38). Unknown without a local config: no check.
    """
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    quantized = config.get("quantization_config")
    method = quantized.get("quant_method", "quantized") if isinstance(quantized, dict) else ""
    if quantized and method != "bitsandbytes":
        raise ModelSourceError(
            f"merge.dtype: the base in {base_dir} is saved {method}-quantised, so it cannot be "
            f"loaded in {dtype} to merge into; use the unquantised original as the base (and "
            "quant=nf4 for QLoRA training)"
        )
    stored = config.get("dtype") or config.get("torch_dtype")
    if dtype == "float16" and stored == "bfloat16":
        raise ModelSourceError(
            "merge.dtype: float16 cannot hold the base's bfloat16 weights (values above 65504 "
            "overflow to inf); use merge.dtype=bfloat16 or float32"
        )


def _named(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def loading_problems(info: dict[str, Any]) -> str | None:
    """What transformers' loading info (`from_pretrained(..., output_loading_info=True)`) says
    is wrong with a checkpoint, in one phrase; None when every weight was read from it.

    A missing tensor is filled at random, differently on every load, and a mismatched one
    (loaded with `ignore_mismatched_sizes=True`) likewise; transformers itself only logs them.
    Tied weights (an output layer sharing the input embedding) are not missing.
    """
    problems = []
    if missing := sorted(info.get("missing_keys", ())):
        problems.append(
            f"{len(missing)} tensor(s) missing ({_named(missing)}): they would be random"
        )
    if mismatched := sorted(info.get("mismatched_keys", ())):
        shapes = [f"{k} is {list(saved)}, not {list(model)}" for k, saved, model in mismatched]
        problems.append(
            f"{len(mismatched)} tensor(s) of another shape than the config gives ({_named(shapes)})"
        )
    if unexpected := sorted(info.get("unexpected_keys", ())):
        problems.append(
            f"{len(unexpected)} tensor(s) the model has no place for ({_named(unexpected)})"
        )
    return "; ".join(problems) or None


def with_loading_info(loaded: Any) -> tuple[Any, dict[str, Any]]:
    """(model, loading info) from `from_pretrained(..., output_loading_info=True)`, typed: the
    library's annotations give the model alone."""
    model, info = loaded
    return model, dict(info)


class _LoadReports(list[str]):
    """A logging filter that keeps transformers' load reports out of the log, and here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.append(record.getMessage())
            return False
        return True


@contextmanager
def quiet_load_report() -> Iterator[list[str]]:
    """Within it, transformers does not log its load report (a table of missing, unexpected and
    mismatched weights) to stderr: the caller reads the same from the loading info and says it
    in one line (`loading_problems`). A filter, not a level: transformers reads that logger's
    level to decide whether to log more (its tensor-parallel plan at WARNING and above).
    Yields the reports it kept back, for a load that raises before it returns the info
    (`unconverted`)."""
    logger = logging.getLogger("transformers.modeling_utils")
    reports = _LoadReports()
    logger.addFilter(reports)
    try:
        yield reports
    finally:
        logger.removeFilter(reports)


def unconverted(reports: list[str]) -> str | None:
    """What load reports say could not be converted from the checkpoint as saved (a quantised
    checkpoint missing or damaging a tensor of its quantisation state), in one phrase; None when
    nothing. transformers then raises, pointing at the report, before it returns the loading
    info that would name them, so they are read from the report's text."""
    found = re.findall(r"on tensors destined for (\S+?)\. Ckpt contains", "\n".join(reports))
    if not found:
        return None
    return f"{len(set(found))} tensor(s) fail to convert ({_named(sorted(set(found)))})"


def read_pin(base_dir: Path) -> dict[str, Any]:
    """The pin the base stage wrote; raises ModelSourceError when the base stage has not run."""
    path = base_dir / PIN_FILE
    if not path.exists():
        raise ModelSourceError(f"{path} not found: run the base stage first (`dvc repro base`)")
    return dict(json.loads(path.read_text()))


def require_base(cfg: ModelCfg, base_dir: Path) -> dict[str, Any]:
    """The pin of the base in `base_dir`, once it is known to be the base `cfg` names.

    The base stage records the `model` params it ran with in the pin (`made_with`). A stage run
    by hand with other `model.*` values than those (a `model.file` override on `train`, or
    params.yaml edited without `dvc repro`) would train or evaluate one model while its
    lineage names another, so it stops here instead, naming every key that differs
    (`lorapipe.provenance`). Raises ModelSourceError.
    """
    pin = read_pin(base_dir)
    differ = differences(sections(model=cfg), pin.get(MADE_WITH, {}))
    if differ:
        remake = "`python -m stages.base` with the same overrides"
        raise ModelSourceError(mismatch(base_dir, base_dir / PIN_FILE, differ, remake))
    return pin


def source_of(base_dir: Path) -> tuple[str, str | None, bool]:
    """(path or repo id, revision, trust_remote_code) to pass to `from_pretrained`."""
    pin = read_pin(base_dir)
    trust = bool(pin.get("trust_remote_code", False))
    if (base_dir / "config.json").exists():
        return str(base_dir), None, trust
    return str(pin["name"]), pin.get("revision"), trust


def load_tokenizer(base_dir: Path) -> Any:
    """The base tokenizer, with a pad token (EOS when the model has none) for batching."""
    from transformers import AutoTokenizer

    name, revision, trust = source_of(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=trust, token=hub_token()
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """A torch dtype from its config name; `auto` is bfloat16 on a bf16-capable GPU else float32."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU bf16 matmuls are ~300x slower than fp32 on this class of CPU
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_base_model(
    base_dir: Path, *, dtype: str = "float32", quant: QuantCfg | None = None
) -> Any:
    """Load the base causal LM in `dtype`, or 4-/8-bit per `quant` (bitsandbytes, CPU or GPU).

    A local checkpoint that the load converts (quantises, or casts to another dtype) is read one
    tensor at a time (`read_by_tensor`); one loaded as it is stored stays memory-mapped. A base
    saved quantised loads as saved, so `quant` must leave it be: transformers would take the
    checkpoint's quantisation over any other without a word, and the lineage would name the
    wrong one.
    """
    refuse_quant_on_saved_quantised(base_dir, quant)
    import torch
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        GenerationConfig,
    )

    name, revision, trust = source_of(base_dir)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": trust,
        "token": hub_token(),
        # Mismatched shapes come back in the loading info, refused below with the missing ones.
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    if quant is not None and quant.mode != "none":
        compute = resolve_dtype(quant.compute_dtype)
        if quant.mode == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    else:
        kwargs["dtype"] = resolve_dtype(dtype)
    state = read_by_tensor(Path(name)) if not trust and _converts(Path(name), kwargs) else None
    config: Any = AutoConfig.from_pretrained(name) if state is not None else None
    by_tensor = state is not None and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    with quiet_load_report():
        if not by_tensor:
            model, info = with_loading_info(
                AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, **kwargs)
            )
        else:
            kwargs.pop("trust_remote_code")  # False here: the class is transformers' own
            model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model, info = model_class.from_pretrained(
                None, config=config, state_dict=state, **kwargs
            )
            # Without a folder to read from, from_pretrained leaves out what it would take there.
            model.name_or_path = model.config._name_or_path = name
            if (Path(name) / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(name)
    problem = loading_problems(info)
    if problem:  # the base stage refuses these; this catches a base damaged after it ran
        raise ModelSourceError(
            f"{name}: the base's weights do not fit its config.json: {problem}; rerun the base "
            "stage (`python -m stages.base`)"
        )
    # Quantised here (quant.mode) or saved so (a bitsandbytes 4-bit checkpoint).
    if getattr(model, "hf_quantizer", None) is not None and not torch.cuda.is_available():
        keep_4bit_layout_on_cpu(model)
    return model


def keep_4bit_layout_on_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how
    many layers it turned off.

    Written here because bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's
    weight the first time it runs in eval mode without gradients (as the trainer's evaluation
    does), and keeps it repacked. The kernel for that layout computes in bfloat16, whatever
    `quant.compute_dtype` says; it requires out_features divisible by 32 (the tiny test model's
    688-wide MLP fails an assertion); and it has no backward, so when training resumes after an
    evaluation the gradients through every 4-bit layer are wrong, silently (measured: LoRA
    gradients off by up to 95%; tests/test_models.py). With this flag off every forward
    dequantises and multiplies in the compute dtype, as training does.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _converts(folder: Path, kwargs: dict[str, Any]) -> bool:
    """Whether loading the checkpoint in `folder` with `kwargs` turns every weight into
    something else: quantises it, or casts it to another dtype than it is stored in. False for
    a checkpoint saved quantised, which loads as it is."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        return False
    if "quantization_config" in kwargs:
        return True
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored is not None and stored != str(kwargs["dtype"]).removeprefix("torch.")


class TensorReader(dict[str, Any]):
    """Tensor name -> safetensors slice, read only when the loader asks for that tensor; it
    holds the open files for as long as it lives."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[Any] = []


def read_by_tensor(folder: Path) -> TensorReader | None:
    """The checkpoint in `folder` as lazily read tensors, or None when it has no safetensors.

    Written here because transformers memory-maps every shard for the whole load: when each
    weight is converted (quantised, or cast from bfloat16 to float32) the new copy is what the
    model keeps, yet every page of the file that was read stays in the process's resident memory
    until the load ends (2.2 GB at TinyLlama's shape, more than its NF4 weights). Reading one
    tensor at a time with pread puts the file in the page cache instead, where the kernel drops
    it as it likes, and lets the loader quantise one weight at a time.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    state = TensorReader()
    for file in files:
        handle = safe_open(str(folder / file), framework="pt", device="cpu", backend="pread")
        state.files.append(handle)
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            state[key] = handle.get_slice(key)
    return state
