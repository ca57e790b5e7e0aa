"""Inference: one base model in memory, any number of LoRA adapters on it by name.

The base weights are loaded once; each adapter is added with peft's `load_adapter` under its
name and chosen with `set_adapter`, so switching costs nothing and adapters share the base's
memory. The name `base` answers with every adapter disabled. Prompts are built with
`lorapipe.chat.build_prompt`, the function the format stage used for training, with one system
prompt for every model (generate: format.system_prompt, the one the adapter was trained and
evaluated with), so an adapter sees the same prompt tokens it learnt from and the base the
prompt evaluate gave it. Generation is `lorapipe.generation.generate`, as in evaluation.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from lorapipe.chat import build_prompt, conversations_to_answer, render_prompt, with_system
from lorapipe.errors import PipelineError
from lorapipe.generation import generate
from lorapipe.lineage import LINEAGE_FILE, require_adapter, require_trained_on
from lorapipe.models import load_base_model, load_tokenizer

BASE = "base"  # the name that answers with the base model alone


class InferenceError(PipelineError, ValueError):
    """Bad adapter names, paths or prompt files; the message names what is wrong."""


def parse_adapter(spec: str) -> tuple[str, Path]:
    """`name=path` -> (name, path); raises InferenceError for a malformed or reserved name."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise InferenceError(f"--adapter {spec!r}: expected NAME=PATH, e.g. pyqa=models/adapter")
    if name == BASE:
        raise InferenceError(f"--adapter {spec!r}: {BASE!r} names the base alone; pick another")
    return name, Path(path)


def trained_system_prompt(adapter_dir: Path) -> str | None:
    """The `format.system_prompt` the adapter was trained with, from its lineage (None if the
    adapter has no lineage, e.g. one not made by this pipeline)."""
    path = adapter_dir / LINEAGE_FILE
    if not path.is_file():
        return None
    params = json.loads(path.read_text(encoding="utf-8")).get("params", {})
    return params.get("format", {}).get("system_prompt")


def check_adapter(name: str, path: Path) -> None:
    """Raise ModelSourceError, one line naming adapter `name` and the file, unless `path` holds
    an adapter that loads (`lorapipe.lineage.require_adapter`: JSON files, safetensors weights
    with a whole header), before any weights load."""
    require_adapter(path, label=f"adapter {name!r}", advice="")


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """The conversations to answer, from `path`: JSONL rows with `instruction` (one user turn)
    or `messages` (ending with a user turn), or else plain text, one instruction per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InferenceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # missing, a folder, unreadable
        raise InferenceError(f"{path}: cannot read it ({e.strerror})") from None
    if path.suffix != ".jsonl":
        return [[{"role": "user", "content": line}] for line in text.splitlines() if line.strip()]
    try:
        return [turns for _, turns in conversations_to_answer(text, str(path))]
    except ValueError as e:
        raise InferenceError(str(e)) from None


class Assistant:
    """A base model with named adapters, answering conversations with any one of them."""

    def __init__(
        self,
        base_dir: Path,
        adapters: dict[str, Path],
        *,
        dtype: str = "auto",
        system_prompt: str | None = None,
    ) -> None:
        """Load the base once and every adapter onto it; `system_prompt` is every model's (the
        base's and each adapter's), as evaluation gives them one prompt."""
        for name, path in adapters.items():
            check_adapter(name, path)
            require_trained_on(path, base_dir)
        self.tokenizer = load_tokenizer(base_dir)
        model = load_base_model(base_dir, dtype=dtype)
        if torch.cuda.is_available():
            model.to("cuda")
        if adapters:
            from peft import PeftModel

            (first, first_path), *rest = adapters.items()
            model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first)
            for name, path in rest:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.system_prompt = system_prompt  # every model's, as evaluation gives them one
        self._names = [*adapters, BASE]

    @property
    def names(self) -> list[str]:
        """The adapter names, in load order, then `base`."""
        return list(self._names)

    @property
    def context(self) -> int | None:
        """The model's context in tokens (its config's max_position_embeddings), None when the
        config does not say."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def prompt_tokens(self, messages: list[dict[str, str]], name: str) -> int:
        """How many tokens the prompt `name` answers is, tokenized as generation does."""
        return len(self.tokenizer(self.prompt_for(messages, name))["input_ids"])

    def prompt_for(self, messages: list[dict[str, str]], name: str) -> str:
        """The prompt `name` answers: the conversation with its system prompt, chat-templated."""
        if name not in self._names:
            raise InferenceError(f"unknown adapter {name!r}; loaded: {', '.join(self.names)}")
        if len(messages) == 1 and messages[0]["role"] == "user":
            return build_prompt(self.tokenizer, messages[0]["content"], self.system_prompt)
        return render_prompt(self.tokenizer, with_system(messages, self.system_prompt))

    def answer(
        self,
        messages: list[dict[str, str]],
        name: str,
        *,
        stream: TextIO | None = None,
        max_new_tokens: int = 128,
        **sampling: Any,
    ) -> str:
        """`name`'s answer to the conversation, its tokens written to `stream` as they come.
        `sampling`: do_sample, temperature, top_p, seed, as `lorapipe.generation.generate`."""
        prompt = self.prompt_for(messages, name)
        streamer = None if stream is None else _Streamer(self.tokenizer, stream)
        kwargs: dict[str, Any] = {"batch_size": 1, "max_new_tokens": max_new_tokens, **sampling}
        adapters_off = nullcontext()
        if name == BASE and hasattr(self.model, "disable_adapter"):
            adapters_off = self.model.disable_adapter()
        elif name != BASE:
            self.model.set_adapter(name)
        with adapters_off:
            return generate(self.model, self.tokenizer, [prompt], streamer=streamer, **kwargs)[0]


class _Streamer(TextStreamer):
    """transformers' TextStreamer, writing the new text to a given stream instead of print."""

    def __init__(self, tokenizer: Any, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()
