"""Sweep summaries: ranking members, and which overrides a sweep refuses (the sweep itself and
the DVC remote round trip run on the pipeline copy in test_pipeline.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorapipe.sweep import MEMBER_FILE, SweepError, check_sweepable, rank, write_summary


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


def test_sweep_refuses_keys_that_shape_the_shared_inputs() -> None:
    check_sweepable(["lora.r=4", "train.learning_rate=0.001", "+train.epochs=2"])
    fixed = ("data.path=x.jsonl", "model=tinyllama", "train.max_length=64", "format.x=1")
    for bad in (*fixed, "retain.max_new_tokens=8"):
        with pytest.raises(SweepError, match=bad.split("=")[0]):
            check_sweepable(["lora.r=4", bad])


def test_summary_files_rank_members_read_from_their_folders(tmp_path: Path) -> None:
    for record in (
        member("a", exact_match=0.2),
        member("b", exact_match=0.7),
        member("c", "failed"),
    ):
        (tmp_path / str(record["member"])).mkdir()
        (tmp_path / str(record["member"]) / MEMBER_FILE).write_text(json.dumps(record))
    rows = write_summary(tmp_path, "adapter.exact_match")
    assert [r["member"] for r in rows] == ["b", "a", "c"]
    csv_lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,member,status,metric") and csv_lines[1].startswith("1,b,")
    assert "| 1 | b | completed | 0.7000 |" in (tmp_path / "summary.md").read_text()
    assert "2 of 3 members completed" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SweepError, match="no member"):
        write_summary(tmp_path / "a", "adapter.exact_match")


def test_a_misspelt_metric_is_refused_with_the_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorapipe.sweep import main

    for record in (member("a", exact_match=0.2), member("b", exact_match=0.7)):
        (tmp_path / str(record["member"])).mkdir()
        (tmp_path / str(record["member"]) / MEMBER_FILE).write_text(json.dumps(record))
    assert main([str(tmp_path), "--metric", "adapter.exact_mach"]) == 2
    err = capsys.readouterr().err
    assert "adapter.exact_mach" in err and "did you mean adapter.exact_match?" in err
    assert not (tmp_path / "summary.csv").exists()  # nothing written under a wrong metric
    assert main([str(tmp_path), "--metric", "train.train_seconds"]) == 0


def test_training_time_ticks_are_distinct_when_times_are_close() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorapipe.sweep import _format_x

    fig, ax = plt.subplots()
    times = [21.8, 22.1, 22.4]
    ax.scatter(times, [0.1, 0.2, 0.3])
    _format_x(ax, "train_seconds", times)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_a_member_without_its_training_time_is_ranked_and_left_off_that_plot(
    tmp_path: Path,
) -> None:
    records = [member("a", exact_match=0.2), member("b", exact_match=0.7)]
    records[0]["train"] = {"trainable_params": 10}  # no runtime facts (train_seconds)
    for record in records:
        (tmp_path / str(record["member"])).mkdir()
        (tmp_path / str(record["member"]) / MEMBER_FILE).write_text(json.dumps(record))
    rows = write_summary(tmp_path, "adapter.exact_match")
    assert [(r["member"], r["train_seconds"]) for r in rows] == [("b", 1.0), ("a", None)]
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_without_m_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`python -m stages.sweep lora.r=4,8` (the -m forgotten) ran one Hydra job that raised, and
    Hydra printed the traceback; it is refused before anything runs."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "stages.sweep", "lora.r=4,8"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and not (tmp_path / "sweeps").exists()
    assert done.stderr == (
        "sweep: error: add -m: members run as a Hydra multirun "
        "(python -m stages.sweep -m lora.r=4,8)\n"
    )


def test_a_members_own_overrides_are_found_when_params_yaml_holds_a_list_or_a_dict() -> None:
    """params.yaml's values beyond conf/ reach a sweep as overrides written by hydra_value
    (`[a, b]`, `{k: v}`); Hydra's sweeper hands each member those overrides in its compact form
    (`[a,b]`, `{k:v}`), and the member took them all for its own (then refused `model=tiny` as a
    key it cannot sweep)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lorapipe.params import as_overrides
    from lorapipe.sweep import own_overrides

    applied = as_overrides(
        {"lora": {"target_modules": ["q_proj", "v_proj"]}, "data": {"fields": {"q": "prompt"}}},
        {"lora": {"target_modules": "all-linear"}, "data": {"fields": None}},
    )
    assert applied == [
        "++lora.target_modules=['q_proj', 'v_proj']",
        "++data.fields={q: 'prompt'}",
    ]
    base = ["model=tiny", *applied, "~lora.bias"]
    mine = ["lora.r=2,4", "train.max_steps=1", "lora.layers_to_transform=[0, 1]"]
    parsed = OverridesParser.create().parse_overrides([*base, *mine])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    assert batch[0][1] == "++lora.target_modules=['q_proj','v_proj']"  # as Hydra writes it
    for task, r in zip(batch, ("2", "4"), strict=True):
        assert own_overrides(base, task) == [
            f"lora.r={r}",
            "train.max_steps=1",
            "lora.layers_to_transform=[0,1]",
        ]
    # A member's own value for a key params.yaml also sets is the member's own.
    assert own_overrides(["++lora.r=4"], ["++lora.r=8"]) == ["++lora.r=8"]


