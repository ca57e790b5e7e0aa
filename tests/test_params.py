"""params.yaml and conf/: composition, overrides on top of params.yaml as it stands, and the
report of what params.yaml sets beyond conf/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorapipe.config import ConfigError
from lorapipe.params import compose_run, describe_drift, load_params, main, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_value(project: Path, group: str, key: str, value: object) -> None:
    """Change params.yaml as `dvc exp apply` or `dvc exp run -S` would: the value only."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[group][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_committed_params_yaml_is_what_conf_composes() -> None:
    assert describe_drift(ROOT) == []


def test_overrides_are_recorded_and_agree_with_conf(project: Path) -> None:
    write_params(project, ["lora.r=4", "eval.batch_size=8"])
    params = load_params(project)
    assert params["lora"]["r"] == 4
    assert params["composed_with"] == ["lora.r=4", "eval.batch_size=8"]
    assert describe_drift(project) == []


def test_group_override_selects_another_model(project: Path) -> None:
    params = write_params(project, ["model=tinyllama"])
    assert params["model"]["name"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


def test_an_applied_value_is_kept_by_every_run_with_overrides(project: Path) -> None:
    """params.yaml after `dvc exp apply` (lora.r 16 -> 4): a stage's own overrides go on top of
    it, and nothing puts 16 back; an override of lora.r itself, or choosing the lora group
    anew, wins."""
    write_params(project, [])
    set_value(project, "lora", "r", 4)
    assert compose_run(project, ["train.max_steps=1"])["lora"]["r"] == 4
    assert compose_run(project, ["quant=nf4"])["lora"]["r"] == 4
    assert compose_run(project, ["quant=nf4"])["quant"]["mode"] == "nf4"
    assert compose_run(project, ["lora.r=8"])["lora"]["r"] == 8
    assert compose_run(project, ["lora=llama_all"])["lora"]["r"] == 16
    assert compose_run(project, ["train.max_steps=1"])["composed_with"] == [
        "++lora.r=4",
        "train.max_steps=1",
    ]


def test_values_beyond_conf_are_reported_truthfully(project: Path, capsys) -> None:
    write_params(project, [])
    set_value(project, "lora", "r", 4)
    lora = project / "conf" / "lora" / "default.yaml"
    lora.write_text(lora.read_text().replace("alpha: 32", "alpha: 64"))
    assert describe_drift(project) == [
        "lora.alpha: params.yaml has 32, conf/ composes 64",
        "lora.r: params.yaml has 4, conf/ composes 16",
    ]
    assert main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "stages use them as they stand" in out and "lora.r: params.yaml has 4" in out


def test_missing_params_yaml_says_what_to_do(project: Path) -> None:
    with pytest.raises(ConfigError, match="make params"):
        load_params(project)


def stage_process(
    project: Path, *args: str, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A stage run as DVC runs it: `python -m stages.<name>` from the project root (`python`:
    interpreter options before `-m`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    env.pop("DVC_EXP_NAME", None)
    return subprocess.run(
        [sys.executable, *python, "-m", *args], cwd=project, capture_output=True, text=True, env=env
    )


def imported_modules(stderr: str) -> set[str]:
    """The modules a process run with `-X importtime` lists on stderr (an import refused, its
    `sys.modules` entry None, is listed too, under its own name)."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()}


MISSPELT = {
    "lora.rank=8": "lora.rank: unknown key (use lora.r)",
    "train.lr=1e-3": "train.lr: unknown key (use train.learning_rate)",
    "train.epoch=3": "train.epoch: unknown key (did you mean train.epochs?)",
    "eval.max_new_token=8": "eval.max_new_token: unknown key (did you mean eval.max_new_tokens?)",
    "foo=1": "foo: unknown key (check the spelling against conf/; a new key needs '+'",
    "lora=llama": "lora=llama: conf/lora/ has no llama.yaml (options: default, ",
    # Hydra raised a bare ValueError (Config group override must be a string or a list).
    "experiment=null": "experiment=null: to drop a group choice use ~experiment",
    "lora=null": "lora=null: to drop a group choice use ~lora",
}


@pytest.mark.parametrize("override", list(MISSPELT))
def test_a_misspelt_override_is_one_line_with_a_hint(project: Path, override: str) -> None:
    """A misspelt key: one line naming it, with a hint, and nothing written. That the line comes
    before anything heavy is imported is the next test's, by the import list (not a clock)."""
    write_params(project, [])
    done = stage_process(project, "stages.train", override)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"train: error: {MISSPELT[override]}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (project / "models").exists()


@pytest.mark.parametrize(
    "name", ["base", "references", "prepare", "format", "train", "evaluate", "merge"]
)
def test_every_stage_reports_a_typo_before_importing_torch(project: Path, name: str) -> None:
    """Each stage run by hand says a misspelt key within a second or so: nothing that imports
    torch (seconds on 2 busy cores) is imported before the config is validated."""
    write_params(project, [])
    done = stage_process(project, f"stages.{name}", "train.epoch=3", python=("-X", "importtime"))
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert said == [f"{name}: error: {MISSPELT['train.epoch=3']}"]
    imported = imported_modules(done.stderr)
    assert {"stages", "lorapipe.config", "lorapipe.cli"} <= imported
    assert not {"torch", "transformers", "peft"} & imported


def test_an_override_the_stage_does_not_read_is_refused(project: Path) -> None:
    """An override of a key the stage neither reads nor checks (dvc.yaml's params and
    CHECKED_THROUGH) would change nothing: one line per key, naming the stages that read it,
    before anything loads. Overrides it reads, checks, or that leave a value as params.yaml has
    it pass this check."""
    from lorapipe.params import check_reads

    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    write_params(project, [])
    done = stage_process(project, "stages.train", "eval.max_examples=5", "lora.r=8")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "train: error: eval.max_examples: stage train does not read it, so the override changes "
        "nothing (train reads lora, quant, train and checks data, format, model against its "
        "inputs; dvc.yaml); give it to evaluate"
    )
    done = stage_process(project, "stages.prepare", "lora=llama_all", "merge.dtype=float16")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "prepare: error: 2 overrides change nothing here:",
        "  lora.target_modules: stage prepare does not read it, so the override changes nothing "
        "(prepare reads data; dvc.yaml); give it to train",
        "  merge.dtype: stage prepare does not read it, so the override changes nothing "
        "(prepare reads data; dvc.yaml); give it to merge",
    ]
    assert not (project / "models").exists() and not (project / "data").exists()
    same = yaml.safe_load((project / "params.yaml").read_text())["merge"]["dtype"]
    for stage, overrides in {
        "train": ["lora.r=8", "model.seed=3", "data.replay=0.1", f"merge.dtype={same}"],
        "evaluate": ["eval.max_examples=5", "retain.max_new_tokens=4", "lora.r=8", "quant=nf4"],
        "references": ["retain.sets.eval=x.jsonl", "format.system_prompt=Hi", "paths.base=m"],
    }.items():
        check_reads(project, stage, compose_run(project, overrides))
    with pytest.raises(ConfigError, match=r"^retain\.batch_size: stage evaluate does not read it"):
        check_reads(project, "evaluate", compose_run(project, ["retain.batch_size=2"]))


def test_a_bad_override_value_is_reported_by_key(project: Path) -> None:
    write_params(project, [])
    done = stage_process(project, "stages.base", "model=tiny", "model.architecture.num_layers=0")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "base: error: model.architecture.num_layers: Input should be greater than 0, got 0"
    )


