"""Size limits that keep the code and the README readable: a function fits on a screen or two,
and the README is a user's guide (details live in docs/)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONGEST_FUNCTION = 80  # lines, docstring included
README_LINES = 200


def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted((ROOT / "src" / "lorapipe").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_every_library_function_is_under_the_limit() -> None:
    lengths = function_lengths()
    assert len(lengths) > 100  # the walk found the package's functions
    too_long = {name: n for name, n in lengths.items() if n >= LONGEST_FUNCTION}
    assert not too_long, f"split these (>= {LONGEST_FUNCTION} lines): {too_long}"


def test_the_readme_is_a_short_guide() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_LINES
    for word in ("the article", "Acceptance", "the issue"):  # words only the team knows
        assert word.lower() not in "\n".join(lines).lower(), word
