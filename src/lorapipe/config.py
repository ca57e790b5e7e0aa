"""The typed schema of `params.yaml`: every key the stages read, checked before any model loads.

`validate(raw)` reports every problem at once, by dotted key (`lora.r: must be > 0, got 0`);
unknown keys are errors too, so a typo never trains with a silent default.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lorapipe.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """params.yaml (or a command-line override) has invalid values; the message lists each."""


class _Group(BaseModel):
    # strict: a value of the wrong type is refused, not converted (lora.r=true would be 1,
    # lora.use_dora=yes True, lora.r='8' 8); params arrive typed by YAML, and an int is still
    # taken for a float (train.learning_rate=1).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Architecture(_Group):
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    initializer_range: float = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Architecture:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


# A random seed: numpy's (transformers.set_seed seeds it with train.seed) takes [0, 2**32).
Seed = Annotated[int, Field(ge=0, lt=2**32)]

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class ModelCfg(_Group):
    kind: Literal["tiny", "hub", "local", "gguf"]
    name: str = Field(min_length=1)
    revision: str | None
    # gguf only: the .gguf file (a path, or a path inside the installed distribution
    # `package`), and its sha256 (any other file is refused).
    file: str | None = Field(min_length=1)
    package: str | None = Field(min_length=1)
    sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    # hub only: refuse a revision that is not a full commit sha (a branch or tag can move).
    strict_pin: bool
    snapshot: bool
    trust_remote_code: bool
    seed: Seed
    architecture: Architecture | None

    @model_validator(mode="after")
    def _tiny_needs_architecture(self) -> ModelCfg:
        if self.kind == "tiny" and self.architecture is None:
            raise ValueError("model.kind 'tiny' needs model.architecture")
        return self

    @model_validator(mode="after")
    def _gguf_options(self) -> ModelCfg:
        gguf_keys = (self.file, self.package, self.sha256)
        if self.kind != "gguf" and any(v is not None for v in gguf_keys):
            raise ValueError(
                "model.file, model.package and model.sha256 name and pin a GGUF file (kind: "
                f"gguf), but model.kind is {self.kind!r}"
            )
        if self.kind == "gguf" and (self.file is None or not self.file.endswith(".gguf")):
            raise ValueError(f"model.file: kind gguf needs a .gguf file, got {self.file!r}")
        return self

    @model_validator(mode="after")
    def _strict_pin_needs_a_sha(self) -> ModelCfg:
        if self.kind == "hub" and self.strict_pin and not is_commit_sha(self.revision):
            raise ValueError(
                f"model.strict_pin is on and model.revision {self.revision!r} is not a commit sha "
                "(40 hex digits): a branch or tag can move. Put the commit sha there (the hub "
                "page's history, or models/base/pin.json of an earlier run)"
            )
        return self


def is_commit_sha(revision: str | None) -> bool:
    """True for a full 40-hex-digit git commit sha, the only revision that cannot move."""
    return revision is not None and COMMIT_SHA.fullmatch(revision) is not None


# Files of a model folder that may hold weights: only safetensors are read (no pickle loading).
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# The files a saved tokenizer is read from: at least one of them must be in a model folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` carries a chat template (read from its JSON/Jinja
    files, without loading the tokenizer)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (ValueError, AttributeError):
        return False


def saved_quantisation(base_dir: Path) -> str | None:
    """How the checkpoint in `base_dir` is saved quantised, in words from its config.json's
    `quantization_config` ("bitsandbytes nf4", "bitsandbytes int8", "gptq"); None when it is
    not, or that config cannot be read."""
    try:
        config = json.loads((base_dir / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return quantisation_name(config) if isinstance(config, dict) else None


def quantisation_name(config: dict[str, Any]) -> str | None:
    """The quantisation a model config (config.json's content) records, in words, or None."""
    quantised = config.get("quantization_config")
    if not quantised:
        return None
    if not isinstance(quantised, dict):
        return "quantised"
    method = quantised.get("quant_method", "quantised")
    method = str(getattr(method, "value", method))  # a loaded model's config holds an enum
    if quantised.get("load_in_4bit"):
        return f"{method} {quantised.get('bnb_4bit_quant_type', 'fp4')}"
    return f"{method} int8" if quantised.get("load_in_8bit") else method


def model_folder_problems(folder: Path) -> list[str]:
    """What stops `folder` from serving as a base model, each as `model.name: ...`; [] if usable.

    Reads only file names and the tokenizer's small JSON files, never weights.
    """
    if not folder.is_dir():
        return [f"model.name: folder {str(folder)!r} not found (kind: local takes a model folder)"]
    if not (folder / "config.json").is_file():
        return [f"model.name: {folder} has no config.json (expected a model folder)"]
    problems = []
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHTS)
        problems.append(
            f"model.name: {folder} has no .safetensors weights"
            + (f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else "")
            + "; convert them: AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(folder, safe_serialization=True)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            f"model.name: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save it beside the weights: `AutoTokenizer.from_pretrained(original)"
            ".save_pretrained(folder)`"
        )
    elif not has_chat_template(folder):
        problems.append(
            "model.name: "
            + no_chat_template(
                folder,
                "`tok = AutoTokenizer.from_pretrained(folder); tok.chat_template = '<jinja>'; "
                "tok.save_pretrained(folder)`",
            )
        )
    return problems


