"""Real-world data in: every supported file type and row shape, and what a person sees when a
row is bad (the `prepare` stage's DataError message: file, line or row, field, reason)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorapipe.errors import PipelineError
from lorapipe.io import read_jsonl
from lorapipe.records import (
    DataError,
    Record,
    Turn,
    read_records,
    split_by_counts,
    split_records,
)
from tests.conftest import run_prepare

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def jsonl(*rows: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


OK = {"instruction": "ok?", "response": "fine"}
OK_CHAT = chat(("user", "hi"), ("assistant", "hello"))


def parquet_bytes(tmp: Path, columns: dict[str, list[Any]]) -> bytes:
    path = tmp / "scratch.parquet"
    pq.write_table(pa.table(columns), path)
    return path.read_bytes()


# Each case: file name, its bytes (or a maker given tmp_path), prepare kwargs, and the text the
# message must contain after the file's path. Every one is a different kind of bad input.
BAD_INPUTS = [
    ("a.jsonl", jsonl(OK) + b'{"instruction": "q",\n', {}, ":2: not valid JSON"),
    ("a.jsonl", jsonl(OK) + b'"just a string"\n', {}, ":2: not a JSON object"),
    (
        "a.jsonl",
        jsonl(OK) + b'{"instruction": "q", "response": ' + b"9" * 5000 + b"}\n",
        {},
        ":2: not valid JSON (an integer of more than 4300 digits)",
    ),
    (
        "t.json",
        b'[\n  {"instruction": "q", "response": "a"},\n  ' + b"9" * 5000 + b"\n]",
        {},
        ":3: not valid JSON (an integer of more than 4300 digits at column 3)",
    ),
    ("a.jsonl", jsonl(OK, {"instruction": "q"}), {}, ":2: field 'response' is missing"),
    (
        "a.jsonl",
        jsonl(OK, {"instruction": "q", "response": None}),
        {},
        ":2: field 'response' is null",
    ),
    (
        "a.jsonl",
        jsonl(OK, {"instruction": "q", "response": 3}),
        {},
        ":2: field 'response' is not a string",
    ),
    (
        "a.jsonl",
        jsonl(OK, {"instruction": " ", "response": "a"}),
        {},
        ":2: field 'instruction' is empty",
    ),
    (
        "a.jsonl",
        jsonl(OK) + b'{"instruction": "\xff", "response": "a"}\n',
        {},
        ":2: not valid UTF-8",
    ),
    ("a.jsonl", jsonl(OK) + b"\xef\xbb\xbf" + jsonl(OK), {}, ":2: starts with a byte-order mark"),
    (
        "a.jsonl",
        jsonl(OK, {"instruction": "q" * 50, "response": "a"}),
        {"max_chars": 40},
        ":2: too long",
    ),
    (
        "a.jsonl",
        jsonl(OK, {"instruction": "\ud800", "response": "a"}),
        {},
        ":2: field 'instruction' is not valid Unicode",
    ),
    ("c.jsonl", jsonl(OK_CHAT, {"messages": "hi"}), {}, ":2: field 'messages' is not a list"),
    (
        "c.jsonl",
        jsonl(OK_CHAT, {"messages": ["hi"]}),
        {},
        ":2: field 'messages[0]' is not an object",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, chat(("user", "q"), ("bot", "a"))),
        {},
        ":2: field 'messages[1].role' is not a known role",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, chat(("user", "q"), ("user", "q2"), ("assistant", "a"))),
        {},
        ":2: field 'messages[1].role' is out of order",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, chat(("user", "q"), ("assistant", "a"), ("system", "s"))),
        {},
        ":2: field 'messages[2].role' is out of order",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, chat(("system", "s"), ("user", "q"))),
        {},
        ":2: field 'messages' is missing an assistant turn",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, chat(("user", "q"), ("assistant", "a"), ("user", "more?"))),
        {},
        ":2: field 'messages[2].role' is out of order (the last turn must be",
    ),
    (
        "c.jsonl",
        jsonl(OK_CHAT, {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),
        {},
        ":2: field 'messages[0].content' is missing",
    ),
    (
        "p.jsonl",
        jsonl({"instruction": "q", "input": 5, "output": "a"}),
        {},
        ":1: field 'input' is not a string",
    ),
    (
        "s.jsonl",
        jsonl({**OK, "split": "train"}, {**OK, "response": "b", "split": "holdout"}),
        {"split_column": "split"},
        ":2: field 'split' is not a split name",
    ),
    ("t.csv", b"instruction,response\r\nq,a\r\nq2,\r\n", {}, " row 2: field 'response' is empty"),
    ("t.csv", b"instruction,response\nq,a\nq2,\xe9t\xe9\n", {}, ":3: not valid UTF-8"),
    ("t.csv", b"instruction,response\nq,a\nq,a,extra\n", {}, ": cannot read as CSV"),
    # An extra field in the first row (or a trailing comma on every row) is named by its line,
    # as in a later row; pandas would otherwise take the first column as the index, shifting all.
    (
        "t.csv",
        b"instruction,response\nWhat is max(1, 2)?,2\nq2,b\n",
        {"on_error": "skip", "max_reject_fraction": 1.0},
        ": cannot read as CSV (Error tokenizing data. C error: Expected 2 fields in line 2, saw 3)",
    ),
    (
        "t.csv",
        b"instruction,response\nq,a,\nq2,b,\n",
        {},
        ": cannot read as CSV (Error tokenizing data. C error: Expected 2 fields in line 2, saw 3)",
    ),
    (
        "t.parquet",
        lambda t: parquet_bytes(t, {"instruction": ["q", "r"], "response": ["a", None]}),
        {},
        " row 2: field 'response' is null",
    ),
    (
        "t.parquet",
        lambda t: parquet_bytes(t, {"instruction": ["q", "r"], "response": ["a", "b"]})[:-20],
        {},
        ": cannot read as PARQUET",
    ),
    (
        "t.json",
        b'[\n  {"instruction": "q", "response": "a"},\n  {"instruction": "q2" "response": "b"}\n]',
        {},
        ":3: not valid JSON",
    ),
    ("t.json", b'{"instruction": "q", "response": "a"}', {}, ": expected a JSON array"),
    ("t.json", b'[\n  {"instruction": "q", "response": "a"},\n  7\n]', {}, ":3: not a JSON object"),
    ("t.jsonl.gz", b"not gzip at all", {}, ": not a readable gzip file"),
    (
        "t.jsonl",
        jsonl({"question": "q", "answer": "a"}),
        {},
        ":1: cannot tell the data format from the keys ['answer', 'question']",
    ),
    (
        "t.csv",
        b"instruction,question,answer\nold,q,a\n",
        {"fields": {"question": "instruction", "answer": "response"}},
        " row 1: data.fields renames the keys ['instruction', 'question'] all to 'instruction'",
    ),
    (
        "t.jsonl",
        jsonl(
            {"question": "q", "answer": "a"}, {"question": "q", "instruction": "i", "answer": "a"}
        ),
        {"fields": {"question": "instruction", "answer": "response"}},
        ":2: data.fields renames the keys ['question', 'instruction'] all to 'instruction'",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "expected"),
    BAD_INPUTS,
    ids=[f"{i}-{case[3].split(':')[-1].strip()[:30]}" for i, case in enumerate(BAD_INPUTS)],
)
def test_bad_input_gives_a_message_naming_file_line_and_reason(
    tmp_path: Path, name: str, content: Any, kwargs: dict[str, Any], expected: str
) -> None:
    raw = tmp_path / name
    raw.write_bytes(content(tmp_path) if callable(content) else content)
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, **kwargs)
    assert isinstance(err.value, PipelineError)  # the stage shell prints it without a traceback
    assert f"{raw}{expected}" in str(err.value)
    assert "Traceback" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_skip_keeps_the_good_rows_of_a_mixed_chat_file(tmp_path: Path) -> None:
    raw = tmp_path / "c.jsonl"
    bad = chat(("user", "q"), ("bot", "a"))
    raw.write_bytes(
        jsonl(*[chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(9)], bad)
    )
    report = run_prepare(
        raw, tmp_path / "out", fractions=FRACTIONS, on_error="skip", max_reject_fraction=0.1
    )
    assert report["rows_rejected"] == 1
    assert report["rejects_by_reason"] == {"not a known role": 1}
    (reject,) = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert reject["source"] == f"{raw}:10" and reject["field"] == "messages[1].role"


# --- every shape and file type reads into the same conversations ---------------------------------


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path: Path) -> None:
    raw = tmp_path / "a.jsonl"
    rows = [
        {"instruction": "Sum these.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say yo.", "output": "yo"},
    ]
    raw.write_bytes(jsonl(*rows))
    recs, rejects = read_records(raw)
    assert rejects == []
    assert [r.turns for r in recs] == [
        (Turn("user", "Sum these.\n\n1 2"), Turn("assistant", "3")),
        (Turn("user", "Say hi."), Turn("assistant", "hi")),
        (Turn("user", "Say yo."), Turn("assistant", "yo")),
    ]


def test_every_file_type_and_shape_gives_the_same_records(tmp_path: Path) -> None:
    pairs = [("What is 1+1?", "2"), ("Name a colour, please.", "red"), ('Quote "x"', "'x'")]
    expected = [Record.single(q, a, "").turns for q, a in pairs]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(
        jsonl(*[{"instruction": q, "response": a} for q, a in pairs])
    )
    (tmp_path / "d" / "b.json").write_text(
        json.dumps([{"prompt": q, "completion": a} for q, a in pairs], indent=2)
    )
    (tmp_path / "d" / "c.jsonl.gz").write_bytes(
        gzip.compress(jsonl(*[chat(("user", q), ("assistant", a)) for q, a in pairs]))
    )
    csv = "\ufeffquestion,answer\r\n" + "".join(
        '"{}","{}"\r\n'.format(q.replace('"', '""'), a) for q, a in pairs
    )
    (tmp_path / "d" / "e.csv.gz").write_bytes(gzip.compress(csv.encode()))
    pq.write_table(
        pa.table({"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]}),
        tmp_path / "d" / "f.parquet",
    )
    recs, rejects = read_records(
        tmp_path / "d", fields={"question": "instruction", "answer": "response"}
    )
    assert rejects == []
    assert [r.turns for r in recs] == expected * 5
    assert recs[3].source == f"{tmp_path / 'd' / 'b.json'}:2"
    assert recs[-1].source == f"{tmp_path / 'd' / 'f.parquet'} row 3"


def test_hidden_files_and_folders_in_a_data_folder_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(jsonl(OK))
    (folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_bytes(jsonl(OK, OK_CHAT))
    (folder / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    recs, rejects = read_records(folder)
    assert rejects == [] and [r.source for r in recs] == [f"{folder / 'a.jsonl'}:1"]


def test_an_empty_parquet_or_header_only_csv_is_a_file_of_no_rows(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl(OK))
    (folder / "b.csv").write_text("instruction,response\n")
    empty = {"instruction": pa.array([], pa.string()), "response": pa.array([], pa.string())}
    pq.write_table(pa.table(empty), folder / "c.parquet")
    recs, rejects = read_records(folder)
    assert rejects == [] and [r.source for r in recs] == [f"{folder / 'a.jsonl'}:1"]
    assert read_records(folder / "c.parquet") == read_records(folder / "b.csv") == ([], [])


def test_csv_cells_are_text_and_multiline_cells_survive(tmp_path: Path) -> None:
    raw = tmp_path / "t.csv"
    raw.write_text('instruction,response\n"Two\nlines",007\n', encoding="utf-8")
    recs, rejects = read_records(raw)
    assert rejects == []
    assert recs[0].turns == (Turn("user", "Two\nlines"), Turn("assistant", "007"))


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    raw = tmp_path / "t.jsonl"
    raw.write_bytes(jsonl({"instruction": "q", "response": "a", "output": "o"}))
    recs, _ = read_records(raw)  # detected as alpaca: output wins
    assert recs[0].turns[1].content == "o"
    recs, _ = read_records(raw, fmt="instruction")
    assert recs[0].turns[1].content == "a"


def test_multi_turn_rows_are_written_as_messages_and_one_turn_rows_as_before(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "c.jsonl"
    convo = chat(("system", "Be brief."), ("user", "hi"), ("assistant", "hello"))
    raw.write_bytes(jsonl(convo, chat(("user", "q"), ("assistant", "a"))))
    run_prepare(raw, tmp_path / "out", fractions={"train": 1.0, "val": 0.0, "test": 0.0})
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert rows[0]["messages"] == convo["messages"]
    assert set(rows[1]) == {"id", "instruction", "response"}
    same = Record.single("q", "a", "x").key[:16]
    assert rows[1]["id"] == same  # a one-turn chat hashes like the instruction row it equals


# --- splits ----------------------------------------------------------------------------------


def _csv(path: Path, n: int) -> Path:
    path.write_text(
        "question,answer\n" + "".join(f"Question {i}?,Answer {i}.\n" for i in range(n)),
        encoding="utf-8",
    )
    return path


def _split_of(out: Path) -> dict[str, str]:
    return {r["id"]: s for s in FRACTIONS for r in read_jsonl(out / f"{s}.jsonl")}


def test_growing_a_csv_by_ten_percent_moves_no_row(tmp_path: Path) -> None:
    fields = {"question": "instruction", "answer": "response"}
    run_prepare(_csv(tmp_path / "a.csv", 1000), tmp_path / "a", fractions=FRACTIONS, fields=fields)
    run_prepare(_csv(tmp_path / "b.csv", 1100), tmp_path / "b", fractions=FRACTIONS, fields=fields)
    before, after = _split_of(tmp_path / "a"), _split_of(tmp_path / "b")
    assert len(before) == 1000 and len(after) == 1100
    assert {k: after[k] for k in before} == before


def test_split_counts_are_exact_and_never_take_a_train_row(tmp_path: Path) -> None:
    recs = [Record.single(f"Q{i}", f"A{i}", str(i)) for i in range(300)]
    splits = split_by_counts(recs, {"val": 20, "test": 30})
    assert {k: len(v) for k, v in splits.items()} == {"train": 250, "val": 20, "test": 30}
    grown = split_by_counts(
        recs + [Record.single(f"Q{i}", "A", str(i)) for i in range(300, 400)],
        {"val": 20, "test": 30},
    )
    old_train = {r.source for r in splits["train"]}
    assert old_train <= {r.source for r in grown["train"]}
    with pytest.raises(DataError, match="ask for 350 rows but only 300"):
        split_by_counts(recs, {"val": 200, "test": 150})


def test_a_train_count_takes_the_next_rows_and_leaves_the_rest_out(tmp_path: Path) -> None:
    recs = [Record.single(f"Q{i}", f"A{i}", str(i)) for i in range(300)]
    all_train = split_by_counts(recs, {"val": 20, "test": 30})
    some = split_by_counts(recs, {"train": 100, "val": 20, "test": 30})
    assert {k: len(v) for k, v in some.items()} == {"train": 100, "val": 20, "test": 30}
    for name in ("val", "test"):  # a train count never changes which rows are held out
        assert some[name] == all_train[name]
    assert {r.source for r in some["train"]} < {r.source for r in all_train["train"]}
    reordered = split_by_counts(recs[::-1], {"train": 100, "val": 20, "test": 30})
    assert {r.source for r in reordered["train"]} == {r.source for r in some["train"]}
    with pytest.raises(DataError, match="ask for 400 rows but only 300"):
        split_by_counts(recs, {"train": 350, "test": 50})
    raw = tmp_path / "q.jsonl"
    raw.write_bytes(jsonl(*[{"instruction": f"q{i}", "response": "a"} for i in range(50)]))
    report = run_prepare(
        raw, tmp_path / "out", fractions=FRACTIONS, split_counts={"train": 30, "test": 5}
    )
    assert report["splits"] == {"train": 30, "val": 0, "test": 5} and report["rows_unused"] == 15


def test_split_column_decides_and_accepts_validation(tmp_path: Path) -> None:
    raw = tmp_path / "s.jsonl"
    names = ["train", "validation", "test", "TRAIN", "val"]
    raw.write_bytes(
        jsonl(*[{"instruction": f"q{i}", "response": "a", "split": s} for i, s in enumerate(names)])
    )
    report = run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, split_column="split")
    assert report["splits"] == {"train": 2, "val": 2, "test": 1}
    assert report["split_by"] == "column split"
    assert report["split_label_conflicts"] == 0
    (test_row,) = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert test_row["instruction"] == "q2"
    # q0 again, labelled test: the first copy (train) decides, and the conflict is counted
    with raw.open("ab") as f:
        f.write(jsonl({"instruction": "q0", "response": "a", "split": "test"}))
    report = run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, split_column="split")
    assert report["splits"] == {"train": 2, "val": 2, "test": 1}
    assert report["split_label_conflicts"] == 1 and report["duplicates_removed"] == 1


def test_near_duplicates_across_splits_are_reported(tmp_path: Path) -> None:
    raw = tmp_path / "n.jsonl"
    rows = []
    for i in range(100):
        rows.append({"instruction": f"What is item {i}?", "response": f"Item {i}"})
        rows.append({"instruction": f"what  is ITEM {i}?", "response": f"item {i}"})
    raw.write_bytes(jsonl(*rows))
    report = run_prepare(raw, tmp_path / "out", fractions=FRACTIONS)
    assert report["duplicates_removed"] == 0  # case and spacing differ: not exact duplicates
    split_of = _split_of(tmp_path / "out")
    recs, _ = read_records(raw)
    ids = [r.key[:16] for r in recs]
    straddling = sum(split_of[ids[2 * i]] != split_of[ids[2 * i + 1]] for i in range(100))
    near = report["near_duplicates_across_splits"]
    assert near["groups"] == straddling > 0
    assert near["rows"] == 2 * straddling
    first = near["examples"][0]
    assert len(set(first["splits"])) == 2 and all(str(raw) in s for s in first["sources"])


def test_split_records_still_ignores_row_order() -> None:
    recs = [Record.single(f"Q{i}", f"A{i}", str(i)) for i in range(50)]
    a = split_records(recs, FRACTIONS)
    b = split_records(list(reversed(recs)), FRACTIONS)
    assert {k: {r.source for r in v} for k, v in a.items()} == {
        k: {r.source for r in v} for k, v in b.items()
    }


# --- config ----------------------------------------------------------------------------------


def test_data_config_takes_overrides_and_refuses_conflicts() -> None:
    from lorapipe.config import ConfigError, validate
    from lorapipe.params import compose

    root = Path(__file__).resolve().parents[1] / "conf"
    counts = ["data.split_counts=null", "data.split_counts={val: 5}"]  # replace, not merge
    ok = validate(compose(root, ["data.fields={q: instruction}", *counts]))
    assert ok.data.fields == {"q": "instruction"} and ok.data.split_counts == {"val": 5}
    with pytest.raises(ConfigError, match="not both"):
        validate(compose(root, [*counts, "data.split_column=split"]))
    with pytest.raises(ConfigError, match=r"data\.fields\.q"):
        validate(compose(root, ["data.fields={q: question}"]))
    with pytest.raises(ConfigError, match=r"format\.truncation"):
        validate(compose(root, ["format.truncation=cut"]))


def test_the_documented_rest_is_train_command_leaves_no_row_out(tmp_path: Path) -> None:
    """docs/data.md's command for "the rest is train", run as printed: a dict override would
    merge into conf/data/pyqa.yaml's counts and keep its train count."""
    import shutil

    from lorapipe.params import write_params
    from tests.test_documented_commands import ROOT, run_module

    doc = (ROOT / "docs/data.md").read_text()
    found = re.search(r"`(python -m stages\.prepare '~data\.split_counts\.train'[^`]*)`", doc)
    assert found, "docs/data.md no longer shows how to make the rest train"
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    write_params(project, [])
    (project / "data/raw").mkdir(parents=True)
    rows = [{"instruction": f"What is {i} + 1?", "response": str(i + 1)} for i in range(500)]
    (project / "data/raw/pyqa.jsonl").write_bytes(jsonl(*rows))
    status, out = run_module(project, found.group(1))
    assert status == 0, out
    report = json.loads((project / "reports/data.json").read_text())
    assert report["splits"] == {"train": 100, "val": 200, "test": 200}
    assert report["rows_unused"] == 0


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_table_without_a_required_column_is_refused_once(tmp_path: Path, kind: str) -> None:
    columns = {"instruction": [f"q{i}" for i in range(50)], "output_text": ["a"] * 50}
    if kind == "csv":
        raw = tmp_path / "t.csv"
        raw.write_text("instruction,answer\n" + "".join(f"q{i},a\n" for i in range(50)))
    else:
        raw = tmp_path / "t.parquet"
        raw.write_bytes(parquet_bytes(tmp_path, columns))
    with pytest.raises(DataError) as err:
        run_prepare(raw, tmp_path / "out", fractions=FRACTIONS, format="instruction")
    message = str(err.value)
    assert message.startswith(f"{raw}: no column 'response' (format instruction needs")
    assert len(message.splitlines()) == 1 and "row" not in message
