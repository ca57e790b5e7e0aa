"""Tests for lorapipe.records (the `prepare` stage's library) and the lorapipe.io helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorapipe import records as records_module
from lorapipe.io import atomic_dir, read_jsonl, write_json, write_jsonl
from lorapipe.records import (
    DataError,
    Record,
    Reject,
    assign_split,
    dedupe,
    normalise,
    read_records,
    split_records,
)
from tests.conftest import run_prepare

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def row(instruction: str, response: str) -> bytes:
    return json.dumps({"instruction": instruction, "response": response}).encode()


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def make_records(start: int, stop: int) -> list[Record]:
    return [Record.single(f"Question {i}?", f"Answer {i}.", f"gen:{i}") for i in range(start, stop)]


def tree(path: Path) -> dict[str, bytes]:
    """Every file below `path` with its bytes, to compare a folder before and after."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# --- splitting ---------------------------------------------------------------------------------


def test_split_is_stable_when_rows_are_added() -> None:
    original = make_records(0, 1000)
    before = split_records(original, FRACTIONS)
    split_of = {r.key: name for name, split in before.items() for r in split}

    grown = original + make_records(1000, 1100)
    after = split_records(grown, FRACTIONS)

    moved = [
        r.source
        for name, split in after.items()
        for r in split
        if split_of.get(r.key, name) != name
    ]
    assert moved == []
    assert sum(len(s) for s in after.values()) == len(grown)
    for name, fraction in FRACTIONS.items():
        assert abs(len(after[name]) / len(grown) - fraction) < 0.03, (name, len(after[name]))
        # each split keeps input order
        positions = [grown.index(r) for r in after[name]]
        assert positions == sorted(positions)


def test_assign_split_walks_train_val_test_by_hash_position() -> None:
    low, high = "0" * 64, "f" * 64  # u = 0 and u just below 1
    assert assign_split(low, FRACTIONS) == "train"
    assert assign_split(high, FRACTIONS) == "test"
    assert assign_split(high, {"train": 0.5, "val": 0.5}) == "val"
    assert assign_split(low, {"train": 0.0, "val": 0.0, "test": 1.0}) == "test"
    # a key at u = 0.85 lies in val's interval [0.8, 0.9)
    mid = format(int(0.85 * 16**15), "015x") + "0" * 49
    assert assign_split(mid, FRACTIONS) == "val"


@pytest.mark.parametrize(
    ("fractions", "shown"),
    [
        ({"train": 0.8, "val": 0.1}, "0.8"),
        ({"train": 1.1, "val": -0.1, "test": 0.0}, "-0.1"),
        ({"train": float("nan"), "val": 0.5, "test": 0.5}, "nan"),
        ({"train": 0.9, "dev": 0.1}, "dev"),
    ],
)
def test_bad_fractions_raise_naming_the_values(fractions: dict[str, float], shown: str) -> None:
    with pytest.raises(ValueError, match="fractions") as err:
        assign_split("0" * 64, fractions)
    assert shown in str(err.value)


# --- normalising and deduplicating -------------------------------------------------------------


def test_normalise_only_unifies_line_ends_unicode_and_outer_whitespace() -> None:
    text = " \n\t\r\n  def f(x):  \r\n    return  X\r\rcafe\u0301 \t\n\n"
    assert normalise(text) == "  def f(x):\n    return  X\n\ncaf\u00e9"
    assert normalise(normalise(text)) == normalise(text)
    # A completion continuing a code block keeps its first line's indentation.
    assert normalise("    x = 1\n    return x\n") == "    x = 1\n    return x"


def test_dedupe_keeps_first_and_counts_whitespace_and_crlf_variants() -> None:
    recs = [
        Record.single("Sum?", "def f(a, b):\n    return a + b", "a.jsonl:1"),
        Record.single("Other?", "Yes.", "a.jsonl:2"),
        Record.single("Sum?  ", "def f(a, b):   \r\n    return a + b\r\n", "a.jsonl:3"),
        Record.single("Sum?\n", "def f(a, b):\r    return a + b ", "b.jsonl:1"),
        Record.single("sum?", "def f(a, b):\n    return a + b", "b.jsonl:2"),  # case differs: kept
    ]
    kept, removed = dedupe(recs)
    assert removed == 2
    assert [r.source for r in kept] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:2"]
    assert all(t.content == normalise(t.content) for r in kept for t in r.turns)