def no_chat_template(where: Path, fix: str) -> str:
    """The one wording for a base whose tokenizer has no chat template, with how to give one."""
    return (
        f"the tokenizer in {where} has no chat template (format needs one to build prompts). "
        f"Use a chat/instruct model, or give it one: {fix}"
    )


# Choices the library's functions take; the schema below is where they are checked.
RowFormat = Literal["instruction", "alpaca", "messages", "prompt_completion"]
DataFormat = Literal["auto", RowFormat]  # auto: per file, from its keys
Split = Literal["train", "val", "test"]
OnError = Literal["fail", "skip"]
TrainOn = Literal["all_assistant", "last_assistant"]
Truncation = Literal["reject", "truncate_prompt"]

# The names a row's keys can be mapped to with data.fields (see lorapipe.records).
DataField = Literal[
    "instruction", "input", "output", "response", "messages", "prompt", "completion"
]


SOURCE_NAME = re.compile(r"[A-Za-z][\w.-]*")


class SourceCfg(_Group):
    """One of several data sources (data.sources): where it is, how to read it, its share."""

    path: str = Field(min_length=1)
    format: DataFormat
    fields: dict[str, DataField] | None
    weight: float | None = Field(gt=0)  # share of the training split, relative to the others
    rows: int | None = Field(gt=0)  # or exactly this many training rows

    @model_validator(mode="after")
    def _weight_or_rows(self) -> SourceCfg:
        if (self.weight is None) == (self.rows is None):
            raise ValueError(
                "give weight (a share of the training split) or rows (a fixed number of "
                f"training rows), one of them; got weight {self.weight}, rows {self.rows}"
            )
        return self


