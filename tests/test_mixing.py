"""Several data sources mixed by weight, and replay of the retain set's base answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorapipe.config import ConfigError, DataCfg, validate
from lorapipe.mixing import SOURCES_FILE, apportion, prepare_data
from lorapipe.params import compose
from lorapipe.pyqa import generate
from lorapipe.records import prepare
from lorapipe.sources import DataError
from tests.conftest import conf_group

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


@pytest.fixture(scope="module")
def conf_data() -> dict[str, Any]:
    """conf/'s data group as composed (the schema states no defaults of its own)."""
    return conf_group("data")


@pytest.fixture()
def data_cfg(conf_data: dict[str, Any]) -> Callable[..., DataCfg]:
    def make(**over: Any) -> DataCfg:
        return DataCfg(**{**conf_data, **over})

    return make


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def source(path: Path, **over: Any) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": "auto",
        "fields": None,
        "weight": None,
        "rows": None,
        **over,
    }


def train_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]


def ids_of(rows: list[dict[str, str]]) -> set[str]:
    from lorapipe.records import Record

    return {Record.single(r["instruction"], r["response"], "x").key[:16] for r in rows}


def test_weights_3_to_1_give_the_requested_shares(
    tmp_path: Path, data_cfg: Callable[..., DataCfg]
) -> None:
    a, b = generate(200, seed=11), generate(200, seed=12)
    raw = tmp_path / "raw"
    sources = {
        "a": source(write_rows(raw / "a.jsonl", a), weight=3),
        "b": source(write_rows(raw / "b.jsonl", b), weight=1),
    }
    counts = {"train": 41, "val": 10, "test": 10}
    cfg = data_cfg(path=str(raw), sources=sources, split_counts=counts)
    report = prepare_data(cfg, tmp_path / "out", None)
    ids = train_ids(tmp_path / "out")
    in_a = sum(i in ids_of(a) for i in ids)
    assert len(ids) == 41 and (in_a, len(ids) - in_a) == (31, 10)  # 30.75 and 10.25, rounded
    assert {k: v["splits"]["train"] for k, v in report["sources"].items()} == {"a": 31, "b": 10}
    assert sum(v["splits"]["val"] for v in report["sources"].values()) == 10
    lineage = json.loads((tmp_path / "out" / SOURCES_FILE).read_text())
    assert set(lineage) == {"a", "b"} and lineage["a"]["train_rows"] == 31
    # Without a train count: the largest split that needs no row twice, still 3:1.
    cfg = data_cfg(path=str(raw), sources=sources, split_counts=None)  # fractions 0.8/0.1/0.1
    report = prepare_data(cfg, tmp_path / "frac", None)
    n = {k: v["splits"]["train"] for k, v in report["sources"].items()}
    assert n["a"] == report["sources"]["a"]["splits"]["train"] and abs(n["a"] - 3 * n["b"]) <= 3
    assert abs(n["a"] / (n["a"] + n["b"]) - 0.75) * (n["a"] + n["b"]) <= 1
    assert report["sources"]["a"]["train_rows_repeated"] == 0


@pytest.mark.parametrize("total", [7, 10, 41, 999])
def test_apportion_is_within_one_row_of_each_share(total: int) -> None:
    weights = {"a": 3.0, "b": 1.0, "c": 2.5}
    got = apportion(total, weights)
    assert sum(got.values()) == total
    assert all(abs(got[k] - total * w / 6.5) < 1 for k, w in weights.items())


