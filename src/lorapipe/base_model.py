"""The base stage's work: materialise the configured base model into `models/base` and pin it.

Every later stage loads what this writes through `lorapipe.models`, so none of them depends on
how the base was made (built, copied, pinned on the hub, or converted from a GGUF file).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from lorapipe.config import (
    PICKLE_WEIGHTS,
    ModelCfg,
    is_commit_sha,
    model_folder_problems,
    saved_quantisation,
)
from lorapipe.models import (
    MADE_WITH,
    PIN_FILE,
    ModelSourceError,
    hub_token,
    loading_problems,
    quiet_load_report,
    unconverted,
    with_loading_info,
)
from lorapipe.provenance import sections


def _files_md5(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in {".json", ".safetensors", ".jinja", ".model", ".txt"}
    }


def pin_warning(cfg: ModelCfg, sha: str) -> str | None:
    """The warning for a hub revision that can move (a branch or tag), or None for a sha."""
    if is_commit_sha(cfg.revision):
        return None
    return (
        f"base: warning: model.revision {cfg.revision or 'main'!r} is a branch or tag, not a "
        f"commit; this run is pinned to {sha}. Put that sha in conf/model/ so later runs get the "
        "same weights (model.strict_pin: true refuses anything else)"
    )


def check_model_folder(folder: Path, trust_remote_code: bool) -> None:
    """Raise ModelSourceError, naming the file and what is wrong, unless the model folder loads:
    config.json parses, every safetensors file's header reads, the tokenizer loads, and the
    weights are every tensor the config asks for, of its shapes.

    The weights are checked through transformers' own loading info, on the meta device: names
    and shapes from the safetensors headers, nothing read or allocated.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
        AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelSourceError(f"model.name: {config} cannot be read: {_one_line(exc)}") from None
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise ModelSourceError(
                f"model.name: {weights} is not a whole safetensors file ({_one_line(exc)}); "
                "is it truncated? Copy it again"
            ) from None
    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers fail in many ways on broken files; all mean the same
        raise ModelSourceError(
            f"model.name: the tokenizer in {folder} cannot be loaded ({type(exc).__name__}: "
            f"{_one_line(exc)}); save it again beside the weights"
        ) from None
    try:
        with quiet_load_report() as reports:
            _, info = with_loading_info(
                AutoModelForCausalLM.from_pretrained(
                    folder,
                    # A checkpoint saved quantised unpacks its quantisation state from the
                    # file as it loads, which needs the data: it is read (on the CPU).
                    device_map={"": "cpu"} if saved_quantisation(folder) else "meta",
                    use_safetensors=True,
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                    trust_remote_code=trust_remote_code,
                )
            )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        if failed := unconverted(reports):
            raise ModelSourceError(
                f"model.name: the weights in {folder} cannot be read as saved: {failed}; is a "
                "quantised checkpoint missing part of a weight's quantisation state? Copy it again"
            ) from None
        raise ModelSourceError(
            f"model.name: transformers cannot load the model in {folder}: {_one_line(exc)}"
        ) from None
    problem = loading_problems(info)
    if problem:
        raise ModelSourceError(
            f"model.name: the weights in {folder} do not fit its config.json: {problem}"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def build_base(cfg: ModelCfg, out_dir: Path) -> dict[str, Any]:
    """Materialise the base named by `cfg` into `out_dir` and return its pin.

    tiny: build the seeded model and tokenizer. gguf: dequantise the file into a safetensors
    model (`lorapipe.gguf_source`). hub: resolve `revision` to a commit sha (and
    download that commit when `snapshot`). local: copy the folder. Raises ModelSourceError.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "tiny":
        from lorapipe.tiny import build_tiny_model

        assert cfg.architecture is not None
        pin = build_tiny_model(cfg.architecture.model_dump(), cfg.seed, out_dir)
        pin["name"] = cfg.name
    elif cfg.kind == "gguf":
        from lorapipe.gguf_source import convert

        pin = convert(cfg, out_dir)
    elif cfg.kind == "local":
        src = Path(cfg.name)
        problems = model_folder_problems(src)
        if problems:
            raise ModelSourceError("; ".join(problems))
        check_model_folder(src, cfg.trust_remote_code)
        for item in src.iterdir():
            if item.is_file() and item.suffix not in PICKLE_WEIGHTS:  # safetensors only
                shutil.copy2(item, out_dir / item.name)
        pin = {"kind": "local", "name": str(src), "files_md5": _files_md5(out_dir)}
    else:
        pin = _pin_hub(cfg, out_dir)
    if quantised := saved_quantisation(out_dir):  # the pin says what the card and merge see
        pin["saved_quantised"] = quantised
    pin["trust_remote_code"] = cfg.trust_remote_code
    pin[MADE_WITH] = sections(model=cfg)  # what later stages check (models.require_base)
    if cfg.trust_remote_code:
        print(
            f"base: warning: model.trust_remote_code is on: {cfg.name}'s own Python code will run "
            "when it loads (recorded in pin.json and the adapter's lineage)",
            file=sys.stderr,
        )
    (out_dir / PIN_FILE).write_text(json.dumps(pin, indent=2, sort_keys=True) + "\n")
    return pin


def _pin_hub(cfg: ModelCfg, out_dir: Path) -> dict[str, Any]:
    from huggingface_hub import HfApi, snapshot_download

    token = hub_token()
    try:
        sha = HfApi().model_info(cfg.name, revision=cfg.revision, token=token).sha
    except Exception as exc:  # offline, unknown repo, gated model: all reach the user the same way
        raise ModelSourceError(
            f"model.name: cannot resolve {cfg.name}@{cfg.revision or 'main'} on the Hugging Face "
            f"Hub ({type(exc).__name__}: {exc}). Check the name and network, or download the "
            "model and use kind: local with name: <folder>"
        ) from None
    assert sha is not None
    warning = pin_warning(cfg, sha)
    if warning:
        print(warning, file=sys.stderr)
    pin: dict[str, Any] = {"kind": "hub", "name": cfg.name, "revision": sha}
    if cfg.revision and cfg.revision != sha:
        pin["requested_revision"] = cfg.revision
    if cfg.snapshot:
        snapshot_download(
            cfg.name,
            revision=sha,
            local_dir=out_dir,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
            token=token,
        )
        shutil.rmtree(out_dir / ".cache", ignore_errors=True)  # the hub client's download state
        problems = model_folder_problems(out_dir)
        if problems:
            raise ModelSourceError(
                "; ".join(p.replace(str(out_dir), f"{cfg.name}@{sha}") for p in problems)
            )
    return pin
