"""Every `python -m stages.*` / `python -m lorapipe.*` command that the README, the stage
docstrings and the conf/ comments print is run here, on a copy of the shrunken pipeline that
`dvc repro` made (tests/conftest.py `repro_project`), and what it wrote is checked: the composed
group choices and values reached the stage. A documented command without a run below fails
`test_every_documented_command_is_run`.

Stage commands run in this process (`runpy`, as `python -m` runs them: same argv, same exit
status) so the heavy imports are paid once; sweeps run as subprocesses (Hydra's multirun and its
launchers own the process).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import sh

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(
    r"python -m (?:stages|lorapipe)\.[\w.]+"
    r"(?:[ \t]+(?!#|\(|or\b)(?:'[^']*'|\"(?:\\.|[^\"\\])*\"|[^\s'\"`])+)*"
)
# Appended to commands that train or generate, unless they set the key themselves: fewer steps
# and examples than the copy's own (12 steps, 12 test examples), each only where the stage reads
# it (evaluate refuses training keys its adapter was not trained with); the command is otherwise
# as printed.
STEPS = {"train.max_steps": "2"}
EXAMPLES = {"eval.max_examples": "4", "eval.val_loss_examples": "4"}
SHRINK = {"stages.train": STEPS, "stages.evaluate": EXAMPLES, "stages.sweep": STEPS | EXAMPLES}
# What a command may change in the project; restored after each run, so runs are independent.
MUTABLE = ("params.yaml", "data/prepared", "data/formatted", "models", "reports", "sweeps")
MUTABLE += ("data/references",)


def documented() -> dict[str, str]:
    """Each documented command -> where it is printed (README code blocks, stage and library
    module docstrings, conf/ comments); a line continued with a backslash is one command."""
    readme = (ROOT / "README.md").read_text()
    texts = [("README.md", "\n".join(re.findall(r"```[a-z]*\n(.*?)```", readme, re.S)))]
    for path in sorted([*(ROOT / "stages").glob("*.py"), *(ROOT / "src/lorapipe").glob("*.py")]):
        texts.append((path.name, ast.get_docstring(ast.parse(path.read_text())) or ""))
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        comments = "\n".join(line.split("#", 1)[1] for line in lines if "#" in line)
        texts.append((str(path.relative_to(ROOT)), comments))
    found: dict[str, str] = {}
    for where, text in texts:
        for match in COMMAND.finditer(text.replace("\\\n", " ")):
            command = re.sub(r"\s+", " ", match.group(0).split(" && ")[0]).strip()
            found.setdefault(command, where)
    return found


def shrunk(command: str) -> list[str]:
    """`command`'s words as the shell gives them (a backslash-escaped backtick too), with SHRINK
    appended where it trains or generates."""
    words = shlex.split(command.replace("\\`", "`"))
    if words[2] in SHRINK and len(words) > 3:  # without overrides a stage reads params.yaml
        words += [f"{k}={v}" for k, v in SHRINK[words[2]].items() if f"{k}=" not in command]
    return words


def run_module(project: Path, command: str, stdin: str = "") -> tuple[int, str]:
    """`command` (python -m MODULE ARGS) run in this process from `project`: exit status and
    output."""
    module, *args = shrunk(command)[2:]
    saved = (sys.argv, sys.stdin, sys.stdout, sys.stderr, signal.getsignal(signal.SIGTERM))
    out = io.StringIO()
    sys.argv, sys.stdin, sys.stdout, sys.stderr = [module, *args], io.StringIO(stdin), out, out
    cwd = Path.cwd()
    try:
        os.chdir(project)
        with warnings.catch_warnings():  # run in a process that imported it: expected here
            warnings.filterwarnings(
                "ignore", ".* found in sys.modules after import", RuntimeWarning
            )
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(cwd)
        sys.argv, sys.stdin, sys.stdout, sys.stderr, handler = saved
        signal.signal(signal.SIGTERM, handler)
    return status, out.getvalue()


def read(project: Path, rel: str) -> dict:
    return json.loads((project / rel).read_text())


def lineage(project: Path) -> dict:
    return read(project, "models/adapter/lineage.json")["params"]


def adapter_config(project: Path) -> dict:
    return read(project, "models/adapter/adapter_config.json")


def prompts(project: Path) -> str:
    return (project / "data/formatted/test.jsonl").read_text()


def predictions(project: Path) -> list[dict]:
    text = (project / "reports/predictions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


Check = Callable[[Path, str], object]
# Each documented command -> what its run must show (it also must exit 0). Shrunken: the copy
# trains the 2-layer tiny model for 12 steps and evaluates 12 test examples.
CHECKS: dict[str, Check] = {
    # lorapipe.params: composes params.yaml from conf/
    "python -m lorapipe.params": lambda p, out: (
        yaml.safe_load((p / "params.yaml").read_text())["composed_with"] == []
    ),
    "python -m lorapipe.params --check": lambda p, out: "conf/" in out,
    "python -m lorapipe.params experiment=qlora": lambda p, out: (
        yaml.safe_load((p / "params.yaml").read_text())["quant"]["mode"] == "nf4"
    ),
    "python -m lorapipe.params 'merge.gguf=[f16,q8_0]'": lambda p, out: (
        yaml.safe_load((p / "params.yaml").read_text())["merge"]["gguf"] == ["f16", "q8_0"]
    ),
    "python -m lorapipe.compare HEAD~1 workspace": lambda p, out: "HEAD~1" in out,
    "python -m lorapipe.compare HEAD~1 workspace --model base --top 3 --json": lambda p, out: (
        json.loads(out[out.index("{") :])["model"] == "base"
    ),
    "python -m lorapipe.params lora.r=4 quant=nf4": lambda p, out: (
        yaml.safe_load((p / "params.yaml").read_text())["lora"]["r"] == 4
    ),
    "python -m lorapipe.sweep sweeps/x --metric adapter.rougeL": lambda p, out: (
        read(p, "sweeps/x/summary.json")["metric"] == "adapter.rougeL"
    ),
    "python -m stages.train": lambda p, out: read(p, "reports/train.json")["steps"] == 12,
    # check: names the sections of params.yaml it validated
    "python -m stages.check": lambda p, out: (
        "lora" in read(p, "reports/params_check.json")["checked"] and "is valid" in out
    ),
    # base
    "python -m stages.base": lambda p, out: read(p, "models/base/pin.json")["kind"] == "tiny",
    "python -m stages.base model=tiny model.seed=1": lambda p, out: (
        read(p, "models/base/pin.json")["seed"] == 1
    ),
    # references: the base's answers to each retain part (the stage's own argument, not Hydra's)
    "python -m stages.references": lambda p, out: (
        [len((p / f"data/references/{part}.jsonl").read_text().splitlines()) for part in PARTS]
        == [len((p / f"data/retain/{part}.jsonl").read_text().splitlines()) for part in PARTS]
    ),
    "python -m stages.references eval": lambda p, out: (
        "references: eval:" in out and "references: train:" not in out
    ),
    # prepare
    "python -m stages.prepare data=seed_qa": lambda p, out: (
        read(p, "reports/data.json")["rows_read"] == 8
    ),
    "python -m stages.prepare data.on_error=skip data.max_reject_fraction=0.01": lambda p, out: (
        read(p, "reports/data.json")["rows_rejected"] == 0
    ),
    "python -m stages.prepare data.path=data/raw/qa.csv 'data.fields={q: instruction, a: "
    "response}' data.split_counts=null": lambda p, out: (
        read(p, "reports/data.json")["rows_read"] == 40
    ),
    # format
    'python -m stages.format format.system_prompt="You answer with a Python value only."': (
        lambda p, out: prompts(p).count("You answer with a Python value only.") > 0
    ),
    "python -m stages.format format.train_on=last_assistant format.truncation=truncate_prompt": (
        lambda p, out: read(p, "reports/format.json")["train"]["examples_out"] > 0
    ),
    "python -m stages.format format=template_system": lambda p, out: (
        "Answer with the value only." not in prompts(p)
    ),
    # train
    "python -m stages.train lora.r=8 lora.alpha=16": lambda p, out: (
        (adapter_config(p)["r"], adapter_config(p)["lora_alpha"]) == (8, 16)
    ),
    "python -m stages.train quant=nf4": lambda p, out: lineage(p)["quant"]["mode"] == "nf4",
    "python -m stages.train quant=nf4 train.max_steps=1": lambda p, out: (
        lineage(p)["quant"]["mode"] == "nf4"
        and lineage(p)["train"]["max_steps"] == 1
        and read(p, "reports/train.json")["steps"] == 1
    ),
    "python -m stages.train lora=llama_all train.gradient_checkpointing=true": lambda p, out: (
        len(adapter_config(p)["target_modules"]) == 7
        and lineage(p)["train"]["gradient_checkpointing"] is True
    ),
    "python -m stages.train lora=llama_attention train.learning_rate=2e-4": lambda p, out: (
        sorted(adapter_config(p)["target_modules"]) == ["q_proj", "v_proj"]
        and lineage(p)["train"]["learning_rate"] == 2e-4
    ),
    "python -m stages.train lora=llama_all": lambda p, out: (
        len(adapter_config(p)["target_modules"]) == 7
    ),
    # evaluate
    "python -m stages.evaluate eval.max_examples=50 eval.batch_size=16": lambda p, out: (
        read(p, "reports/metrics.json")["examples"] == 50
    ),
    "python -m stages.evaluate 'eval.adapters={r4: \"sweeps/x/lora.r=4/adapter\"}'": (
        lambda p, out: "r4" in read(p, "reports/metrics.json")
    ),
    "python -m stages.evaluate eval=sampled": lambda p, out: (
        [r["adapter"] for r in predictions(p)] != [r["adapter"] for r in GREEDY[p][:4]]
    ),
    # merge
    "python -m stages.merge merge.dtype=bfloat16": lambda p, out: (
        read(p, "models/merged/lineage.json")["merge"]["dtype"] == "bfloat16"
    ),
    "python -m stages.merge merge.push_to_hub=true merge.hub_repo_id=me/model "
    "merge.push_dry_run=true": lambda p, out: "me/model" in out,
    # The tiny test model's tokenizer has no BPE merges, which GGUF cannot hold: the stage got
    # merge.gguf and refuses it in one line (the export itself runs on SmolLM2 in
    # tests/test_gguf_export.py).
    "python -m stages.merge 'merge.gguf=[f16,q8_0]'": lambda p, out: GGUF_REFUSED in out,
    "python -m stages.merge merge=gguf": lambda p, out: GGUF_REFUSED in out,
    # generate (argparse, not Hydra: prompts are free text)
    'python -m stages.generate "What does \\`sorted([3, 1, 2])\\` return?"': lambda p, out: (
        "[adapter] " in out
    ),
    "python -m stages.generate -i": lambda p, out: out.count("[adapter]> ") == 2,
    "python -m stages.generate -i --use adapter,base": lambda p, out: (
        "adapters: adapter, base;" in out
        and out.count("[adapter,base]> ") == 2  # both answer the one question
        and out.count("[adapter] ") == out.count("[base] ") == 1
    ),
    "python -m stages.generate --adapter pyqa=models/adapter --adapter r4=sweeps/x/lora.r=4/"
    "adapter --use pyqa,r4,base --prompts questions.txt --out answers.jsonl": lambda p, out: (
        [json.loads(line)["adapter"] for line in (p / "answers.jsonl").read_text().splitlines()]
        == ["pyqa", "r4", "base"] * 2
    ),
}
# Hydra multirun (its own process): the members that must have completed.
SWEEPS = {
    "python -m stages.sweep -m lora.r=4,8 lora.alpha=8,16": 4,
    "python -m stages.sweep -m lora.r=4,8 hydra/launcher=local_parallel": 2,
}
GGUF_REFUSED = "merge: error: merge.gguf: models/base cannot be exported to GGUF: a BPE tokenizer"
EXIT = {"python -m stages.merge 'merge.gguf=[f16,q8_0]'": 2, "python -m stages.merge merge=gguf": 2}
STDIN = "What does `len('ab')` return?\n/quit\n"
GREEDY: dict[Path, list[dict]] = {}
PARTS = ("train", "eval")


def test_every_documented_command_is_run() -> None:
    docs = documented()
    assert len(docs) > 20  # the extraction still finds the commands
    unrun = {c: where for c, where in docs.items() if c not in CHECKS and c not in SWEEPS}
    assert not unrun, f"documented but run by no test: {unrun}"
    stale = sorted((set(CHECKS) | set(SWEEPS)) - set(docs))
    assert not stale, f"run here but no longer documented: {stale}"


@pytest.fixture(scope="module")
def docs_project(repro_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repro'd project with what the documented commands name: a second adapter
    at sweeps/x/lora.r=4/adapter, data/raw/qa.csv, questions.txt, and two commits of results
    (for `compare HEAD~1 workspace`)."""
    dest = tmp_path_factory.mktemp("docs") / "project"
    shutil.copytree(repro_project, dest, symlinks=True)
    shutil.copytree(dest / "models/adapter", dest / "sweeps/x/lora.r=4/adapter")
    member = {"member": "lora.r=4", "overrides": ["lora.r=4"], "status": "completed"}
    member["metrics"] = read(dest, "reports/metrics.json")
    member["train"] = {
        **read(dest, "reports/train.json"),
        **read(dest, "reports/runtime/train.json"),
    }
    (dest / "sweeps/x/lora.r=4/member.json").write_text(json.dumps(member))
    rows = "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(40))
    (dest / "data/raw/qa.csv").write_text("q,a\n" + rows)
    (dest / "questions.txt").write_text("What does `len('ab')` return?\nWhat is 2 + 2?\n")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    sh(dest, *git, "add", "-A")
    sh(dest, *git, "commit", "-qm", "results")
    sh(dest, *git, "commit", "-q", "--allow-empty", "-m", "again")
    GREEDY[dest] = predictions(dest)
    return dest


