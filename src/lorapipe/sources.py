"""Raw data files in, parsed rows out, each row tagged with where it came from.

Supported: JSON Lines (`.jsonl`), a JSON array (`.json`), CSV (`.csv`, header row, every cell
read as text) and Parquet (`.parquet`); the text formats also gzipped (`.jsonl.gz`, ...).
JSON Lines and JSON are parsed here, byte by byte, so a problem is named `file:line`; CSV and
Parquet are read through `datasets` (pandas / pyarrow underneath), and rows are named
`file row N`, counting from 1 after the header. A CSV row with more fields than the header
makes the file unreadable, named by its line (pandas' message), the first row's too. A file
of no rows (an empty Parquet file, a CSV of its header alone) gives none, as an empty `.jsonl`.

A problem with one row becomes a Reject (the caller decides whether to skip or fail); a problem
that makes a whole file unreadable (a broken CSV, a JSON array with a syntax error, a CSV that
is not UTF-8) raises DataError naming the file and, where known, the line.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.errors import PipelineError

KINDS = ("jsonl", "json", "csv", "parquet")
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(PipelineError, ValueError):
    """The raw data cannot be used as is; the message names file:line and field of each problem."""


@dataclass
class Reject:
    source: str  # "file:line", or "file row N" for CSV and Parquet
    field: str | None  # None when the problem is the whole row
    reason: str  # short and fixed per kind of problem, so rejects can be counted by reason
    detail: str = ""  # row-specific specifics, e.g. the JSON parser's message

    @property
    def message(self) -> str:
        """One line a person can act on, e.g. `data/raw/a.jsonl:17: field 'response' is empty`."""
        what = f"field '{self.field}' is {self.reason}" if self.field else self.reason
        return f"{self.source}: {what}" + (f" ({self.detail})" if self.detail else "")


def kind_of(path: Path) -> str | None:
    """ "jsonl", "json", "csv" or "parquet" for a supported file name, else None."""
    name = path.name.lower()
    for kind in KINDS:
        if name.endswith(f".{kind}") or (kind != "parquet" and name.endswith(f".{kind}.gz")):
            return kind
    return None


def data_files(path: Path) -> list[Path]:
    """`path` itself if it is a supported file, or every supported file below the folder `path`.

    A folder is read recursively, files in order of their relative path; other files in it are
    ignored, and so are hidden ones: a name starting with '.' (`.ipynb_checkpoints/`, macOS's
    `._x.jsonl`), of the file or of a folder below `path`. Raises DataError if `path` does not
    exist, is an unsupported file, or is a folder without data files.
    """
    supported = ".jsonl, .json, .csv, .parquet (the first three also .gz)"
    if path.is_file():
        if kind_of(path) is None:
            raise DataError(f"{path}: not a supported data file; use {supported}")
        return [path]
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and kind_of(p) is not None
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"{path}: folder has no data files ({supported})")
        return files
    raise DataError(f"{path}: no such file or folder")


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped for `.gz`, without a leading UTF-8 byte-order mark."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    return data.removeprefix(UTF8_BOM)


def _decode_whole(path: Path, data: bytes) -> str:
    """`data` as UTF-8 text; raises DataError naming the first undecodable line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {e.start + 1} of the file); "
            "save the file as UTF-8"
        ) from None


def _too_many_digits() -> str:
    """Why `json` refused a number: Python's limit on the digits of an int (a ValueError)."""
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any] | Reject]:
    data = _file_bytes(path)
    # Split on LF only: a CRLF line's "\r" is JSON whitespace; a lone CR ends no JSONL line.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        source = f"{path}:{lineno}"
        if raw.startswith(UTF8_BOM):
            yield Reject(
                source,
                None,
                "starts with a byte-order mark",
                "a BOM inside a file usually means files were concatenated; remove it",
            )
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Reject(
                source, None, "not valid UTF-8", f"undecodable byte {e.start + 1} of the line"
            )
            continue
        try:
            yield source, json.loads(text)
        except json.JSONDecodeError as e:
            yield Reject(source, None, "not valid JSON", f"{e.msg} at column {e.colno}")
        except RecursionError:
            yield Reject(source, None, "not valid JSON", "nested too deeply")
        except ValueError:  # Python's limit on the digits of an integer
            yield Reject(source, None, "not valid JSON", _too_many_digits())


