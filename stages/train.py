"""Stage `train`: LoRA (or QLoRA with quant=nf4) SFT on the formatted train split.

python -m stages.train lora.r=8 lora.alpha=16
python -m stages.train quant=nf4            # QLoRA: 4-bit NF4 base, fp32 compute on CPU
python -m stages.train lora=llama_all train.gradient_checkpointing=true

Interrupted? Run it again: it resumes from the last checkpoint in paths.checkpoints when the
params, data, base, code and library versions are unchanged.
"""

import json
from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import atomic_dir, write_json
from lorapipe.runtime import write_runtime


def run(params: Params) -> None:
    # Imported here, after the config is validated: torch and the training stack take ~10-25 s
    # to import on 2 busy cores, and a typo in params should be reported before that.
    from lorapipe.lineage import CARD_FILE, LINEAGE_FILE, build_lineage, model_card
    from lorapipe.models import require_base
    from lorapipe.provenance import formatted_record, require_made_with
    from lorapipe.training import RUNTIME_KEYS, process_rank, train_adapter

    paths = params.paths
    require_base(params.model, Path(paths.base))
    formatted = Path(paths.formatted)
    require_made_with(
        formatted,
        formatted_record(params),
        # format takes no data.* override (it reads data/prepared): each stage its own
        "`python -m stages.prepare` and `python -m stages.format`, each with the overrides it "
        "reads",
    )
    reports = Path(paths.reports)
    if process_rank()[0] != 0:
        # Another process of `accelerate launch -m stages.train`: it trains its share of each
        # batch and writes nothing; rank 0 writes the adapter, lineage and metrics.
        train_adapter(params, Path(paths.base), formatted, None, None)
        return
    # Curves go to a temporary folder too: the plots are a DVC output, never left half-written.
    with atomic_dir(Path(paths.adapter)) as out, atomic_dir(reports / "train") as curves:
        summary = train_adapter(params, Path(paths.base), formatted, out, curves)
        lineage = build_lineage(
            params,
            {split: formatted / f"{split}.jsonl" for split in ("train", "val")},
            Path(paths.base),
            summary,
            sources=_sources(Path(paths.prepared) / "sources.json"),
        )
        write_json(out / LINEAGE_FILE, lineage)
        (out / CARD_FILE).write_text(model_card(lineage), encoding="utf-8")  # replaces PEFT's
    # Numbers only, for `dvc metrics diff`; device, precision and gradient checkpointing are in
    # lineage.json. Seconds and memory go to reports/runtime/train.json (git, not DVC): they
    # differ on every run.
    metrics = {k: v for k, v in summary.items() if not isinstance(v, (str, bool))}
    write_json(reports / "train.json", {k: v for k, v in metrics.items() if k not in RUNTIME_KEYS})
    write_runtime(reports, "train", {k: v for k, v in metrics.items() if k in RUNTIME_KEYS})
    print(
        f"train: loss {summary['train_loss']:.4f} in {summary['train_seconds']} s "
        f"on {summary['device']} ({summary['precision']}) -> {paths.adapter}"
    )


def _sources(path: Path) -> dict | None:
    """Each data source's md5 and training rows, as prepare recorded them (None for data
    prepared elsewhere, without the file)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


main = stage(run)

if __name__ == "__main__":
    main()