@pytest.fixture()
def project(docs_project: Path, tmp_path: Path) -> Iterator[Path]:
    """docs_project, put back as it was after the test."""
    saved = tmp_path / "saved"
    for rel in MUTABLE:
        src = docs_project / rel
        if src.is_dir():
            shutil.copytree(src, saved / rel, symlinks=True)
        elif src.exists():
            (saved / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, saved / rel)
    yield docs_project
    for rel in MUTABLE:
        target = docs_project / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        if (saved / rel).is_dir():
            shutil.copytree(saved / rel, target, symlinks=True)
        elif (saved / rel).exists():
            shutil.copy2(saved / rel, target)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(CHECKS))
def test_documented_command_runs(project: Path, command: str) -> None:
    status, out = run_module(project, command, stdin=STDIN if " -i" in command else "")
    assert status == EXIT.get(command, 0), f"{command}: exit {status}\n{out[-3000:]}"
    assert CHECKS[command](project, out), f"{command}: its result is not what it asked for\n{out}"
    assert "Traceback" not in out


@pytest.mark.slow
@pytest.mark.parametrize("command", list(SWEEPS))
def test_documented_sweep_runs(project: Path, command: str) -> None:
    sh(project, sys.executable, *shrunk(command)[1:], "hydra.sweep.dir=sweeps/doc")
    rows = read(project, "sweeps/doc/summary.json")["members"]
    assert [r["status"] for r in rows] == ["completed"] * SWEEPS[command]
