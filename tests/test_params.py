"""params.yaml composition and the staleness check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorapipe.params import StaleParamsError, check_fresh, load_params, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def test_committed_params_yaml_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    check_fresh(ROOT)


def test_overrides_are_recorded_and_replayed(project: Path) -> None:
    write_params(project, ["lora.r=4", "eval.batch_size=8"])
    params = load_params(project)
    assert params["lora"]["r"] == 4
    assert params["composed_with"] == ["lora.r=4", "eval.batch_size=8"]
    check_fresh(project)


def test_group_override_selects_another_model(project: Path) -> None:
    params = write_params(project, ["model=tinyllama"])
    assert params["model"]["name"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def test_editing_conf_without_recomposing_is_refused(project: Path) -> None:
    write_params(project, [])
    lora = project / "conf" / "lora" / "default.yaml"
    lora.write_text(lora.read_text().replace("r: 16", "r: 64"))
    with pytest.raises(StaleParamsError) as err:
        check_fresh(project)
    assert "lora.r: params.yaml has 16, conf/ composes 64" in str(err.value)
    assert "make params" in str(err.value)


def test_hand_edited_params_yaml_is_refused(project: Path) -> None:
    write_params(project, [])
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("max_new_tokens: 48", "max_new_tokens: 4"))
    with pytest.raises(StaleParamsError, match=r"eval\.max_new_tokens"):
        check_fresh(project)


def test_dvc_experiments_skip_the_check(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_params(project, [])
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("r: 16", "r: 4"))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")  # dvc exp run composed params.yaml itself
    check_fresh(project)


def test_missing_params_yaml_says_what_to_do(project: Path) -> None:
    with pytest.raises(StaleParamsError, match="make params"):
        check_fresh(project)


def run_stage(
    project: Path, *args: str, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A stage run as DVC runs it: `python -m stages.<name>` from the project root (`python`:
    interpreter options before `-m`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *python, "-m", *args], cwd=project, capture_output=True, text=True, env=env
    )


def test_a_stage_refuses_stale_params_without_a_traceback(project: Path) -> None:
    shutil.copytree(ROOT / "stages", project / "stages")
    write_params(project, [])
    lora = project / "conf" / "lora" / "default.yaml"
    lora.write_text(lora.read_text().replace("r: 16", "r: 64"))
    done = run_stage(project, "stages.train")
    assert done.returncode == 2
    assert "train: error: params.yaml is stale against conf/" in done.stderr
    assert "lora.r: params.yaml has 16, conf/ composes 64" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "models").exists()


def test_a_bad_override_is_reported_by_key(project: Path) -> None:
    shutil.copytree(ROOT / "stages", project / "stages")
    write_params(project, [])
    done = run_stage(project, "stages.base", "model.architecture.num_layers=0")
    assert done.returncode == 2
    assert "model.architecture.num_layers: Input should be greater than 0, got 0" in done.stderr
    assert "Traceback" not in done.stderr
