"""`dvc.yaml` lists each stage's params: every key the stage reads is under one it lists, so
`dvc repro` re-runs the stage whenever a value it depends on changes, and no stage re-runs for a
key it never reads. Found by running each stage on a copy of the shrunken pipeline with every
params read recorded (`trace`), not by reading the code.

What a stage only checks, before it starts, is not a read here: the base's pin and the formatted
data's record (lorapipe.provenance) are compared with whole params sections (`model_dump`, which
reads no field one by one), and DVC re-runs the stage through those files, which are its deps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Read by every stage without being a value it computes with: where its files are (each one a
# dep or out in dvc.yaml) and the overrides the params were composed with (a record).
EVERY_STAGE = ("paths", "composed_with")


def places(model: Any, prefix: str = "") -> dict[type, str]:
    """Each params group class -> its dotted place in Params (a mapping's groups: the mapping's)."""
    from pydantic import BaseModel

    found: dict[type, str] = {}
    for name, field in model.model_fields.items():
        for kind in _classes(field.annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found[kind] = f"{prefix}{name}"
                found.update(places(kind, f"{prefix}{name}."))
    return found


def _classes(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    return [annotation] if not args else [c for a in args for c in _classes(a)]


def trace(names: list[str]) -> dict[str, list[str]]:
    """In a project's folder: run each stage (`references@train` style for a part) on its
    params.yaml in this process, and return the params keys each one reads."""
    import importlib

    from lorapipe import config
    from lorapipe.params import load_params

    where = places(config.Params)
    read: set[str] = set()
    plain = object.__getattribute__

    def recording(self: Any, name: str) -> Any:
        value = plain(self, name)
        if name in type(self).model_fields and not isinstance(value, config._Group):
            read.add(f"{where.get(type(self), '')}.{name}".lstrip("."))
        return value

    params = config.validate(load_params(Path.cwd()))
    config._Group.__getattribute__ = recording  # type: ignore[method-assign]
    found = {}
    for name in names:
        module, _, part = name.partition("@")
        run = importlib.import_module(f"stages.{module}").run
        read.clear()
        run(params, (part,)) if part else run(params)
        found[name] = sorted(read)
    return found


def listed(stage: dict[str, Any], part: str) -> list[str]:
    """The params keys dvc.yaml lists for `stage` (a foreach stage's for its `part`)."""
    keys = stage.get("do", stage).get("params", [])
    return [k.replace("${key}", part) for k in keys]


def _under(read: str, key: str) -> bool:
    # A mapping read whole (references reads `retain.sets[its part]`) is under the entries listed
    # beneath it: which entry the stage then takes is not seen here.
    return read == key or read.startswith(key + ".") or key.startswith(read + ".")


def drift(reads: dict[str, list[str]], dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (keys it reads that dvc.yaml does not list, listed keys it never reads)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, keys in reads.items():
        stage, _, part = name.partition("@")
        wanted = [k for k in keys if k.split(".")[0] not in EVERY_STAGE]
        given = listed(stages[stage], part)
        missing = [k for k in wanted if not any(_under(k, g) for g in given)]
        out[name] = (missing, [g for g in given if not any(_under(k, g) for k in wanted)])
    return out


@pytest.fixture(scope="module")
def reads(repro_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every dvc.yaml stage run once on a copy of the shrunken pipeline: the params keys each
    one read."""
    project = tmp_path_factory.mktemp("traced") / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    names = []  # in dvc.yaml's order, each part of a foreach stage apart
    for name, stage in stages.items():
        parts = params["retain"]["sets"] if "foreach" in stage else [""]
        names += [f"{name}@{part}".rstrip("@") for part in parts]
    code = (
        f"import json; from tests.test_dvc_params import trace; print(json.dumps(trace({names!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    assert set(found) == {*names}
    return found


def test_every_stage_lists_exactly_the_params_it_reads(reads: dict[str, list[str]]) -> None:
    assert drift(reads, ROOT / "dvc.yaml") == {name: ([], []) for name in reads}


def test_the_check_fails_when_a_read_key_is_not_listed(
    reads: dict[str, list[str]], tmp_path: Path
) -> None:
    """`format` truncates to train.max_length and `evaluate` bounds the adapter's retain answers
    by retain.max_new_tokens: a dvc.yaml without them is caught, and so is one that lists a key
    its stage never reads."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages["stages"]["format"]["params"].remove("train.max_length")
    stages["stages"]["evaluate"]["params"].remove("retain.max_new_tokens")
    stages["stages"]["prepare"]["params"].append("lora.r")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    found = drift(reads, tmp_path / "dvc.yaml")
    assert found["format"] == (["train.max_length"], [])
    assert found["evaluate"] == (["retain.max_new_tokens"], [])
    assert found["prepare"] == ([], ["lora.r"])
