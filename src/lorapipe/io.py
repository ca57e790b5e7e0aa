"""Small file helpers shared by the stages: JSON/JSONL reading and writing, atomic output folders.

Every text file is UTF-8 with "\\n" line ends, so outputs hash the same on every platform and DVC
sees a change only when the content changes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target`; on a clean exit it replaces `target`.

    The temporary folder is `target.parent / ".tmp-<name>-<random>"`. Only when the `with` body
    finishes without an exception is the old `target` (if any) swapped out and removed, so a
    reader sees either the complete old folder or the complete new one. On any exception the
    temporary folder is removed, `target` is left untouched and the exception propagates.

    A process killed (SIGKILL, power loss) inside the block leaves its temporary folder behind,
    never a partial `target`; the next `atomic_dir` on the same target removes such leftovers.
    The new folder and everything in it get a plain folder's or file's mode under the umask
    (the temporary folder and files some writers make are owner-only).

    Raises NotADirectoryError if `target` exists and is not a folder.
    """
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a folder; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in (
        *target.parent.glob(f".tmp-{target.name}-*"),
        *target.parent.glob(f".old-{target.name}-*"),
    ):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; never read
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    # mkdtemp makes it private (0700); the output gets a plain folder's mode, as mkdir gives it.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        _plain_modes(tmp, umask)
        # Move the old folder aside rather than deleting it first: if the swap fails, it comes back.
        old = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        had_old = target.exists()
        if had_old:
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if had_old:
                old.rename(target)
            raise
        if had_old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_modes(folder: Path, umask: int) -> None:
    """Give everything in `folder` the mode a plain file or folder gets under `umask`, as
    `open` and `mkdir` give it: writers that go through a private temporary file (safetensors,
    `tempfile`) leave theirs owner-only (0600). An executable keeps its x bits; links are
    left alone. Modes only: no content changes."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(0o777 & ~umask)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                executable = path.stat().st_mode & 0o100
                path.chmod((0o777 if executable else 0o666) & ~umask)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` as UTF-8 with "\\n" line ends, atomically.

    The text goes to a hidden sibling first and is renamed over `path`, so a reader (or DVC,
    after a crash) sees the old file or the new one, never half of one. Parent folders are
    created.
    """
    write_texts({path: text})


def write_texts(files: Mapping[Path, str]) -> None:
    """Write several files as one set: each text as `write_text` writes it, but every text goes
    to its hidden sibling before any is renamed over its path.

    A failure while writing (a full disk, a folder in the way) replaces none of them, and a
    process killed before the renames leaves every old file as it was: the window in which old
    and new files can stand side by side is the renames', not the writing's.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            staged.append((tmp, path))
            tmp.write_text(text, encoding="utf-8", newline="\n")
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)  # no stray half-written sibling
        raise


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """`rows` as JSON Lines: non-ASCII kept as is, one object per line (TypeError if a row is
    not JSON-serialisable)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def json_text(obj: Any) -> str:
    """`obj` as indented JSON with sorted keys and a trailing newline (TypeError if it is not
    JSON-serialisable)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write `rows` to `path` (atomically) as JSON Lines (`jsonl_text`). Parent folders are
    created."""
    write_text(path, jsonl_text(rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects in the JSON Lines file `path`, in file order; blank lines are skipped.

    Raises ValueError naming `path:line` if a line is not valid JSON or not a JSON object, and
    UnicodeDecodeError if the file is not UTF-8.
    """
    return parse_jsonl(path.read_text(encoding="utf-8"), str(path))


def parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    """The objects in JSON Lines `text`; errors name `source:line` as ValueError."""
    return [row for _, row in numbered_jsonl(text, source)]


def numbered_jsonl(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of JSON Lines `text` that is not blank; errors name
    `source:line` as ValueError."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` to `path` (atomically) as `json_text` renders it. Parent folders are
    created."""
    write_text(path, json_text(obj))
