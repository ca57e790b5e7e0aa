"""Chat formatting: the one function that turns a record into the prompt the model sees.

`format` renders every prompt with `render_prompt` and writes it beside its completion; train
and evaluate both read those prompts, and inference on a new conversation calls `render_prompt`
(or `build_prompt`) too, so the prompt tokens at evaluation are exactly those seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorapipe.config import TrainOn
from lorapipe.errors import PipelineError
from lorapipe.io import numbered_jsonl


class FormatError(PipelineError, ValueError):
    """A record cannot be turned into a prompt/completion pair; the message says why."""


ROLES = ("system", "user", "assistant")


def to_answer(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation a row asks a model to answer (a retain-set row, a prompt file's): its
    `instruction` as one user turn, or its `messages`, each a known role with non-empty content,
    the last a user turn. Raises ValueError saying what is wrong; callers name file and line."""
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        return [{"role": "user", "content": row["instruction"]}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("needs a non-empty 'instruction' string or 'messages' list")
    turns = []
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        if not ok or not m["content"].strip():
            raise ValueError(f"messages[{i}] needs a role {ROLES} and a non-empty content")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "user":
        raise ValueError("messages must end with a user turn (the one to answer)")
    return turns


def conversations_to_answer(text: str, source: str) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, `to_answer` conversation) for each row of JSON Lines `text`; raises
    ValueError naming `source:line` and the problem."""
    out = []
    for lineno, row in numbered_jsonl(text, source):
        try:
            out.append((lineno, to_answer(row)))
        except ValueError as e:
            raise ValueError(f"{source}:{lineno}: {e}") from None
    return out


@dataclass(frozen=True)
class Example:
    prompt: str  # the conversation up to this assistant turn, with the generation prompt
    completion: str  # the assistant turn as the template renders it, ending with EOS
    reference: str  # the assistant turn's plain text, what evaluation compares against


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of a prepared row: `row["messages"]`, or `{instruction, response}` as one
    user turn and one assistant turn (see `lorapipe.records.Record.to_row`)."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["response"]},
    ]


def with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """`messages` with a system turn first: the conversation's own one wins over `system_prompt`."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def messages_for(instruction: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one user instruction, with an optional system turn first."""
    return with_system([{"role": "user", "content": instruction}], system_prompt)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt for `messages` (ending with a user turn): chat template + generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError(
            "the base tokenizer has no chat template; use a chat/instruct model, or give the "
            "tokenizer one (`tok.chat_template = '<jinja>'; tok.save_pretrained(folder)`) and "
            "use that folder with model.kind: local"
        )
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def build_prompt(tokenizer: Any, instruction: str, system_prompt: str | None = None) -> str:
    """The prompt string for `instruction`: chat template with the generation prompt appended."""
    return render_prompt(tokenizer, messages_for(instruction, system_prompt))


def build_turn(tokenizer: Any, history: list[dict[str, str]], response: str) -> Example:
    """Split the templated `history` + assistant `response` into prompt and completion.

    The completion is everything the template renders after the prompt, cut right after the
    closing EOS: trailing whitespace the template adds after EOS is not supervised, and the EOS
    itself always is (so the model learns to stop).
    Raises FormatError when the template does not render the prompt as a prefix of the whole.
    """
    prompt = render_prompt(tokenizer, history)
    messages = [*history, {"role": "assistant", "content": response}]
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
    return Example(prompt=prompt, completion=completion, reference=response)


def build_examples(
    tokenizer: Any,
    messages: list[dict[str, str]],
    system_prompt: str | None = None,
    train_on: TrainOn = "all_assistant",
) -> list[Example]:
    """The examples that supervise a conversation's assistant turns, in turn order.

    `train_on` "last_assistant": one example, the last assistant turn, the rest as prompt.
    "all_assistant": one example per assistant turn, its prompt the conversation so far.
    TRL's prompt/completion format supervises only the completion, and its alternative
    (`assistant_only_loss`) needs `{% generation %}` markers that most chat templates lack;
    one example per turn supervises every assistant turn exactly, with any template.
    Raises FormatError as `build_turn` does.
    """
    messages = with_system(messages, system_prompt)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    return [build_turn(tokenizer, messages[:i], messages[i]["content"]) for i in turns]
