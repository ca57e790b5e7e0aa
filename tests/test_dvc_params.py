"""`dvc.yaml` lists each stage's params: every key the stage reads is under one it lists, so
`dvc repro` re-runs the stage whenever a value it depends on changes, and no stage re-runs for a
key it never reads. Found by running each stage on a copy of the shrunken pipeline with every
params read recorded (`trace`), not by reading the code.

A section a stage dumps whole (`model_dump`) counts too: it computes with it (a checkpoint's
fingerprint, a lineage) or compares it with the record of an input (the base's pin, the formatted
data's, the adapter's lineage). Those it only compares are not listed: DVC re-runs the stage
through the input, a dep, and `lorapipe.params.CHECKED_THROUGH` names them by that dep; stages
run by hand refuse overrides of keys that are neither listed nor checked (`check_reads`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorapipe.params import stage_reads

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


def trace(names: list[str]) -> dict[str, dict[str, list[str]]]:
    """In a project's folder: run each stage (`references@train` style for a part) on its
    params.yaml in this process; for each, the params fields it read one by one (`reads`) and the
    sections it dumped whole (`dumps`)."""
    import importlib

    from lorapipe import config
    from lorapipe.params import load_params

    where = places(config.Params)
    read: set[str] = set()
    dumped: set[str] = set()
    plain, dump = object.__getattribute__, config._Group.model_dump

    def recording(self: Any, name: str) -> Any:
        value = plain(self, name)
        if name in type(self).model_fields and not isinstance(value, config._Group):
            read.add(f"{where.get(type(self), '')}.{name}".lstrip("."))
        return value

    def recording_dump(self: Any, *args: Any, **kwargs: Any) -> Any:
        if type(self) is config.Params:  # the whole params, less what it excludes
            dumped.update(set(type(self).model_fields) - set(kwargs.get("exclude") or ()))
        else:
            dumped.add(where[type(self)])
        return dump(self, *args, **kwargs)

    params = config.validate(load_params(Path.cwd()))
    config._Group.__getattribute__ = recording  # type: ignore[method-assign]
    config._Group.model_dump = recording_dump  # type: ignore[method-assign]
    found = {}
    for name in names:
        module, _, part = name.partition("@")
        run = importlib.import_module(f"stages.{module}").run
        read.clear()
        dumped.clear()
        run(params, (part,)) if part else run(params)
        found[name] = {"reads": sorted(read), "dumps": sorted(dumped)}
    return found


def _under(read: str, key: str) -> bool:
    # A mapping read whole (references reads `retain.sets[its part]`) is under the entries listed
    # beneath it: which entry the stage then takes is not seen here.
    return read == key or read.startswith(key + ".") or key.startswith(read + ".")


def drift(traced: dict[str, dict[str, list[str]]], root: Path) -> dict[str, list[list[str]]]:
    """stage -> [keys it used that root/dvc.yaml neither lists nor checks through a dep, listed
    keys it never used, sections checked through a dep that it never compared]."""
    out = {}
    for name, seen in traced.items():
        listed, checked = stage_reads(root, name.partition("@")[0]) or ([], [])
        used = [k for k in {*seen["reads"], *seen["dumps"]} if k.split(".")[0] not in EVERY_STAGE]
        out[name] = [
            sorted(k for k in used if not any(_under(k, g) for g in [*listed, *checked])),
            [g for g in listed if not any(_under(k, g) for k in used)],
            [c for c in checked if c not in seen["dumps"]],
        ]
    return out


@pytest.fixture(scope="module")
def traced(
    repro_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, list[str]]]:
    """Every dvc.yaml stage run once on a copy of the shrunken pipeline: what each one used."""
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


def test_every_stage_lists_exactly_the_params_it_reads(
    traced: dict[str, dict[str, list[str]]],
) -> None:
    assert drift(traced, ROOT) == {name: [[], [], []] for name in traced}


def test_the_check_fails_when_a_used_key_is_not_listed(
    traced: dict[str, dict[str, list[str]]], tmp_path: Path
) -> None:
    """`format` truncates to train.max_length and `evaluate` bounds the adapter's retain answers
    by retain.max_new_tokens: a dvc.yaml without them is caught; so is one that lists a key its
    stage never reads, and one whose train stage no longer depends on the formatted data's
    record (it compares data and format with it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages["stages"]["format"]["params"].remove("train.max_length")
    stages["stages"]["evaluate"]["params"].remove("retain.max_new_tokens")
    stages["stages"]["prepare"]["params"].append("lora.r")
    stages["stages"]["train"]["deps"].remove("${paths.formatted}/made_with.json")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    found = drift(traced, tmp_path)
    assert found["format"] == [["train.max_length"], [], []]
    assert found["evaluate"] == [["retain.max_new_tokens"], [], []]
    assert found["prepare"] == [[], ["lora.r"], []]
    assert found["train"] == [["data", "format"], [], []]


def test_a_check_claimed_for_a_dep_the_stage_does_not_make_is_caught(
    traced: dict[str, dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CHECKED_THROUGH says what a stage compares through each input: claiming that `format`
    checks the data params against the prepared data (it carries their record on unchecked) is
    caught, and the claim would have let `python -m stages.format data.replay=0.1` through."""
    from lorapipe import params

    more = {**params.CHECKED_THROUGH, "${paths.prepared}": ("data",)}
    monkeypatch.setattr(params, "CHECKED_THROUGH", more)
    assert drift(traced, ROOT)["format"] == [[], [], ["data"]]
