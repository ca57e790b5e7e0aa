"""Stage `references`: the base model's own greedy answers to the retain set, once per base.

dvc.yaml runs it once per part (`references@train`, `references@eval`), so editing one part of
`data/retain/` regenerates only that part's answers. `evaluate` scores the adapter against the
eval part's; `data.replay` mixes the train part, answers as responses, into training.

python -m stages.references            # both parts
python -m stages.references eval       # one part
"""

import sys
from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params, RetainPart
from lorapipe.io import write_json, write_jsonl
from lorapipe.models import load_base_model, load_tokenizer, require_base
from lorapipe.retain import PARTS, base_references, made_with, made_with_file, read_retain


def run(params: Params, parts: tuple[RetainPart, ...] = PARTS) -> None:
    base, cfg = Path(params.paths.base), params.retain
    pin = require_base(params.model, base)
    rows = {part: read_retain(Path(cfg.sets[part])) for part in parts}  # all checked first
    tokenizer = load_tokenizer(base)
    model = load_base_model(base, dtype="float32")
    for part in parts:
        refs = base_references(
            model,
            tokenizer,
            rows[part],
            system_prompt=params.format.system_prompt,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
        )
        write_jsonl(Path(params.paths.references) / f"{part}.jsonl", refs)
        # After the answers: a run cut short between the two leaves a record evaluate refuses.
        write_json(made_with_file(Path(params.paths.references), part), made_with(pin, params))
        unfinished = sum(not r["stopped"] for r in refs)
        print(
            f"references: {part}: {len(refs)} base answers, {unfinished} cut at "
            f"retain.max_new_tokens={cfg.max_new_tokens}"
        )


def main() -> None:
    """The stage, with the parts named first on the command line (`train`, `eval`) taken out."""
    parts = tuple(p for p in PARTS if p in sys.argv[1:]) or PARTS
    sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a not in PARTS)]

    def references(params: Params) -> None:
        run(params, parts)

    stage(references)()


if __name__ == "__main__":
    main()