class DataCfg(_Group):
    path: str = Field(min_length=1)
    format: DataFormat
    fields: dict[str, DataField] | None
    splits: dict[Split, float]
    split_counts: dict[Split, int] | None
    split_column: str | None = Field(min_length=1)
    on_error: OnError
    max_reject_fraction: float = Field(ge=0.0, le=1.0)
    max_chars: int = Field(gt=0)
    # Several sources by name (lorapipe.mixing), each inside `path`; None: `path` is the one.
    sources: dict[str, SourceCfg] | None
    replay: float = Field(ge=0.0, lt=1.0)  # share of the training split: retain answers

    @model_validator(mode="after")
    def _sources_inside_path(self) -> DataCfg:
        if self.sources is None:
            return self
        problems = []
        if not self.sources:
            problems.append("data.sources is empty: name at least one source, or set it null")
        if self.format != "auto" or self.fields is not None:
            problems.append(
                "data.format and data.fields read data.path alone; with data.sources set them "
                "per source (data.sources.<name>.format / .fields)"
            )
        for name, source in self.sources.items():
            if name == "replay" or not SOURCE_NAME.fullmatch(name):
                problems.append(
                    f"data.sources: {name!r} cannot name a source (letters, digits, '_', '-', "
                    "'.', starting with a letter; 'replay' names the replayed retain answers)"
                )
            # `..` collapsed first (data/raw/mix/../../x is outside data/raw), but symlinks not
            # followed: DVC may link a tracked file to its cache, outside data.path.
            path, top = (
                Path(os.path.normpath(Path(p).absolute())) for p in (source.path, self.path)
            )
            inside = path == top or top in path.parents
            if not inside:
                problems.append(
                    f"data.sources.{name}: path {source.path} is not inside data.path "
                    f"{self.path}, which dvc.yaml tracks; move it there or widen data.path"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _path_is_not_named_replay(self) -> DataCfg:
        # data.path alone is the source named by its stem: "replay" would be taken for the
        # replayed retain answers, and its own rows dropped.
        if self.sources is None and self.replay > 0 and Path(self.path).stem == "replay":
            raise ValueError(
                f"data.path {self.path}: a file or folder named 'replay' would be taken for the "
                "replayed retain answers (data.replay); rename it, or list it under "
                "data.sources with another name"
            )
        return self

    @model_validator(mode="after")
    def _splits_are_fractions(self) -> DataCfg:
        if set(self.splits) != {"train", "val", "test"}:
            raise ValueError("data.splits needs train, val and test fractions")
        if any(v < 0 for v in self.splits.values()) or abs(sum(self.splits.values()) - 1) > 1e-9:
            raise ValueError(f"data.splits must be >= 0 and sum to 1, got {dict(self.splits)}")
        if self.split_counts is not None and any(n < 0 for n in self.split_counts.values()):
            raise ValueError(f"data.split_counts must be >= 0, got {dict(self.split_counts)}")
        if self.split_counts is not None and self.split_column is not None:
            raise ValueError("set data.split_counts or data.split_column, not both")
        return self


class FormatCfg(_Group):
    system_prompt: str | None
    train_on: TrainOn
    truncation: Truncation


# peft 0.21's `init_lora_weights` values this pipeline can run; "pissa_niter_<n>" is also accepted.
LORA_INITS = ("gaussian", "pissa", "olora", "orthogonal", "mica")
# Values peft accepts that need a pass this pipeline does not make, with what to do instead.
LORA_INITS_UNSUPPORTED = {
    "eva": "needs a data-driven initialisation pass (peft.initialize_lora_eva_weights)",
    "corda": "needs a data-driven preprocessing pass (peft.tuners.lora.corda)",
    "loftq": "re-quantises the base itself, so evaluate and merge would not see the same base",
}


class LoraCfg(_Group):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: str | list[str]
    bias: Literal["none", "all", "lora_only"]
    modules_to_save: list[str] | None
    use_dora: bool
    use_rslora: bool
    init: bool | str
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None  # the range: training.py

    @model_validator(mode="after")
    def _peft_accepts(self) -> LoraCfg:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is empty: name layers, or use all-linear")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "lora.layers_to_transform needs lora.target_modules as a list of names "
                f"(peft ignores layer indices for a string), got {self.target_modules!r}"
            )
        if isinstance(self.init, str):
            name = self.init
            if name in LORA_INITS_UNSUPPORTED:
                raise ValueError(
                    f"lora.init {name!r} is not supported: {LORA_INITS_UNSUPPORTED[name]}"
                )
            if name not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", name):
                raise ValueError(
                    f"lora.init must be true, false, {', '.join(LORA_INITS)} or pissa_niter_<n>, "
                    f"got {name!r}"
                )
        return self


class QuantCfg(_Group):
    mode: Literal["none", "nf4", "int8"]
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"]
    double_quant: bool

    @model_validator(mode="after")
    def _options_fit_the_mode(self) -> QuantCfg:
        # bitsandbytes ignores both silently outside 4-bit; say so instead of training without.
        if self.double_quant and self.mode != "nf4":
            raise ValueError(
                f"quant.double_quant is a 4-bit (nf4) option, but quant.mode is {self.mode!r}"
            )
        if self.compute_dtype != "auto" and self.mode != "nf4":
            raise ValueError(
                f"quant.compute_dtype {self.compute_dtype!r} applies to 4-bit (nf4) only, "
                f"but quant.mode is {self.mode!r}; leave it auto"
            )
        return self


