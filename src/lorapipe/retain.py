"""The retain set: general instructions that measure what fine-tuning costs the base model.

`data/retain/` holds instructions written for this (facts, short explanations, rewriting,
arithmetic, a few multi-turn conversations), in two parts: `train` may be replayed in training,
`eval` is only ever used to measure. Each row is `{"instruction": ...}` or `{"messages": [...]}`
ending with a user turn; other keys (such as `kind`) are ignored.

Their references are the base model's own greedy answers (`base_references`, run by the
`references` stage once per base), rendered with the same chat template and system prompt as
the task, so the prompts are those the adapter is trained and used with. `evaluate` compares
the adapter's answers with them (`lorapipe.evaluation.retain_scores`); `data.replay` trains on
the train part's (`lorapipe.mixing`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorapipe.chat import conversations_to_answer, render_prompt, with_system
from lorapipe.config import Params, RetainPart
from lorapipe.errors import PipelineError
from lorapipe.lineage import BASE_IDENTITY
from lorapipe.provenance import differences, mismatch

PARTS: tuple[RetainPart, ...] = ("train", "eval")  # replayable in training; measurement only


class RetainError(PipelineError, ValueError):
    """A retain-set row cannot be used; the message names file:line and the problem."""


def made_with(pin: Mapping[str, Any], params: Params) -> dict[str, Any]:
    """What a part's references depend on, recorded beside them (`{part}.made_with.json`) and
    checked by `evaluate`: the base that answered (its pin's identity) and the system prompt and
    token budget it answered under."""
    return {
        "base": {key: pin.get(key) for key in BASE_IDENTITY},
        "format": {"system_prompt": params.format.system_prompt},
        "retain": {"max_new_tokens": params.retain.max_new_tokens},
    }


def made_with_file(folder: Path, part: str) -> Path:
    return folder / f"{part}.made_with.json"


def require_references(folder: Path, part: str, pin: Mapping[str, Any], params: Params) -> None:
    """Raise RetainError when the part's references in `folder` came from another base, system
    prompt or token budget than `pin` and `params` give: the adapter's answers would be scored
    against answers the base it is compared with never gave (the references stage run by hand
    after another base, or not re-run after one). References without a record are not checked."""
    record = made_with_file(folder, part)
    if not record.is_file():
        return
    made = json.loads(record.read_text(encoding="utf-8"))
    differ = differences(made_with(pin, params), made)
    if differ:
        remake = f"`python -m stages.references {part}` with the same overrides"
        raise RetainError(mismatch(folder / f"{part}.jsonl", record, differ, remake))


def read_retain(path: Path) -> list[dict[str, Any]]:
    """The rows of one retain-set part: `{"id", "messages"}` in file order, ids from content.

    Raises RetainError naming `file:line` for a row that is not JSON, has neither a usable
    instruction nor messages ending with a user turn, or repeats an earlier row; FileNotFoundError
    if `path` does not exist.
    """
    rows, seen = [], set()
    text = path.read_text(encoding="utf-8")
    try:
        numbered = conversations_to_answer(text, str(path))
    except ValueError as e:
        raise RetainError(str(e)) from None
    for lineno, messages in numbered:
        where = f"{path}:{lineno}"
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        if key in seen:
            raise RetainError(f"{where}: repeats an earlier row")
        seen.add(key)
        rows.append({"id": key, "messages": messages})
    if not rows:
        raise RetainError(f"{path}: no rows")
    return rows


def base_references(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None,
    batch_size: int,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """The base model's greedy answer to each row of `read_retain`, as one row each:
    `{"id", "prompt", "messages", "reference", "stopped"}`.

    `prompt` is the conversation with `system_prompt` (unless it has its own), chat-templated as
    the format stage templates training prompts; `messages` ends with the answer as the
    assistant turn (so the row can be replayed as training data), `reference` is the answer and
    `stopped` whether it ended with EOS rather than at `max_new_tokens`.
    """
    from lorapipe.generation import generate_with_stops  # torch: only where the base answers

    prompts = [render_prompt(tokenizer, with_system(r["messages"], system_prompt)) for r in rows]
    answers, stopped = generate_with_stops(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    return [
        {
            "id": row["id"],
            "prompt": prompt,
            "messages": [*row["messages"], {"role": "assistant", "content": answer}],
            "reference": answer,
            "stopped": stop,
        }
        for row, prompt, answer, stop in zip(rows, prompts, answers, stopped, strict=True)
    ]
