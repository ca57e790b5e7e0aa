"""Stage `format`: apply the base tokenizer's chat template -> prompt/completion JSONL.

python -m stages.format format.system_prompt="You answer with a Python value only."
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.formatting import format_rows, mask_audit, split_report
from lorapipe.io import atomic_dir, read_jsonl, write_json, write_jsonl
from lorapipe.models import load_tokenizer

SPLITS = ("train", "val", "test")


def run(params: Params) -> None:
    tokenizer = load_tokenizer(Path(params.paths.base))
    report = {}
    with atomic_dir(Path(params.paths.formatted)) as out:
        for split in SPLITS:
            rows = read_jsonl(Path(params.paths.prepared) / f"{split}.jsonl")
            examples = format_rows(rows, tokenizer, params.format.system_prompt)
            audits = [mask_audit(ex, tokenizer, params.train.max_length) for ex in examples]
            # An example with nothing supervised would train on nothing: leave it out, counted.
            kept = [ex for ex, a in zip(examples, audits, strict=True) if a["supervised_tokens"]]
            write_jsonl(out / f"{split}.jsonl", kept)
            report[split] = split_report(audits)
            report[split]["dropped_no_supervised_tokens"] = len(examples) - len(kept)
    write_json(Path(params.paths.reports) / "format.json", report)
    for split in SPLITS:
        r = report[split]
        print(f"format: {split}: {r['examples']} examples, {r.get('truncated', 0)} truncated")


main = stage(run)

if __name__ == "__main__":
    main()
