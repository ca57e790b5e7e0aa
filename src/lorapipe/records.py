"""The `prepare` stage's library: read raw instruction/response rows, validate, dedupe, split.

Rows are `{"instruction": str, "response": str}` objects in JSON Lines files. Every problem is
reported as `file:line` plus the field and reason, so a person can find and fix the row. Splits
are chosen from each row's content hash, never from its position or a random draw, so adding
rows never moves an existing row to another split and duplicates can never straddle splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError
from lorapipe.io import atomic_dir, write_jsonl

FIELDS = ("instruction", "response")
SPLITS = ("train", "val", "test")
ON_ERROR = ("fail", "skip")
MAX_LISTED = 20
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(PipelineError, ValueError):
    """The raw data cannot be used as is; the message names file:line and field of each problem."""


@dataclass(frozen=True)
class Record:
    instruction: str
    response: str
    source: str  # "file:line" of the row this record came from

    @property
    def key(self) -> str:
        """The content hash: sha256 hex of normalised `instruction + "\\x00" + response`."""
        content = normalise(self.instruction) + "\x00" + normalise(self.response)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()


@dataclass
class Reject:
    source: str  # "file:line"
    field: str | None  # None when the problem is the whole row
    reason: str  # short and fixed per kind of problem, so rejects can be counted by reason
    detail: str = ""  # row-specific specifics, e.g. the JSON parser's message

    @property
    def message(self) -> str:
        """One line a person can act on, e.g. `data/raw/a.jsonl:17: field 'response' is empty`."""
        what = f"field '{self.field}' is {self.reason}" if self.field else self.reason
        return f"{self.source}: {what}" + (f" ({self.detail})" if self.detail else "")


def normalise(text: str) -> str:
    """`text` in NFC with "\\n" line ends, no trailing whitespace on any line, stripped as a whole.

    Nothing else changes: case and internal spaces (indentation in code answers) are kept.
    Idempotent: normalising twice gives the same string.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _jsonl_files(path: Path) -> list[Path]:
    """`path` itself if it is a .jsonl file, or every .jsonl file below the folder `path`."""
    if path.is_file():
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: not a .jsonl file; raw data must be JSON Lines")
        return [path]
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*.jsonl") if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"{path}: folder has no .jsonl files")
        return files
    raise DataError(f"{path}: no such file or folder")