def test_prepare_reports_duplicates_and_never_splits_them(tmp_path: Path) -> None:
    lines = [row(f"q{i}", f"a{i}") for i in range(50)]
    lines += [row(f"q{i}  ", f"a{i}\r\n") for i in range(0, 50, 5)]
    raw = write_lines(tmp_path / "raw.jsonl", lines)
    report = run_prepare(raw, tmp_path / "out", fractions=FRACTIONS)
    assert report["rows_read"] == 60
    assert report["duplicates_removed"] == 10
    assert sum(report["splits"].values()) == 50
    ids = [r["id"] for name in FRACTIONS for r in read_jsonl(tmp_path / "out" / f"{name}.jsonl")]
    assert len(ids) == len(set(ids)) == 50


# --- reading and validating --------------------------------------------------------------------

TOO_LONG = row("x" * 30, "y")
BAD_ROWS = [
    pytest.param(b'{"instruction": "q", ', None, "not valid JSON", id="invalid-json"),
    pytest.param(b'["q", "a"]', None, "not a JSON object", id="not-an-object"),
    pytest.param(b'{"instruction": "q"}', "response", "missing", id="missing-field"),
    pytest.param(b'{"instruction": 7, "response": "a"}', "instruction", "not a string", id="type"),
    pytest.param(row("q", " \t "), "response", "empty", id="blank-field"),
    pytest.param(row("", "a"), "instruction", "empty", id="empty-field"),
    pytest.param(TOO_LONG, None, "too long", id="too-long"),
    pytest.param(b'{"instruction": "q\xff", "response": "a"}', None, "not valid UTF-8", id="utf8"),
    pytest.param(row("\ud800", "a"), "instruction", "not valid Unicode", id="lone-surrogate"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_ROWS)
def test_bad_row_becomes_a_reject_naming_file_line_and_field(
    tmp_path: Path, line: bytes, field: str | None, reason: str
) -> None:
    raw = write_lines(tmp_path / "raw.jsonl", [row("ok", "fine"), b"", line, row("q2", "a2")])
    recs, rejects = read_records(raw, max_chars=20)
    assert [r.source for r in recs] == [f"{raw}:1", f"{raw}:4"]
    assert rejects == [Reject(f"{raw}:3", field, reason, rejects[0].detail)]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_ROWS)
def test_bad_row_fails_prepare_with_an_actionable_message(
    tmp_path: Path, line: bytes, field: str | None, reason: str
) -> None:
    raw = write_lines(tmp_path / "raw.jsonl", [row("ok", "fine"), b"", line])
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, max_chars=20)
    message = str(err.value)
    expected = f"{raw}:3: field '{field}' is {reason}" if field else f"{raw}:3: {reason}"
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_message_matches_the_documented_form(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "pyqa.jsonl", [row(f"q{i}", f"a{i}") for i in range(16)])
    with raw.open("ab") as f:
        f.write(row("q", "") + b"\n")
    with pytest.raises(DataError, match=f"{raw}:17: field 'response' is empty"):
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS)


def test_all_problems_are_collected_and_the_listing_is_capped(tmp_path: Path) -> None:
    raw = write_lines(tmp_path / "raw.jsonl", [row("ok", "fine")] + [b"{"] * 25)
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS)
    message = str(err.value)
    assert "25 of 26 rows" in message
    assert f"{raw}:21:" in message
    assert f"{raw}:22:" not in message
    assert message.endswith("... and 5 more")


def test_extra_fields_are_ignored(tmp_path: Path) -> None:
    line = json.dumps({"instruction": "q", "response": "a", "meta": {"x": 1}}).encode()
    recs, rejects = read_records(write_lines(tmp_path / "raw.jsonl", [line]))
    assert (recs, rejects) == ([Record.single("q", "a", f"{tmp_path / 'raw.jsonl'}:1")], [])


