"""The embedded default dataset: Python questions whose answers Python itself computes.

`generate(n, seed)` returns `{instruction, response}` rows such as
"What does `sorted([3, 1, 2])` return?" -> "[1, 2, 3]". Every response is `repr(eval(expr))`,
so the answers are exact; every expression appears once, so a held-out question is never a
rephrasing of a training one. Regenerate the shipped file with `python scripts/make_pyqa.py`.

The questions are about lists of digits (sorting, reversing, indexing, len, max, min, in): kinds
that share one skill, reading the list, so even the 4-layer random-weight model the tests train
(`model=tiny`, the default before SmolLM2) learns them with LoRA in minutes on 2 CPU cores.
Questions on string methods (such as `'ab'.upper()`) were tried too: that model's exact match
on them was far lower, so they were left out; a pretrained model could learn them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

QUESTION_TEMPLATE = "What does `{expr}` return?"


def _digits(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


# Each maker returns a Python expression built from small random literals.
EXPRESSION_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "sorted": lambda r: f"sorted({_digits(r, 3, 3)})",
    "reverse": lambda r: f"{_digits(r, 3, 3)}[::-1]",
    "index_first": lambda r: f"{_digits(r, 3, 5)}[0]",
    "index_last": lambda r: f"{_digits(r, 3, 5)}[-1]",
    "max": lambda r: f"max({_digits(r, 3, 5)})",
    "min": lambda r: f"min({_digits(r, 3, 5)})",
    "len": lambda r: f"len({_digits(r, 1, 7)})",
    "membership": lambda r: f"{r.randint(0, 9)} in {_digits(r, 2, 4)}",
}


SAFE_BUILTINS = {"sorted": sorted, "max": max, "min": min, "len": len, "list": list, "range": range}


def generate(n: int, seed: int) -> list[dict[str, str]]:
    """Return `n` distinct rows `{instruction, response}`, the same for the same `(n, seed)`.

    Question kinds take turns; a kind with no fresh expressions left is retired.
    Raises ValueError when the kinds cannot yield `n` distinct expressions.
    """
    rng = random.Random(seed)
    kinds = sorted(EXPRESSION_MAKERS)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    misses = 0
    turn = 0
    while len(rows) < n:
        if not kinds:
            raise ValueError(f"could only make {len(rows)} distinct questions of the {n} asked")
        kind = kinds[turn % len(kinds)]
        expr = EXPRESSION_MAKERS[kind](rng)
        if expr in seen:
            misses += 1
            if misses > 200:  # this kind has few distinct expressions left: retire it
                kinds.remove(kind)
                misses = 0
            continue
        misses = 0
        turn += 1
        seen.add(expr)
        answer = repr(eval(expr, {"__builtins__": SAFE_BUILTINS}))
        question = QUESTION_TEMPLATE.format(expr=expr)
        rows.append({"instruction": question, "response": answer})
    return rows
