"""The README's `dvc` and `make` commands: each `dvc` one runs here, in the order a reader meets
them, on a copy of the shrunken pipeline that `dvc repro` made, and does what the README says
it does, and then the winner is kept as the README says; the rest (`make`, replay on the real
model) are named with what runs them. (The `python -m` commands are
tests/test_documented_commands.py's.)"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lorapipe.mixing import REPLAY
from tests.test_pipeline import ran, sh

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Each `dvc ...` / `make ...` command in the README's code blocks, in order, once: a line
    split at ` && `, its comment (after two spaces and `#`) dropped."""
    readme = (ROOT / "README.md").read_text()
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            for part in line.split("  #")[0].split(" && "):
                command = re.sub(r"\s+", " ", part).strip()
                if command.split(" ")[0] in ("dvc", "make") and command not in found:
                    found.append(command)
    return found


GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def committed_copy(repro_project: Path, dest: Path) -> Path:
    """`repro_project` copied as `dvc repro` left it, its results committed (what DVC's
    experiments start from)."""
    shutil.copytree(repro_project, dest, symlinks=True)
    sh(dest, *GIT, "add", "-A")
    sh(dest, *GIT, "commit", "-qm", "results")
    return dest


def params(project: Path) -> dict:
    return dict(yaml.safe_load((project / "params.yaml").read_text()))


def experiments(project: Path) -> list[str]:
    return sh(project, "dvc", "exp", "list", "--name-only").split()


def replayed(project: Path) -> int:
    """Training rows that `data.replay` mixed in (prepare's report)."""
    sources = json.loads((project / "reports/data.json").read_text())["sources"]
    return int(sources[REPLAY]["splits"]["train"]) if REPLAY in sources else 0


Check = Callable[[Path, str], object]
# In README order; each must exit 0 and its check hold, on the state the commands before it left.
DVC: dict[str, Check] = {
    # a `dvc repro` of an unchanged project runs nothing
    "dvc repro": lambda p, out: ran(out) == set(),
    "dvc exp run -S lora.r=4": lambda p, out: (
        ran(out) == {"check", "train", "evaluate", "merge"}
        and params(p)["lora"]["r"] == 4
        and len(experiments(p)) == 1
    ),
    "dvc exp show": lambda p, out: experiments(p)[0] in out,
    # a config group chosen with -S: the QLoRA row's command
    "dvc exp run -S experiment=qlora": lambda p, out: (
        params(p)["quant"]["mode"] == "nf4"
        and json.loads((p / "models/adapter/lineage.json").read_text())["params"]["quant"]["mode"]
        == "nf4"
    ),
    "dvc metrics diff HEAD~1": lambda p, out: "reports/metrics.json" in out,
    "dvc exp run -n replay-00 -S data.replay=0.0": lambda p, out: (
        "replay-00" in experiments(p) and replayed(p) == 0 and params(p)["quant"]["mode"] == "none"
    ),
}
# The README's commands that run elsewhere, and where.
ELSEWHERE = {
    # The tiny model's random base never ends an answer within retain.max_new_tokens, so it has
    # nothing to replay (prepare refuses: "no base answer to replay (all cut or empty)").
    "dvc exp run -n replay-01 -S data.replay=0.1 evaluate": "on the real model, docs/retain.md "
    "(its measured runs); replay itself: tests/test_mixing.py, tests/test_retain.py",
    "dvc exp run -n replay-025 -S data.replay=0.25 evaluate": "as replay-01",
    # the `make` commands
    "make repro": "the README's set-up on the real model (8-25 min), run from a fresh clone by "
    "each session; tests/test_real_model.py runs every stage on the real model",
    "make test": "CI (.ci/run runs it on a fresh clone)",
    "make params": "its recipe is `python -m lorapipe.params $(ARGS)` (checked below), which "
    "tests/test_documented_commands.py runs",
    "make params ARGS='lora.r=8 lora.alpha=16'": "as `make params`",
    "make lint": "each session before committing",
}


def test_every_readme_command_is_run_or_placed() -> None:
    commands = readme_commands()
    assert "dvc repro" in commands and "make test" in commands  # the extraction still works
    unplaced = [c for c in commands if c not in DVC and c not in ELSEWHERE]
    assert not unplaced, f"in the README but run by no test: {unplaced}"
    stale = sorted((set(DVC) | set(ELSEWHERE)) - set(commands))
    assert not stale, f"run or placed here but no longer in the README: {stale}"
    recipe = re.search(r"^params:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and recipe.group(1) == "$(PY) -m lorapipe.params $(ARGS)"


@pytest.mark.slow
def test_the_readmes_dvc_commands_run_in_order_and_its_winner_is_kept(
    repro_project: Path, tmp_path: Path
) -> None:
    """The commands, in order; then the README's next step, keeping the winner (`dvc exp apply
    <name> && git commit`, here the lora.r=4 experiment): params.yaml now holds a value conf/
    does not, and every way of running accepts it as it stands and keeps it."""
    project = committed_copy(repro_project, tmp_path / "project")
    # the results are what `dvc metrics diff HEAD~1` compares with
    sh(project, *GIT, "commit", "-q", "--allow-empty", "-m", "again")
    winner = ""
    for command in [c for c in readme_commands() if c in DVC]:
        out = sh(project, *command.split(" "))
        assert DVC[command](project, out), f"{command}: not what the README says\n{out}"
        if command == "dvc exp run -S lora.r=4":  # the only experiment yet: the one kept
            winner = experiments(project)[0]
    sh(project, "dvc", "exp", "apply", winner)
    sh(project, *GIT, "commit", "-qam", "LoRA r=4")
    assert params(project)["lora"]["r"] == 4
    # by hand, its reports elsewhere: `dvc repro` below then finds everything it made unchanged
    py = (sys.executable, "-m")
    sh(project, *py, "stages.evaluate", "eval.max_examples=4", "paths.reports=adhoc")
    sh(project, *py, "stages.sweep", "-m", "hydra.sweep.dir=sweeps/w", "train.max_steps=2")
    (member,) = [p for p in (project / "sweeps" / "w").iterdir() if p.is_dir()]
    lineage = json.loads((member / "adapter" / "lineage.json").read_text())
    assert lineage["params"]["lora"]["r"] == 4 and lineage["params"]["train"]["max_steps"] == 2
    assert json.loads((project / "adhoc" / "metrics.json").read_text())["examples"] == 4
    assert ran(sh(project, "dvc", "repro")) == set()
    assert params(project)["lora"]["r"] == 4
    out = sh(project, *py, "lorapipe.params", "--check", status=1)
    assert "lora.r: params.yaml has 4, conf/ composes 16" in out
