"""Stage `prepare`: validate data/raw, drop duplicates, split by content hash; with several
sources (`data.sources`) or replay (`data.replay`), mix the training split by weight.

python -m stages.prepare data.on_error=skip data.max_reject_fraction=0.01
python -m stages.prepare data=seed_qa             # the seed tutorial's 8 questions
python -m stages.prepare data.path=data/raw/qa.csv 'data.fields={q: instruction, a: response}' \\
    data.split_counts=null                         # your CSV, split 80/10/10 by content hash
dvc exp run -S data.replay=0.1                     # a tenth of the training rows: base answers
"""

from pathlib import Path
from typing import Any

from lorapipe.cli import stage
from lorapipe.config import DataCfg, Params
from lorapipe.io import write_json
from lorapipe.mixing import prepare_data


def run(params: Params) -> None:
    references = Path(params.paths.references)
    if params.data.replay > 0:  # the answers replayed must be this base's, under this prompt
        from lorapipe.models import require_base  # imports torch: only when replaying
        from lorapipe.retain import require_references

        pin = require_base(params.model, Path(params.paths.base))
        require_references(references, "train", pin, params)
    replay = references / "train.jsonl"  # the references@train stage's
    report = prepare_data(params.data, Path(params.paths.prepared), replay)
    write_json(Path(params.paths.reports) / "data.json", report)
    near = report["near_duplicates_across_splits"]["groups"]
    print(f"prepare: {report['rows_read']} rows read, splits {report['splits']}")
    if report["rows_rejected"]:  # data.on_error=skip: each one in rejects.jsonl
        print(
            f"prepare: {report['rows_rejected']} rows skipped {report['rejects_by_reason']}, "
            f"each named in {Path(params.paths.prepared) / 'rejects.jsonl'}"
        )
    for name, source in report["sources"].items():
        print(f"prepare: source {name}: {source['splits']}")
        if source["train_rows_repeated"]:
            print(
                f"prepare: source {name}: {source['train_rows_repeated']} of its "
                f"{source['splits']['train']} training rows repeat others (too few rows left "
                "for its share; lower its weight or rows, or data.split_counts.train)"
            )
    left_out(params.data, report["sources"])
    if report.get("split_label_conflicts"):
        print(
            f"prepare: warning: {report['split_label_conflicts']} duplicate rows name another "
            f"split than their first copy, which decides ({params.data.split_column} column)"
        )
    if near:
        print(f"prepare: warning: {near} near-duplicate groups straddle splits (reports/data.json)")


def left_out(cfg: DataCfg, sources: dict[str, Any]) -> None:
    """Warn when sources mixed by weight leave a tenth or more of their training rows out:
    without `data.split_counts.train` the training split is the largest the weights allow with
    no row twice, so one small source shrinks it (weights 3:1 over pyqa's 3,000 rows and
    seed_qa's 8, fractions 0.8/0.1/0.1: 24 trained, 2,391 left out)."""
    if (cfg.split_counts or {}).get("train") is not None:
        return  # the size asked for: what it leaves out is by choice (docs/data.md)
    weighted = {n: s for n, s in sources.items() if s["weight"] is not None and s["rows"] is None}
    unused = {n: s["train_rows_unused"] for n, s in weighted.items()}
    left = sum(unused.values())
    candidates = left + sum(s["splits"]["train"] for s in weighted.values())
    if len(weighted) < 2 or left < 0.1 * candidates:
        return
    least = min(unused.values())
    limits = " and ".join(sorted(n for n, k in unused.items() if k == least))
    print(
        f"prepare: warning: {left} of {candidates} training rows left out ("
        + ", ".join(f"{n} {k}" for n, k in sorted(unused.items()) if k)
        + f"): mixed by weight, the training split is as large as {limits} allows with no row "
        "twice; raise its weight, lower the others, or set data.split_counts.train "
        "(reports/data.json: train_rows_unused)"
    )


main = stage(run)

if __name__ == "__main__":
    main()