def _json_rows(path: Path) -> Iterator[tuple[str, Any] | Reject]:
    """Items of a top-level JSON array, each named by the line it starts on."""
    text = _decode_whole(path, _file_bytes(path))
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        column = pos - text.rfind("\n", 0, pos)
        return DataError(f"{path}:{line}: not valid JSON ({what} at column {column})")

    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(
            f"{path}: expected a JSON array of objects; for one object a line use .jsonl"
        )
    pos += 1
    expect_item, items = True, 0
    line, counted = 1, 0  # the line of text[counted], advanced as items are read
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise fail(pos, "unterminated array")
        if text[pos] == "]" and (not expect_item or items == 0):
            break
        if not expect_item:
            if text[pos] != ",":
                raise fail(pos, "expected ',' or ']'")
            pos += 1
            expect_item = True
            continue
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        except RecursionError:
            raise fail(pos, "nested too deeply") from None
        except ValueError:  # Python's limit on the digits of an integer
            raise fail(pos, _too_many_digits()) from None
        line, counted = line + text.count("\n", counted, pos), pos
        yield f"{path}:{line}", item
        pos, expect_item, items = end, False, items + 1
    if text[pos + 1 :].strip():
        raise fail(pos + 1, "extra data after the array")


def _innermost(exc: BaseException) -> str:
    """The message of the exception at the bottom of `exc`'s chain, on one line."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return " ".join(str(exc).split()) or type(exc).__name__


def _table_rows(path: Path, kind: str) -> Iterator[tuple[str, Any] | Reject]:
    """Rows of a CSV or Parquet file as dicts, read through `datasets`, kept in memory."""
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Value

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become ours, below
    try:
        with tempfile.TemporaryDirectory(prefix="lorapipe-") as cache:
            table: Dataset | None = None  # None: no rows, which `datasets` cannot read
            if kind == "parquet":
                if pq.read_metadata(path).num_rows > 0:
                    table = Dataset.from_parquet(str(path), keep_in_memory=True, cache_dir=cache)
            else:
                # Arrow cannot hold undecodable bytes, so check here and name the line.
                data = _file_bytes(path)
                if not _decode_whole(path, data).split("\n", 1)[0].strip():
                    raise DataError(
                        f"{path}:1: the first line must be the header naming the columns"
                    )
                csv_path = path
                if path.name.lower().endswith(".gz"):
                    csv_path = Path(cache) / path.name.removesuffix(".gz")
                    csv_path.write_bytes(data)
                columns = list(pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig").columns)
                # A first row with more fields than the header would become pandas' implicit
                # index, shifting every column: read header and first row as plain rows, so
                # pandas names the line ("Expected 2 fields in line 2, saw 3") as it does for a
                # later row, and never infer an index below (index_col=False).
                head = pd.read_csv(csv_path, header=None, nrows=2, dtype=str, encoding="utf-8-sig")
                # Every cell as text: "3" stays "3", an empty cell stays "" (not NaN).
                table = (
                    None
                    if len(head) < 2
                    else Dataset.from_csv(
                        str(csv_path),
                        features=Features({c: Value("string") for c in columns}),
                        keep_in_memory=True,
                        cache_dir=cache,
                        encoding="utf-8-sig",
                        index_col=False,
                        keep_default_na=False,
                        na_filter=False,
                    )
                )
    except DataError:
        raise
    except Exception as e:  # any reader failure means the file cannot be used
        raise DataError(f"{path}: cannot read as {kind.upper()} ({_innermost(e)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    for index, row in enumerate(table.to_list() if table is not None else [], start=1):
        yield f"{path} row {index}", row


def read_rows(path: Path) -> Iterator[tuple[str, Any] | Reject]:
    """For one data file, in file order: (source, parsed row) or a Reject for an unparsable row.

    Raises DataError when the whole file cannot be read (see the module docstring).
    """
    kind = kind_of(path)
    if kind == "jsonl":
        return _jsonl_rows(path)
    if kind == "json":
        return _json_rows(path)
    if kind in ("csv", "parquet"):
        return _table_rows(path, kind)
    raise DataError(f"{path}: not a supported data file")
