"""The format stage's work: prepared rows -> prompt/completion examples, with a mask audit.

The audit tokenizes each example the way TRL's SFTTrainer does (prompt, then prompt+completion,
the completion starting where the two diverge) and counts the supervised tokens that survive
truncation to `max_length`. An example that would lose its closing EOS to truncation is either
rejected or has its prompt shortened from the left (`truncation`), and one with nothing
supervised is rejected, so every written example trains on its whole completion. A row whose
text holds one of the tokenizer's special tokens is rejected before that: in training it would
be a control token (a fake turn boundary), not text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from lorapipe.chat import (
    ROLES,
    FormatError,
    build_examples,
    conversation,
    render_prompt,
    with_system,
)
from lorapipe.config import FormatCfg, TrainOn
from lorapipe.io import numbered_jsonl

LISTED_REJECTS = 5  # rejected examples named in the report, per split
LENGTH_BINS = 50  # at most this many bars in the length distribution plot


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def read_prepared(path: Path) -> list[dict[str, Any]]:
    """The rows of a prepared split file, as the prepare stage writes them (`{id, instruction,
    response}` or `{id, messages}`); raises FormatError naming `file:line` and the problem
    (not UTF-8, not JSON, not an object, a field missing or of the wrong type)."""
    again = "the prepare stage writes data/prepared: run it again"
    try:
        numbered = numbered_jsonl(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 (byte {e.start + 1}); {again}") from None
    except ValueError as e:  # names path:line
        raise FormatError(f"{e}; {again}") from None
    for lineno, row in numbered:
        problem = _prepared_problem(row)
        if problem:
            raise FormatError(f"{path}:{lineno}: {problem}; {again}")
    return [row for _, row in numbered]


def _prepared_problem(row: dict[str, Any]) -> str:
    """What keeps `row` from being a prepared row, or "" when nothing does."""
    if not isinstance(row.get("id"), str):
        return "field 'id' is missing or not a string"
    if "messages" not in row:
        for name in ("instruction", "response"):
            if not isinstance(row.get(name), str):
                return f"field '{name}' is missing or not a string"
        return ""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "field 'messages' is not a non-empty list"
    for i, m in enumerate(messages):
        ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        if not ok:
            return f"field 'messages[{i}]' needs a role {ROLES} and a string content"
    return ""


def format_rows(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    system_prompt: str | None,
    train_on: TrainOn = "all_assistant",
) -> list[dict[str, str]]:
    """`{id, prompt, completion, reference}` for each supervised assistant turn of each row.

    Rows are prepared rows (`{id, instruction, response}` or `{id, messages}`). A row that gives
    one example keeps its id; one that gives several (multi-turn, `train_on` "all_assistant")
    gives `<id>-1`, `<id>-2`, ... in turn order. `reference` is the plain assistant text, what
    evaluation compares generated text against.

    Raises FormatError naming the row's id and the template's message when the chat template
    raises (Jinja's `raise_exception`, e.g. a template that refuses a system turn).
    """
    out = []
    for row in rows:
        try:
            examples = build_examples(tokenizer, conversation(row), system_prompt, train_on)
        except jinja2.TemplateError as e:
            hint = _template_hint(row, system_prompt)
            raise FormatError(f"row {row['id']}: the chat template failed: {e}{hint}") from None
        for k, ex in enumerate(examples, start=1):
            out.append(
                {
                    "id": row["id"] if len(examples) == 1 else f"{row['id']}-{k}",
                    "prompt": ex.prompt,
                    "completion": ex.completion,
                    "reference": ex.reference,
                }
            )
    return out


def _template_hint(row: dict[str, Any], system_prompt: str | None) -> str:
    """What to try when the chat template refuses a row: most often its system turn."""
    own = conversation(row)[0]["role"] == "system"
    if own:
        return "; the row has a system turn: remove it, or use a base whose template takes one"
    if with_system(conversation(row), system_prompt)[0]["role"] == "system":
        return "; format.system_prompt adds a system turn: try format.system_prompt=null"
    return ""


def special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens (its named ones and every added token marked special),
    longest first: in a text they become control tokens, such as a chat turn's end."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    found = {*tokenizer.all_special_tokens, *(t.content for t in added if t.special)}
    return sorted((t for t in found if t), key=lambda t: (-len(t), t))


def special_token_in(row: dict[str, Any], specials: list[str]) -> str | None:
    """The reject detail naming the first field of a prepared row that holds a special token,
    and the first such token in it; None when no field does."""
    if "messages" in row:
        fields = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(row["messages"])]
    else:
        fields = [("instruction", row["instruction"]), ("response", row["response"])]
    pattern = re.compile("|".join(map(re.escape, specials)))  # longest first: the whole token
    for name, text in fields:
        found = pattern.search(text) if specials else None
        if found:
            return f"field '{name}' holds {found.group()!r}, a control token to the tokenizer"
    return None


def mask_audit(example: dict[str, str], tokenizer: Any, max_length: int) -> dict[str, int]:
    """Token counts for one example: prompt, completion, supervised after truncation.

    `eos_supervised` is 1 when the last token kept within `max_length` is the EOS token.
    """
    prompt_ids = tokenizer(example["prompt"])["input_ids"]
    full_ids = tokenizer(example["prompt"] + example["completion"])["input_ids"]
    start = common_prefix_length(prompt_ids, full_ids)
    kept = min(len(full_ids), max_length)
    return {
        "prompt_tokens": start,
        "completion_tokens": len(full_ids) - start,
        "total_tokens": len(full_ids),
        "supervised_tokens": max(0, kept - start),
        "truncated": int(len(full_ids) > max_length),
        "eos_supervised": int(kept > start and full_ids[kept - 1] == tokenizer.eos_token_id),
    }


def truncate_prompt(
    example: dict[str, str], tokenizer: Any, max_length: int
) -> tuple[dict[str, str], dict[str, int]] | None:
    """The example with tokens dropped from the left of its prompt so that all fits in
    `max_length`, and its audit; None if the completion alone does not fit, or leaves room for
    nothing of the prompt but what the chat template puts after the last user turn's text
    (`question_tail`): an answer to no question would train the model to answer anything so.

    The kept prompt tokens are decoded back to a string (the formatted files hold text), and
    the tokens the tokenizer adds itself (such as BOS) stay in front.
    """
    added = len(tokenizer("")["input_ids"])  # BOS and the like, added to every text
    body = tokenizer(example["prompt"])["input_ids"][added:]
    audit = mask_audit(example, tokenizer, max_length)
    drop = audit["total_tokens"] - max_length
    while 0 < drop < len(body):
        text = tokenizer.decode(body[drop:], clean_up_tokenization_spaces=False)
        if text.startswith("\ufffd") and "\ufffd" not in example["prompt"]:
            drop += 1  # a byte-level cut inside a character's bytes: cut after the character
            continue
        candidate = {**example, "prompt": text}
        audit = mask_audit(candidate, tokenizer, max_length)
        if not audit["truncated"]:
            return None if question_tail(tokenizer).endswith(text.strip()) else (candidate, audit)
        # Re-tokenizing decoded text can merge differently at the cut: drop what is still over.
        drop += audit["total_tokens"] - max_length
    return None


def question_tail(tokenizer: Any) -> str:
    """What the chat template writes after a user turn's text (the turn's end and the
    generation prompt), without surrounding whitespace: "<|im_end|>\n<|im_start|>assistant"
    for ChatML. Written here: tokenizers expose no such part of their template."""
    mark = "\u2063lorapipe-question\u2063"  # a text no template adds or changes
    return render_prompt(tokenizer, [{"role": "user", "content": mark}]).split(mark)[-1].strip()


def format_split(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    cfg: FormatCfg,
    max_length: int,
) -> tuple[list[dict[str, str]], dict[str, Any], list[int]]:
    """The examples of one split that will train on their whole completion, the split's
    report and the token length of each kept example.

    A row whose text holds one of the tokenizer's special tokens (`special_tokens`, e.g. a
    response with `<|im_end|>` that would fake a turn's end) has each of its examples rejected
    ("special token in the text", the detail naming the field and token). An example longer
    than `max_length` is rejected ("completion truncated") or, with
    `cfg.truncation` "truncate_prompt", shortened from the left of its prompt (rejected as
    "completion longer than max_length" when that cannot make it fit). An example with no
    supervised token, or whose last supervised token is not EOS, is rejected too. The report:
    `{"rows", "examples", "examples_out", "truncated", "prompt_truncated", "rejects_by_reason",
    "rejected_examples", "supervised_tokens", "prompt_tokens" / "completion_tokens" /
    "total_tokens": {"p50", "p95", "max"}}`, lengths over the kept examples.
    `cfg` (format.*) comes validated by lorapipe.config and is not checked again here.
    """
    examples, rejects = _screened(rows, tokenizer, cfg)
    screened = len(rejects)  # examples rejected for a special token, counted in "examples"
    kept: list[dict[str, str]] = []
    audits: list[dict[str, int]] = []
    truncated = prompt_truncated = 0
    for ex in examples:
        audit = mask_audit(ex, tokenizer, max_length)
        reason, detail = "", ""
        if audit["truncated"]:
            truncated += 1
            fitted = None
            if cfg.truncation == "truncate_prompt":
                fitted = truncate_prompt(ex, tokenizer, max_length)
            if fitted is not None:
                (ex, audit), prompt_truncated = fitted, prompt_truncated + 1
            elif cfg.truncation == "reject":
                reason = "completion truncated"
                detail = f"{audit['total_tokens']} tokens, max_length is {max_length}"
            elif audit["completion_tokens"] >= max_length:
                reason = "completion longer than max_length"
                detail = f"{audit['completion_tokens']} completion tokens, max_length {max_length}"
            else:
                reason = "no room for the question"
                detail = (
                    f"{audit['completion_tokens']} completion tokens leave none of the prompt's "
                    f"text within max_length {max_length}"
                )
        if not reason and audit["supervised_tokens"] == 0:
            reason = "no supervised tokens"
        elif not reason and not audit["eos_supervised"]:
            reason, detail = "closing EOS not supervised", "the completion does not end with EOS"
        if reason:
            rejects.append({"id": ex["id"], "reason": reason, "detail": detail})
            continue
        kept.append(ex)
        audits.append(audit)
    report: dict[str, Any] = {
        "rows": len(rows),
        "examples": len(examples) + screened,
        "examples_out": len(kept),
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejected_examples": rejects[:LISTED_REJECTS],
        "supervised_tokens": sum(a["supervised_tokens"] for a in audits),
    }
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        values = np.array([a[key] for a in audits] or [0])
        report[key] = {
            "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)),
            "max": int(values.max()),
        }
    return kept, report, [a["total_tokens"] for a in audits]


def _screened(
    rows: list[dict[str, Any]], tokenizer: Any, cfg: FormatCfg
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The examples of `rows`, and the rejects of those whose row holds a special token."""
    specials = special_tokens(tokenizer)
    examples: list[dict[str, str]] = []
    rejects: list[dict[str, str]] = []
    for row in rows:
        built = format_rows([row], tokenizer, cfg.system_prompt, cfg.train_on)
        found = special_token_in(row, specials)
        if found is None:
            examples.extend(built)
        else:
            reason = "special token in the text"
            rejects.extend({"id": ex["id"], "reason": reason, "detail": found} for ex in built)
    return examples, rejects


def length_distribution(lengths: dict[str, list[int]]) -> dict[str, list[dict[str, int]]]:
    """Per split, `{"total_tokens", "examples"}` rows: how many examples fall in each bin.

    All splits share one set of at most LENGTH_BINS equal bins, from the shortest example to the
    longest; a bin is named by its lowest length.
    """
    every = [v for values in lengths.values() for v in values]
    shortest, longest = min(every, default=0), max(every, default=0)
    width = max(1, math.ceil((longest - shortest + 1) / LENGTH_BINS))
    first = shortest - shortest % width
    bins = range(first, longest + 1, width)
    out = {}
    for split, values in lengths.items():
        counts = Counter(v - v % width for v in values)
        out[split] = [{"total_tokens": b, "examples": counts.get(b, 0)} for b in bins]
    return out