class TrainCfg(_Group):
    epochs: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    max_length: int = Field(gt=0)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(gt=0)
    max_steps: int  # -1: train.epochs decides
    logging_steps: int = Field(gt=0)
    seed: Seed
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    # auto: on when the base is quantised (QLoRA's usual setting, as peft's
    # prepare_model_for_kbit_training defaults), off otherwise (faster); true / false force it.
    gradient_checkpointing: bool | Literal["auto"]
    early_stopping_patience: int | None = Field(gt=0)
    save_strategy: Literal["epoch", "steps", "no"]
    save_steps: int = Field(gt=0)
    save_total_limit: int | None = Field(gt=0)
    resume: bool

    def checkpointing(self, quant: QuantCfg) -> bool:
        """Whether training recomputes activations: `gradient_checkpointing`, auto resolved."""
        if self.gradient_checkpointing == "auto":
            return quant.mode != "none"
        return bool(self.gradient_checkpointing)

    @field_validator("max_steps")
    @classmethod
    def _max_steps_positive_or_unset(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be > 0, or -1 to train for train.epochs")
        return value

    @model_validator(mode="after")
    def _early_stopping_restores_an_epoch(self) -> TrainCfg:
        if self.early_stopping_patience is not None and self.save_strategy != "epoch":
            raise ValueError(
                "train.early_stopping_patience needs train.save_strategy: epoch (the best epoch's "
                f"checkpoint is restored at the end), got {self.save_strategy!r}"
            )
        return self


# What evaluation writes beside each model's name, so no adapter in eval.adapters may take one:
# the base and the pipeline's own adapter; the keys of reports/metrics.json that are not models
# (lorapipe.evaluation.evaluate_models builds them from these names; "examples" is in its
# "retain" section too); the fields of each predictions.jsonl and retain.jsonl row.
MODEL_KEYS = ("base", "adapter")
EXAMPLES, VAL_EXAMPLES, RETAIN = "examples", "val_examples", "retain"
ROW_KEYS = ("id", "prompt", "reference", "instruction", "scores")
NOT_ADAPTER_NAMES = (*MODEL_KEYS, EXAMPLES, VAL_EXAMPLES, RETAIN, *ROW_KEYS)
ADAPTER_NAME = re.compile(r"[A-Za-z][\w.-]*")


def _adapter_name(name: str) -> str:
    if not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            "cannot name an adapter: use letters, digits, '_', '-', '.', starting with a letter"
        )
    if name in NOT_ADAPTER_NAMES:
        raise ValueError(
            "cannot name an adapter: the evaluation's metrics.json, predictions and retain rows "
            f"already use the name (taken: {', '.join(NOT_ADAPTER_NAMES)}); pick another"
        )
    return name


class EvalCfg(_Group):
    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    max_examples: int | None = Field(gt=0)
    use_stemmer: bool
    ignore_case: bool
    do_sample: bool
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    seed: Seed
    val_loss_examples: int | None = Field(ge=0)
    # More adapters to evaluate beside the pipeline's own, on the same base and prompts:
    # {name: adapter folder}. Each becomes a model in metrics.json, predictions and the report.
    # Names are checked as keys (`_adapter_name`), so an error names eval.adapters.<name>.
    adapters: dict[Annotated[str, AfterValidator(_adapter_name)], str]