def _check_row(row: Any, source: str, max_chars: int) -> Record | Reject:
    """The record for one parsed row, or the first problem found with it."""
    if not isinstance(row, dict):
        return Reject(source, None, "not a JSON object", f"got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            return Reject(source, name, "missing")
        value = row[name]
        if not isinstance(value, str):
            return Reject(source, name, "not a string", f"got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A JSON escape such as "\ud800" parses, but is not text and cannot be written out.
            return Reject(source, name, "not valid Unicode", "contains a lone surrogate")
        if not value.strip():
            return Reject(source, name, "empty")
    chars = len(row["instruction"]) + len(row["response"])
    if chars > max_chars:
        return Reject(source, None, "too long", f"{chars} characters, max_chars is {max_chars}")
    return Record(row["instruction"], row["response"], source)


def _read_file(path: Path, max_chars: int) -> tuple[list[Record], list[Reject]]:
    """Records and rejects of one JSON Lines file, in line order."""
    data = path.read_bytes().removeprefix(UTF8_BOM)
    records: list[Record] = []
    rejects: list[Reject] = []
    # Split on LF only: a CRLF line's "\r" is JSON whitespace; a lone CR ends no JSONL line.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rejects.append(
                Reject(
                    source, None, "not valid UTF-8", f"undecodable byte {e.start + 1} of the line"
                )
            )
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            rejects.append(Reject(source, None, "not valid JSON", f"{e.msg} at column {e.colno}"))
            continue
        except RecursionError:
            rejects.append(Reject(source, None, "not valid JSON", "nested too deeply"))
            continue
        result = _check_row(row, source, max_chars)
        if isinstance(result, Record):
            records.append(result)
        else:
            rejects.append(result)
    return records, rejects


def read_records(path: Path, *, max_chars: int = 20000) -> tuple[list[Record], list[Reject]]:
    """All valid records and all rejects of `path`: a .jsonl file, or a folder of them.

    A folder is read recursively, files in order of their relative path. Blank lines are
    skipped; a UTF-8 byte-order mark at the start of a file and CRLF line ends are accepted.
    Each bad row becomes one Reject naming `file:line`, the field (if any) and the reason:
    invalid UTF-8, invalid JSON, not an object, a missing, non-string or blank field, or more
    than `max_chars` characters in instruction plus response. Extra fields are ignored.
    Records keep their text as read (see `dedupe` for normalisation).

    Raises DataError if `path` does not exist, is a file not named .jsonl, or is a folder
    without .jsonl files; ValueError if `max_chars` is not positive.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    records: list[Record] = []
    rejects: list[Reject] = []
    for file in _jsonl_files(path):
        file_records, file_rejects = _read_file(file, max_chars)
        records.extend(file_records)
        rejects.extend(file_rejects)
    return records, rejects


def dedupe(records: Iterable[Record]) -> tuple[list[Record], int]:
    """The first record of each distinct content (`key`) in input order, and the number dropped.

    Returned records carry normalised instruction and response and the first one's source.
    """
    seen: set[str] = set()
    kept: list[Record] = []
    removed = 0
    for record in records:
        key = record.key
        if key in seen:
            removed += 1
            continue
        seen.add(key)
        instruction, response = normalise(record.instruction), normalise(record.response)
        kept.append(replace(record, instruction=instruction, response=response))
    return kept, removed


def _split_order(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    """(split, fraction) in the fixed order train, val, test; a split not given gets 0.

    Raises ValueError naming the values if a split name is unknown, a fraction is negative or
    not finite, or the fractions do not sum to 1 (within 1e-9).
    """
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"unknown split(s) {unknown} in fractions {dict(fractions)}; use {list(SPLITS)}"
        )
    order = [(name, float(fractions.get(name, 0.0))) for name in SPLITS]
    if not all(math.isfinite(f) and f >= 0 for _, f in order):
        raise ValueError(f"split fractions must be finite and >= 0, got {dict(fractions)}")
    total = math.fsum(f for _, f in order)
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)} (sum {total})")
    return order


def _pick(key: str, order: Sequence[tuple[str, float]]) -> str:
    """The split whose cumulative-fraction interval holds the position hashed from `key`."""
    u = int(key[:15], 16) / 16**15
    acc = 0.0
    for name, fraction in order:
        acc += fraction
        if u < acc:
            return name
    # Float rounding can leave the sum a hair under 1; the tail belongs to the last used split.
    return [name for name, fraction in order if fraction > 0][-1]


def assign_split(key: str, fractions: Mapping[str, float]) -> str:
    """The split ("train", "val" or "test") of the record whose content hash is `key`.

    Depends only on `key` and `fractions`: u = int(key[:15], 16) / 16**15 in [0, 1) falls into
    the interval of one split, laid out in the order train, val, test.

    Raises ValueError naming the values if the fractions are not valid (see `_split_order`).
    """
    return _pick(key, _split_order(fractions))


def split_records(
    records: Iterable[Record], fractions: Mapping[str, float]
) -> dict[str, list[Record]]:
    """Records grouped by `assign_split`, every split present, each in input order.

    Raises ValueError naming the values if the fractions are not valid.
    """
    order = _split_order(fractions)
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        splits[_pick(record.key, order)].append(record)
    return splits


def _listing(header: str, rejects: Sequence[Reject]) -> str:
    """`header` followed by the first MAX_LISTED reject messages and a count of the rest."""
    lines = [header] + [f"  {r.message}" for r in rejects[:MAX_LISTED]]
    if len(rejects) > MAX_LISTED:
        lines.append(f"  ... and {len(rejects) - MAX_LISTED} more")
    return "\n".join(lines)


def prepare(
    raw: Path,
    out_dir: Path,
    *,
    fractions: Mapping[str, float],
    on_error: str = "fail",
    max_reject_fraction: float = 0.0,
    max_chars: int = 20000,
) -> dict[str, Any]:
    """Read `raw`, validate, dedupe and split it, and write the splits to `out_dir`.

    `out_dir` receives train.jsonl, val.jsonl and test.jsonl (rows `{"id", "instruction",
    "response"}` in input order, id = first 16 hex digits of the content hash) and rejects.jsonl
    (`{"source", "field", "reason", "detail"}`, empty when nothing was rejected). The folder is
    replaced atomically: on any error an existing `out_dir` is left as it was.

    Returns the report `{"rows_read", "rows_rejected", "rejects_by_reason": {reason: n},
    "duplicates_removed", "splits": {split: n}}`.

    Raises DataError if `raw` cannot be read (see `read_records`), if any row is bad and
    `on_error` is "fail", if the rejected share of rows exceeds `max_reject_fraction` with
    `on_error` "skip", or if no valid row remains; the message lists the bad rows. Raises
    ValueError if an argument is out of range.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction}")
    _split_order(fractions)  # fail on bad fractions before reading any data

    records, rejects = read_records(raw, max_chars=max_chars)
    rows_read = len(records) + len(rejects)
    if rejects and on_error == "fail":
        raise DataError(
            _listing(
                f"{len(rejects)} of {rows_read} rows in {raw} are invalid; fix them, or set "
                "on_error to 'skip' to drop them:",
                rejects,
            )
        )
    if rejects and len(rejects) / rows_read > max_reject_fraction:
        raise DataError(
            _listing(
                f"{len(rejects)} of {rows_read} rows in {raw} are invalid "
                f"({len(rejects) / rows_read:.2%}), more than max_reject_fraction="
                f"{max_reject_fraction}; fix them or raise the limit:",
                rejects,
            )
        )
    if not records:
        raise DataError(f"{raw}: no valid rows (read {rows_read})")

    unique, duplicates = dedupe(records)
    splits = split_records(unique, fractions)
    with atomic_dir(out_dir) as tmp:
        for name, split in splits.items():
            write_jsonl(
                tmp / f"{name}.jsonl",
                (
                    {"id": r.key[:16], "instruction": r.instruction, "response": r.response}
                    for r in split
                ),
            )
        write_jsonl(
            tmp / "rejects.jsonl",
            (
                {"source": r.source, "field": r.field, "reason": r.reason, "detail": r.detail}
                for r in rejects
            ),
        )

    return {
        "rows_read": rows_read,
        "rows_rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "duplicates_removed": duplicates,
        "splits": {name: len(split) for name, split in splits.items()},
    }
