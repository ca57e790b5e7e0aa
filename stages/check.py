"""Stage `check`: refuse bad values in params.yaml before DVC removes any stage's outputs.

DVC deletes a stage's outputs before it runs the stage's command, so a value that `train` refuses
(`dvc exp run -S lora.r=0`, a hand edit) would cost the workspace its adapter and train reports
before the error. This stage runs first whenever a params section changes (`base` depends on its
output and every other stage on `base`'s): the shell validates params.yaml as every stage's does
(lorapipe.cli), so a bad value stops `dvc repro` here, one line naming the key, with every output
as it was (this stage's own persists: DVC never removes it). Its output names the sections
checked, not their values: it stays the same under a new valid value, and only the stages that
read that value run again.

python -m stages.check
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import write_json

OUTPUT = "params_check.json"  # under paths.reports; dvc.yaml names it too (tests/test_pipeline.py)
NOT_CHECKED = {"paths", "composed_with"}  # where files go, and a record: not values a stage uses


def run(params: Params) -> None:
    sections = sorted(params.model_dump(exclude=NOT_CHECKED))
    write_json(Path(params.paths.reports) / OUTPUT, {"checked": sections})
    print(f"check: params.yaml is valid ({', '.join(sections)})")


main = stage(run)

if __name__ == "__main__":
    main()
