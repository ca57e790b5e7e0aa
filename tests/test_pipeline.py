"""The real pipeline, end to end: `dvc repro` on a shrunken default in a temporary copy."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_params import stage_process

ROOT = Path(__file__).resolve().parents[1]
# The shrunken default the copies run: the tiny model, smaller still, and a few steps. Written
# into the copy's conf/config.yaml (not given as overrides), so `dvc exp run -S`, which composes
# conf/ afresh, keeps it too.
SMALL = {
    "model": {"architecture": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2}},
    "train": {"max_steps": 12, "batch_size": 8},
    "eval": {"max_examples": 12, "max_new_tokens": 8},
    "merge": {"probe_examples": 4},
    "retain": {"max_new_tokens": 8},
}
STAGES = {"check", "base", "references@train", "references@eval", "prepare", "format", "train"}
STAGES |= {"evaluate", "merge"}


# And smaller splits of the default data (data=pyqa; other data groups keep their own): every
# training run scores the whole val split, 12 steps of 8 stay within one epoch of train, and test
# holds the 50 examples a documented evaluate command asks for.
SMALL_SPLITS = "split_counts: {train: 1200, val: 8, test: 200}"


def shrink(dest: Path) -> Path:
    """Make the copy at `dest` run the SMALL tiny pipeline from its conf/, and compose it."""
    config = dest / "conf" / "config.yaml"
    text = config.read_text().replace("  - model: smollm2\n", "  - model: tiny\n")
    config.write_text(text + yaml.safe_dump(SMALL))
    data = dest / "conf" / "data" / "pyqa.yaml"
    text, found = re.subn(r"^split_counts: .*$", SMALL_SPLITS, data.read_text(), flags=re.M)
    assert found == 1, f"no split_counts line in {data}"
    data.write_text(text)
    sh(dest, sys.executable, "-m", "lorapipe.params")
    sh(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "small")
    return dest


def sh(cwd: Path, *cmd: str, status: int = 0) -> str:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("DVC_EXP_NAME", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == status, (
        f"{' '.join(cmd)}: exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    """Stage names `dvc repro` printed as running."""
    return {
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    }


def copy_project(dest: Path) -> Path:
    """A git repository at `dest` holding the tracked tree (as on disk), with no results yet."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for path in (dest / "reports").glob("*.json"):
        path.unlink()  # start from nothing, as a fresh clone's first run would
    (dest / "dvc.lock").unlink(missing_ok=True)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh(dest, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return dest


@pytest.fixture(scope="module")
def project(repro_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shrunken pipeline that `dvc repro` ran once (conftest); these tests change
    it, in order."""
    dest = tmp_path_factory.mktemp("pipeline") / "project"
    shutil.copytree(repro_project, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_reports_hold_both_models_metrics(project: Path) -> None:
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["examples"] == 12
    scores = {"exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    for model in ("base", "adapter"):
        assert set(metrics[model]) == scores | {"val_loss", "val_perplexity", "stopped_at_eos"}
        assert all(0.0 <= metrics[model][k] <= 1.0 for k in scores)
        assert metrics[model]["val_perplexity"] == pytest.approx(
            math.exp(metrics[model]["val_loss"]), rel=1e-3
        )
    assert (project / "reports" / "report.html").read_text().count("<svg") >= 1
    rows = (project / "reports" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 12
    first = json.loads(rows[0])
    assert {"id", "prompt", "reference", "base", "adapter", "scores"} <= set(first)
    retain = metrics["retain"]
    assert retain["examples"] == len((ROOT / "data/retain/eval.jsonl").read_text().splitlines())
    assert retain["base"] == {"rougeL": 1.0, "identical": 1.0}  # by construction
    assert set(retain["adapter"]) == {"rougeL", "identical"}
    assert 'id="retain"' in (project / "reports" / "report.html").read_text()


@pytest.mark.slow
def test_editing_the_retain_eval_part_reruns_only_what_measures_it(project: Path) -> None:
    """The eval part's answers and evaluate re-run; the train part's answers, the data, the
    adapter and the merged model stay as they are."""
    path = project / "data" / "retain" / "eval.jsonl"
    before = path.read_text()
    path.write_text(before + json.dumps({"instruction": "Name a colour of the rainbow."}) + "\n")
    status = sh(project, "dvc", "status")
    changed = {x.rstrip(":") for x in status.splitlines() if x.endswith(":") and x[0] != "\t"}
    assert changed == {"references@eval"}, status
    assert ran(sh(project, "dvc", "repro")) == {"references@eval", "evaluate"}
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["retain"]["examples"] == len(before.splitlines()) + 1


@pytest.mark.slow
def test_adapter_carries_lineage_matching_dvc_lock(project: Path) -> None:
    adapter = project / "models" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    lineage = json.loads((adapter / "lineage.json").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    locked = {d["path"]: d["md5"] for d in lock["stages"]["train"]["deps"]}
    for split in ("train", "val"):
        entry = lineage["data"][split]
        assert locked[entry["path"]] == entry["md5"]
    assert lineage["params"]["lora"]["r"] == 16
    assert lineage["base_model"]["kind"] == "tiny"
    assert "git" not in lineage  # the run's commit is a run-time fact: reports/runtime/
    runtime = json.loads((project / "reports" / "runtime" / "train.json").read_text())
    assert len(runtime["git"]["commit"]) == 40
    assert lineage["code"] == {
        d["path"]: d["md5"] for d in lock["stages"]["train"]["deps"] if d["path"].endswith(".py")
    }
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.slow
def test_an_adapter_is_never_used_on_a_base_it_was_not_trained_on(
    repro_project: Path, tmp_path: Path
) -> None:
    """The base made again from other model params by hand (`python -m stages.base
    model.seed=1`), then the adapter used without training it again: evaluate, merge and
    generate refuse it, naming both bases, and replace nothing."""
    work = tmp_path / "project"
    shutil.copytree(repro_project, work, symlinks=True)
    before = {
        p: (work / p).read_bytes() for p in ("reports/metrics.json", "models/merged/lineage.json")
    }
    trained_on = json.loads((work / "models/adapter/lineage.json").read_text())["base_model"]
    assert stage_process(work, "stages.base", "model.seed=1").returncode == 0
    now = json.loads((work / "models/base/pin.json").read_text())["config_hash"]
    for command in (
        ("stages.evaluate", "model.seed=1"),
        ("stages.merge", "model.seed=1"),
        ("stages.generate", "What does `len('ab')` return?"),
    ):
        done = stage_process(work, *command)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert done.stderr.strip().splitlines()[-1] == (
            f"{command[0].split('.')[1]}: error: models/adapter was trained on another base than "
            f"the one in models/base: config_hash {trained_on['config_hash']!r} in its lineage, "
            f"{now!r} in models/base/pin.json. Use it with the base it was trained on (the base "
            "stage, run with its lineage's params.model), or train it again on this one"
        )
    assert {p: (work / p).read_bytes() for p in before} == before


def test_an_adapter_is_used_only_under_the_params_it_was_trained_with(
    repro_project: Path, tmp_path: Path
) -> None:
    """evaluate and merge run by hand with a training key the adapter was not trained with
    (`lora.r=4`) refuse it, naming the key and both values, and replace nothing: their reports
    would describe an adapter these params did not make."""
    work = tmp_path / "project"
    shutil.copytree(repro_project, work, symlinks=True)
    outputs = ("reports/metrics.json", "reports/merge.json", "models/merged/lineage.json")
    before = {p: (work / p).read_bytes() for p in outputs}
    trained = json.loads((work / "models/adapter/lineage.json").read_text())["params"]["lora"]
    assert trained["r"] != 4
    for command in ("stages.evaluate", "stages.merge"):
        done = stage_process(work, command, "lora.r=4")
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert done.stderr.strip().splitlines()[-1] == (
            f"{command.split('.')[1]}: error: models/adapter was made from other params "
            f"(models/adapter/lineage.json): lora.r is 4 here, {trained['r']} there. Make it "
            "from these first (`dvc repro`, or `python -m stages.train` with the same "
            "overrides), or give this stage the params it was made from"
        )
    assert {p: (work / p).read_bytes() for p in outputs} == before


def test_evaluate_refuses_retain_references_made_under_other_params(
    repro_project: Path, tmp_path: Path
) -> None:
    """The eval part's references made again by hand with a smaller token budget: the record
    beside them says so, and evaluate without that override refuses them (the adapter would be
    scored against answers cut where its own are not) and replaces nothing."""
    work = tmp_path / "project"
    shutil.copytree(repro_project, work, symlinks=True)
    budget = yaml.safe_load((work / "params.yaml").read_text())["retain"]["max_new_tokens"]
    done = stage_process(work, "stages.references", "eval", f"retain.max_new_tokens={budget - 1}")
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((work / "data/references/eval.made_with.json").read_text())
    pin = json.loads((work / "models/base/pin.json").read_text())
    assert record["base"]["config_hash"] == pin["config_hash"]
    assert record["retain"] == {"max_new_tokens": budget - 1}
    before = (work / "reports/metrics.json").read_bytes()
    done = stage_process(work, "stages.evaluate")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "evaluate: error: data/references/eval.jsonl was made from other params "
        f"(data/references/eval.made_with.json): retain.max_new_tokens is {budget} here, "
        f"{budget - 1} there. Make it from these first (`dvc repro`, or `python -m stages."
        "references eval` with the same overrides), or give this stage the params it was made "
        "from"
    )
    assert (work / "reports/metrics.json").read_bytes() == before


@pytest.mark.slow
def test_merge_reproduces_adapter_logits(project: Path) -> None:
    report = json.loads((project / "reports" / "merge.json").read_text())
    assert report["passed"] and report["merged_max_abs_logit_diff"] <= 1e-4
    merged = project / "models" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "lineage.json").is_file()


@pytest.mark.slow
def test_submitit_local_sweep_records_each_member_and_a_failure(project: Path) -> None:
    # lora.target_modules=[nope] fails inside training (no such layer): the other member still runs.
    cmd = [sys.executable, "-m", "stages.sweep", "-m", "hydra/launcher=submitit_local"]
    cmd += ["hydra.sweep.dir=sweeps/t", "lora.r=2", "lora.target_modules=all-linear,[nope]"]
    cmd += ["train.max_steps=3", "eval.max_examples=4"]
    out = sh(project, *cmd, status=1)  # a member failed: the sweep's exit status says so
    assert "1 member(s) failed" in out
    sweep = project / "sweeps" / "t"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["rank"], r["status"]) for r in rows] == [("1", "completed"), ("", "failed")]
    good, bad = rows
    assert "lora.target_modules: nope matches no layer" in bad["error"]
    assert int(good["trainable_params"]) > 0 and float(good["train_seconds"]) > 0
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert good["member"] in (sweep / "summary.md").read_text()

    record = json.loads((sweep / good["member"] / "member.json").read_text())
    assert record["overrides"] == ["lora.r=2", "lora.target_modules=all-linear", *cmd[-2:]]
    assert record["metrics"]["adapter"]["exact_match"] == float(good["exact_match"])
    lineage = json.loads((sweep / good["member"] / "adapter" / "lineage.json").read_text())
    assert lineage["params"]["composed_with"] == record["overrides"]
    assert lineage["params"]["lora"]["r"] == 2
    # It trained on the formatted data dvc repro made, which is still what dvc.lock records.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["format"]["outs"]}
    assert lineage["data"]["train"]["md5"] == outs["data/formatted/train.jsonl"]
    assert not (sweep / good["member"] / "checkpoints").exists()  # its own, removed when done
    assert ran(sh(project, "dvc", "repro", "--dry", "format")) == set()


@pytest.mark.slow
def test_every_report_a_stage_writes_is_a_declared_output(project: Path) -> None:
    """Output file names are stated in stage code and in dvc.yaml: each file under reports/
    that `dvc repro` left is inside a declared out, metric or plot of the stage (the run-time
    facts in reports/runtime/ stay outside DVC on purpose), and each declared path exists."""
    reports = yaml.safe_load((project / "params.yaml").read_text())["paths"]["reports"]
    declared = set()
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                declared.add(path.replace("${paths.reports}", reports))
    written = {
        str(p.relative_to(project))
        for p in (project / reports).rglob("*")
        if p.is_file() and "runtime" not in p.parts and not p.name.startswith("bench.")
    }  # bench.*: `make bench` writes them, not a stage
    undeclared = {w for w in written if not any(w == d or w.startswith(d + "/") for d in declared)}
    assert not undeclared, f"written but not declared in dvc.yaml: {sorted(undeclared)}"
    assert all((project / d).exists() for d in declared if d.startswith(reports)), declared


@pytest.mark.slow
def test_dvc_plots_show_writes_a_page_that_needs_no_network(project: Path) -> None:
    sh(project, "dvc", "plots", "show", "-o", "plots_page")
    check_offline_plots((project / "plots_page" / "index.html").read_text())


def check_offline_plots(page: str) -> None:
    """`dvc plots show`'s page draws every chart with the library inlined in it."""
    assert "<script src" not in page and "cdn." not in page  # no chart library fetched
    assert page.count("vegaEmbed('#") >= 3  # one chart per plot, drawn by the inlined library
    for library in ("vega 5", "vega-lite 5.21.0", "vega-embed 6.26.0"):
        assert f"<script>/* {library} */" in page


@pytest.mark.slow
def test_only_changed_stages_rerun(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (A LoRA change, {"check", "train", "evaluate", "merge"}: the experiment test below.)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from run_all import EVAL_CHANGE_RUNS  # what `make bench`'s overhead target allows

    assert ran(sh(project, "dvc", "repro")) == set()
    sh(project, sys.executable, "-m", "lorapipe.params", "eval.max_new_tokens=6")
    assert ran(sh(project, "dvc", "repro")) == {"check", "evaluate"} == set(EVAL_CHANGE_RUNS)


@pytest.mark.slow
def test_a_value_a_stage_refuses_stops_dvc_before_any_output_is_removed(
    repro_project: Path, tmp_path: Path
) -> None:
    """DVC removes a stage's outputs before running it: without the `check` stage,
    `dvc exp run -S lora.r=0` deleted the adapter, the merged model and the train reports, then
    train refused r=0. Now `check` refuses it first, and every output is as it was."""
    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)

    def outputs() -> dict[str, bytes]:
        found = [p for d in ("models", "reports", "data") for p in (project / d).rglob("*")]
        return {p.relative_to(project).as_posix(): p.read_bytes() for p in found if p.is_file()}

    before = outputs()
    out = sh(project, "dvc", "exp", "run", "-S", "lora.r=0", status=255)
    assert ran(out) == {"check"}, out
    assert "check: error: lora.r: Input should be greater than 0, got 0" in out
    assert outputs() == before
    assert "models/adapter/adapter_model.safetensors" in before


def write_chat_parquet(project: Path) -> dict[str, object]:
    """Multi-turn conversations with a system turn, in Parquet, under a non-standard column:
    the `data.sources` entry that reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorapipe.pyqa import generate

    rows = generate(120, seed=7)
    conversations = [
        [
            {"role": "system", "content": "Answer with a Python value."},
            {"role": "user", "content": a["instruction"]},
            {"role": "assistant", "content": a["response"]},
            {"role": "user", "content": b["instruction"]},
            {"role": "assistant", "content": b["response"]},
        ]
        for a, b in zip(rows[::2], rows[1::2], strict=True)
    ]
    pq.write_table(pa.table({"conversation": conversations}), project / "data/raw/chat.parquet")
    return {"path": "data/raw/chat.parquet", "fields": {"conversation": "messages"}}


def write_alpaca_csv(project: Path) -> dict[str, object]:
    """Alpaca rows (instruction, input, output) in a CSV whose columns are named differently:
    the `data.sources` entry that reads them."""
    import csv

    from lorapipe.pyqa import generate

    with (project / "data/raw/alpaca.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "context", "answer"])
        for i, row in enumerate(generate(120, seed=8)):
            writer.writerow([row["instruction"], "" if i % 2 else "Be brief.", row["response"]])
    fields = {"task": "instruction", "context": "input", "answer": "output"}
    return {"path": "data/raw/alpaca.csv", "format": "alpaca", "fields": fields}


def hydra_value(value: object) -> str:
    """`value` (a dict of dicts, strings, numbers and None) in Hydra's override syntax."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


@pytest.mark.slow
def test_real_world_shapes_run_end_to_end(project: Path) -> None:
    """Data shapes people bring (chat turns in Parquet, alpaca in CSV), mixed as two sources,
    through every stage (one run for both: each stage's cost is mostly its start)."""
    sources = {"chat": write_chat_parquet(project), "alpaca": write_alpaca_csv(project)}
    every = {"format": "auto", "weight": 1, "rows": None}
    overrides = [
        "data.split_counts=null",  # fractions of the 60 + 120 rows
        "data.path=data/raw",
        "data.sources=" + hydra_value({k: {**every, **v} for k, v in sources.items()}),
        "format.train_on=all_assistant",  # the chat's second turn, with the first as context
        "train.max_steps=2",  # the shape is in the formatted data; more steps show nothing more
    ]
    sh(project, sys.executable, "-m", "lorapipe.params", *overrides)
    out = sh(project, "dvc", "repro")
    assert {"prepare", "format", "train", "evaluate", "merge"} <= ran(out), out
    assert not any(stage.startswith("references") for stage in ran(out))  # once per base
    counts = json.loads((project / "reports" / "data.json").read_text())["sources"]
    assert set(counts) == {"chat", "alpaca"}
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert set(metrics["adapter"]) >= {"exact_match", "rougeL"}
    assert json.loads((project / "reports" / "merge.json").read_text())["passed"]
    prompts = [
        json.loads(line)["prompt"]
        for line in (project / "data" / "formatted" / "train.jsonl").read_text().splitlines()
    ]
    # the chat's second turn is trained with the first as context; alpaca's input is kept
    assert any(p.count("<|assistant|>") == 2 and "<|system|>" in p for p in prompts)
    assert any("Be brief." in p for p in prompts)
