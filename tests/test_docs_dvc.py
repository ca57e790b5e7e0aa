"""The `dvc` and `git` commands that docs/*.md prints: the DVC queue sweep of
docs/sweeps-and-scale-out.md (queue, run, compare, keep the winner) and its remote (push, clone,
pull, then docs/comparing-runs.md's plots) run here, as printed, on a copy of the shrunken
pipeline that `dvc repro` made, and do what the pages say; every other one is named with the
test that runs it. A command in docs/ that is neither fails
`test_every_docs_command_is_run_or_placed`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import check_offline_plots, ran, sh
from tests.test_readme_dvc import DVC as README_RUNS
from tests.test_readme_dvc import ELSEWHERE as README_PLACED
from tests.test_readme_dvc import committed_copy

ROOT = Path(__file__).resolve().parents[1]


def docs_commands() -> dict[str, str]:
    """Each `dvc ...` / `git ...` command in docs/*.md's code blocks -> the page that prints it:
    a line continued with a backslash is one command, a line split at ` && `, its comment
    dropped."""
    found: dict[str, str] = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"\s#", line)[0].split(" && "):
                    command = re.sub(r"\s+", " ", part).strip()
                    if command.split(" ")[0] in ("dvc", "git"):
                        found.setdefault(command, page.name)
    return found


QUEUE = "dvc exp run --queue -S 'lora.r=4,8' -S 'lora.alpha=8,16'"
SHOW = (
    "dvc exp show --md --drop '.*' "
    "--keep '^(Experiment|lora\\.r|lora\\.alpha|adapter\\.exact_match|adapter\\.rougeL)$'"
)
REAL_SHOW = (
    "dvc exp show --drop '.*' "
    "--keep '^(Experiment|quant\\.mode|adapter\\.exact_match|adapter\\.rougeL)$'"
)
APPLY = 'git commit -am "LoRA r=8"'
LOCAL_REMOTE = "dvc remote add -d store /mnt/shared/dvc-store"
REMOTE = ("git add .dvc/config", 'git commit -m "DVC remote"', "dvc push", "git clone <repo>")
# Run by the two tests below (with the page's placeholders filled in).
RUN_HERE = {
    "dvc repro format", QUEUE, "dvc queue start -j 1", "dvc queue status", SHOW,
    "dvc exp apply <name>", APPLY, REAL_SHOW, "dvc exp show --only-changed",
    LOCAL_REMOTE, *REMOTE, "dvc pull", "dvc plots show",
}  # fmt: skip
PLACED = {
    "dvc exp run -S 'merge.gguf=[f16,q8_0]'": "tests/test_gguf_export.py (the stage with "
    "merge.gguf=[f16,q8_0]; the experiment is `dvc exp run -S`, as in the README's lora.r=4)",
    # the same command as the local one, to stores that need credentials and a network
    "dvc remote add -d store s3://my-bucket/lorapipe": "as the local store, run here",
    "dvc remote add -d store gs://my-bucket/lorapipe": "as the local store, run here",
    "dvc remote add -d store ssh://user@host/srv/dvc/lorapipe": "as the local store, run here",
}


def test_every_docs_command_is_run_or_placed() -> None:
    commands = docs_commands()
    assert QUEUE in commands and SHOW in commands  # the extraction still works
    known = RUN_HERE | set(PLACED) | set(README_RUNS) | set(README_PLACED)
    unplaced = [f"{page}: {c}" for c, page in commands.items() if c not in known]
    assert not unplaced, f"in docs/ but run by no test: {unplaced}"
    stale = sorted((RUN_HERE | set(PLACED)) - set(commands))
    assert not stale, f"run or placed here but no longer in docs/: {stale}"


def run(project: Path, command: str, **fill: str) -> str:
    for key, value in fill.items():
        command = command.replace(f"<{key}>", value)
    return sh(project, *shlex.split(command))


def finished(project: Path, timeout: float = 900) -> str:
    """`dvc queue status` once no task is queued or running (`dvc queue start` returns at once)."""
    end = time.monotonic() + timeout
    while True:
        out = run(project, "dvc queue status")
        if not re.search(r"\b(Queued|Running)\b", out) or time.monotonic() > end:
            return out
        time.sleep(2)


def table(markdown: str) -> list[dict[str, str]]:
    """The rows of `dvc exp show --md`, by column name."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(head, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def experiment(row: dict[str, str]) -> str:
    """The experiment's name in a `dvc exp show --md` row ("├── <rev> [<name>]"), else ""."""
    found = re.search(r"\[(.+)\]", row["Experiment"])
    return found.group(1) if found else ""


@pytest.mark.slow
def test_the_dvc_queue_sweep_runs_as_docs_say(repro_project: Path, tmp_path: Path) -> None:
    """docs/sweeps-and-scale-out.md's DVC experiments block, in order: four experiments queued
    and run, each running only check, train, evaluate and merge (base, prepare, format come
    from the cache), compared in one table, and the r=8 one kept with a commit."""
    project = committed_copy(repro_project, tmp_path / "project")
    assert ran(run(project, "dvc repro format")) == set()  # made already: nothing runs
    run(project, QUEUE)
    run(project, "dvc queue start -j 1")
    try:
        status = finished(project)
    finally:  # a test stopped early leaves no worker running experiments
        dvc = str(Path(sys.executable).parent / "dvc")
        subprocess.run([dvc, "queue", "stop", "--kill"], cwd=project, capture_output=True)
    assert status.count("Success") == 4 and "Failed" not in status, status
    names = sorted(line.split()[1] for line in status.splitlines() if "Success" in line)
    for name in names:
        stages = ran(run(project, "dvc queue logs " + name))
        assert stages == {"check", "train", "evaluate", "merge"}, f"{name}: ran {stages}"
    # an experiment's row reads "├── <rev> [<name>]"
    rows = [r for r in table(run(project, SHOW)) if experiment(r) in names]
    assert sorted((r["lora.r"], r["lora.alpha"]) for r in rows) == [
        ("4", "16"), ("4", "8"), ("8", "16"), ("8", "8"),
    ]  # fmt: skip
    for r in rows:
        assert 0 <= float(r["adapter.exact_match"]) <= 1 and 0 <= float(r["adapter.rougeL"]) <= 1
    # the other pages' `dvc exp show` forms, on these experiments (before a commit moves HEAD)
    assert all(n in run(project, "dvc exp show --only-changed") for n in names)
    assert "quant.mode" in run(project, REAL_SHOW)
    winner = next(r for r in rows if r["lora.r"] == "8")
    run(project, "dvc exp apply <name>", name=experiment(winner))
    run(project, APPLY)
    kept = yaml.safe_load((project / "params.yaml").read_text())["lora"]
    assert (kept["r"], kept["alpha"]) == (8, int(winner["lora.alpha"]))
    lineage = json.loads((project / "models/adapter/lineage.json").read_text())
    assert lineage["params"]["lora"]["r"] == 8  # the winner's adapter, not just its params
    assert ran(sh(project, "dvc", "repro")) == set()  # what the commit holds is what was made


def files(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) -> its bytes."""
    found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in found}


@pytest.mark.slow
def test_a_remote_gives_a_clone_the_same_outputs(repro_project: Path, tmp_path: Path) -> None:
    """docs/sweeps-and-scale-out.md's remote block with a local folder as the store: after
    `dvc push`, a fresh clone's `dvc pull` brings every output, byte for byte, and `dvc repro`
    there finds nothing to run."""
    project = committed_copy(repro_project, tmp_path / "project")
    store = tmp_path / "store"
    run(project, LOCAL_REMOTE.replace("/mnt/shared/dvc-store", str(store)))
    for command in REMOTE[:3]:
        run(project, command)
    run(tmp_path, REMOTE[3] + " clone", repo=str(project))
    clone = tmp_path / "clone"
    assert not (clone / "models/adapter").exists()  # outputs are not in git
    run(clone, "dvc pull")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [o["path"] for s in lock["stages"].values() for o in s.get("outs", [])]
    assert "models/adapter" in outs and "models/merged" in outs
    for out in outs:
        pushed = files(project / out)
        assert pushed and files(clone / out) == pushed, f"{out}: not what was pushed"
    assert ran(sh(clone, "dvc", "repro")) == set()
    assert sh(clone, "dvc", "status").strip() == "Data and pipelines are up to date."
    run(clone, "dvc plots show")  # docs/comparing-runs.md: the loss curves, from pulled data
    check_offline_plots((clone / "dvc_plots" / "index.html").read_text())
