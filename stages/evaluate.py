"""Stage `evaluate`: base model vs adapter on the test split -> ROUGE and exact match, each
model's loss on the validation split, the adapter's answers to the retain set against the
base's own (what fine-tuning changed), and the report (`report.md`, `report.html`).

python -m stages.evaluate eval.max_examples=50 eval.batch_size=16
python -m stages.evaluate 'eval.adapters={r4: "sweeps/x/lora.r=4/adapter"}'   # more adapters
"""

import sys
from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import RETAIN, Params
from lorapipe.io import json_text, jsonl_text, read_jsonl, write_texts
from lorapipe.lineage import (
    LINEAGE_FILE,
    require_adapter,
    require_trained_on,
    require_trained_with,
)
from lorapipe.models import require_base
from lorapipe.provenance import formatted_record, require_made_with
from lorapipe.report import report_texts
from lorapipe.retain import require_references

HOLDS = "adapter_config.json and adapter_model.safetensors"


def run(params: Params) -> None:
    # Imported here, after the config is validated: torch takes seconds to import on 2 busy
    # cores, and a typo in params should be reported before that.
    from lorapipe.evaluation import evaluate_models

    pin = require_base(params.model, Path(params.paths.base))
    extra = {name: Path(folder) for name, folder in params.eval.adapters.items()}
    # Every adapter's files, before any weights load: a bad extra one would otherwise stop the
    # stage after the base and the pipeline's adapter had generated every answer.
    require_adapter(Path(params.paths.adapter))
    for name, folder in extra.items():
        key = f"eval.adapters.{name}"
        require_adapter(
            folder, key, f"point {key} at an adapter folder as PEFT saves one ({HOLDS})"
        )
        if not (folder / LINEAGE_FILE).is_file():  # made elsewhere: its base is not recorded
            print(
                f"evaluate: note: {key}: {folder} has no {LINEAGE_FILE}, so it is not checked "
                f"against {params.paths.base}; its scores assume it was trained on this base",
                file=sys.stderr,
            )
    for folder in [Path(params.paths.adapter), *extra.values()]:
        require_trained_on(folder, Path(params.paths.base))
    # The adapter is the one these params describe (the others are compared as they are), and
    # the test and validation examples were formatted with them.
    require_trained_with(Path(params.paths.adapter), params)
    formatted = Path(params.paths.formatted)
    require_made_with(
        formatted,
        formatted_record(params),
        # format takes no data.* override (it reads data/prepared): each stage its own
        "`python -m stages.prepare` and `python -m stages.format`, each with the overrides it "
        "reads",
    )
    examples = read_jsonl(formatted / "test.jsonl")
    val_examples = read_jsonl(formatted / "val.jsonl")
    references = Path(params.paths.references)
    require_references(references, "eval", pin, params)
    retain = read_jsonl(references / "eval.jsonl")
    metrics, predictions, retain_rows = evaluate_models(
        params.eval,
        Path(params.paths.base),
        Path(params.paths.adapter),
        examples,
        val_examples,
        extra_adapters=extra,
        retain=(retain, params.retain.max_new_tokens),
    )
    reports = Path(params.paths.reports)
    # Everything is rendered before anything is written, then written as one set: a run killed
    # while the HTML renders leaves the last run's files, not new answers beside an old report.
    write_texts(
        {
            reports / "predictions.jsonl": jsonl_text(predictions),
            reports / "retain.jsonl": jsonl_text(retain_rows),
            reports / "metrics.json": json_text(metrics),
            **report_texts(reports, metrics, predictions, retain_rows),
        }
    )
    for model, scores in metrics.items():
        if isinstance(scores, dict) and model != RETAIN:
            loss = f", val_loss {scores['val_loss']:.4f}" if "val_loss" in scores else ""
            kept = metrics[RETAIN][model]
            print(
                f"evaluate: {model}: exact_match {scores['exact_match']:.3f}, "
                f"rougeL {scores['rougeL']:.3f}{loss}, retain rougeL {kept['rougeL']:.3f} "
                f"(identical {kept['identical']:.3f})"
            )
    print(f"evaluate: report in {reports / 'report.html'}")


main = stage(run)

if __name__ == "__main__":
    main()
