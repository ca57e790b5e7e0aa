"""Stage `prepare`: validate data/raw, drop duplicates, split by content hash.

python -m stages.prepare data.on_error=skip data.max_reject_fraction=0.01
python -m stages.prepare data.path=data/raw/qa.csv 'data.fields={q: instruction, a: response}'
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import write_json
from lorapipe.records import prepare


def run(params: Params) -> None:
    cfg = params.data
    report = prepare(
        Path(cfg.path),
        Path(params.paths.prepared),
        fractions=dict(cfg.splits),
        on_error=cfg.on_error,
        max_reject_fraction=cfg.max_reject_fraction,
        max_chars=cfg.max_chars,
        fmt=cfg.format,
        fields=dict(cfg.fields or {}),
        split_counts=dict(cfg.split_counts) if cfg.split_counts is not None else None,
        split_column=cfg.split_column,
    )
    write_json(Path(params.paths.reports) / "data.json", report)
    near = report["near_duplicates_across_splits"]["groups"]
    print(f"prepare: {report['rows_read']} rows read, splits {report['splits']}")
    if near:
        print(f"prepare: warning: {near} near-duplicate groups straddle splits (reports/data.json)")


main = stage(run)

if __name__ == "__main__":
    main()
