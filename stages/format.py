"""Stage `format`: apply the base tokenizer's chat template -> prompt/completion JSONL.

python -m stages.format format.system_prompt="You answer with a Python value only."
python -m stages.format format.train_on=last_assistant format.truncation=truncate_prompt
"""

from pathlib import Path

from lorapipe.chat import FormatError
from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.formatting import format_split, length_distribution, read_prepared
from lorapipe.io import atomic_dir, write_json, write_jsonl
from lorapipe.models import load_tokenizer, require_base
from lorapipe.provenance import format_record, read_made_with, write_made_with

SPLITS = ("train", "val", "test")


def run(params: Params) -> None:
    require_base(params.model, Path(params.paths.base))
    tokenizer = load_tokenizer(Path(params.paths.base))
    report, lengths = {}, {}
    seen: set[tuple[str, str]] = set()  # the training examples, as written
    with atomic_dir(Path(params.paths.formatted)) as out:
        for split in SPLITS:
            path = Path(params.paths.prepared) / f"{split}.jsonl"
            rows = read_prepared(path)
            try:
                kept, report[split], lengths[split] = format_split(
                    rows, tokenizer, params.format, params.train.max_length
                )
            except FormatError as e:  # the chat template's: the message names the row
                raise FormatError(f"{path}: {e}") from None
            write_jsonl(out / f"{split}.jsonl", kept)
            pairs = [(ex["prompt"], ex["completion"]) for ex in kept]
            if split == "train":
                seen.update(pairs)
            else:  # prepare splits rows apart; a conversation's turns can still meet across
                report[split]["examples_in_train"] = sum(pair in seen for pair in pairs)
        # The prepared data's record (its `data` params) goes on with this stage's own.
        made = read_made_with(Path(params.paths.prepared))
        write_made_with(out, {**made, **format_record(params)})
        if not report["train"]["examples_out"]:
            reasons = report["train"]["rejects_by_reason"]
            raise FormatError(f"format: no training example left: {reasons}{_hint(params)}")
    # Reports only after the formatted files are in place: a failed run leaves neither.
    reports = Path(params.paths.reports)
    write_json(reports / "format.json", report)
    with atomic_dir(reports / "format_lengths") as plots:
        for split, rows in length_distribution(lengths).items():
            write_json(plots / f"{split}.json", rows)
    for split in SPLITS:
        r = report[split]
        print(
            f"format: {split}: {r['examples_out']} of {r['examples']} examples kept, "
            f"{r['truncated']} over max_length, rejected {r['rejects_by_reason']}"
        )
        if r.get("examples_in_train"):
            print(
                f"format: warning: {split}: {r['examples_in_train']} examples are also training "
                "examples, prompt and completion (conversations sharing turns; "
                "format.train_on=last_assistant trains on each conversation's last turn only)"
            )


def _hint(params: Params) -> str:
    """What to change when length rejected every training example (only what is not set)."""
    if params.format.truncation == "truncate_prompt":
        return "; raise train.max_length, or shorten the completions"
    return "; raise train.max_length or set format.truncation=truncate_prompt"


main = stage(run)

if __name__ == "__main__":
    main()