def test_the_params_command_refuses_values_a_stage_would_refuse(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m lorapipe.params lora.r=abc` composes fine (Hydra has no types) but no stage
    could run the result: it is refused by key, and params.yaml stays as it was."""
    write_params(project, ["lora.r=4"])
    before = (project / "params.yaml").read_text()
    assert main(["lora.r=abc", "train.learning_rate=0"]) == 2
    assert capsys.readouterr().err == (
        "params: error: invalid configuration:\n"
        "  lora.r: Input should be a valid integer, got 'abc'\n"
        "  train.learning_rate: Input should be greater than 0, got 0\n"
    )
    assert (project / "params.yaml").read_text() == before


def test_a_mapping_value_is_assigned_without_plus(project: Path) -> None:
    write_params(project, [])
    params = compose_run(project, ["eval.adapters={r4: sweeps/x/adapter, old: /tmp/a}"])
    assert params["eval"]["adapters"] == {"r4": "sweeps/x/adapter", "old": "/tmp/a"}
    # The params command takes it the same way, and a stage run recomposes what it recorded.
    written = write_params(project, ["eval.adapters={r4: sweeps/x/adapter}"])
    assert written["eval"]["adapters"] == {"r4": "sweeps/x/adapter"}
    assert compose_run(project, ["eval.batch_size=2"])["eval"]["adapters"] == {
        "r4": "sweeps/x/adapter"
    }


def test_a_group_set_to_null_is_one_line_for_the_params_command_and_a_sweep(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorapipe.params import base_overrides

    write_params(project, [])
    assert main(["experiment=null"]) == 2
    assert capsys.readouterr().err == (
        "params: error: experiment=null: to drop a group choice use ~experiment\n"
    )
    with pytest.raises(ConfigError, match=r"^experiment=null: to drop a group choice use ~exp"):
        base_overrides(project, ["experiment=null,qlora", "lora.r=2"], sweep=True)
    assert compose_run(project, ["~experiment"])["lora"]["r"] == 16  # what the hint says works


def test_a_yaml_syntax_error_names_the_file_and_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand edit that breaks the YAML (`r: [16`) gave yaml.parser's traceback, in params.yaml
    (--check, every stage, generate) and in a conf/ file (make params)."""
    from stages.generate import main as generate

    write_params(project, [])
    good = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(good.replace("  r: 16\n", "  r: [16\n"))
    line = good.splitlines().index("  r: 16") + 1
    expected = (
        f"params.yaml line {line + 1}: expected ',' or ']', but got ':' (while parsing a flow "
        f"sequence started on line {line}); fix the YAML syntax there\n"
    )
    assert main(["--check"]) == 2
    assert capsys.readouterr().err == f"params: error: {expected}"
    assert generate(["hi"]) == 2
    assert capsys.readouterr().err == f"generate: error: {expected}"
    done = stage_process(project, "stages.train", "lora.r=2")
    assert done.returncode == 2 and done.stderr == f"train: error: {expected}"

    (project / "params.yaml").write_text(good.replace("paths:", "elsewhere:"))
    assert generate(["hi"]) == 2
    assert capsys.readouterr().err.startswith("generate: error: params.yaml: no paths section")

    lora = project / "conf" / "lora" / "default.yaml"
    lora.write_text(lora.read_text().replace("\nr: 16", "\nr: [16"))
    assert main(["lora.r=4"]) == 2
    assert capsys.readouterr().err.startswith(
        "params: error: conf/lora/default.yaml line 4: expected ',' or ']', but got '<scalar>' "
        "(while parsing a flow sequence started on line 3); fix the YAML syntax there"
    )


def test_params_yaml_is_read_as_yaml_1_2_and_an_int_is_a_float(project: Path) -> None:
    """The schema refuses a value of the wrong type (pydantic strict), so params.yaml is read
    as DVC and Hydra read it: a hand-written `1e-3` is a float (PyYAML alone reads a string),
    and `train.learning_rate=1` (an int) is a float."""
    from lorapipe.config import validate

    write_params(project, [])
    set_value(project, "train", "learning_rate", 1)
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("learning_rate: 1\n", "learning_rate: 1e-3\n"))
    assert validate(load_params(project)).train.learning_rate == 0.001
    assert write_params(project, ["train.learning_rate=1"])["train"]["learning_rate"] == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "lora.r: Input should be greater than 0, got 0"),
        ("eight", "lora.r: Input should be a valid integer, got 'eight'"),
    ],
)
def test_check_validates_the_values_of_params_yaml(
    project: Path, capsys: pytest.CaptureFixture[str], value: object, message: str
) -> None:
    """A hand edit no stage would run with was reported as values beyond conf/ (exit 1)."""
    write_params(project, [])
    set_value(project, "lora", "r", value)
    assert main(["--check"]) == 2
    assert capsys.readouterr().err == f"params: error: {message}\n"


def test_check_reports_a_renamed_key_and_takes_no_overrides(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(project, [])
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("  r: 16\n", "  rank: 8\n"))
    assert main(["--check"]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  lora.r: missing (every key has its value in conf/; see conf/lora/)",
        "  lora.rank: unknown key (use lora.r)",
    ]
    # It said `--check: not an override (LexerNoViableAltException ...)`.
    assert main(["lora.r=4", "--check"]) == 2
    assert capsys.readouterr().err.startswith("params: error: --check takes no overrides")


def test_recorded_overrides_come_with_a_note_that_an_experiment_drops_them(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dvc exp run -S` composes conf/ with its -S values only: what `make params ARGS=...`
    recorded is silently dropped in an experiment, so both commands say so."""
    note = (
        "note: `dvc exp run -S` composes conf/ with its -S values only, so it drops lora.r=8: "
        "keep lasting values in conf/, or pass them again with -S\n"
    )
    assert main(["lora.r=8"]) == 0
    assert capsys.readouterr().out.endswith(note)
    assert main(["--check"]) == 0
    assert capsys.readouterr().out.endswith(note)
    assert main([]) == 0
    assert "note:" not in capsys.readouterr().out
