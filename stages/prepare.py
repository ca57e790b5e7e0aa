"""Stage `prepare`: validate data/raw, drop duplicates, split by content hash.

python -m stages.prepare data.on_error=skip data.max_reject_fraction=0.01
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
    )
    reports = Path(params.paths.reports)
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "data.json", report)
    print(f"prepare: {report['rows_read']} rows read, splits {report['splits']}")


main = stage(run)

if __name__ == "__main__":
    main()
