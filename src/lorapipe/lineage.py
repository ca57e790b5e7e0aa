"""Lineage: what an adapter or merged model was made from, written beside it; and the checks
of an adapter folder a stage makes before it loads any model (`require_adapter`,
`require_trained_on`, `require_trained_with`).

Data files are identified by md5 of their bytes, the same hash DVC 3 records in `dvc.lock`
for a file dependency, so `lineage.json` and `dvc.lock` can be checked against each other.
Nothing time-dependent goes here: two identical runs write identical lineage files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from lorapipe.config import Params
from lorapipe.models import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PIN_FILE,
    RETRAIN,
    ModelSourceError,
    missing_safetensors,
    read_pin,
)
from lorapipe.provenance import ProvenanceError, differences, mismatch

LINEAGE_FILE = "lineage.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/lorapipe/lineage.py -> the checkout
CARD_FILE = "README.md"
# What train_adapter reports that belongs in lineage: fixed for identical runs on one machine.
TRAINING_FACTS = (
    "device",
    "precision",
    "gradient_checkpointing",
    "trainable_params",
    "total_params",
)
# Only distributed runs report these (processes, the rank that wrote the adapter, and how the
# model was split: ddp, fsdp2, deepspeed-zero3, ...), so a single-process lineage is unchanged.
DISTRIBUTED_FACTS = ("world_size", "writer_rank", "sharding")
# Only early-stopped runs report it: the step whose checkpoint became the adapter.
EARLY_STOPPING_FACTS = ("kept_step",)
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "evaluate",
    "rouge-score",
    "dvc",
    "hydra-core",
)


# What names a base's weights in its pin: the GGUF file's sha256, the hub commit, the tiny
# build's config hash or a local folder's file md5s, with the kind and name.
BASE_IDENTITY = ("kind", "name", "sha256", "revision", "config_hash", "files_md5")
# Params groups that cannot shape the adapter (evaluation, merging, where files go): left out of
# its lineage, so a later `merge.dtype=...` or `eval.*` run never contradicts what it records.
NOT_TRAINING = {"eval", "merge", "paths", "retain"}


def require_adapter(adapter_dir: Path, label: str = "", advice: str = RETRAIN) -> None:
    """Raise ModelSourceError, one line naming the file, unless `adapter_dir` holds an adapter
    PEFT loads: a folder whose adapter_config.json (and lineage.json, if any) is a JSON object,
    with its weights as safetensors (`missing_safetensors`: never a pickle) whose header
    safetensors reads (a truncated file fails here, not in PEFT after minutes of work).

    Reads the small files and the weights' header only, so a stage checks every adapter it will
    use before any model loads. `label` (the key that named the folder: `eval.adapters.r4`)
    begins the message and `advice` (what to do) ends it."""
    problem = _adapter_problem(adapter_dir)
    if problem:
        raise ModelSourceError(
            (f"{label}: " if label else "") + problem + (f"; {advice}" if advice else "")
        )


def _adapter_problem(adapter_dir: Path) -> str | None:
    if not adapter_dir.is_dir():
        return f"{adapter_dir}: no such folder"
    config = adapter_dir / ADAPTER_CONFIG
    if not config.is_file():
        return f"{adapter_dir}: no {ADAPTER_CONFIG}"
    for file in (config, adapter_dir / LINEAGE_FILE):
        if not file.is_file():
            continue
        try:
            ok = isinstance(json.loads(file.read_text(encoding="utf-8")), dict)
        except (ValueError, UnicodeDecodeError) as e:
            return f"{file}: not valid JSON ({e})"
        if not ok:
            return f"{file}: expected a JSON object"
    missing = missing_safetensors(adapter_dir)
    if missing:
        return missing
    try:
        with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as weights:
            weights.keys()  # the header, read and checked against the file's length
    except (SafetensorError, OSError) as e:
        return f"{adapter_dir / ADAPTER_WEIGHTS}: unreadable: truncated or not safetensors ({e})"
    return None


def require_trained_on(adapter_dir: Path, base_dir: Path) -> None:
    """Raise ModelSourceError when the adapter's lineage names another base than the one in
    `base_dir`: LoRA weights loaded onto a base they were not trained on load without a word
    when the shapes agree, and every answer and metric after that would be wrong. An adapter
    without a lineage (not made by this pipeline) is not checked."""
    path = adapter_dir / LINEAGE_FILE
    if not path.is_file():
        return
    trained_on = json.loads(path.read_text(encoding="utf-8")).get("base_model", {})
    here = read_pin(base_dir)
    differ = [
        f"{key} {_shown(trained_on.get(key))} in its lineage, {_shown(here.get(key))} in "
        f"{base_dir / PIN_FILE}"
        for key in BASE_IDENTITY
        if trained_on.get(key) != here.get(key)
    ]
    if differ:
        raise ModelSourceError(
            f"{adapter_dir} was trained on another base than the one in {base_dir}: "
            + "; ".join(differ)
            + ". Use it with the base it was trained on (the base stage, run with its lineage's "
            "params.model), or train it again on this one"
        )


def require_trained_with(adapter_dir: Path, params: Params) -> None:
    """Raise ProvenanceError when the adapter's lineage records other training params (the
    model, data, format, lora, quant and train sections) than `params`, naming each key: run by
    hand with `lora.r=8` on an adapter trained with 16, or without it after `stages.train
    lora.r=8`, `evaluate` would report (and `merge` fold) an adapter its params do not describe,
    and DVC would file the metrics under the wrong params. An adapter without a lineage is not
    checked."""
    path = adapter_dir / LINEAGE_FILE
    if not path.is_file():
        return
    made = json.loads(path.read_text(encoding="utf-8")).get("params", {})
    asked = params.model_dump(mode="json", exclude=NOT_TRAINING | {"composed_with"})
    differ = differences(asked, made)
    if differ:
        remake = "`python -m stages.train` with the same overrides"
        raise ProvenanceError(mismatch(adapter_dir, path, differ, remake))


def _shown(value: Any) -> str:
    return "other file md5s" if isinstance(value, dict) else repr(value)


def file_md5(path: Path) -> str:
    """md5 hex digest of the file's bytes, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version(stage: str) -> dict[str, str]:
    """md5 of each code file `dvc.yaml` lists for `stage` (what DVC hashes for the stage's code
    deps), read from the project this package belongs to; {} outside a project checkout."""
    import yaml

    dvc_yaml = PROJECT_ROOT / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    deps = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][stage]["deps"]
    files = [d for d in deps if isinstance(d, str) and d.endswith(".py")]
    return {f: file_md5(PROJECT_ROOT / f) for f in sorted(files) if (PROJECT_ROOT / f).is_file()}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_lineage(
    params: Params,
    data_files: dict[str, Path],
    base_dir: Path,
    training: dict[str, Any] | None = None,
    sources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage record: data md5s, composed params, base pin, the train stage's code md5s,
    library versions.

    `sources` (data/prepared/sources.json: each data source's md5 and training rows, the
    replayed retain answers among them) is recorded as `sources` when given.

    `training` adds what the run itself decided: device, precision, trainable and total
    parameters. Only what determines the adapter belongs here: the git commit, time and memory
    of the run go to reports/runtime/train.json, so identical inputs give identical bytes on any
    commit and in any working tree.
    """
    record: dict[str, Any] = {
        "data": {name: {"path": str(p), "md5": file_md5(p)} for name, p in data_files.items()},
        **({"sources": sources} if sources is not None else {}),
        "params": params.model_dump(mode="json", exclude=NOT_TRAINING),
        "base_model": read_pin(base_dir),
        "code": code_version("train"),
        "libraries": library_versions(),
        "python": platform.python_version(),
    }
    if training is not None:
        optional = (*DISTRIBUTED_FACTS, *EARLY_STOPPING_FACTS)
        facts = [*TRAINING_FACTS, *(k for k in optional if k in training)]
        record["training"] = {key: training[key] for key in facts}
    return record


def model_card(lineage: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for the adapter described by `lineage`, or, when
    the lineage has a `merge` entry (the merge stage's), for the merged model.

    Deterministic: built only from the lineage record, so identical runs write identical cards.
    """
    params, base, merge = lineage["params"], lineage["base_model"], lineage.get("merge")
    quant, saved = params["quant"], base.get("saved_quantised")
    qlora = quant["mode"] != "none" or saved
    tags = ["lora", "sft", "trl", "lorapipe", *(["qlora"] if qlora else [])]
    tags += ["merged"] if merge else []
    tags += ["gguf"] if merge and merge.get("gguf") else []
    method = "QLoRA (4-bit NF4 base)" if quant["mode"] == "nf4" else "LoRA"
    method = f"QLoRA (base saved quantised: {saved})" if saved else method
    lines = [
        "---",
        f"base_model: {json.dumps(base['name'])}",
        f"library_name: {'transformers' if merge else 'peft'}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# {base['name']} fine-tuned with {method}, merged"
        if merge
        else f"# LoRA adapter for {base['name']}",
        "",
        f"{method} supervised fine-tuning with TRL's SFTTrainer, loss on completions only, made by "
        "the lorapipe DVC pipeline"
        + (
            ", with the adapter folded into the base's weights: it loads with "
            "`AutoModelForCausalLM.from_pretrained` alone, no peft needed."
            if merge
            else "."
        ),
        *_training_lines(lineage),
        *(_merge_lines(merge) if merge else []),
        "",
        "## Data",
        "",
        "| split | file | md5 |",
        "| --- | --- | --- |",
        *(f"| {name} | `{d['path']}` | `{d['md5']}` |" for name, d in lineage["data"].items()),
        *_source_lines(lineage.get("sources")),
        "",
        "## Evaluation and provenance",
        "",
        f"Exact match and ROUGE, base model vs {'the adapter' if merge else 'this adapter'} on "
        "the held-out test split, are in "
        "`reports/metrics.json` (the pipeline's `evaluate` stage). `lineage.json` beside this "
        "card records the params that shaped it, the base pin, the md5 of each code file and "
        "the library versions.",
        "",
    ]
    return "\n".join(lines)


def _source_lines(sources: dict[str, Any] | None) -> list[str]:
    if not sources:
        return []
    return [
        "",
        "| source | training rows | md5 |",
        "| --- | --- | --- |",
        *(f"| {name} | {s['train_rows']} | `{s['md5']}` |" for name, s in sources.items()),
    ]


def base_source(pin: dict[str, Any]) -> str:
    """What the base model is and what pins it, from its pin (models/base/pin.json), in words:
    a GGUF file's sha256 is not a hub revision, so the card does not write it as one."""
    name = f"`{pin['name']}`"
    if pin.get("kind") == "gguf":
        shipped = f" in {pin['package']} {pin['package_version']}" if pin.get("package") else ""
        return f"{name}, dequantised from `{pin['file']}` (sha256 `{pin['sha256']}`){shipped}"
    if pin.get("kind") == "hub":
        return f"{name} at commit `{pin['revision']}` on the Hugging Face Hub"
    if pin.get("kind") == "local":
        return f"{name}, a local model folder (each file's md5 in `lineage.json`)"
    if pin.get("kind") == "tiny":  # an older pin may lack the seed: the card still renders
        seed = f", seed {pin['seed']}" if "seed" in pin else ""
        return (
            f"{name}, a random Llama built by lorapipe (config hash `{pin['config_hash']}`{seed})"
        )
    return name


def _training_lines(lineage: dict[str, Any]) -> list[str]:
    params, base = lineage["params"], lineage["base_model"]
    lora, train = params["lora"], params["train"]
    targets = lora["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    lines = [
        "",
        "## Training",
        "",
        f"- base: {base_source(base)}",
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"targets: {targets}",
        f"- epochs {train['epochs']}, learning rate {train['learning_rate']}, "
        f"batch size {train['batch_size']} x {train['grad_accum']} accumulation, "
        f"{train['lr_scheduler']} schedule, seed {train['seed']}",
    ]
    facts = lineage.get("training", {})
    if facts:
        lines.append(
            f"- {facts['trainable_params']:,} trainable of {facts['total_params']:,} parameters, "
            f"{facts['precision']} on {facts['device']}"
        )
    if base.get("saved_quantised"):
        lines.append(
            f"- the base's weights are stored quantised ({base['saved_quantised']}): LoRA trained "
            "on them as in QLoRA"
        )
    if base.get("trust_remote_code"):
        lines.append(
            "- the base ran its own Python code when loaded (`trust_remote_code: true`): "
            "load it only from the pinned revision above"
        )
    return lines


def _merge_lines(merge: dict[str, Any]) -> list[str]:
    return [
        "",
        "## Merge",
        "",
        f"- weights in {merge['dtype']}; adapter weights md5 `{merge['adapter_weights_md5']}`",
        "- checked before saving: on the test prompts, the largest logit difference between "
        f"this model and base + adapter is {merge['merged_max_abs_logit_diff']:.3g} "
        f"(allowed {merge['max_logit_diff_allowed']:.3g})",
        *(
            f"- GGUF for llama.cpp / Ollama: `{file}` ({g['type']}, sha256 `{g['sha256']}`), read "
            f"back before saving: largest logit difference {g['max_abs_logit_diff']:.3g} "
            f"(allowed {g['max_logit_diff_allowed']:.3g}); `ollama create NAME -f {g['modelfile']}`"
            for file, g in merge.get("gguf", {}).items()
        ),
    ]