class MergeCfg(_Group):
    dtype: Literal["float32", "float16", "bfloat16"]
    # null: the dtype's default (lorapipe.merging: 1e-4 for float32, relative for half precision)
    max_logit_diff: float | None = Field(gt=0)
    probe_examples: int = Field(gt=0)
    # Largest safetensors shard: bytes, or a whole number with a unit as transformers reads it.
    max_shard_size: int | str
    push_to_hub: bool
    hub_repo_id: str | None = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    hub_private: bool
    push_dry_run: bool
    # GGUF files to write beside the merged model, each checked by reading it back
    # (lorapipe.gguf_export.GGUF_TYPES); empty: none.
    gguf: list[Literal["f32", "f16", "q8_0"]]

    @model_validator(mode="after")
    def _shards_and_hub(self) -> MergeCfg:
        size = self.max_shard_size
        if (isinstance(size, int) and size <= 0) or (
            isinstance(size, str) and not re.fullmatch(r"[1-9]\d*(KB|MB|GB|KiB|MiB|GiB)", size)
        ):
            raise ValueError(
                "merge.max_shard_size must be a positive number of bytes or a whole number "
                f"with a unit (KB, MB, GB, KiB, MiB, GiB), e.g. 5GB; got {size!r}"
            )
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError(
                "merge.hub_repo_id is required when merge.push_to_hub is true (e.g. user/my-model)"
            )
        if self.push_dry_run and not self.push_to_hub:
            raise ValueError(
                "merge.push_dry_run shows what a push would upload: set merge.push_to_hub: true "
                "with it"
            )
        return self


RetainPart = Literal["train", "eval"]  # train may be replayed, eval is only measured


class RetainCfg(_Group):
    # The retain set's parts (lorapipe.retain)
    sets: dict[RetainPart, str]
    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)

    @field_validator("sets")
    @classmethod
    def _both_parts(cls, sets: dict[str, str]) -> dict[str, str]:
        if set(sets) != {"train", "eval"}:
            raise ValueError(f"needs a train and an eval file, got {sorted(sets)}")
        return sets


class Paths(_Group):
    prepared: str
    formatted: str
    references: str
    base: str
    adapter: str
    merged: str
    checkpoints: str
    reports: str


class Params(_Group):
    model: ModelCfg
    data: DataCfg
    format: FormatCfg
    lora: LoraCfg
    quant: QuantCfg
    train: TrainCfg
    eval: EvalCfg
    merge: MergeCfg
    retain: RetainCfg
    paths: Paths
    composed_with: list[str]

    # Checks across groups name their keys themselves (`_describe`).
    @model_validator(mode="after")
    def _lora_init_fits_the_quantisation(self) -> Params:
        init = self.lora.init
        # peft starts PiSSA from an SVD of each float weight, and raises on 4- or 8-bit layers
        # after the model has loaded (OLoRA dequantises them, and runs).
        if isinstance(init, str) and init.startswith("pissa") and self.quant.mode != "none":
            raise ValueError(
                f"lora.init: {init!r} needs the base's float weights (peft takes their SVD), but "
                f"quant.mode is {self.quant.mode!r}; use quant=none, or another lora.init"
            )
        return self


# Keys people carry over from BitsAndBytesConfig, TrainingArguments, peft or older scripts, with
# what this schema uses.
RENAMED = {
    "load_in_4bit": "quant.mode: nf4 (one mode, so 4-bit and 8-bit cannot both be on)",
    "load_in_8bit": "quant.mode: int8 (one mode, so 4-bit and 8-bit cannot both be on)",
    "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lr": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_seq_length": "train.max_length",
    "warmup_steps": "train.warmup_ratio (a fraction of all steps)",
    "token": "the HF_TOKEN environment variable (a token never goes into params)",
    "hub_token": "the HF_TOKEN environment variable (a token never goes into params)",
}


