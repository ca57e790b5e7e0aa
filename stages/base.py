"""Stage `base`: materialise the base model into models/base (build, pin or copy it).

python -m stages.base                      # the tiny default, built from conf/model/tiny.yaml
dvc exp run -S model=tinyllama             # pin a hub model to its commit sha
"""

from pathlib import Path

from lorapipe.base_model import build_base
from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import atomic_dir


def run(params: Params) -> None:
    with atomic_dir(Path(params.paths.base)) as out:
        pin = build_base(params.model, out)
    print(f"base: {pin['kind']} model {pin['name']} -> {params.paths.base}")


main = stage(run)

if __name__ == "__main__":
    main()
