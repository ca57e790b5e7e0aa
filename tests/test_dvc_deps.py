"""`dvc.yaml` lists each stage's code: exactly the modules of this project the stage imports,
directly or through each other, so a change to any of them re-runs the stage and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The shared shell every stage runs in: config loading, validation, file writing, errors, and
# the run-time facts kept outside DVC. It does no stage's work (dvc.yaml says so too).
SHELL = {
    f"src/lorapipe/{name}.py" for name in ("cli", "config", "params", "io", "errors", "runtime")
}


def project_imports(path: Path) -> set[str]:
    """Files of this project that `path` imports, at any depth in the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        for module in modules:
            for root in ("src", "."):
                candidate = Path(root) / f"{module.replace('.', '/')}.py"
                if module.split(".")[0] in ("lorapipe", "stages") and (ROOT / candidate).is_file():
                    found.add(candidate.as_posix())
    return found


def import_closure(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for dep in project_imports(ROOT / todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def drift(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (imported files dvc.yaml misses, listed files the stage does not import)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage: one definition for every item
        words = stage["cmd"].split()
        module = words[words.index("-m") + 1]
        listed = {d for d in stage["deps"] if isinstance(d, str) and d.endswith(".py")}
        imported = import_closure(f"{module.replace('.', '/')}.py") - SHELL
        out[name] = (sorted(imported - listed), sorted(listed - imported))
    return out


def test_every_stage_lists_exactly_the_code_it_imports() -> None:
    assert drift(ROOT / "dvc.yaml") == {name: ([], []) for name in drift(ROOT / "dvc.yaml")}


def test_the_check_fails_when_a_module_is_dropped_from_a_stage(tmp_path: Path) -> None:
    """`format` loads the tokenizer through models.py: a dvc.yaml without it is caught."""
    text = (ROOT / "dvc.yaml").read_text()
    stages = yaml.safe_load(text)
    stages["stages"]["format"]["deps"].remove("src/lorapipe/models.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    assert drift(tmp_path / "dvc.yaml")["format"] == (["src/lorapipe/models.py"], [])
