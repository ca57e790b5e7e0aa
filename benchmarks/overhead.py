"""Pipeline overhead: a no-op `dvc repro`, and `dvc repro` after an eval-only change.

python benchmarks/overhead.py --out /tmp/bench_overhead.json

Runs in a throwaway clone of HEAD (this working tree and its outputs are never touched) that
borrows this repository's DVC cache: `dvc checkout` restores the committed outputs, then
(1) `dvc repro` with nothing changed: DVC hashes every dependency and runs no stage;
(2) `eval.max_examples` recomposed into params.yaml (`python -m lorapipe.params`), then
`dvc repro`: only `check` (which validates params.yaml after any change, before a stage's
outputs are removed) and `evaluate` may run. Each records wall seconds and the stages DVC ran.
Needs HEAD's outputs in the cache and HEAD's dvc.lock up to date (`make repro`, then commit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from output import publish

from lorapipe.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]

EVAL_CHANGE = "eval.max_examples=64"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr}")
    return done.stdout


def _stages_ran(output: str) -> list[str]:
    return [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]


def _timed_repro(clone: Path, env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    out = _run(["dvc", "repro"], clone, env)
    return {"seconds": round(time.perf_counter() - started, 3), "stages_ran": _stages_ran(out)}


def run(root: Path = ROOT) -> dict[str, Any]:
    """Both measurements in a fresh clone; raises PipelineError naming what to do when HEAD's
    outputs are not in the cache or HEAD's dvc.lock is stale."""
    bin_dir = str(Path(sys.executable).parent)  # this venv's dvc and python first
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        clone = Path(tmp) / "clone"
        env["PYTHONPATH"] = str(clone / "src")  # the clone's library, not this checkout's
        _run(["git", "clone", "--quiet", str(root), str(clone)], Path(tmp), env)
        _run(["dvc", "cache", "dir", "--local", str(root / ".dvc" / "cache")], clone, env)
        try:
            _run(["dvc", "checkout", "--quiet"], clone, env)
        except PipelineError as e:
            raise PipelineError(
                f"HEAD's outputs are not all in the DVC cache: run `make repro`\n{e}"
            ) from e
        status = subprocess.run(["dvc", "status", "-q"], cwd=clone, env=env).returncode
        if status != 0:
            changed = _run(["dvc", "status"], clone, env)
            raise PipelineError(
                "HEAD's dvc.lock does not match HEAD's code and params: run `make repro` and "
                f"commit dvc.lock first\n{changed}"
            )
        noop = _timed_repro(clone, env)
        _run([sys.executable, "-m", "lorapipe.params", EVAL_CHANGE], clone, env)
        eval_only = _timed_repro(clone, env)
    return {"noop_repro": noop, "eval_only_change": {"change": EVAL_CHANGE, **eval_only}}


def markdown(result: dict[str, Any]) -> str:
    noop, ev = result["noop_repro"], result["eval_only_change"]
    return "\n".join(
        [
            "| run | seconds | stages run |",
            "| --- | ---: | --- |",
            f"| no-op `dvc repro` | {noop['seconds']:.2f} | "
            f"{', '.join(noop['stages_ran']) or 'none'} |",
            f"| `dvc repro` after `{ev['change']}` | {ev['seconds']:.2f} | "
            f"{', '.join(ev['stages_ran']) or 'none'} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="reports/bench_overhead.json", help="results file")
    args = parser.parse_args(argv)
    try:
        result = run()
    except PipelineError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return publish(args.out, result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
