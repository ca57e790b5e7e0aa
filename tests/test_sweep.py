"""Sweeps and artifacts: ranking members, a Hydra sweep through submitit's local launcher on a
shrunken pipeline copy (one member fails, the other completes), and a DVC remote round trip."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lorapipe.lineage import file_md5
from lorapipe.sweep import SweepError, check_sweepable, rank
from tests.test_pipeline import SMALL, copy_project, ran, sh

FEW = ["train.max_steps=3", "eval.max_examples=6", "eval.max_new_tokens=6"]


def member(name: str, status: str = "completed", **adapter: float) -> dict[str, object]:
    return {
        "member": name,
        "overrides": [name],
        "status": status,
        "metrics": {"adapter": adapter} if adapter else None,
        "train": {"trainable_params": 10, "train_seconds": 1.0} if adapter else None,
        "error": None if status == "completed" else "TrainingError: boom",
    }


def test_ranking_orders_scores_down_losses_up_and_failures_last() -> None:
    records = [
        member("lora.r=4", exact_match=0.5, val_loss=2.0),
        member("lora.r=8", status="failed"),
        member("lora.r=16", exact_match=0.9, val_loss=3.0),
        member("lora.r=2", exact_match=0.5, val_loss=1.0),
    ]
    by_em = rank(records, "adapter.exact_match")
    assert [r["member"] for r in by_em] == ["lora.r=16", "lora.r=2", "lora.r=4", "lora.r=8"]
    assert [r["rank"] for r in by_em] == [1, 2, 3, None]
    by_loss = rank(records, "adapter.val_loss")
    assert [r["member"] for r in by_loss][:3] == ["lora.r=2", "lora.r=4", "lora.r=16"]
    assert by_loss[-1]["error"] == "TrainingError: boom"


def test_sweep_refuses_keys_that_shape_the_shared_formatted_data() -> None:
    check_sweepable(["lora.r=4", "train.learning_rate=0.001", "+train.epochs=2"])
    for bad in ("data.path=x.jsonl", "model=tinyllama", "train.max_length=64", "format.x=1"):
        with pytest.raises(SweepError, match=bad.split("=")[0]):
            check_sweepable(["lora.r=4", bad])


@pytest.fixture(scope="module")
def formatted_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shrunken pipeline copy with `dvc repro train` done: base, data, formatted, adapter."""
    dest = copy_project(tmp_path_factory.mktemp("sweep-project"))
    sh(dest, sys.executable, "-m", "lorapipe.params", *SMALL, *FEW)
    out = sh(dest, "dvc", "repro", "train")
    assert ran(out) == {"base", "prepare", "format", "train"}, out
    return dest


@pytest.mark.slow
def test_submitit_local_sweep_records_each_member_and_a_failure(formatted_project: Path) -> None:
    project = formatted_project
    # lora.target_modules=[nope] fails inside training (no such layer): the other member still runs.
    cmd = [sys.executable, "-m", "stages.sweep", "-m", "hydra/launcher=submitit_local"]
    cmd += ["hydra.sweep.dir=sweeps/t", "lora.r=2", "lora.target_modules=all-linear,[nope]"]
    out = sh(project, *cmd, status=1)  # a member failed: the sweep's exit status says so
    assert "1 member(s) failed" in out
    sweep = project / "sweeps" / "t"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["rank"], r["status"]) for r in rows] == [("1", "completed"), ("", "failed")]
    good, bad = rows
    assert "lora.target_modules: nope match no layer" in bad["error"]
    assert int(good["trainable_params"]) > 0 and float(good["train_seconds"]) > 0
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert good["member"] in (sweep / "summary.md").read_text()

    record = json.loads((sweep / good["member"] / "member.json").read_text())
    assert record["overrides"] == ["lora.r=2", "lora.target_modules=all-linear"]
    assert record["metrics"]["adapter"]["exact_match"] == float(good["exact_match"])
    lineage = json.loads((sweep / good["member"] / "adapter" / "lineage.json").read_text())
    assert lineage["params"]["composed_with"][-2:] == record["overrides"]
    assert lineage["params"]["lora"]["r"] == 2
    # It trained on the formatted data dvc repro made, which is still what dvc.lock records.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["format"]["outs"]}
    assert lineage["data"]["train"]["md5"] == outs["data/formatted/train.jsonl"]
    assert not (sweep / good["member"] / "checkpoints").exists()  # its own, removed when done
    assert ran(sh(project, "dvc", "repro", "--dry", "format")) == set()


@pytest.mark.slow
def test_dvc_remote_round_trip_restores_the_adapter(
    formatted_project: Path, tmp_path: Path
) -> None:
    project, remote = formatted_project, tmp_path / "remote"
    sh(project, "dvc", "remote", "add", "-d", "store", str(remote))
    sh(project, "dvc", "push")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    sh(project, *git, "add", "dvc.lock", "params.yaml", ".dvc/config")
    sh(project, *git, "commit", "-qm", "pipeline run")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    sh(clone, "dvc", "pull", "train")
    adapter = Path("models") / "adapter"
    files = sorted(p.relative_to(project / adapter) for p in (project / adapter).rglob("*"))
    assert "adapter_model.safetensors" in {str(f) for f in files}
    for rel in files:
        if (project / adapter / rel).is_file():
            assert file_md5(clone / adapter / rel) == file_md5(project / adapter / rel), rel
    assert sorted(p.relative_to(clone / adapter) for p in (clone / adapter).rglob("*")) == files
    assert ran(sh(clone, "dvc", "repro", "--dry", "train")) == set()  # nothing to recompute
    shutil.rmtree(clone)
