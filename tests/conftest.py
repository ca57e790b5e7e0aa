"""Shared fixtures: a tiny Llama base built the way the base stage builds the default, formatted
pyqa splits for it, and params shrunk for training tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # One share of the cores per pytest worker, for torch here and in every process a test
    # starts (read when torch is first imported, after this). Two workers of two threads each
    # on two cores made a test 10x slower (5.8 -> 56 s), torch's threads spinning on each other.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 2,
    "max_position_embeddings": 256,
}


# The slowest files first. `make test` runs three workers that each take whole files in this
# order (`--no-loadscope-reorder`; xdist's own order is by test count), so the long files start
# at once and the short ones fill in at the end instead of one long file running alone. A
# stable sort: each file's tests keep their order.
SLOWEST_FIRST = (
    "test_reliability.py",
    "test_real_model.py",
    "test_pipeline.py",
    "test_documented_commands.py",
    "test_readme_dvc.py",
    "test_docs_dvc.py",
    "test_gguf_export.py",
    "test_bench_real_model.py",
    "test_distributed.py",
    "test_benchmarks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def conf_group(group: str, option: str | None = None, **over: object) -> dict[str, object]:
    """conf/<group> as composed (its default option, or `option`) with `over` on top: the
    values a test builds one config group from (the schema states no defaults of its own)."""
    from lorapipe.params import compose

    raw = compose(ROOT / "conf", [f"{group}={option}"] if option else [])[group]
    return {**raw, **over}


def run_prepare(raw: Path, out: Path, fractions: dict[str, float], **over: object) -> dict:
    """records.prepare of `raw` into `out` with conf/data's values, split by `fractions` (no
    split_counts), and `over` (data.* keys) on top."""
    from lorapipe.config import DataCfg
    from lorapipe.records import prepare

    over = {"split_counts": None, **over}
    return prepare(DataCfg(**conf_group("data", path=str(raw), splits=fractions, **over)), out)


def tiny_model_cfg(**over: object) -> object:
    """model=tiny with the small test architecture (initializer_range 0.02)."""
    from lorapipe.config import ModelCfg

    arch = {**SMALL_ARCH, "initializer_range": 0.02}
    return ModelCfg(**conf_group("model", "tiny", name="tiny-test", architecture=arch, **over))


def tiny_model_overrides() -> list[str]:
    """The overrides that make composed params name the model `tiny_base` is made from
    (`tiny_model_cfg()`): stages check their `model` params against the base's pin."""
    made = tiny_model_cfg()
    arch = made.architecture.model_dump().items()
    return ["model=tiny", f"model.name={made.name}", f"model.seed={made.seed}"] + [
        f"model.architecture.{key}={value}" for key, value in arch
    ]


def local_model_cfg(folder: Path, **over: object) -> object:
    """model kind local: the model folder at `folder`."""
    from lorapipe.config import ModelCfg

    return ModelCfg(
        **conf_group("model", "tiny", kind="local", name=str(folder), architecture=None, **over)
    )


def transformers_nf4(folder: Path) -> Any:
    """The model in `folder` loaded by transformers alone in NF4 with double quantisation and
    float32 compute, on the CPU: what `quant=nf4` asks bitsandbytes for."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )


def run_stage(module: str, *args: str) -> tuple[int, list[str]]:
    """`python -m module args` run in this process from the checkout, as its stage shell runs
    it (`lorapipe.cli.stage`: argv, exit status, errors on stderr): the exit status and the
    lines written to stderr. The shell's signal handlers and unraisable hook are undone
    afterwards."""
    import importlib
    import io
    import signal
    import sys
    from contextlib import redirect_stderr

    saved = (sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM))
    saved_int, saved_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    err = io.StringIO()
    sys.argv = [module, *args]
    try:
        os.chdir(ROOT)
        with redirect_stderr(err):
            importlib.import_module(module).main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGTERM, saved[2])
        signal.signal(signal.SIGINT, saved_int)
        sys.unraisablehook = saved_hook
    return status, err.getvalue().strip().splitlines()


def broken_adapter(good: Path, out: Path, how: str) -> Path:
    """A copy of the adapter folder `good` at `out`, spoilt: `json`, its adapter_config.json
    cut to `{`; `truncated`, its weights cut to their first 1000 bytes (`head -c 1000`);
    `missing`, no folder at all."""
    if how != "missing":
        shutil.copytree(good, out)
    if how == "json":
        (out / "adapter_config.json").write_text("{")
    elif how == "truncated":
        os.truncate(out / "adapter_model.safetensors", 1000)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/base-like folder: the small tiny Llama, its tokenizer and pin.json."""
    from lorapipe.base_model import build_base

    out = tmp_path_factory.mktemp("base")
    build_base(tiny_model_cfg(), out)
    return out