def test_bom_and_crlf_files_are_read(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(b"\xef\xbb\xbf" + row("h\u00e9?", "x") + b"\r\n\r\n" + row("q", "a") + b"\r\n")
    recs, rejects = read_records(raw)
    assert rejects == []
    assert recs == [Record.single("h\u00e9?", "x", f"{raw}:1"), Record.single("q", "a", f"{raw}:3")]


def test_folder_is_read_recursively_in_name_order(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_lines(raw / "b" / "x.jsonl", [row("b", "1")])
    write_lines(raw / "a.jsonl", [row("a", "1")])
    write_lines(raw / "c.jsonl", [row("c", "1")])
    write_lines(raw / "notes.txt", [b"not data"])
    recs, _ = read_records(raw)
    assert [r.turns[0].content for r in recs] == ["a", "b", "c"]
    assert recs[1].source == f"{raw / 'b' / 'x.jsonl'}:1"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "nope.jsonl", "no such file or folder"),
        (lambda p: p, "folder has no data files"),
        (lambda p: write_lines(p / "raw.txt", [row("q", "a")]), "not a supported data file"),
    ],
)
def test_unusable_path_raises_data_error(tmp_path: Path, make: Any, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError, match=match) as err:
        read_records(path)
    assert str(path) in str(err.value)


def test_zero_valid_rows_raise(tmp_path: Path) -> None:
    blank = write_lines(tmp_path / "blank.jsonl", [b"", b"  "])
    with pytest.raises(DataError, match="no valid rows"):
        run_prepare(blank, tmp_path / "out", fractions=FRACTIONS)
    bad = write_lines(tmp_path / "bad.jsonl", [b"{"])
    with pytest.raises(DataError, match="no valid rows"):
        run_prepare(
            bad, tmp_path / "out", fractions=FRACTIONS, on_error="skip", max_reject_fraction=1
        )


# --- prepare: outputs, skip mode, atomicity ----------------------------------------------------


def test_prepare_writes_splits_in_input_order_with_content_ids(tmp_path: Path) -> None:
    raw = write_lines(
        tmp_path / "raw.jsonl", [row(f"caf\u00e9 {i}", f"  a{i} ") for i in range(40)]
    )
    report = run_prepare(raw, tmp_path / "out", fractions=FRACTIONS)
    assert report == {
        "rows_read": 40,
        "rows_rejected": 0,
        "rejects_by_reason": {},
        "duplicates_removed": 0,
        "near_duplicates_across_splits": {"groups": 0, "rows": 0, "examples": []},
        "splits": report["splits"],
        "rows_unused": 0,
        "split_by": "content hash",
        "split_label_conflicts": 0,
    }
    expected = split_records(dedupe(read_records(raw)[0])[0], FRACTIONS)
    for name in FRACTIONS:
        path = tmp_path / "out" / f"{name}.jsonl"
        assert read_jsonl(path) == [
            {"id": r.key[:16], "instruction": r.turns[0].content, "response": r.turns[1].content}
            for r in expected[name]
        ]
        assert report["splits"][name] == len(expected[name])
    assert "caf\u00e9".encode() in (tmp_path / "out" / "train.jsonl").read_bytes()
    assert (tmp_path / "out" / "rejects.jsonl").read_bytes() == b""


def test_skip_writes_rejects_within_the_allowed_fraction(tmp_path: Path) -> None:
    lines = [row(f"q{i}", f"a{i}") for i in range(8)] + [b"{", row("q", "")]
    raw = write_lines(tmp_path / "raw.jsonl", lines)
    out = tmp_path / "out"
    report = run_prepare(raw, out, fractions=FRACTIONS, on_error="skip", max_reject_fraction=0.2)
    assert report["rows_read"] == 10
    assert report["rows_rejected"] == 2
    assert report["rejects_by_reason"] == {"empty": 1, "not valid JSON": 1}
    assert sum(report["splits"].values()) == 8
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [(r["source"], r["field"], r["reason"]) for r in rejects] == [
        (f"{raw}:9", None, "not valid JSON"),
        (f"{raw}:10", "response", "empty"),
    ]


def test_skip_raises_when_rejects_exceed_the_allowed_fraction(tmp_path: Path) -> None:
    lines = [row(f"q{i}", f"a{i}") for i in range(8)] + [b"{", row("q", "")]
    raw = write_lines(tmp_path / "raw.jsonl", lines)
    with pytest.raises(DataError, match=r"2 of 10 rows .*max_reject_fraction=0\.1") as err:
        run_prepare(
            raw, tmp_path / "out", fractions=FRACTIONS, on_error="skip", max_reject_fraction=0.1
        )
    assert f"{raw}:10: field 'response' is empty" in str(err.value)
    assert "or set data.max_reject_fraction=0.2 or more to drop them:" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("limit", "advice"), [(0.0, " with data.max_reject_fraction=0.2 or more"), (0.5, "")]
)
def test_a_failing_reject_names_every_setting_that_drops_it(
    tmp_path: Path, limit: float, advice: str
) -> None:
    """on_error=fail names on_error=skip, and the reject limit too when the default's (0) would
    stop skipping as well; the settings it names then prepare the data."""
    lines = [row(f"q{i}", f"a{i}") for i in range(8)] + [b"{", row("q", "")]
    raw = write_lines(tmp_path / "raw.jsonl", lines)
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, max_reject_fraction=limit)
    assert f"fix them, or set data.on_error=skip{advice} to drop them:" in str(err.value)
    named = 0.2 if advice else limit
    report = run_prepare(
        raw, tmp_path / "out", fractions=FRACTIONS, on_error="skip", max_reject_fraction=named
    )
    assert report["rows_rejected"] == 2


