"""Sweep (not a DVC stage): train + evaluate one member per Hydra multirun job.

python -m stages.sweep -m lora.r=4,8 lora.alpha=8,16
python -m stages.sweep -m lora.r=4,8 hydra/launcher=local_parallel   # members side by side
Other launchers (conf/hydra/launcher/): submitit_local, slurm, ray_local.

Members start from params.yaml as it stands (its values, then each member's overrides on
conf/; group choices such as lora=llama_all work) and reuse the formatted data and base model
that `dvc repro` made (params.paths), so prepare and format never run again; each writes
sweeps/<time>/<overrides>/ (see lorapipe.sweep), and a Hydra callback ranks them at the end. A
member that fails is recorded (member.json status and error, error.log with the traceback) and
the others still run.
"""

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lorapipe.cli import stage
from lorapipe.config import Params, validate
from lorapipe.io import write_json
from lorapipe.params import assignable, load_params
from lorapipe.sweep import (
    DEFAULT_METRIC,
    MEMBER_FILE,
    MEMBER_PATHS,
    SWEEP_ROOT,
    SweepError,
    check_sweepable,
    own_overrides,
)

# The sweep's folders and summary; `hydra.sweep.dir=...` on the command line still wins.
# Members are named by their own overrides, not by those params.yaml contributes.
SWEEP_DEFAULTS = [
    f"hydra.sweep.dir={SWEEP_ROOT}/${{now:%Y-%m-%d_%H-%M-%S}}",
    "hydra.sweep.subdir=${hydra:job.override_dirname}",
    "+hydra.callbacks.sweep_summary._target_=lorapipe.sweep.SweepSummary",
    # Declared with its default, so `hydra.callbacks.sweep_summary.metric=...` overrides it.
    f"+hydra.callbacks.sweep_summary.metric={DEFAULT_METRIC}",
]


def member_params(params: Params, root: Path, member: Path, overrides: list[str]) -> Params:
    """`params` with this member's output paths, inputs anchored at `root`, and the overrides
    recorded in `composed_with` (so the adapter's lineage.json names them)."""
    paths = params.paths.model_dump()
    for key, value in paths.items():
        paths[key] = str(root / value) if not Path(value).is_absolute() else value
    paths.update({key: str(member / sub) for key, sub in MEMBER_PATHS.items()})
    return params.model_copy(
        update={
            "paths": params.paths.model_copy(update=paths),
            "composed_with": [*params.composed_with, *overrides],
        }
    )


def check_inputs(params: Params) -> None:
    """SweepError unless the formatted splits and base model that `dvc repro` makes exist."""
    needed = [Path(params.paths.formatted) / f"{s}.jsonl" for s in ("train", "val", "test")]
    needed.append(Path(params.paths.base))
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SweepError(
            f"{', '.join(missing)} not found: members train on what `dvc repro format` makes; "
            "run it (or `dvc pull`) first"
        )


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run(composed: dict[str, Any]) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Imported here, not at the top: they load torch and transformers (~7 s on 2 cores), and a
    # sweep's usage errors (`check_members`, no -m) are said before any of that.
    from lorapipe.lineage import LINEAGE_FILE
    from stages import evaluate, train

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        raise SweepError("add -m: `python -m stages.sweep -m lora.r=4,8 lora.alpha=8,16`")
    root = Path(hydra.runtime.cwd)
    member = Path(hydra.runtime.output_dir)
    base, task = composed["composed_with"], list(hydra.overrides.task)
    overrides = own_overrides(base, task)
    record: dict[str, Any] = {"member": member.name, "overrides": overrides, "status": "running"}
    write_json(member / MEMBER_FILE, record)
    started = time.perf_counter()
    try:
        check_sweepable(overrides)
        mine = member_params(validate(composed), root, member, overrides)
        check_inputs(mine)
        train.run(mine)
        evaluate.run(mine)
        record["status"] = "completed"
    except Exception as exc:  # one member's failure is recorded; Hydra runs the next
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        (member / "error.log").write_text(traceback.format_exc(), encoding="utf-8")
        print(f"sweep: member {member.name} failed: {record['error']}", file=sys.stderr)
    record["seconds"] = round(time.perf_counter() - started, 1)
    reports = member / MEMBER_PATHS["reports"]
    # train.json holds the numbers DVC tracks, runtime/train.json the seconds and memory.
    facts = [_read(reports / "train.json"), _read(reports / "runtime" / "train.json")]
    record["train"] = {k: v for f in facts if f for k, v in f.items()} or None
    record["metrics"] = _read(reports / "metrics.json")
    lineage = _read(member / MEMBER_PATHS["adapter"] / LINEAGE_FILE)
    if lineage is not None:
        record["data"] = lineage["data"]  # the md5s of the splits it trained on
    write_json(member / MEMBER_FILE, record)
    return record


def check_members(base: list[str], overrides: list[str]) -> None:
    """SweepError before the sweep starts for a key no member can vary (`model.seed=1,2`); each
    member would fail with it. An override params.yaml already holds is no change."""
    check_sweepable(own_overrides(base, assignable(load_params(Path.cwd()), overrides)))


main = stage(run, SWEEP_DEFAULTS, raw=True, check=check_members)

if __name__ == "__main__":
    main()
