"""The shell every stage runs in: Hydra on `params.yaml`, validation, errors for people.

A stage module defines `run(params: Params) -> None` and ends with `main = stage(run)`.
`python -m stages.train lora.r=4` then works like any Hydra app (overrides, `-m` multirun),
while under DVC the stage reads exactly the `params.yaml` that `dvc.lock` records.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorapipe.config import validate
from lorapipe.errors import PipelineError
from lorapipe.params import PARAMS_FILE, StaleParamsError, check_fresh

# Hydra settings that keep a stage run from writing logs or `outputs/` into the project;
# given first, so a user's own `hydra.*` overrides still win.
HYDRA_DEFAULTS = [
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=stdout",
    "hydra/hydra_logging=none",
]


def _friendly(exc: BaseException) -> str | None:
    """The message to show for errors a person can act on, or None for real bugs."""
    if isinstance(exc, PipelineError | FileNotFoundError):
        return str(exc)
    return None


def stage(
    run: Callable[[Any], Any], hydra_defaults: Sequence[str] = (), *, raw: bool = False
) -> Callable[[], None]:
    """Wrap `run` into a Hydra entrypoint on `./params.yaml` that reports errors without traces.

    `hydra_defaults` are Hydra overrides given after HYDRA_DEFAULTS and before the user's own
    (the sweep's output folders and summary callback). With `raw`, `run` gets the composed dict
    unvalidated and validates it itself (a sweep records one member's bad values and goes on).
    """
    module = run.__module__
    if module == "__main__":  # `python -m stages.train`: the real name is on the module spec
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else Path(sys.argv[0]).stem
    name = module.rsplit(".", 1)[-1]

    def main() -> None:
        # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so temporary folders are cleaned up;
        # either way the stage ends with one short line, no traceback.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        interrupted = False
        try:
            _main()
        except KeyboardInterrupt:
            interrupted = True
        if interrupted:
            # Outside the except block the traceback is gone, so the trainer and its progress
            # bar are freed now; collected, the bar prints its last line before ours, not after.
            gc.collect()
            print(f"\n{name}: interrupted; no output was replaced", file=sys.stderr)
            sys.exit(130)

    def _main() -> None:
        import hydra
        from omegaconf import DictConfig, OmegaConf

        root = Path.cwd()
        try:
            if not (root / PARAMS_FILE).exists():
                raise StaleParamsError(
                    f"{root / PARAMS_FILE} not found: run stages from the project root "
                    "(where dvc.yaml is), after `make params`"
                )
            check_fresh(root)
        except StaleParamsError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            sys.exit(2)

        @hydra.main(config_path=str(root), config_name="params", version_base=None)
        def app(cfg: DictConfig) -> Any:
            try:
                composed = OmegaConf.to_container(cfg, resolve=True)
                assert isinstance(composed, dict)
                return run(composed if raw else validate(composed))  # type: ignore[arg-type]
            except Exception as exc:
                message = _friendly(exc)
                if message is None:
                    raise
                print(f"{name}: error: {message}", file=sys.stderr)
                sys.exit(2)

        # Hydra's argparse takes the overrides as one positional run, so flags (`-m`, `--cfg job`)
        # and their values go first, then our defaults, then the user's overrides (`key=value`,
        # `~key`), which thereby win.
        args = sys.argv[1:]
        overrides = [a for a in args if not a.startswith("-") and ("=" in a or a[:1] == "~")]
        flags = [a for a in args if a not in overrides]
        sys.argv = [sys.argv[0], *flags, *HYDRA_DEFAULTS, *hydra_defaults, *overrides]
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        app()

    return main
