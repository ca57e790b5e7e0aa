"""The format stage's work: prepared rows -> prompt/completion examples, with a mask audit.

The audit tokenizes each example the way TRL's SFTTrainer does (prompt, then prompt+completion,
the completion starting where the two diverge) and counts the supervised tokens that survive
truncation to `max_length`, so a dataset that would train on nothing is caught here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorapipe.chat import build_example


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def format_rows(
    rows: list[dict[str, Any]], tokenizer: Any, system_prompt: str | None
) -> list[dict[str, str]]:
    """`{id, prompt, completion, reference}` for each prepared `{id, instruction, response}` row.

    `reference` is the plain response, what evaluation compares generated text against.
    """
    out = []
    for row in rows:
        ex = build_example(tokenizer, row["instruction"], row["response"], system_prompt)
        out.append(
            {
                "id": row["id"],
                "prompt": ex.prompt,
                "completion": ex.completion,
                "reference": row["response"],
            }
        )
    return out


def mask_audit(example: dict[str, str], tokenizer: Any, max_length: int) -> dict[str, int]:
    """Token counts for one example: prompt, completion, supervised after truncation."""
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
    }


def split_report(audits: list[dict[str, int]]) -> dict[str, Any]:
    """Aggregate audits of one split: counts and token-length percentiles."""
    if not audits:
        return {"examples": 0}
    report: dict[str, Any] = {
        "examples": len(audits),
        "truncated": sum(a["truncated"] for a in audits),
        "no_supervised_tokens": sum(a["supervised_tokens"] == 0 for a in audits),
        "supervised_tokens": sum(a["supervised_tokens"] for a in audits),
    }
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        values = np.array([a[key] for a in audits])
        report[key] = {
            "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)),
            "max": int(values.max()),
        }
    return report