def test_renaming_or_reordering_files_changes_nothing(
    tmp_path: Path, data_cfg: Callable[..., DataCfg]
) -> None:
    a, b = generate(120, seed=21), generate(60, seed=22)

    def run(name: str, files: dict[str, list[dict[str, str]]], order: list[str]) -> Path:
        raw = tmp_path / name / "raw"
        for rel, rows in files.items():
            write_rows(raw / rel, rows)
        folder_a, file_b = sorted(p for p in raw.iterdir())
        specs = {"a": source(folder_a, weight=2), "b": source(file_b, weight=1)}
        cfg = data_cfg(path=str(raw), sources={k: specs[k] for k in order}, split_counts=None)
        prepare_data(cfg, tmp_path / name / "out", None)
        return tmp_path / name / "out"

    first = run("one", {"a/1.jsonl": a[:70], "a/2.jsonl": a[70:], "b.jsonl": b}, ["a", "b"])
    renamed = {"p/z.jsonl": a[:70], "p/m.jsonl": a[70:], "q.jsonl": b}  # z is read last now
    second = run("two", renamed, ["b", "a"])
    for name in (*SPLIT_FILES, SOURCES_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Rows reordered inside the files: other bytes (so other md5s), the same prepared data.
    shuffled = {"p/z.jsonl": a[70:][::-1], "p/m.jsonl": a[:70], "q.jsonl": b[::-1]}
    third = run("three", shuffled, ["a", "b"])
    for name in SPLIT_FILES:
        assert (first / name).read_bytes() == (third / name).read_bytes(), name


def test_one_source_is_prepared_as_before(tmp_path: Path, data_cfg: Callable[..., DataCfg]) -> None:
    path = write_rows(tmp_path / "raw" / "qa.jsonl", generate(150, seed=3))
    cfg = data_cfg(path=str(path), split_counts={"train": 100, "val": 20, "test": 20})
    report = prepare_data(cfg, tmp_path / "new", None)
    prepare(cfg, tmp_path / "old")
    for name in SPLIT_FILES:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
    assert report["sources"]["qa"]["splits"] == {"train": 100, "val": 20, "test": 20}


def test_one_source_interrupted_at_its_records_leaves_the_old_folder_whole(
    tmp_path: Path, data_cfg: Callable[..., DataCfg], monkeypatch: pytest.MonkeyPatch
) -> None:
    # sources.json and made_with.json (after hashing every raw file) are written into the new
    # folder before it replaces the old: an interrupt there must replace nothing.
    import lorapipe.mixing

    path = write_rows(tmp_path / "raw" / "qa.jsonl", generate(150, seed=3))
    out = tmp_path / "prepared"
    prepare_data(data_cfg(path=str(path), split_counts=None), out, None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lorapipe.mixing, "write_made_with", interrupted)
    counts = {"train": 100, "val": 20, "test": 20}
    with pytest.raises(KeyboardInterrupt):
        prepare_data(data_cfg(path=str(path), split_counts=counts), out, None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_replay_takes_its_share_of_the_train_split_only(
    tmp_path: Path, data_cfg: Callable[..., DataCfg]
) -> None:
    path = write_rows(tmp_path / "raw" / "qa.jsonl", generate(100, seed=4))
    refs = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ],
            "stopped": i != 0,  # the first was cut at max_new_tokens: never replayed
        }
        for i in range(6)
    ]
    replay = write_rows(tmp_path / "refs" / "train.jsonl", refs)
    counts = {"train": 40, "val": 10, "test": 10}
    cfg = data_cfg(path=str(path), split_counts=counts, replay=0.25)
    report = prepare_data(cfg, tmp_path / "out", replay)
    assert report["sources"]["replay"]["splits"] == {"train": 10, "val": 0, "test": 0}
    assert report["sources"]["replay"]["train_rows_repeated"] == 5  # 5 answers, 10 rows
    assert report["sources"]["qa"]["splits"]["train"] == 30
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    replayed = [r for r in rows if "What is" in str(r)]
    assert len(replayed) == 10 and "What is 0 plus 0?" not in str(replayed)
    for split in ("val", "test"):
        assert "What is" not in (tmp_path / "out" / f"{split}.jsonl").read_text()


def test_a_missing_or_empty_source_is_named_in_one_line(
    tmp_path: Path, data_cfg: Callable[..., DataCfg]
) -> None:
    raw = tmp_path / "raw"
    good = source(write_rows(raw / "a.jsonl", generate(40, seed=5)), weight=1)
    missing = {"a": good, "b": source(raw / "nope.jsonl", weight=1)}
    cfg = data_cfg(path=str(raw), sources=missing, split_counts=None)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tmp_path / "out", None)
    assert str(err.value) == f"data.sources.b: {raw / 'nope.jsonl'}: no such file or folder"
    bad = write_rows(raw / "bad.jsonl", [{"instruction": "", "response": "x"}] * 3)
    empty = {"a": good, "b": source(bad, weight=1)}
    cfg = data_cfg(
        path=str(raw), sources=empty, on_error="skip", max_reject_fraction=1.0, split_counts=None
    )
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tmp_path / "out", None)
    assert str(err.value) == f"data.sources.b: {bad}: no valid rows (read 3)"
    assert not (tmp_path / "out").exists()