@pytest.mark.parametrize(
    "kwargs", [{"on_error": "ignore"}, {"max_reject_fraction": 1.5}, {"max_chars": 0}]
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    raw = write_lines(tmp_path / "raw.jsonl", [row("q", "a")])
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, **kwargs)


def _existing_out(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "prepared"
    write_lines(out / "train.jsonl", [b'{"id": "old"}'])
    (out / "keep.txt").write_text("previous run")
    return out, tree(out)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_failing_validation_leaves_existing_out_dir_untouched(tmp_path: Path) -> None:
    out, before = _existing_out(tmp_path)
    raw = write_lines(tmp_path / "raw.jsonl", [row("q", "a"), b"{"])
    with pytest.raises(DataError):
        run_prepare(raw, out, fractions=FRACTIONS)
    assert tree(out) == before
    assert _leftovers(tmp_path) == []


def test_failing_write_leaves_existing_out_dir_untouched_and_no_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, before = _existing_out(tmp_path)
    raw = write_lines(tmp_path / "raw.jsonl", [row(f"q{i}", f"a{i}") for i in range(20)])
    calls: list[Path] = []

    def fail_on_second(path: Path, rows: Any) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        write_jsonl(path, rows)

    monkeypatch.setattr(records_module, "write_jsonl", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(raw, out, fractions=FRACTIONS)
    assert calls[0].parent.name.startswith(".tmp-prepared-")
    assert tree(out) == before
    assert _leftovers(tmp_path) == []


def test_successful_prepare_replaces_out_dir_completely(tmp_path: Path) -> None:
    out, _ = _existing_out(tmp_path)
    raw = write_lines(tmp_path / "raw.jsonl", [row(f"q{i}", f"a{i}") for i in range(20)])
    run_prepare(raw, out, fractions=FRACTIONS)
    assert sorted(tree(out)) == ["rejects.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert _leftovers(tmp_path) == []


# --- io helpers --------------------------------------------------------------------------------


def test_atomic_dir_refuses_to_replace_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError), atomic_dir(target):
        pass
    assert target.read_text() == "a file"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_gives_its_files_a_plain_files_mode(tmp_path: Path) -> None:
    """safetensors writes through a private (0600) temporary file: the weights came out
    -rw------- beside -rw-r--r-- files. Every file gets the mode a plain file gets under the
    umask (an executable keeps its x bits), every folder a plain folder's; contents unchanged."""
    import os
    import stat

    import torch
    from safetensors.torch import load_file, save_file

    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        save_file({"w": torch.ones(2)}, tmp / "model.safetensors")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "secret.txt").write_text("x")
        (tmp / "sub" / "secret.txt").chmod(0o600)
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*")}
    plain = 0o666 & ~umask
    assert mode == {
        "model.safetensors": plain,
        "sub": 0o777 & ~umask,
        "secret.txt": plain,
        "run.sh": 0o777 & ~umask,
    }
    assert load_file(target / "model.safetensors")["w"].tolist() == [1.0, 1.0]


def test_jsonl_and_json_round_trip_as_utf8_with_lf(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "h\u00e9 \u4e16\u754c", "n": 1},
        {"text": "line\r\nbreak"},
    ]
    write_jsonl(tmp_path / "sub" / "rows.jsonl", rows)
    data = (tmp_path / "sub" / "rows.jsonl").read_bytes()
    assert data.count(b"\n") == 2
    assert b"\r\n" not in data
    assert "\u4e16".encode() in data
    assert read_jsonl(tmp_path / "sub" / "rows.jsonl") == rows
    write_json(tmp_path / "report.json", {"b": 1, "a": [1]})
    assert (tmp_path / "report.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