def _group_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names the schema has beside the unknown key at `loc` (for a spelling hint)."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _describe(err: dict[str, Any]) -> str:
    # A dict key's own error ends its loc with "[key]": eval.adapters.<name>, not ...<name>.[key].
    key = ".".join(str(p) for p in err["loc"] if p != "[key]") or "params"
    if err["type"] == "extra_forbidden":
        name = str(err["loc"][-1])
        if name in RENAMED:
            return f"{key}: unknown key (use {RENAMED[name]})"
        close = difflib.get_close_matches(name, _group_fields(tuple(err["loc"])), n=1)
        hint = (
            f"did you mean {'.'.join([*map(str, err['loc'][:-1]), close[0]])}?"
            if close
            else ("check the spelling against conf/")
        )
        return f"{key}: unknown key ({hint})"
    if err["type"] == "missing":
        if tuple(err["loc"][:2]) == ("data", "sources"):  # no conf/ file lists sources
            return (
                f"{key}: missing (every source gives path, format, fields, weight and rows, "
                "null where unused; see docs/data.md)"
            )
        group = f"conf/{err['loc'][0]}/" if len(err["loc"]) > 1 else "conf/config.yaml"
        return f"{key}: missing (every key has its value in conf/; see {group})"
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across groups (Params' validators): it names its keys
        return message
    given = err.get("input")
    shown = "" if isinstance(given, dict) or "[key]" in err["loc"] else f", got {given!r}"
    return f"{key}: {message}{shown}"


# A Hugging Face access token: "hf_" and 30+ letters/digits (hub tokens are 37 characters).
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _secrets(raw: Any, key: str = "") -> list[str]:
    """Dotted keys whose value holds a hub token (a pattern match or an environment token)."""
    if isinstance(raw, dict):
        return [p for k, v in raw.items() for p in _secrets(v, f"{key}.{k}" if key else str(k))]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in _secrets(v, f"{key}.{i}")]
    if not isinstance(raw, str):
        return []
    tokens = [os.environ.get(v) for v in TOKEN_VARIABLES]
    if TOKEN_PATTERN.search(raw) or any(t and t in raw for t in tokens):
        # The value itself is never echoed: that would put the token into logs.
        return [
            f"{key}: holds a Hugging Face token; tokens are read from the HF_TOKEN environment "
            "variable only, never from params (which DVC, git and lineage record)"
        ]
    return []


def _files(raw: dict[str, Any]) -> list[str]:
    """Problems with files the config names (the local model folder), found without loading."""
    model = raw.get("model")
    if (
        isinstance(model, dict)
        and model.get("kind") == "local"
        and isinstance(model.get("name"), str)
    ):
        folder = Path(model["name"])
        problems = model_folder_problems(folder)
        quant = raw.get("quant")
        if not problems and isinstance(quant, dict):  # config.json read only for a usable folder
            problem = quant_on_saved_quantised(folder, quant.get("mode"))
            problems = [problem] if problem else []
        return problems
    return []


def quant_on_saved_quantised(folder: Path, mode: Any) -> str | None:
    """The problem, in one line, when `quant.mode` (`mode`) asks to quantise a base saved
    quantised in `folder`; None otherwise. transformers loads the checkpoint's own quantisation
    whatever `quant` asks, without a word, so the lineage would name the wrong one. Reads
    config.json only: at validation for a local folder, at load for every base
    (`models.refuse_quant_on_saved_quantised`)."""
    saved = saved_quantisation(folder) if mode not in (None, "none") else None
    if not saved:
        return None
    return (
        f"quant.mode: the base in {folder} is saved quantised ({saved}) and loads as saved; "
        f"set quant.mode: none (it is {mode}): LoRA on it is QLoRA already"
    )


def validate(raw: dict[str, Any]) -> Params:
    """The typed Params for `raw`; raises ConfigError listing every problem by dotted key.

    Besides the schema: values holding a hub token, and a local model folder that is missing,
    has no safetensors weights or no chat template. Nothing heavy is imported or loaded here.
    """
    problems = _secrets(raw) + _files(raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems += [_describe(dict(e)) for e in errors]
        # A group with an unknown key skips its cross-field checks; run them without those keys
        # too, so one pass lists every problem.
        unknown = [e["loc"] for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            problems += [p for p in _problems(_without(raw, unknown)) if p not in problems]
    if len(problems) == 1:
        raise ConfigError(problems[0]) from None
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    return params


def _problems(raw: dict[str, Any]) -> list[str]:
    try:
        Params.model_validate(raw)
    except ValidationError as exc:
        return [_describe(dict(e)) for e in exc.errors()]
    return []


def _without(raw: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of `raw` without the keys at `locs`."""
    out = copy.deepcopy(raw)
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            node = node[part]
        node.pop(loc[-1], None)
    return out
