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


def test_every_command_line_tool_ends_through_the_quiet_exit() -> None:
    # `lorapipe.errors.exit_with` turns a reader that stops early (`| head`) into a quiet exit;
    # a stage's `main` (made by `lorapipe.cli.stage`) runs through it, any other tool must call it
    tools = sorted((ROOT / "src" / "lorapipe").glob("*.py")) + sorted(
        (ROOT / "stages").glob("*.py")
    )
    mains = {}
    for path in tools:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                mains[path.name] = ast.unparse(node.body[0])
        if "from lorapipe.cli import stage" in path.read_text(encoding="utf-8"):
            mains[path.name] = "stage"
    assert {"compare.py", "sweep.py", "params.py", "generate.py", "train.py"} <= set(mains)
    loud = {name: call for name, call in mains.items() if call not in ("stage", "exit_with(main)")}
    assert not loud, f"end these with lorapipe.errors.exit_with(main): {loud}"
