"""Resumable training: checkpoints reused only for the same params, data, base, code, libraries.

The train stage checkpoints into `paths.checkpoints` (outside DVC's outputs, so an interrupted
run leaves them behind). `checkpoints/train/fingerprint.json` holds a sha256 of everything that
shapes the run: the md5 of the train and val files, the `lora`, `quant` and `train` params, the
resolved precision, the base model's pin, and the train stage's code md5s and library versions
(what the adapter's lineage records: steps trained by other code would be in an adapter whose
lineage names only the new code). A rerun resumes from the latest complete checkpoint
when the fingerprint matches; otherwise the stale checkpoints are deleted, saying which inputs
changed. Once the adapter is written the checkpoints are removed: DVC caches the adapter, and a
checkpoint of a finished run has nothing left to resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from lorapipe.config import Params
from lorapipe.errors import PipelineError
from lorapipe.lineage import code_version, file_md5, library_versions
from lorapipe.models import read_pin

FINGERPRINT_FILE = "fingerprint.json"
# Train keys that change where checkpoints go or how many stay, never the numbers a run produces.
RESUME_NEUTRAL_KEYS = ("resume", "save_total_limit")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(PipelineError, RuntimeError):
    """The checkpoint folder cannot be used safely; the message says what to do."""


def run_inputs(
    params: Params, data_files: dict[str, Path], base_dir: Path, precision: str
) -> dict[str, Any]:
    """Everything that determines a training run's numbers, as plain JSON values."""
    train = params.train.model_dump(mode="json")
    for key in RESUME_NEUTRAL_KEYS:
        train.pop(key)
    return {
        "data": {name: file_md5(path) for name, path in sorted(data_files.items())},
        "lora": params.lora.model_dump(mode="json"),
        "quant": params.quant.model_dump(mode="json"),
        "train": train,
        "precision": precision,
        "base_model": read_pin(base_dir),
        "code": code_version("train"),
        "libraries": library_versions(),
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of `inputs` as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [
            k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step `checkpoint-N` in `folder` that was saved completely, or None.

    The trainer writes `trainer_state.json` last, so a checkpoint without it was cut short.
    """
    complete = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return max(complete)[1] if complete else None


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or cut short: its checkpoints cannot be trusted
    return stored if isinstance(stored, dict) and {"sha256", "inputs"} <= set(stored) else None


def _owned(folder: Path) -> bool:
    """True when `folder` is empty or was made by `prepare_checkpoints` (holds its fingerprint)."""
    return not any(folder.iterdir()) or (folder / FINGERPRINT_FILE).is_file()


def resumable(folder: Path, inputs: dict[str, Any], *, resume: bool) -> Path | None:
    """The checkpoint in `folder` a run with `inputs` resumes from, or None; changes nothing.

    What the other processes of a distributed run use once rank 0 has prepared the folder.
    """
    if not resume or not folder.is_dir():
        return None
    previous = _read_fingerprint(folder / FINGERPRINT_FILE)
    if not previous or previous["sha256"] != fingerprint(inputs):
        return None
    return latest_checkpoint(folder)


def prepare_checkpoints(folder: Path, inputs: dict[str, Any], *, resume: bool) -> Path | None:
    """Make `folder` ready for a run with `inputs`; return the checkpoint to resume from, or None.

    Resumes only from a checkpoint whose fingerprint matches `inputs`; stale or unwanted
    checkpoints are deleted, with the reason printed. Raises CheckpointError when `folder`
    holds files this pipeline did not write (so it never deletes someone else's folder).
    """
    digest = fingerprint(inputs)
    if folder.exists():
        if not folder.is_dir() or not _owned(folder):
            raise CheckpointError(
                f"paths.checkpoints: {folder} holds files that training did not write (no "
                f"{FINGERPRINT_FILE}); empty it or point paths.checkpoints at a new folder"
            )
        found = resumable(folder, inputs, resume=resume)
        if found is not None:
            print(f"train: resuming from {found} (same params, data, base, code and libraries)")
            return found
        previous = _read_fingerprint(folder / FINGERPRINT_FILE)
        latest = latest_checkpoint(folder)
        if latest is not None:
            if not resume:
                why = "train.resume is false"
            elif previous is None:
                why = "no fingerprint"
            else:
                why = "made with different " + ", ".join(_changed_keys(previous["inputs"], inputs))
            print(f"train: discarding checkpoints in {folder}: {why}; starting fresh")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    text = json.dumps({"sha256": digest, "inputs": inputs}, indent=2, sort_keys=True) + "\n"
    (folder / FINGERPRINT_FILE).write_text(text, encoding="utf-8")
    return None


def remove_checkpoints(folder: Path) -> None:
    """Delete `folder` once its run has finished; leaves a folder it does not own untouched."""
    if folder.is_dir() and _owned(folder):
        shutil.rmtree(folder)
