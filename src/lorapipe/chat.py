"""Chat formatting: the one function that turns a record into the prompt the model sees.

`format` (training data) and `evaluate`/`generate` (inference) both call `build_prompt`, so the
prompt tokens at evaluation are exactly those seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorapipe.errors import PipelineError


class FormatError(PipelineError, ValueError):
    """A record cannot be turned into a prompt/completion pair; the message says why."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def messages_for(instruction: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one user instruction, with an optional system turn first."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": instruction})
    return messages


def build_prompt(tokenizer: Any, instruction: str, system_prompt: str | None = None) -> str:
    """The prompt string for `instruction`: chat template with the generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError(
            "the base tokenizer has no chat template; set format.chat_template in conf/format/ "
            "or use a chat model's tokenizer"
        )
    return str(
        tokenizer.apply_chat_template(
            messages_for(instruction, system_prompt), tokenize=False, add_generation_prompt=True
        )
    )


def build_example(
    tokenizer: Any, instruction: str, response: str, system_prompt: str | None = None
) -> Example:
    """Split the templated conversation into the prompt and the completion to supervise.

    The completion is everything the template renders after the prompt, cut right after the
    closing EOS: trailing whitespace the template adds after EOS is not supervised, and the EOS
    itself always is (so the model learns to stop).
    Raises FormatError when the template does not render the prompt as a prefix of the whole.
    """
    prompt = build_prompt(tokenizer, instruction, system_prompt)
    messages = messages_for(instruction, system_prompt)
    messages.append({"role": "assistant", "content": response})
    full = str(tokenizer.apply_chat_template(messages, tokenize=False))
    if not full.startswith(prompt):
        raise FormatError(
            "the chat template renders the prompt differently alone and within the conversation, "
            "so the prompt/completion boundary is ambiguous"
        )
    completion = full[len(prompt) :]
    eos = tokenizer.eos_token
    end = completion.rfind(eos)
    completion = completion.rstrip() + eos if end == -1 else completion[: end + len(eos)]
    return Example(prompt=prompt, completion=completion)
