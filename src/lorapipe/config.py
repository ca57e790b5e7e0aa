"""The typed schema of `params.yaml`: every key the stages read, checked before any model loads.

`validate(raw)` reports every problem at once, by dotted key (`lora.r: must be > 0, got 0`);
unknown keys are errors too, so a typo never trains with a silent default.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorapipe.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """params.yaml (or a command-line override) has invalid values; the message lists each."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Group):
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    initializer_range: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Architecture:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


class ModelCfg(_Group):
    kind: Literal["tiny", "hub", "local"]
    name: str = Field(min_length=1)
    revision: str | None = None
    snapshot: bool = False
    trust_remote_code: bool = False
    seed: int = 0
    architecture: Architecture | None = None

    @model_validator(mode="after")
    def _tiny_needs_architecture(self) -> ModelCfg:
        if self.kind == "tiny" and self.architecture is None:
            raise ValueError("model.kind 'tiny' needs model.architecture")
        return self


# The names a row's keys can be mapped to with data.fields (see lorapipe.records).
DataField = Literal[
    "instruction", "input", "output", "response", "messages", "prompt", "completion"
]


class DataCfg(_Group):
    path: str = Field(min_length=1)
    format: Literal["auto", "instruction", "alpaca", "messages", "prompt_completion"] = "auto"
    fields: dict[str, DataField] | None = None
    splits: dict[Literal["train", "val", "test"], float]
    split_counts: dict[Literal["val", "test"], int] | None = None
    split_column: str | None = Field(default=None, min_length=1)
    on_error: Literal["fail", "skip"] = "fail"
    max_reject_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    max_chars: int = Field(default=20000, gt=0)

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
    system_prompt: str | None = None
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    truncation: Literal["reject", "truncate_prompt"] = "reject"


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
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    init: bool | str = True
    layers_to_transform: list[int] | None = None

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
    mode: Literal["none", "nf4", "int8"] = "none"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    double_quant: bool = False


class TrainCfg(_Group):
    epochs: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum: int = Field(gt=0)
    max_length: int = Field(gt=0)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(ge=0.0)
    max_grad_norm: float = Field(gt=0)
    max_steps: int = -1
    logging_steps: int = Field(gt=0)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    early_stopping_patience: int | None = Field(default=None, gt=0)
    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    save_steps: int = Field(default=500, gt=0)
    save_total_limit: int | None = Field(default=2, gt=0)
    resume: bool = True

    @model_validator(mode="after")
    def _early_stopping_restores_an_epoch(self) -> TrainCfg:
        if self.early_stopping_patience is not None and self.save_strategy != "epoch":
            raise ValueError(
                "train.early_stopping_patience needs train.save_strategy: epoch (the best epoch's "
                f"checkpoint is restored at the end), got {self.save_strategy!r}"
            )
        return self


class EvalCfg(_Group):
    batch_size: int = Field(gt=0)
    max_new_tokens: int = Field(gt=0)
    max_examples: int | None = Field(default=None, gt=0)
    use_stemmer: bool = False
    ignore_case: bool = False
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    val_loss_examples: int | None = Field(default=200, ge=0)
    # More adapters to evaluate beside the pipeline's own, on the same base and prompts:
    # {name: adapter folder}. Each becomes a model in metrics.json, predictions and the report.
    adapters: dict[str, str] = Field(default_factory=dict)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if name in ("base", "adapter") or not re.fullmatch(r"[A-Za-z][\w.-]*", name):
                raise ValueError(
                    f"eval.adapters: {name!r} cannot name an adapter (use letters, digits, "
                    "'_', '-', '.', starting with a letter; 'base' and 'adapter' are taken)"
                )
        return adapters


class MergeCfg(_Group):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_logit_diff: float = Field(gt=0)
    probe_examples: int = Field(gt=0)


class Paths(_Group):
    prepared: str
    formatted: str
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
    paths: Paths
    composed_with: list[str] = []


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "params"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against conf/)"
    given = err.get("input")
    shown = "" if isinstance(given, dict) else f", got {given!r}"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}{shown}"


def validate(raw: dict[str, Any]) -> Params:
    """The typed Params for `raw`; raises ConfigError listing every problem by dotted key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(dict(e)) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