def test_source_settings_are_checked_by_key(conf_data: dict[str, Any]) -> None:
    def problems(**data: Any) -> str:
        raw = compose(ROOT / "conf", [])
        raw["data"] = {**conf_data, "path": "data/raw", **data}
        with pytest.raises(ConfigError) as err:
            validate(raw)
        return str(err.value)

    message = problems(replay=1.0, sources={"both": source(Path("data/raw/a"), weight=1, rows=5)})
    assert "data.replay: Input should be less than 1" in message
    assert "data.sources.both: give weight (a share of the training split) or rows" in message
    message = problems(
        sources={
            "outside": source(Path("elsewhere/b.jsonl"), weight=1),
            "up": source(Path("data/raw/mix/../../outside.jsonl"), weight=1),
            "replay": source(Path("data/raw/c.jsonl"), weight=1),
        }
    )
    assert (
        "data.sources.outside: path elsewhere/b.jsonl is not inside data.path data/raw" in message
    )
    assert "data.sources.up: path data/raw/mix/../../outside.jsonl is not inside" in message
    assert "data.sources: 'replay' cannot name a source" in message
    # data.path alone is the source named by its stem: 'replay' would lose every row to replay
    message = problems(path="data/raw/r/replay.jsonl", replay=0.1)
    assert "data.path data/raw/r/replay.jsonl: a file or folder named 'replay'" in message


def run_prepare_stage(
    tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str], *overrides: str
) -> str:
    """The prepare stage run on `raw` with its outputs under tmp_path; what it printed."""
    from stages import prepare as prepare_stage

    paths = [f"paths.prepared={tmp_path / 'prepared'}", f"paths.reports={tmp_path / 'reports'}"]
    prepare_stage.run(validate(compose(ROOT / "conf", [f"data.path={raw}", *overrides, *paths])))
    return capsys.readouterr().out


def test_the_prepare_stage_says_how_many_training_rows_repeat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    write_rows(raw / "a.jsonl", generate(20, seed=7))
    out = run_prepare_stage(
        tmp_path,
        raw,
        capsys,
        f"data.sources={{a: {{path: {raw / 'a.jsonl'}, format: auto, fields: null, weight: 1, "
        "rows: null}}",
        "data.split_counts={train: 40, val: 2, test: 2}",
    )
    assert "prepare: source a: 24 of its 40 training rows repeat others" in out


def test_the_prepare_stage_says_how_many_rows_it_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = write_rows(tmp_path / "raw" / "qa.jsonl", generate(20, seed=7))
    with raw.open("a", encoding="utf-8") as f:
        f.write('{"instruction": "no answer"}\nnot json\n')
    out = run_prepare_stage(
        tmp_path,
        raw,
        capsys,
        "data.split_counts=null",
        "data.on_error=skip",
        "data.max_reject_fraction=0.5",
    )
    assert "prepare: 2 rows skipped" in out
    assert f"each named in {tmp_path / 'prepared' / 'rejects.jsonl'}" in out
    assert len((tmp_path / "prepared" / "rejects.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("train", [None, 60])
def test_the_prepare_stage_warns_when_a_small_source_shrinks_the_mix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], train: int | None
) -> None:
    """Weights 3:1 with no training size: the small source's rows fix the split's size and most
    of the big one's are left out, which the stage says (the report alone did before); with
    `split_counts.train` the size is the user's, and it says nothing."""
    raw = tmp_path / "raw"
    write_rows(raw / "big.jsonl", generate(100, seed=7))
    write_rows(raw / "small.jsonl", generate(10, seed=8))
    entry = "{{path: {}, format: auto, fields: null, weight: {}, rows: null}}"
    sources = (
        f"big: {entry.format(raw / 'big.jsonl', 3)}, small: {entry.format(raw / 'small.jsonl', 1)}"
    )
    counts = f"{{train: {train}, val: 2, test: 2}}" if train else "{val: 2, test: 2}"
    out = run_prepare_stage(
        tmp_path, raw, capsys, f"data.sources={{{sources}}}", "data.split_counts=null",
        f"data.split_counts={counts}",
    )  # fmt: skip
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    small, big = report["sources"]["small"], report["sources"]["big"]
    if train:
        assert "left out" not in out
        return
    assert small["train_rows_unused"] == 0 and big["train_rows_unused"] > 50
    assert big["splits"]["train"] == 3 * small["splits"]["train"]
    rows = big["train_rows_unused"] + big["splits"]["train"] + small["splits"]["train"]
    assert (
        f"prepare: warning: {big['train_rows_unused']} of {rows} training rows left out "
        f"(big {big['train_rows_unused']}): mixed by weight, the training split is as large as "
        "small allows with no row twice; raise its weight, lower the others, or set "
        "data.split_counts.train (reports/data.json: train_rows_unused)"
    ) in out
