"""Lineage: what an adapter or merged model was made from, written beside it.

Data files are identified by md5 of their bytes, the same hash DVC 3 records in `dvc.lock`
for a file dependency, so `lineage.json` and `dvc.lock` can be checked against each other.
Nothing time-dependent goes here: two identical runs write identical lineage files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from lorapipe.config import Params
from lorapipe.models import read_pin

LINEAGE_FILE = "lineage.json"
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "evaluate",
    "rouge-score",
    "dvc",
    "hydra-core",
)


def file_md5(path: Path) -> str:
    """md5 hex digest of the file's bytes, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_state(root: Path) -> dict[str, Any]:
    """The commit checked out at `root` and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def build_lineage(params: Params, data_files: dict[str, Path], base_dir: Path) -> dict[str, Any]:
    """The lineage record: data md5s, composed params, base pin, git state, library versions."""
    return {
        "data": {name: {"path": str(p), "md5": file_md5(p)} for name, p in data_files.items()},
        "params": params.model_dump(mode="json"),
        "base_model": read_pin(base_dir),
        "git": git_state(Path.cwd()),
        "libraries": library_versions(),
        "python": platform.python_version(),
    }