@pytest.fixture(scope="session")
def formatted(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data/formatted-like folder: 32 train and 8 val pyqa examples in the tiny chat format."""
    from lorapipe.formatting import format_rows
    from lorapipe.io import write_jsonl
    from lorapipe.models import load_tokenizer
    from lorapipe.pyqa import generate

    out = tmp_path_factory.mktemp("formatted")
    tok = load_tokenizer(tiny_base)
    rows = [{"id": str(i), **r} for i, r in enumerate(generate(40, seed=1))]
    write_jsonl(out / "train.jsonl", format_rows(rows[:32], tok, None))
    write_jsonl(out / "val.jsonl", format_rows(rows[32:], tok, None))
    return out


@pytest.fixture()
def train_params(tmp_path: Path) -> Callable[..., object]:
    """Params from conf/ for the tiny model `tiny_base` is made from (`tiny_model_cfg`), a few
    steps of batch 4, checkpoints under tmp_path, plus overrides."""
    from lorapipe.config import validate
    from lorapipe.params import compose

    def make(*overrides: str) -> object:
        base = [
            *tiny_model_overrides(),
            "train.max_steps=4",
            "train.batch_size=4",
            "train.logging_steps=1",
            f"paths.checkpoints={tmp_path / 'ckpt'}",
        ]
        return validate(compose(ROOT / "conf", [*base, *overrides]))

    return make


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/base as the base stage writes it for the real default, SmolLM2-135M-Instruct from
    its GGUF file (10-20 s on 2 cores), built once for all workers. Read only."""
    import yaml
    from filelock import FileLock

    from lorapipe.base_model import build_base
    from lorapipe.config import ModelCfg

    shared = across_workers(tmp_path_factory)
    out = shared / "smol-base"
    with FileLock(shared / "smol-base.lock"):
        if not out.is_dir():
            cfg = ModelCfg(**yaml.safe_load((ROOT / "conf/model/smollm2.yaml").read_text()))
            build_base(cfg, shared / "smol-base.tmp")
            (shared / "smol-base.tmp").rename(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_base: Path) -> object:
    from lorapipe.models import load_tokenizer

    return load_tokenizer(smol_base)


# A hub token planted in the environment of the pipeline runs that test_reliability searches
# afterwards (it must reach no file they wrote). Unique, token-shaped, and never a real token.
FAKE_TOKEN = "hf_" + "PlantedByLorapipeTests" + "x9Q2r7Lk4mZt8"


@contextmanager
def planted(caches: Path) -> Iterator[None]:
    """FAKE_TOKEN in HF_TOKEN (and the legacy name), the hub's and DVC's machine-wide caches
    moved under `caches` (so they get searched too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        mp.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
        mp.setenv("HF_HOME", str(caches / "hf"))
        mp.setenv("DVC_SITE_CACHE_DIR", str(caches / "dvc-site"))
        yield


def across_workers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest-xdist worker of this run sees (`make test` runs two): the run's
    base temporary folder, which each worker's own is inside."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def planted_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the planted runs use as HF_HOME and DVC's site cache (one for all workers:
    `first_run` ran with it, whichever worker ran it)."""
    caches = across_workers(tmp_path_factory) / "caches"
    caches.mkdir(exist_ok=True)
    return caches


@dataclass
class Run:
    project: Path
    output: str


@pytest.fixture(scope="session")
def first_run(tmp_path_factory: pytest.TempPathFactory, planted_caches: Path) -> Run:
    """A git + DVC copy of the tracked tree, composed with the shrunken config (test_pipeline's
    SMALL), with an untracked file (a dirty tree, as a working copy usually is), run once from
    scratch by `dvc repro` with the hub token planted. Never changed afterwards: tests that
    change a project copy it (`repro_project`); test_reliability compares a second clean run
    with it and searches it for the token."""
    from filelock import FileLock

    from tests.test_pipeline import STAGES, copy_project, ran, sh, shrink

    # Run once for all workers: the first to ask runs it, the others wait and read where it is.
    shared = across_workers(tmp_path_factory)
    record = shared / "run-a.json"
    with FileLock(shared / "run-a.lock"):
        if record.is_file():
            done = json.loads(record.read_text())
            return Run(Path(done["project"]), done["output"])
        project = shrink(copy_project(tmp_path_factory.mktemp("run-a")))
        (project / "scratch.txt").write_text("notes of run-a\n")
        with planted(planted_caches):
            output = sh(project, "dvc", "repro")
        assert ran(output) == STAGES, output
        record.write_text(json.dumps({"project": str(project), "output": output}))
    return Run(project, output)


@pytest.fixture(scope="session")
def repro_project(first_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `first_run`'s project, as `dvc repro` left it. Never changed: tests that change
    a project copy this one first."""
    dest = tmp_path_factory.mktemp("project") / "project"
    shutil.copytree(first_run.project, dest, symlinks=True)
    return dest
