"""What params an output was made from, recorded beside it and checked by the stages that read it.

Under `dvc repro` every output is made from the params it is used with: DVC re-runs whatever
they changed. A stage run by hand (with an override of an earlier stage's key such as
`data.replay`, or after editing params.yaml without `dvc repro`) reads the outputs on disk as
they are, so its lineage could name params that did not make its inputs. So `prepare` records
its `data` params in `data/prepared/made_with.json`, `format` carries them into
`data/formatted/made_with.json` with its own `format` params and `train.max_length`, and `base`
records its `model` params in `pin.json`; `train` and every stage that reads the base stop,
naming each key that differs, before they read or write anything. The adapter's `lineage.json`
is checked the same way (`lineage.require_trained_with`), and so are the retain references'
records (`retain.require_references`), with the comparison and message here.
A record that lacks a section (an output made before records were kept) is not checked for it.

Written here: DVC keeps this record in `dvc.lock` for its own runs only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorapipe.errors import PipelineError
from lorapipe.io import write_json

MADE_WITH_FILE = "made_with.json"


class ProvenanceError(PipelineError, ValueError):
    """An output on disk was made from other params than the ones a stage runs with."""


def sections(**groups: BaseModel) -> dict[str, Any]:
    """Params groups as a record: {name: the group's values}."""
    return {name: group.model_dump(mode="json") for name, group in groups.items()}


def format_record(params: Any) -> dict[str, Any]:
    """What `format` adds to the prepared data's record in the formatted data's made_with.json:
    its `format` params and `train.max_length` (by which it drops or truncates examples)."""
    return {**sections(format=params.format), "train": {"max_length": params.train.max_length}}


def formatted_record(params: Any) -> dict[str, Any]:
    """What the formatted data must have been made from for `params` (train and evaluate check
    it): the `data` params, then format's record."""
    return {**sections(data=params.data), **format_record(params)}


def _flat(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(asked: Mapping[str, Any], made: Mapping[str, Any]) -> list[str]:
    """One line per key whose value differs, for every section of `asked` that `made` records."""
    lines = []
    for name in sorted(set(asked) & set(made)):
        here, there = _flat(asked[name], f"{name}."), _flat(made[name], f"{name}.")
        lines += [
            f"{key} is {here.get(key)!r} here, {there.get(key)!r} there"
            for key in sorted(set(here) | set(there))
            if here.get(key) != there.get(key)
        ]
    return lines


def mismatch(what: Path, record: Path, differ: list[str], remake: str) -> str:
    return (
        f"{what} was made from other params ({record}): " + "; ".join(differ) + f". Make it from "
        f"these first (`dvc repro`, or {remake}), or give this stage the "
        "params it was made from"
    )


def read_made_with(folder: Path) -> dict[str, Any]:
    """The record in `folder` ({} when there is none)."""
    path = folder / MADE_WITH_FILE
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def write_made_with(folder: Path, record: Mapping[str, Any]) -> None:
    write_json(folder / MADE_WITH_FILE, dict(record))


def require_made_with(folder: Path, asked: Mapping[str, Any], remake: str) -> None:
    """Raise ProvenanceError when `folder`'s record names other values than `asked` (`remake`:
    the commands that make it again and with which overrides, for the message)."""
    differ = differences(asked, read_made_with(folder))
    if differ:
        raise ProvenanceError(mismatch(folder, folder / MADE_WITH_FILE, differ, remake))
