"""Several data sources, mixed by weight into one training split; replay of the retain set.

`data.path` alone is one source, prepared exactly as `lorapipe.records.prepare` always has.
`data.sources` names several, each with its own path, format, field mapping and either a
`weight` (its share of the training split, relative to the other weights) or a fixed number of
`rows`; `data.replay` adds the retain set's train part, the base model's own answers as
responses (the `references` stage), as that share of the training split.

When mixing, validation and test come from all sources together, split as `data.splits`,
`data.split_counts` or `data.split_column` say; the training split is then drawn from each
source's remaining rows: the training split's size (`split_counts.train`, or else the largest
that needs no row twice) is divided by the weights with the largest-remainder rule (so each
source is within one row of its exact share), and each source gives its rows in the fixed
pseudo-random order of their content hashes (the order `split_by_counts` ranks by), whole
passes again when it has fewer rows than its share. Every split is written in that content
order too, so the names and order of files and sources change nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapipe.config import DataCfg
from lorapipe.io import atomic_dir, read_jsonl, write_json, write_jsonl
from lorapipe.provenance import sections, write_made_with
from lorapipe.records import (
    SPLITS,
    Record,
    check_rejects,
    check_row,
    dedupe,
    near_duplicates,
    prepare,
    read_records,
    split_by_column,
    split_by_counts,
    split_records,
)
from lorapipe.sources import DataError, Reject, data_files

REPLAY = "replay"  # the source name of the retain set's replayed answers
SOURCES_FILE = "sources.json"  # in data/prepared: each source's md5 and training rows (lineage)


@dataclass
class Source:
    name: str
    path: Path
    weight: float | None  # share of the training split, relative to the other weights
    rows: int | None  # or a fixed number of training rows
    records: list[Record] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    md5: str = ""


def source_md5(path: Path) -> str:
    """md5 of a data file's bytes; for a folder, md5 of its data files' md5s, sorted, so
    renaming or moving a file inside it changes nothing."""

    def md5(file: Path) -> str:
        return hashlib.md5(file.read_bytes()).hexdigest()

    if path.is_file():
        return md5(path)
    digests = sorted(md5(f) for f in data_files(path))
    return hashlib.md5("\n".join(digests).encode()).hexdigest()


def position(record: Record) -> int:
    """The record's place in the fixed pseudo-random content order (higher first)."""
    return int(record.key[:15], 16)


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` rows divided in proportion to `weights` by the largest-remainder rule: each name
    gets the floor or the ceiling of its exact share; ties go to the earlier name, sorted."""
    whole = math.fsum(weights.values())
    exact = {name: total * w / whole for name, w in weights.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def draw(records: Sequence[Record], n: int) -> list[Record]:
    """`n` records in content order, from the top; again from the top when `n` > len."""
    ranked = sorted(records, key=position, reverse=True)
    passes, rest = divmod(n, len(ranked)) if ranked else (0, 0)
    return ranked * passes + ranked[:rest]


def read_source(source: Source, cfg: DataCfg, fmt: Any, fields: Any) -> Source:
    """`source` with its records, rejects and md5; DataError naming the source when its path is
    missing, a file cannot be read, its rows fail `data.on_error`, or none is valid."""
    where = f"data.sources.{source.name}" if cfg.sources else "data.path"
    try:
        source.md5 = source_md5(source.path)
        source.records, source.rejects = read_records(
            source.path,
            max_chars=cfg.max_chars,
            fmt=fmt,
            fields=fields,
            split_column=cfg.split_column,
        )
        rows_read = len(source.records) + len(source.rejects)
        check_rejects(source.path, rows_read, source.rejects, cfg.on_error, cfg.max_reject_fraction)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if not source.records:
        raise DataError(f"{where}: {source.path}: no valid rows (read {rows_read})")
    return source


def read_replay(path: Path, max_chars: int) -> Source:
    """The references stage's train part as a source: each conversation ending with the base's
    answer; answers cut at max_new_tokens (not `stopped`) or empty are not replayed."""
    source = Source(REPLAY, path, weight=None, rows=None, md5=source_md5(path))
    for i, row in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{i}"
        if not row.get("stopped"):
            source.rejects.append(Reject(where, None, "answer cut at max_new_tokens"))
            continue
        result = check_row({"messages": row["messages"]}, where, "messages", max_chars)
        if isinstance(result, Record):
            source.records.append(result)
        else:
            source.rejects.append(result)
    if not source.records:
        raise DataError(f"data.replay: {path}: no base answer to replay (all cut or empty)")
    return source


def sources_of(cfg: DataCfg) -> list[Source]:
    """The configured sources, read, sorted by name (so their order in the config is moot)."""
    if not cfg.sources:  # data.path, mixed with replay
        source = Source(Path(cfg.path).stem, Path(cfg.path), weight=1.0, rows=None)
        return [read_source(source, cfg, cfg.format, cfg.fields)]
    out = []
    for name in sorted(cfg.sources):
        s = cfg.sources[name]
        source = Source(name, Path(s.path), weight=s.weight, rows=s.rows)
        out.append(read_source(source, cfg, s.format, s.fields))
    return out


def train_quotas(
    pools: Mapping[str, Sequence[Record]],
    sources: Sequence[Source],
    total: int | None,
    replay: float,
) -> dict[str, int]:
    """Training rows per source (and REPLAY when `replay` > 0): see the module docstring."""
    fixed = {s.name: s.rows for s in sources if s.rows is not None}
    weights = {s.name: s.weight for s in sources if s.weight is not None}
    for name in sorted({*fixed, *weights}):
        if not pools[name]:
            raise DataError(f"data.sources.{name}: no rows left for the training split")
    if total is not None:
        n_replay = round(replay * total)
        rest = total - n_replay - sum(fixed.values())
        if rest < 0 or (rest > 0 and not weights):
            raise DataError(
                f"data.split_counts.train is {total}, but the sources' fixed rows "
                f"({sum(fixed.values())}) and replay ({n_replay}) add up to "
                f"{total - rest}; make them agree"
            )
    else:
        whole = math.fsum(weights.values())
        rest = min((math.floor(len(pools[n]) * whole / w) for n, w in weights.items()), default=0)
        n_replay = round(replay / (1 - replay) * (rest + sum(fixed.values())))
    quotas = {**fixed, **(apportion(rest, weights) if weights else {})}
    return {**quotas, **({REPLAY: n_replay} if replay > 0 else {})}


def _split(cfg: DataCfg, unique: list[Record]) -> tuple[dict[str, list[Record]], str]:
    """Validation and test as configured; every other row a training candidate."""
    if cfg.split_column is not None:
        return split_by_column(unique), f"column {cfg.split_column}"
    if cfg.split_counts is not None:
        counts: dict[str, int] = {k: v for k, v in cfg.split_counts.items() if k != "train"}
        return split_by_counts(unique, counts), "counts"
    return split_records(unique, dict(cfg.splits.items())), "content hash"


def mix(cfg: DataCfg, sources: list[Source]) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """The three splits, mixed, and the report's per-source entries (see the module docstring)."""
    owner: dict[str, str] = {}
    for source in sources:  # a row in two sources belongs to the first by name
        for record in source.records:
            owner.setdefault(record.key, source.name)
    task = [s for s in sources if s.name != REPLAY]
    unique, _ = dedupe(r for s in task for r in s.records)
    splits, split_by = _split(cfg, unique)
    pools = {s.name: [r for r in splits["train"] if owner[r.key] == s.name] for s in task}
    replay = next((s for s in sources if s.name == REPLAY), None)
    if replay is not None:
        pools[REPLAY], _ = dedupe(replay.records)
    total = cfg.split_counts.get("train") if cfg.split_counts is not None else None
    quotas = train_quotas(pools, task, total, cfg.replay)
    drawn = {name: draw(pools[name], n) for name, n in quotas.items()}
    splits["train"] = [r for name in sorted(drawn) for r in drawn[name]]
    for name in SPLITS:  # content order: file and source names and order change nothing
        splits[name] = sorted(splits[name], key=position, reverse=True)
    held_out = {s: Counter(owner[r.key] for r in splits[s]) for s in ("val", "test")}
    report = {
        source.name: {
            "train": quotas.get(source.name, 0),
            "val": held_out["val"][source.name] if source.name != REPLAY else 0,
            "test": held_out["test"][source.name] if source.name != REPLAY else 0,
        }
        for source in sources
    }
    entries = {s.name: _entry(s, report[s.name], pools[s.name]) for s in sources}
    return splits, {"sources": entries, "split_by": split_by}


def _entry(source: Source, splits: Mapping[str, int], pool: Sequence[Record]) -> dict[str, Any]:
    return {
        "path": str(source.path),
        "md5": source.md5,
        "weight": source.weight,
        "rows": source.rows,
        "rows_read": len(source.records) + len(source.rejects),
        "rows_rejected": len(source.rejects),
        "splits": dict(splits),
        "train_rows_repeated": max(0, splits["train"] - len(pool)),
        "train_rows_unused": max(0, len(pool) - splits["train"]),
    }


def prepare_data(cfg: DataCfg, out_dir: Path, replay_file: Path | None) -> dict[str, Any]:
    """Prepare the configured sources into `out_dir`, as `lorapipe.records.prepare` does for one
    (whose output it keeps, byte for byte, when `data.path` is the only source and nothing is
    replayed), plus `sources.json`: each source's md5 and training rows, for lineage, and
    `made_with.json`: the `data` params (`lorapipe.provenance`).

    Returns the data report: `records.prepare`'s, with `sources` ({name: {path, md5, weight,
    rows, rows_read, rows_rejected, splits: {train, val, test}, train_rows_repeated,
    train_rows_unused}}).
    `replay_file` (the references stage's train part) is read only when `data.replay` > 0.
    """
    if not cfg.sources and cfg.replay == 0:
        return _prepare_one(cfg, out_dir)
    sources = sources_of(cfg)
    if cfg.replay > 0:
        if replay_file is None:
            raise DataError("data.replay is set, but there are no retain answers to replay")
        sources.append(read_replay(replay_file, cfg.max_chars))
    splits, extra = mix(cfg, sources)
    rejects = [r for s in sources for r in s.rejects]
    with atomic_dir(out_dir) as tmp:
        for name, split in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", (r.to_row() for r in split))
        write_jsonl(tmp / "rejects.jsonl", (_reject_row(r) for r in rejects))
        write_json(tmp / SOURCES_FILE, _lineage(extra["sources"]))
        write_made_with(tmp, sections(data=cfg))
    valid = [r for s in sources for r in s.records]
    distinct = {r.key for r in valid}
    used = {r.key for split in splits.values() for r in split}
    return {
        "rows_read": len(valid) + len(rejects),
        "rows_rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r.reason for r in rejects).items())),
        "duplicates_removed": len(valid) - len(distinct),
        "near_duplicates_across_splits": near_duplicates(splits),
        "splits": {name: len(split) for name, split in splits.items()},
        "rows_unused": len(distinct - used),
        **extra,
    }


def _prepare_one(cfg: DataCfg, out_dir: Path) -> dict[str, Any]:
    """`data.path` alone, nothing replayed: `records.prepare`, its errors and output unchanged,
    plus the one source's entry and `sources.json`, written into the new folder before it
    replaces `out_dir` (an interrupted run leaves the old folder whole)."""
    path = Path(cfg.path)

    def records_of(folder: Path, report: dict[str, Any]) -> None:
        report["sources"] = {
            path.stem: {
                "path": str(path),
                "md5": source_md5(path),
                "weight": 1.0,
                "rows": None,
                "rows_read": report["rows_read"],
                "rows_rejected": report["rows_rejected"],
                "splits": {k: report["splits"][k] for k in SPLITS},
                "train_rows_repeated": 0,
                "train_rows_unused": report["rows_unused"],
            }
        }
        write_json(folder / SOURCES_FILE, _lineage(report["sources"]))
        write_made_with(folder, sections(data=cfg))

    return prepare(cfg, out_dir, also=records_of)


def _reject_row(r: Reject) -> dict[str, Any]:
    return {"source": r.source, "field": r.field, "reason": r.reason, "detail": r.detail}


def _lineage(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What lineage records of each source: its md5 and training rows (no path: renaming a file
    changes nothing)."""
    return {
        name: {"md5": e["md5"], "train_rows": e["splits"]["train"]} for name, e in entries.items()
    }