def test_the_ranking_metric_is_chosen_by_the_documented_override(tmp_path: Path) -> None:
    """`hydra.callbacks.sweep_summary.metric=adapter.val_loss` (docs/sweeps-and-scale-out.md)
    was refused by Hydra (Key 'metric' is not in struct): the callback's config lacked the key.
    Here the members fail fast (nothing formatted), which is enough for the summary to be
    written under the chosen metric."""
    import shutil
    import subprocess
    import sys

    from lorapipe.params import write_params

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "conf", tmp_path / "conf")
    write_params(tmp_path, ["model=tiny"])
    cmd = [sys.executable, "-m", "stages.sweep", "-m", "hydra.sweep.dir=sweeps/m", "lora.r=2"]
    done = subprocess.run(
        [*cmd, "hydra.callbacks.sweep_summary.metric=adapter.val_loss"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "not in struct" not in done.stderr, done.stderr
    summary = json.loads((tmp_path / "sweeps/m/summary.json").read_text())
    assert summary["metric"] == "adapter.val_loss"
    assert [m["error"].split(":")[0] for m in summary["members"]] == ["SweepError"]
    assert done.returncode == 1 and "ranked by adapter.val_loss" in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # Hydra's generic help, which names none of the sweep's usage.
        (["--help"], "Sweep (not a DVC stage): train + evaluate one member per Hydra"),
        # Hydra's many-line message, once the sweep ran.
        (
            ["-m", "hydra/launcher=nope", "lora.r=2"],
            "sweep: error: hydra/launcher=nope: no such option (options: basic, joblib, "
            "local_parallel, ray_local, slurm, submitit_local, submitit_slurm)\n",
        ),
        # Every member failed with it, one after the other.
        (
            ["-m", "model.seed=1,2", "lora.r=2"],
            "sweep: error: cannot sweep model.seed=1,2: members share the formatted data",
        ),
        (["-m", "train.max_length=128,256"], "sweep: error: cannot sweep train.max_length="),
        # Every member trained into its own folder anyway: two identical members (audit).
        (
            ["-m", "paths.adapter=a,b"],
            "sweep: error: cannot set paths.adapter=a,b: each member's adapter, reports and "
            "checkpoints go in its own folder under hydra.sweep.dir",
        ),
    ],
)
def test_sweep_usage_and_what_no_member_can_run_are_said_before_it_starts(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    import shutil
    import subprocess
    import sys

    from lorapipe.params import write_params

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "conf", tmp_path / "conf")
    write_params(tmp_path, ["model=tiny"])
    done = subprocess.run(
        [sys.executable, "-m", "stages.sweep", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.stdout if args == ["--help"] else done.stderr).startswith(expected), done
    assert done.returncode == (0 if args == ["--help"] else 2)
    assert not (tmp_path / "sweeps").exists()
