"""Stage `prepare`: validate data/raw, drop duplicates, split by content hash; with several
sources (`data.sources`) or replay (`data.replay`), mix the training split by weight.

python -m stages.prepare data.on_error=skip data.max_reject_fraction=0.01
python -m stages.prepare data=seed_qa             # the seed tutorial's 8 questions
python -m stages.prepare data.path=data/raw/qa.csv 'data.fields={q: instruction, a: response}' \\
    data.split_counts=null                         # your CSV, split 80/10/10 by content hash
dvc exp run -S data.replay=0.1                     # a tenth of the training rows: base answers
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
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
    if report.get("split_label_conflicts"):
        print(
            f"prepare: warning: {report['split_label_conflicts']} duplicate rows name another "
            f"split than their first copy, which decides ({params.data.split_column} column)"
        )
    if near:
        print(f"prepare: warning: {near} near-duplicate groups straddle splits (reports/data.json)")


main = stage(run)

if __name__ == "__main__":
    main()
