"""The `prepare` stage's library: read raw conversations, validate, dedupe, split.

Rows come in one of four shapes (`FORMATS`), detected per file from its keys or set by
`data.format`, after renaming keys with `data.fields`:

- instruction: `{"instruction", "response"}`
- alpaca: `{"instruction", "input", "output"}`; a non-empty input follows the instruction
  after a blank line
- messages: `{"messages": [{"role", "content"}, ...]}`, roles system (first only), then user
  and assistant alternating, ending with an assistant turn
- prompt_completion: `{"prompt", "completion"}`, the prompt as the user turn

Every row becomes a Record: a conversation (a tuple of Turns). Every problem is reported as
`file:line` (or `file row N`) plus the field and reason, so a person can find and fix the row.
Splits are chosen from each row's content hash, never from its position or a random draw, so
adding rows never moves an existing row to another split and duplicates can never straddle
splits; `split_counts` and `split_column` are the two documented alternatives.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, get_args

from lorapipe.config import DataCfg, DataFormat, OnError, RowFormat
from lorapipe.io import atomic_dir, write_jsonl
from lorapipe.sources import DataError, Reject, data_files, kind_of, read_rows

FORMATS: tuple[RowFormat, ...] = get_args(RowFormat)
ROLES = ("system", "user", "assistant")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "dev": "val"}  # common names in a user's split column
MAX_LISTED = 20
NEAR_DUPLICATE_EXAMPLES = 5
# The fields each format needs (after `data.fields` renaming), in the order they are checked.
REQUIRED = {
    "instruction": ("instruction", "response"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}


class Turn(NamedTuple):
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Record:
    turns: tuple[Turn, ...]  # an optional system turn, then user/assistant alternating
    source: str  # "file:line" (or "file row N") of the row this record came from
    split: str | None = None  # the split named by the row's split column, if one is used

    @classmethod
    def single(cls, instruction: str, response: str, source: str) -> Record:
        """The one-turn conversation: `instruction` from the user, `response` from the assistant."""
        return cls((Turn("user", instruction), Turn("assistant", response)), source)

    @property
    def is_single_turn(self) -> bool:
        return [t.role for t in self.turns] == ["user", "assistant"]

    @property
    def key(self) -> str:
        """The content hash: sha256 hex of the normalised conversation.

        A one-turn conversation hashes `instruction + "\\x00" + response`, the form the
        prepared files have always used, so ids and splits of such rows never change.
        """
        if self.is_single_turn:
            content = normalise(self.turns[0].content) + "\x00" + normalise(self.turns[1].content)
        else:
            content = json.dumps([[t.role, normalise(t.content)] for t in self.turns])
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    @property
    def near_key(self) -> str:
        """The text with case folded and whitespace collapsed: equal for near-duplicates."""
        return json.dumps([[t.role, " ".join(t.content.casefold().split())] for t in self.turns])

    def to_row(self) -> dict[str, Any]:
        """The prepared row: `{id, instruction, response}` for one turn, else `{id, messages}`."""
        if self.is_single_turn:
            return {
                "id": self.key[:16],
                "instruction": self.turns[0].content,
                "response": self.turns[1].content,
            }
        return {
            "id": self.key[:16],
            "messages": [{"role": t.role, "content": t.content} for t in self.turns],
        }


def normalise(text: str) -> str:
    """`text` in NFC with "\\n" line ends, no trailing whitespace on any line, and no blank
    lines before the first line with text or after the last.

    Nothing else changes: case and every line's indentation (the first line's too, as in a
    completion that continues a code block) are kept. Idempotent: normalising twice gives the
    same string.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def detect_format(row: Mapping[str, Any]) -> RowFormat | None:
    """The format whose distinctive keys `row` has, or None: messages, then prompt/completion,
    then alpaca (input/output), then instruction/response."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "output" in row or "input" in row:
        return "alpaca"
    if "instruction" in row or "response" in row:
        return "instruction"
    return None


def _text(row: Mapping[str, Any], name: str, source: str, field: str = "") -> str | Reject:
    """The non-blank string `row[name]`, or the Reject saying why it is not one."""
    field = field or name
    if name not in row:
        return Reject(source, field, "missing")
    value = row[name]
    if value is None:
        return Reject(source, field, "null")
    if not isinstance(value, str):
        return Reject(source, field, "not a string", f"got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A JSON escape such as "\ud800" parses, but is not text and cannot be written out.
        return Reject(source, field, "not valid Unicode", "contains a lone surrogate")
    if not value.strip():
        return Reject(source, field, "empty")
    return value


def _messages(value: Any, source: str) -> tuple[Turn, ...] | Reject:
    """The turns of a `messages` list, or the first problem with it."""
    if not isinstance(value, list):
        return Reject(source, "messages", "not a list", f"got {type(value).__name__}")
    if not value:
        return Reject(source, "messages", "empty")
    turns: list[Turn] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return Reject(source, where, "not an object", f"got {type(message).__name__}")
        role = _text(message, "role", source, f"{where}.role")
        if isinstance(role, Reject):
            return role
        if role not in ROLES:
            return Reject(source, f"{where}.role", "not a known role", f"got {role!r}; use {ROLES}")
        content = _text(message, "content", source, f"{where}.content")
        if isinstance(content, Reject):
            return content
        turns.append(Turn(role, content))
    if not any(t.role == "assistant" for t in turns):
        return Reject(source, "messages", "missing an assistant turn", "nothing to learn from")
    first = 1 if turns[0].role == "system" else 0
    for i, turn in enumerate(turns[first:], start=first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if turn.role != expected:
            return Reject(
                source,
                f"messages[{i}].role",
                "out of order",
                f"got {turn.role!r}, expected {expected!r}: an optional system turn first, then "
                "user and assistant alternating",
            )
    if turns[-1].role != "assistant":
        return Reject(
            source,
            f"messages[{len(turns) - 1}].role",
            "out of order",
            "the last turn must be the assistant's; remove the trailing user turn",
        )
    return tuple(turns)


def _split_name(row: Mapping[str, Any], column: str, source: str) -> str | Reject:
    value = _text(row, column, source)
    if isinstance(value, Reject):
        return value
    name = SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if name not in SPLITS:
        return Reject(source, column, "not a split name", f"got {value!r}; use {list(SPLITS)}")
    return name


def check_row(
    row: Any, source: str, fmt: RowFormat, max_chars: int, split_column: str | None = None
) -> Record | Reject:
    """The record for one parsed row in format `fmt`, or the first problem found with it.

    Extra fields are ignored.
    """
    if not isinstance(row, dict):
        return Reject(source, None, "not a JSON object", f"got {type(row).__name__}")
    if fmt == "messages":
        if row.get("messages") is None:
            return Reject(source, "messages", "missing" if "messages" not in row else "null")
        turns = _messages(row["messages"], source)
        if isinstance(turns, Reject):
            return turns
    else:
        texts = []
        for name in REQUIRED[fmt]:
            value = _text(row, name, source)
            if isinstance(value, Reject):
                return value
            texts.append(value)
        user, assistant = texts
        if fmt == "alpaca" and row.get("input") is not None:
            extra = _text(row, "input", source)
            if isinstance(extra, Reject) and extra.reason != "empty":
                return extra
            if isinstance(extra, str):
                user = f"{user}\n\n{extra}"
        turns = (Turn("user", user), Turn("assistant", assistant))
    chars = sum(len(t.content) for t in turns)
    if chars > max_chars:
        return Reject(source, None, "too long", f"{chars} characters, max_chars is {max_chars}")
    if split_column is None:
        return Record(turns, source)
    split = _split_name(row, split_column, source)
    return split if isinstance(split, Reject) else Record(turns, source, split)


def _read_file(
    path: Path,
    fmt: DataFormat,
    fields: Mapping[str, str],
    max_chars: int,
    split_column: str | None,
) -> tuple[list[Record], list[Reject]]:
    """Records and rejects of one data file, in file order."""
    table = kind_of(path) in ("csv", "parquet")
    records: list[Record] = []
    rejects: list[Reject] = []
    for item in read_rows(path):
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        source, row = item
        if isinstance(row, dict) and fields:
            row = _renamed(row, fields, source)
        if fmt == "auto" and isinstance(row, dict):
            fmt = detect_format(row) or "auto"
            if fmt == "auto":
                raise DataError(
                    f"{source}: cannot tell the data format from the keys {sorted(row)}; "
                    f"expected one of {_shapes()}. Rename keys with data.fields (e.g. "
                    "{question: instruction, answer: response}) or set data.format"
                )
        if table and isinstance(row, dict) and fmt != "auto":
            _check_columns(path, row, fmt)
            table = False  # every row of a table has the same columns: checked once
        result = check_row(
            row, source, fmt if fmt != "auto" else "instruction", max_chars, split_column
        )
        if isinstance(result, Record):
            records.append(result)
        else:
            rejects.append(result)
    return records, rejects


def _renamed(row: Mapping[str, Any], fields: Mapping[str, str], source: str) -> dict[str, Any]:
    """`row` with its keys renamed by `data.fields`; raises DataError naming `source` and the
    keys when two would get one name (a renamed key onto a key the row already has)."""
    renamed = {fields.get(k, k): v for k, v in row.items()}
    if len(renamed) < len(row):
        target, keys = next(
            (t, ks) for t in renamed if len(ks := [k for k in row if fields.get(k, k) == t]) > 1
        )
        raise DataError(
            f"{source}: data.fields renames the keys {keys} all to {target!r}, so one would "
            "overwrite the other; remove one of them from the data, or its entry from data.fields"
        )
    return renamed


def _check_columns(path: Path, row: Mapping[str, Any], fmt: RowFormat) -> None:
    """Raise DataError naming the columns a table (CSV, Parquet) lacks for `fmt`: said once for
    the file, not once per row."""
    absent = [name for name in REQUIRED[fmt] if name not in row]
    if absent:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, absent))} (format {fmt} needs "
            f"{', '.join(REQUIRED[fmt])}; the columns, after data.fields, are {sorted(row)}). "
            "Rename columns with data.fields, e.g. {answer: response}"
        )


def _shapes() -> str:
    return "; ".join(f"{fmt}: {{{', '.join(names)}}}" for fmt, names in REQUIRED.items())


def read_records(
    path: Path,
    *,
    max_chars: int = 20000,
    fmt: DataFormat = "auto",
    fields: Mapping[str, str] | None = None,
    split_column: str | None = None,
) -> tuple[list[Record], list[Reject]]:
    """All valid records and all rejects of `path`: a data file, or a folder of them.

    Files are .jsonl, .json, .csv or .parquet (see `lorapipe.sources`); a folder is read
    recursively, files in order of their relative path. Keys are renamed by `fields` (source
    name -> one of the format's names) first; with `fmt` "auto" each file's format is detected
    from its first row. Each bad row becomes one Reject naming its source, the field (if any)
    and the reason: invalid UTF-8 or JSON, a byte-order mark inside the file, not an object, a
    missing, non-string or blank field, a bad `messages` list (not a list, unknown role, turns
    out of order, no assistant turn), a bad split name, or more than `max_chars` characters of
    text. Extra fields are ignored. Records keep their text as read (see `dedupe`).

    Raises DataError if `path` does not exist or holds no data file, if a whole file cannot be
    read, or if a file's format cannot be detected.
    """
    records: list[Record] = []
    rejects: list[Reject] = []
    for file in data_files(path):
        file_records, file_rejects = _read_file(file, fmt, fields or {}, max_chars, split_column)
        records.extend(file_records)
        rejects.extend(file_rejects)
    return records, rejects


def dedupe(records: Iterable[Record]) -> tuple[list[Record], int]:
    """The first record of each distinct content (`key`) in input order, and the number dropped.

    Returned records carry normalised text (see `normalise`) and the first one's source.
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
        turns = tuple(Turn(t.role, normalise(t.content)) for t in record.turns)
        kept.append(replace(record, turns=turns))
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


def _position(key: str) -> float:
    """The position in [0, 1) hashed from a content hash, the one `assign_split` uses."""
    return int(key[:15], 16) / 16**15


def split_by_counts(
    records: Sequence[Record], counts: Mapping[str, int]
) -> dict[str, list[Record]]:
    """Exactly `counts["test"]` and `counts["val"]` records in test and val; the rest in train,
    or, when `counts["train"]` is given, that many in train and the others left out.

    Test takes the records hashed to the highest positions, val the next ones, train the next,
    so the choice still depends only on content. Adding rows can move a row from test to val or
    from val to train (the sizes are fixed), but never a train row into val or test. Each split
    keeps input order. Raises DataError if the counts ask for more records than there are,
    ValueError if a count is negative or names another split.
    """
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown or any(n < 0 for n in counts.values()):
        raise ValueError(f"split counts must be >= 0 and name splits {SPLITS}, got {dict(counts)}")
    n_test, n_val = counts.get("test", 0), counts.get("val", 0)
    n_train = counts.get("train", len(records) - n_test - n_val)
    if n_test + n_val + n_train > len(records) or n_train < 0:
        raise DataError(
            f"split_counts {dict(counts)} ask for {n_test + n_val + max(n_train, 0)} rows but only "
            f"{len(records)} unique rows remain; lower data.split_counts, or set it to null to "
            "split by the data.splits fractions"
        )
    ranked = sorted(range(len(records)), key=lambda i: _position(records[i].key), reverse=True)
    split_of = {i: "test" for i in ranked[:n_test]}
    split_of.update({i: "val" for i in ranked[n_test : n_test + n_val]})
    split_of.update({i: "train" for i in ranked[n_test + n_val : n_test + n_val + n_train]})
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for i, record in enumerate(records):
        if i in split_of:
            splits[split_of[i]].append(record)
    return splits


def split_by_column(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by the split their row named (`Record.split`), each in input order."""
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for record in records:
        if record.split is None:
            raise ValueError(f"{record.source}: record has no split; read it with split_column")
        splits[record.split].append(record)
    return splits


def near_duplicates(splits: Mapping[str, Sequence[Record]]) -> dict[str, Any]:
    """Groups of records that differ only in case or whitespace yet sit in different splits.

    Such pairs leak evaluation data into training. Returns `{"groups", "rows", "examples"}`:
    the number of such groups, the rows in them, and up to NEAR_DUPLICATE_EXAMPLES groups as
    `{"splits", "sources", "text"}` (the first user turn, cut to 80 characters).
    """
    groups: dict[str, list[tuple[str, Record]]] = defaultdict(list)
    for name, split in splits.items():
        for record in split:
            groups[record.near_key].append((name, record))
    straddling = [g for g in groups.values() if len({name for name, _ in g}) > 1]
    return {
        "groups": len(straddling),
        "rows": sum(len(g) for g in straddling),
        "examples": [
            {
                "splits": [name for name, _ in g],
                "sources": [r.source for _, r in g],
                "text": next(t.content for t in g[0][1].turns if t.role == "user")[:80],
            }
            for g in straddling[:NEAR_DUPLICATE_EXAMPLES]
        ],
    }


def _listing(header: str, rejects: Sequence[Reject]) -> str:
    """`header` followed by the first MAX_LISTED reject messages and a count of the rest."""
    lines = [header] + [f"  {r.message}" for r in rejects[:MAX_LISTED]]
    if len(rejects) > MAX_LISTED:
        lines.append(f"  ... and {len(rejects) - MAX_LISTED} more")
    return "\n".join(lines)


def check_rejects(
    raw: Path, rows_read: int, rejects: Sequence[Reject], on_error: OnError, max_fraction: float
) -> None:
    """Raise DataError listing the bad rows when any is rejected and `on_error` is "fail", or
    when more than `max_fraction` of the rows are with "skip"."""
    if not rejects:
        return
    share = len(rejects) / rows_read
    # the smallest limit (4 decimals, rounded up) under which these rejects pass
    needed = f"data.max_reject_fraction={math.ceil(round(share * 10_000, 6)) / 10_000:g}"
    if on_error == "fail":
        also = "" if share <= max_fraction else f" with {needed} or more"
        raise DataError(
            _listing(
                f"{len(rejects)} of {rows_read} rows in {raw} are invalid; fix them, or set "
                f"data.on_error=skip{also} to drop them:",
                rejects,
            )
        )
    if share > max_fraction:
        raise DataError(
            _listing(
                f"{len(rejects)} of {rows_read} rows in {raw} are invalid ({share:.2%}), more "
                f"than data.max_reject_fraction={max_fraction}; fix them, or set {needed} or "
                "more to drop them:",
                rejects,
            )
        )


def prepare(
    cfg: DataCfg, out_dir: Path, also: Callable[[Path, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Read `cfg.path`, validate, dedupe and split it, and write the splits to `out_dir`.

    Splits come from `cfg.split_column` (the split each row names) if set, else from
    `cfg.split_counts` (exact sizes) if set, else from `cfg.splits` (fractions, by content hash).
    `out_dir` receives train.jsonl, val.jsonl and test.jsonl (rows from `Record.to_row`, in
    input order: `{"id", "instruction", "response"}` for one turn, `{"id", "messages"}`
    otherwise; id = first 16 hex digits of the content hash) and rejects.jsonl (`{"source",
    "field", "reason", "detail"}`, empty when nothing was rejected). The folder is replaced
    atomically: on any error an existing `out_dir` is left as it was. `also(folder, report)`
    writes more files into the new folder before it replaces `out_dir` (the caller's records).

    Returns the report `{"rows_read", "rows_rejected", "rejects_by_reason": {reason: n},
    "duplicates_removed", "near_duplicates_across_splits": {...}, "splits": {split: n},
    "split_by", "split_label_conflicts"}` (see `near_duplicates`); the last counts duplicate rows
    whose split column names another split than the first copy's, which decides.

    Raises DataError if the data cannot be read (see `read_records`), if any row is bad and
    `on_error` is "fail", if the rejected share of rows exceeds `max_reject_fraction` with
    `on_error` "skip", or if no valid row remains; the message lists the bad rows. `cfg` comes
    validated (lorapipe.config), so its values are not checked again here.
    """
    raw, split_column, split_counts = Path(cfg.path), cfg.split_column, cfg.split_counts
    records, rejects = read_records(
        raw, max_chars=cfg.max_chars, fmt=cfg.format, fields=cfg.fields, split_column=split_column
    )
    rows_read = len(records) + len(rejects)
    check_rejects(raw, rows_read, rejects, cfg.on_error, cfg.max_reject_fraction)
    if not records:
        raise DataError(f"{raw}: no valid rows (read {rows_read})")
    unique, duplicates = dedupe(records)
    conflicts = 0
    if split_column is not None:
        splits, split_by = split_by_column(unique), f"column {split_column}"
        first = {r.key: r.split for r in unique}
        conflicts = sum(r.split != first[r.key] for r in records)  # kept in the first's split
    elif split_counts is not None:
        splits, split_by = split_by_counts(unique, dict(split_counts.items())), "counts"
    else:
        splits, split_by = split_records(unique, dict(cfg.splits.items())), "content hash"
    report = {
        "rows_read": rows_read,
        "rows_rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "duplicates_removed": duplicates,
        "near_duplicates_across_splits": near_duplicates(splits),
        "splits": {name: len(split) for name, split in splits.items()},
        "rows_unused": len(unique) - sum(len(split) for split in splits.values()),
        "split_by": split_by,
        "split_label_conflicts": conflicts,
    }
    with atomic_dir(out_dir) as tmp:
        for name, split in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", (r.to_row() for r in split))
        write_jsonl(
            tmp / "rejects.jsonl",
            (
                {"source": r.source, "field": r.field, "reason": r.reason, "detail": r.detail}
                for r in rejects
            ),
        )
        if also is not None:
            also(tmp, report)
    return report
