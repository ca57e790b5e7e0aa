"""Data-parallel training: two CPU processes (gloo) run the real train stage under torchrun, the
launcher `accelerate launch` uses for multi-GPU runs. Rank 0 alone writes the adapter."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.params import write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_trains_and_only_rank_zero_writes(
    tiny_base: Path, formatted: Path, tmp_path: Path
) -> None:
    (tmp_path / "conf").symlink_to(ROOT / "conf")  # the stage checks params.yaml against conf/
    write_params(
        tmp_path,
        [
            f"paths.base={tiny_base}",
            f"paths.formatted={formatted}",
            f"paths.adapter={tmp_path / 'out' / 'adapter'}",
            f"paths.reports={tmp_path / 'out' / 'reports'}",
            f"paths.checkpoints={tmp_path / 'out' / 'ckpt'}",
            "train.max_steps=6",
            "train.batch_size=4",
            "train.logging_steps=1",
        ],
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("DVC_EXP_NAME", None)
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(logs), "--redirects", "3", "-m", "stages.train"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    rank_logs = {
        int(p.parent.name): p.read_text()
        for p in logs.rglob("stdout.log")
        if p.parent.name in ("0", "1")
    }
    assert done.returncode == 0, done.stderr + "\n".join(rank_logs.values())

    # Both processes trained; only rank 0 went on to write (the stage prints its line after).
    assert sorted(rank_logs) == [0, 1]
    assert all("trainable params" in text for text in rank_logs.values())
    assert "-> " in rank_logs[0] and "train: loss" in rank_logs[0]
    assert "train: loss" not in rank_logs[1]

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "reports"]  # no rank-1 temp dir
    assert not (out / "ckpt").exists()
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    lineage = json.loads((adapter / "lineage.json").read_text())
    assert lineage["training"]["world_size"] == 2 and lineage["training"]["writer_rank"] == 0
    report = json.loads((out / "reports" / "train.json").read_text())
    assert report["steps"] == 6 and report["world_size"] == 2

    with (out / "reports" / "train" / "plots" / "metrics" / "loss.tsv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f, delimiter="\t")]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2])  # the loss falls
