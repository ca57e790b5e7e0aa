"""Real model shapes with random weights, for the memory and GPU benchmarks (no download).

`build_random_base(out, dtype=...)` writes a folder the pipeline loads like any base
(`lorapipe.models.load_base_model(out, ...)`): config.json, safetensors shards, the tiny
byte-level tokenizer (its 263 ids are valid ids of the 32000-token vocabulary) and a pin.json
of kind `local`. The weights are N(0, initializer_range), the RMSNorm scales 1, so activations
and hence timings and memory behave like a trained model's; no benchmark needs real weights.
`random_base_like(folder, out)` does the same for any base folder's config and tokenizer (the
real model's shape on a machine that cannot get its weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# TinyLlama/TinyLlama-1.1B-Chat-v1.0's config.json (the model conf/model/tinyllama.yaml pins).
TINYLLAMA: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def llama_config(shape: dict[str, Any] | None = None, **changes: Any) -> Any:
    """A transformers LlamaConfig of `shape` (TinyLlama's by default) with `changes` applied."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**(shape or TINYLLAMA), **changes})


def random_model(config: Any, dtype: str, *, seed: int = 0) -> Any:
    """A causal LM of `config` (a LlamaForCausalLM for `llama_config`) in `dtype` with random
    weights, built without first materialising float32 weights (meta device, then each tensor
    filled in place; tied embeddings stay tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorapipe.models import resolve_dtype

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(resolve_dtype(dtype))  # meta parameters in `dtype`, not float32
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every module its own tensor: tied embeddings untie
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range)
    model.eval()
    return model


def build_random_base(
    out: Path, *, dtype: str = "bfloat16", shape: dict[str, Any] | None = None, **changes: Any
) -> tuple[Any, dict[str, Any]]:
    """Save a random model of `shape` (TinyLlama's; `changes` such as num_hidden_layers=2
    override keys) in `dtype` to `out` as a loadable base, and return the in-memory model and
    `{parameters, model_bytes, name}` (its size in `dtype`)."""
    from lorapipe.tiny import build_tokenizer

    config = llama_config(shape, **changes)
    tokenizer = build_tokenizer()
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = random_model(config, dtype)
    info = _save_random(model, out, "tinyllama-shape-random", dtype, max_shard_size="1GB")
    tokenizer.save_pretrained(out)
    return model, info


RANDOM_BASE_INFO = "random-base.json"  # `random_base_in`'s record of what the folder holds


def random_base_at(folder: Path, *, dtype: str, layers: int) -> dict[str, Any] | None:
    """The record of the TinyLlama-shaped random base of `layers` layers in `dtype` that
    `random_base_in` built at `folder`, or None where nothing is there yet. Raises
    FileExistsError for a folder holding anything else (another dtype or depth, other files)."""
    record = folder / RANDOM_BASE_INFO
    wanted = {"dtype": dtype, "layers": layers}
    if record.is_file():
        info: dict[str, Any] = json.loads(record.read_text())
        held = {k: info.get(k) for k in wanted}
        if held != wanted:
            raise FileExistsError(f"{folder} holds a random base of {held}, not {wanted}")
        return info
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} is not an empty folder and holds no {RANDOM_BASE_INFO}")
    return None


def random_base_in(folder: Path, *, dtype: str, layers: int) -> tuple[Any, dict[str, Any]]:
    """The TinyLlama-shaped random base of `layers` layers in `dtype` at `folder`: built there
    (`build_random_base`; the model comes back too) unless `random_base_at` finds it there (then
    the model is None). The weights are seeded, so a base built once is the base built again:
    `make bench` builds one for the memory and merge benchmarks both (`--base-dir`)."""
    info = random_base_at(folder, dtype=dtype, layers=layers)
    if info is not None:
        return None, info
    model, built = build_random_base(folder, dtype=dtype, num_hidden_layers=layers)
    info = {**built, "dtype": dtype, "layers": layers}
    (folder / RANDOM_BASE_INFO).write_text(json.dumps(info, indent=2) + "\n")  # last: it is whole
    return model, info


# What a model folder holds besides its weights (and the pin, which names the weights).
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def weight_files(folder: Path) -> set[Path]:
    return {path for pattern in WEIGHT_FILES for path in folder.glob(pattern)}


def has_weights(folder: Path) -> bool:
    return bool(weight_files(folder))


def random_base_like(folder: Path, out: Path, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """Save to `out` a base with `folder`'s config and tokenizer and random weights in `dtype`
    (`folder` needs no weights: a base's small files, as `scripts/gpu_kit.sh` packs them for a
    machine that cannot get the model file). Timings depend on the shape, not the values; the
    loss of random weights means nothing. Returns `{parameters, model_bytes, name}`."""
    import shutil

    from transformers import AutoConfig

    from lorapipe.models import PIN_FILE

    model = random_model(AutoConfig.from_pretrained(folder), dtype)
    pin_file = folder / PIN_FILE
    name = json.loads(pin_file.read_text()).get("name") if pin_file.is_file() else folder.name
    info = _save_random(model, out, f"{name}, random weights at its shape", dtype)
    skip = weight_files(folder) | {pin_file, folder / "config.json"}
    for path in folder.iterdir():
        if path.is_file() and path not in skip:
            shutil.copy2(path, out / path.name)
    return info


def _save_random(
    model: Any, out: Path, name: str, dtype: str, max_shard_size: str = "5GB"
) -> dict[str, Any]:
    """Save `model` to `out` with a pin of kind `local` named `name`; `{parameters,
    model_bytes, name}`."""
    from lorapipe.models import PIN_FILE

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    parameters = sum(p.numel() for p in model.parameters())
    pin = {"kind": "local", "name": name, "dtype": dtype, "parameters": parameters}
    (out / PIN_FILE).write_text(json.dumps(pin, indent=2) + "\n")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"parameters": parameters, "model_bytes": model_bytes, "name": name}
