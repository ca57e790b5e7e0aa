"""Crash safety, secrets and reproducibility of the whole pipeline (`dvc repro` on the shrunken
default in temporary copies, as test_pipeline does).

- Each stage killed with SIGKILL at several points: `dvc status` never calls a stage up to date
  unless its outputs are the complete ones, and rerunning completes with the same hashes as a
  clean run from scratch at another commit.
- A hub token planted in the environment ends up in no file the pipeline wrote.
- Ctrl-C (and SIGTERM) stops a stage with one short line, leaving the previous output intact.
"""

from __future__ import annotations

import _thread
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil  # a DVC dependency
import pytest
import yaml

from lorapipe.cli import Interrupt
from lorapipe.io import atomic_dir
from lorapipe.params import write_params
from tests.conftest import FAKE_TOKEN, Run, planted, tiny_model_overrides
from tests.test_pipeline import STAGES, copy_project, sh, shrink

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def planted_env(planted_caches: Path) -> Iterator[Path]:
    """The fake token in HF_TOKEN (and the legacy name) for every command of this module, the
    hub's and DVC's machine-wide caches moved under one folder (so they get searched too): the
    folder conftest's `first_run` ran with."""
    with planted(planted_caches):
        yield planted_caches


def fresh(dest: Path) -> Path:
    return shrink(copy_project(dest))


def locked_outs(project: Path) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} from the project's dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", [])}
        for stage, entry in lock["stages"].items()
    }


def out_files(project: Path, out: str) -> dict[str, bytes]:
    """Every file of one DVC out (a file or a folder), by path relative to the project."""
    path = project / out
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(project)): p.read_bytes() for p in files}


def dvc_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    return env


def status(project: Path) -> dict[str, object]:
    """`dvc status --json`: the stages DVC would run again, with why."""
    done = subprocess.run(
        ["dvc", "status", "--json"], cwd=project, env=dvc_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


# Where to kill, in pipeline order: a stage, a path that appears while it runs (glob, relative to
# the project; it must be new in this attempt), seconds to wait after it appears, and whether to
# kill only the stage's processes (DVC sees it fail, like the OOM killer) or DVC with it (a power
# cut, `kill -9` of the whole job).
KILL_POINTS = [
    ("base", "models/.tmp-base-*", 0.0, "stage"),  # building the model
    ("prepare", "data/.tmp-prepared-*", 0.0, "group"),  # writing the splits
    ("prepare", "data/prepared", 0.0, "stage"),  # splits swapped in, report maybe not yet
    ("format", "data/.tmp-formatted-*", 0.0, "stage"),
    ("format", "data/formatted", 0.0, "group"),  # before format.json and the length plots
    ("train", "models/.tmp-adapter-*", 1.0, "stage"),  # mid-training
    ("train", "models/adapter", 0.0, "group"),  # adapter in place, train.json not yet
    ("evaluate", "reports/predictions.jsonl", 0.0, "stage"),  # before metrics and report
    ("merge", "models/.tmp-merged-*", 0.0, "group"),
    ("merge", "models/merged", 0.0, "stage"),  # merged in place, merge.json not yet
]


def appeared(project: Path, pattern: str, since: float) -> bool:
    for path in project.glob(pattern):
        try:
            if path.lstat().st_ctime >= since:
                return True
        except FileNotFoundError:
            continue
    return False


def kill_during(project: Path, stage: str, pattern: str, delay: float, how: str, log: Path) -> bool:
    """Run `dvc repro <stage>` (its output appended to `log`); SIGKILL it when `pattern`
    appears. False if it ended first."""
    since = time.time() - 0.01
    with log.open("a") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", stage],
            cwd=project,
            env=dvc_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while not appeared(project, pattern, since):
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
        time.sleep(delay)
        if how == "group":
            os.killpg(proc.pid, signal.SIGKILL)
            return True
        hit = False
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE:  # a stage that has ended is not hit
                    child.kill()
                    hit = True
            except psutil.NoSuchProcess:
                continue
        return hit  # False: the stage ended between its file appearing and the kill
    finally:
        proc.wait(timeout=120)
        # A whole job killed while DVC stages a file in git (core.autostage) leaves git's own
        # lock behind, and every later git write refuses until it goes, as git's message says:
        # the user's step after a crash, not the pipeline's to take.
        (project / ".git" / "index.lock").unlink(missing_ok=True)


@dataclass
class Killed:
    run: Run  # the project after the kills and a last `dvc repro`, and that run's output
    log: Path  # the output of the killed runs
    killed: list[str]  # the points hit
    checked: int  # stages DVC called up to date after a kill, their files compared
    wrong: list[str]  # a killed stage called up to date, or one up to date with partial files


@pytest.fixture(scope="module")
def killed_run(
    first_run: Run, tmp_path_factory: pytest.TempPathFactory, planted_env: Path
) -> Killed:
    """A second copy of the project, one commit after `first_run`'s (a change to no stage) and
    with an untracked file of its own, run from scratch with the token planted: each stage
    SIGKILLed at KILL_POINTS in turn, `dvc status` checked after each kill against the clean run's
    files, then `dvc repro` to the end. (One run for both checks: a second clean run would cost
    as much as this one again.)"""
    reference = first_run.project
    locked = locked_outs(reference)
    complete = {
        stage: {k: v for out in outs for k, v in out_files(reference, out).items()}
        for stage, outs in locked.items()
    }
    folder = tmp_path_factory.mktemp("killed")
    project = fresh(folder / "project")
    (project / "scratch.txt").write_text("notes of the killed run\n")
    with (project / "README.md").open("a") as readme:
        readme.write("\nA later commit that changes no stage.\n")
    sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "doc")
    result = Killed(Run(project, ""), folder / "killed.log", [], 0, [])
    for stage, pattern, delay, how in KILL_POINTS:
        if not kill_during(project, stage, pattern, delay, how, result.log):
            continue
        result.killed.append(f"{stage}@{pattern}")
        stale = status(project)
        if stage not in stale:
            result.wrong.append(f"{stage} killed at {pattern} but dvc status calls it up to date")
        for name in set(STAGES) - set(stale):
            # DVC would skip it: its outputs must be exactly a complete run's.
            now = {k: v for out in locked[name] for k, v in out_files(project, out).items()}
            if now != complete[name]:
                result.wrong.append(f"{name} up to date with partial outputs (killed {stage})")
            result.checked += 1
    result.run.output = sh(project, "dvc", "repro")
    return result


