"""Stage `base`: materialise the base model into models/base (convert, build, copy or pin it).

python -m stages.base                           # the default: SmolLM2-135M-Instruct, from GGUF
python -m stages.base model=tiny model.seed=1   # the tiny random Llama the tests use, reseeded
dvc exp run -S model=tinyllama                  # pin a hub model to its commit sha
"""

from pathlib import Path

from lorapipe.cli import stage
from lorapipe.config import Params
from lorapipe.io import atomic_dir


def run(params: Params) -> None:
    # Imported here, after the config is validated: torch takes seconds to import on 2 busy
    # cores, and a typo in params should be reported before that.
    from lorapipe.base_model import build_base

    with atomic_dir(Path(params.paths.base)) as out:
        pin = build_base(params.model, out)
    print(f"base: {pin['kind']} model {pin['name']} -> {params.paths.base}")


# A source model saved quantised loads with bitsandbytes, and there is no pinned base yet to say so.
main = stage(run, keep_bitsandbytes=True)

if __name__ == "__main__":
    main()
