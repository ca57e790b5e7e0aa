"""The embedded default dataset: Python questions whose answers Python itself computes.

`generate(n, seed)` returns `{instruction, response}` rows such as
"What does `sorted([3, 1, 2])` return?" -> "[1, 2, 3]". Every response is `repr(eval(expr))`,
so the answers are exact; every expression appears once, so a held-out question is never a
rephrasing of a training one. Regenerate the shipped file with `python scripts/make_pyqa.py`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

WORDS = [
    "apple",
    "bread",
    "cloud",
    "delta",
    "eagle",
    "flame",
    "grape",
    "house",
    "index",
    "juice",
    "kite",
    "lemon",
    "mango",
    "night",
    "ocean",
    "piano",
    "queen",
    "river",
    "stone",
    "tiger",
    "umbra",
    "valve",
    "water",
    "xenon",
    "yacht",
    "zebra",
    "amber",
    "brick",
    "cedar",
    "dune",
    "ember",
    "frost",
    "globe",
    "honey",
    "ivory",
    "jolly",
    "karma",
    "lunar",
    "maple",
    "noble",
    "orbit",
    "pearl",
    "quilt",
    "robin",
    "solar",
    "tulip",
    "urban",
    "vivid",
    "wheat",
    "yield",
    "zesty",
]

QUESTION_TEMPLATES = (
    "What does `{expr}` return?",
    "What is the value of `{expr}` in Python?",
    "Evaluate `{expr}`.",
    "In Python, what does `{expr}` evaluate to?",
)


def _digits(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


# Each maker returns a Python expression built from small random literals.
EXPRESSION_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "sorted": lambda r: f"sorted({_digits(r, 3, 5)})",
    "sorted_reverse": lambda r: f"sorted({_digits(r, 3, 4)}, reverse=True)",
    "list_reverse": lambda r: f"{_digits(r, 3, 5)}[::-1]",
    "max": lambda r: f"max({_digits(r, 3, 5)})",
    "min": lambda r: f"min({_digits(r, 3, 5)})",
    "len_str": lambda r: f"len({_letters(r, 2, 9)!r})",
    "len_list": lambda r: f"len({_digits(r, 1, 7)})",
    "upper": lambda r: f"{_word(r)!r}.upper()",
    "lower": lambda r: f"{_word(r).upper()!r}.lower()",
    "capitalize": lambda r: f"{_letters(r, 3, 6)!r}.capitalize()",
    "str_reverse": lambda r: f"{_letters(r, 3, 6)!r}[::-1]",
    "str_slice": lambda r: (lambda w, a: f"{w!r}[{a}:{a + r.randint(1, 3)}]")(
        _word(r), r.randint(0, 2)
    ),
    "index_first": lambda r: f"{_digits(r, 3, 5)}[0]",
    "index_last": lambda r: f"{_digits(r, 3, 5)}[-1]",
    "split": lambda r: (
        f"{'-'.join(_letters(r, 1, 2) for _ in range(r.randint(2, 4)))!r}.split('-')"
    ),
    "join": lambda r: f"'-'.join({[_letters(r, 1, 2) for _ in range(r.randint(2, 4))]})",
    "list_concat": lambda r: f"{_digits(r, 1, 3)} + {_digits(r, 1, 3)}",
    "str_repeat": lambda r: f"{_letters(r, 1, 3)!r} * {r.randint(2, 3)}",
    "membership": lambda r: f"{r.randint(0, 9)} in {_digits(r, 2, 4)}",
    "range": lambda r: (lambda a: f"list(range({a}, {a + r.randint(1, 5)}))")(r.randint(0, 20)),
    "count": lambda r: (lambda w: f"{w!r}.count({r.choice(w)!r})")(_word(r)),
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
        question = rng.choice(QUESTION_TEMPLATES).format(expr=expr)
        rows.append({"instruction": question, "response": answer})
    return rows
