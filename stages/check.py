"""Stage `check`: refuse bad values in params.yaml before DVC removes any stage's outputs.

DVC deletes a stage's outputs before it runs the stage's command, so a value that `train` refuses
(`dvc exp run -S lora.r=0`, a hand edit) would cost the workspace its adapter and train reports
before the error. This stage runs first whenever a params section changes (`base` depends on its
output and every other stage on `base`'s): the shell validates params.yaml as every stage's does
(lorapipe.cli), so a bad value stops `dvc repro` here, one line naming the key, with every output
as it was (this stage's own persists: DVC never removes it). Its output names the sections
checked, not their values: it stays the same under a new valid value, and only the stages that
read that value run again.

It also refuses what no params value alone shows but the base it names does (`quant.mode` on a
base saved quantised), when the base stage will not rebuild that base (a `kind: local` folder's
is refused by the validation itself, from the folder).

python -m stages.check
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import write_json
from lorapipe.models import MADE_WITH, PIN_FILE, read_pin, refuse_quant_on_saved_quantised
from lorapipe.provenance import sections

OUTPUT = "params_check.json"  # under paths.reports; dvc.yaml names it too (tests/test_pipeline.py)
NOT_CHECKED = {"paths", "composed_with"}  # where files go, and a record: not values a stage uses


def run(params: Params) -> None:
    base = Path(params.paths.base)
    # A value refused against the base itself, when the base stage will not change it (built
    # from these `model` params already): `quant.mode` on a base saved quantised. Only its
    # small files are read.
    built = (base / PIN_FILE).is_file() and read_pin(base).get(MADE_WITH)
    if built == sections(model=params.model):
        refuse_quant_on_saved_quantised(base, params.quant)
    checked = sorted(params.model_dump(exclude=NOT_CHECKED))
    write_json(Path(params.paths.reports) / OUTPUT, {"checked": checked})
    print(f"check: params.yaml is valid ({', '.join(checked)})")


main = stage(run)

if __name__ == "__main__":
    main()