@pytest.mark.slow
def test_killed_stages_are_never_up_to_date_with_partial_outputs(killed_run: Killed) -> None:
    print(f"killed at {len(killed_run.killed)} of {len(KILL_POINTS)} points: {killed_run.killed}")
    assert not killed_run.wrong
    assert len(killed_run.killed) >= 7, killed_run.killed  # a fast write can slip past a point
    assert killed_run.checked >= 10
    project = killed_run.run.project
    assert status(project) == {}, killed_run.run.output  # the last `dvc repro` completed it
    leftovers = [p for p in project.rglob(".*") if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers


@pytest.mark.slow
def test_runs_at_two_commits_give_identical_output_hashes(
    first_run: Run, killed_run: Killed
) -> None:
    """Byte-identical adapters (and every other output) from different commits, and from a run
    whose every stage was killed once and run again."""
    runs = [first_run, killed_run.run]
    commits = {sh(run.project, "git", "rev-parse", "HEAD").strip() for run in runs}
    assert len(commits) == 2
    first, second = (locked_outs(run.project) for run in runs)
    assert set(first) == set(STAGES)
    assert sum(len(outs) for outs in first.values()) >= 12  # every out of every stage is there
    assert first == second


@pytest.mark.slow
def test_planted_token_is_in_no_file_the_pipeline_wrote(
    first_run: Run, killed_run: Killed, planted_env: Path
) -> None:
    """Everything under both projects (outputs, reports, .dvc/cache, .dvc/tmp, dvclive, git)
    and the moved hub/DVC caches; the commands' own output too."""
    needle = FAKE_TOKEN.encode()
    searched = 0
    runs = [first_run, killed_run.run]
    for folder in [run.project for run in runs] + [planted_env]:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                searched += 1
                assert needle not in path.read_bytes(), f"token written to {path}"
    assert searched > 100  # the search covered the runs' outputs and DVC's cache
    assert all(FAKE_TOKEN not in run.output for run in runs)
    assert "Running stage" in killed_run.log.read_text()
    assert FAKE_TOKEN not in killed_run.log.read_text()


SWALLOWED_INTERRUPT = """
import os, signal, sys, time
from lorapipe.cli import Interrupt

interrupt = Interrupt(every=EVERY)
signal.signal(signal.SIGTERM, interrupt)
if HOOK:
    sys.unraisablehook = interrupt.unraisable


class Collected:
    def __del__(self):  # the signal's KeyboardInterrupt is raised in here, and Python drops it
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass


try:
    Collected()
    deadline = time.time() + 30
    while time.time() < deadline:
        sum(range(1000))
    print("ran on")
except KeyboardInterrupt:
    interrupt.caught = True
    print("interrupted")
"""


@pytest.mark.parametrize("hook", [True, False])
def test_an_interrupt_python_drops_is_raised_again(hook: bool) -> None:
    """A KeyboardInterrupt raised while a `__del__` runs is lost: Python prints "Exception
    ignored" and a traceback and goes on (CI once saw a train stage run on after SIGINT, and
    once a SIGTERM's traceback printed from an import's lock). The stages' `sys.unraisablehook`
    raises it again at once and prints nothing (the timer set 1,000 s away, so only the hook can
    have done it); without the hook, the timer raises it again."""
    script = SWALLOWED_INTERRUPT.replace("EVERY", "1000" if hook else "0.5")
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", script.replace("HOOK", str(hook))],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "interrupted", done.stderr
    if hook:
        assert done.stderr == ""
    else:
        assert "Exception ignored" in done.stderr and "KeyboardInterrupt" in done.stderr
    assert time.time() - started < 20


def test_a_signal_after_the_stage_caught_its_interrupt_is_ignored() -> None:
    """The re-raising thread can look at `caught` just before the stage sets it and raise after:
    CI once saw that KeyboardInterrupt land after the stage's last line and end it as a SIGINT
    death (-2, not 130). Once caught, the handler raises nothing."""
    interrupt = Interrupt(every=1000)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupt(signal.SIGTERM, None)
        interrupt.caught = True
        try:
            _thread.interrupt_main(signal.SIGTERM)  # the thread's late re-raise
            for _ in range(1000):
                sum(range(10))  # the pending handler runs between these calls
        except KeyboardInterrupt:
            pytest.fail("a KeyboardInterrupt was raised after the stage had caught one")
    finally:
        signal.signal(signal.SIGTERM, previous)
        interrupt.lost.set()  # the thread wakes, sees `caught` and ends


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_cleanly_and_keeps_the_previous_output(
    signum: int, tmp_path: Path, tiny_base: Path, formatted: Path
) -> None:
    """Ctrl-C or SIGTERM mid-training: one line, exit 130, no traceback, old adapter intact."""
    for name in ("conf", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name)
    write_params(
        tmp_path,
        [
            *tiny_model_overrides(),
            f"paths.base={tiny_base}",
            f"paths.formatted={formatted}",
            "train.max_steps=100000",
            "train.batch_size=2",
        ],
    )
    previous = tmp_path / "models" / "adapter"
    previous.mkdir(parents=True)
    (previous / "adapter_model.safetensors").write_bytes(b"the previous run's adapter")
    # PYTHONFAULTHANDLER: a stage that does not stop is made to print where every thread stands.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell script's background job (`.ci/run &`) hands its children
        # SIGINT ignored, and Python then keeps ignoring it (the stage trained on for 60 s).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list((tmp_path / "reports").glob(".tmp-train-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(3.0)  # loading the base or training: max_steps keeps it busy for hours
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # the fault handler prints every thread's stack
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"still running 60 s after the signal; its last stderr:\n{stderr[-8000:]}")
    assert proc.returncode == 130, stderr
    # The last words on stderr (a progress bar being torn down may still write \r and escapes).
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    words = [line for line in re.split(r"[\r\n]", plain) if re.search(r"\w", line)]
    assert words[-1].strip() == "train: interrupted; no output was replaced", stderr[-2000:]
    assert "Traceback" not in stderr
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["adapter"]  # no temp folder
    assert (previous / "adapter_model.safetensors").read_bytes() == b"the previous run's adapter"
    assert not list((tmp_path / "reports").glob(".tmp-*"))


def test_atomic_dir_clears_a_killed_runs_leftovers(tmp_path: Path) -> None:
    """A SIGKILLed run leaves its temporary sibling; the next run removes it, and an output folder
    gets an ordinary folder's mode (mkdtemp's is 0700)."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    for leftover in (".tmp-adapter-k1ll3d", ".old-adapter-0dd"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "weights").write_text("partial")
    (tmp_path / ".tmp-merged-other").mkdir()  # another output's: not ours to remove
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("failed mid-write")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-merged-other", "adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
