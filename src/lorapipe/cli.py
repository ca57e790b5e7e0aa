"""The shell every stage runs in: params in, validation, errors for people.

A stage module defines `run(params: Params) -> None` and ends with `main = stage(run)`.
`python -m stages.train` reads `params.yaml` exactly as DVC recorded it; with overrides
(`python -m stages.train quant=nf4 train.max_steps=1`, group choices, values, `+key=value`)
it runs on `conf/` composed with them on top of `params.yaml` (`lorapipe.params.compose_run`).
The sweep (`stages.sweep`, run with `-m`) is a Hydra multirun on `conf/`, for its launchers.
Any bad key or value: one line per problem, exit 2, no traceback.
"""

from __future__ import annotations

import _thread
import gc
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorapipe.config import ConfigError, Params, validate
from lorapipe.errors import PipelineError, exit_with
from lorapipe.params import (
    CONF_DIR,
    CONFIG_NAME,
    RECORD_KEY,
    assignable,
    base_overrides,
    check_hydra,
    check_reads,
    compose_run,
    load_params,
    override_key,
)
from lorapipe.runtime import leave_out_bitsandbytes, needs_bitsandbytes

# Hydra settings that keep a sweep from writing logs or `outputs/` into the project; given
# first, so a user's own `hydra.*` overrides still win.
HYDRA_DEFAULTS = [
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=stdout",
    "hydra/hydra_logging=none",
]


def is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def stage(
    run: Callable[[Any], Any],
    hydra_defaults: Sequence[str] = (),
    *,
    raw: bool = False,
    check: Callable[[list[str], list[str]], None] | None = None,
    keep_bitsandbytes: bool = False,
) -> Callable[[], None]:
    """Wrap `run` into the entry point of a stage, reporting errors without traces.

    `hydra_defaults` make the stage a Hydra multirun app (the sweep): overrides given after
    HYDRA_DEFAULTS and before the user's own (its output folders and summary callback). With
    `raw`, `run` gets the composed dict unvalidated and validates it itself (a sweep records one
    member's bad values and goes on). `check(base, overrides)` (a multirun's) raises
    PipelineError for overrides no member could run with, before the first member starts.

    A stage that is its process's program (`python -m stages.<name>`) and loads no quantised model
    leaves bitsandbytes out (`runtime.needs_bitsandbytes`), unless `keep_bitsandbytes`: the base
    stage's, which loads a source model before there is a pinned base to read.
    """
    module = run.__module__
    if module == "__main__":  # `python -m stages.train`: the real name is on the module spec
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else Path(sys.argv[0]).stem
    name = module.rsplit(".", 1)[-1]

    def main() -> None:
        exit_with(body)

    def body() -> int:
        # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so temporary folders are cleaned up;
        # either way the stage ends with one short line, no traceback.
        interrupt = Interrupt()
        signal.signal(signal.SIGTERM, interrupt)
        sys.unraisablehook = interrupt.unraisable
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (nohup)
            signal.signal(signal.SIGINT, interrupt)
        interrupted = False
        try:
            if hydra_defaults:
                _multirun(run, name, hydra_defaults, check)
            else:
                _single(run, module, raw, keep_bitsandbytes)
        except KeyboardInterrupt:
            interrupted = interrupt.caught = True
        if interrupted:
            # Outside the except block the traceback is gone, so the trainer and its progress
            # bar are freed now; collected, the bar prints its last line before ours, not after.
            gc.collect()
            print(f"\n{name}: interrupted; no output was replaced", file=sys.stderr)
            return 130
        return 0

    return main


class Interrupt:
    """The stage's SIGINT / SIGTERM handler: raises KeyboardInterrupt, and again every `every`
    seconds until the stage has caught one (`caught`). Python loses a KeyboardInterrupt raised
    while a `__del__` or a weakref callback runs (a progress bar being collected mid-training, an
    import's module lock released) and goes on, printing "Exception ignored" and a traceback
    through `sys.unraisablehook`; the stage would then run on. No library re-raises it, so this
    does: `unraisable`, installed as that hook, prints nothing and has it raised again at once;
    the timer alone would, should something replace the hook. Once caught, a signal is ignored:
    the stage is already on its way out with its one line (CI once saw the thread's re-raise,
    decided just before the catch, land after that line and end the stage as a SIGINT death)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.caught = False
        self.raised = False
        self.lost = threading.Event()
        self.previous_hook = sys.unraisablehook

    def __call__(self, signum: int, frame: Any) -> None:
        if self.caught:
            return
        self._insisting()
        raise KeyboardInterrupt

    def unraisable(self, report: Any) -> None:
        """`sys.unraisablehook`: a lost KeyboardInterrupt wakes `_insist`, which raises it again
        from its own thread (raised in here, it would be lost again); any other report goes to
        the hook there was before."""
        if isinstance(report.exc_value, KeyboardInterrupt):
            self._insisting()
            self.lost.set()
        else:
            self.previous_hook(report)

    def _insisting(self) -> None:
        if not self.raised:
            self.raised = True
            threading.Thread(target=self._insist, daemon=True).start()

    def _insist(self) -> None:
        while True:
            if self.lost.wait(self.every):
                self.lost.clear()
                time.sleep(0.05)  # the main thread leaves the hook first
            if self.caught:
                return
            _thread.interrupt_main(signal.SIGTERM)  # runs __call__ in the main thread


def _fail(name: str, message: str) -> None:
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _single(run: Callable[[Any], Any], module: str, raw: bool, keep_bitsandbytes: bool) -> None:
    name = module.rsplit(".", 1)[-1]
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(sys.modules["__main__"].__doc__ or f"python -m stages.{name} [key=value ...]")
        return
    flags = [a for a in args if not is_override(a)]
    if flags:
        hint = " (sweeps: python -m stages.sweep -m ...)" if "-m" in flags else ""
        _fail(name, f"unknown argument(s) {' '.join(flags)}: give overrides as key=value{hint}")
    root = Path.cwd()
    try:
        composed = compose_run(root, args) if args else load_params(root)
        params = composed if raw else validate(composed)
        if args:
            check_reads(root, name, composed)
    except ConfigError as exc:
        _fail(name, str(exc))
    if isinstance(params, Params) and not (keep_bitsandbytes or needs_bitsandbytes(params, root)):
        leave_out_bitsandbytes(module)
    try:
        run(params)
    except Exception as exc:
        if not isinstance(exc, PipelineError | FileNotFoundError):
            raise  # a bug: its traceback is what a report needs
        _fail(name, str(exc))


def _multirun(
    run: Callable[[Any], Any],
    name: str,
    hydra_defaults: Sequence[str],
    check: Callable[[list[str], list[str]], None] | None,
) -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    root = Path.cwd()
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):  # the module's usage, not Hydra's generic help
        print(sys.modules["__main__"].__doc__ or f"python -m stages.{name} -m [key=a,b ...]")
        return
    overrides = [a for a in args if is_override(a)]
    flags = [a for a in args if a not in overrides]
    if not flags and not any(o.startswith("hydra.mode=") for o in overrides):
        # Without -m Hydra runs one job, and an error raised in it comes with Hydra's traceback.
        example = " ".join(overrides) or "lora.r=4,8 lora.alpha=8,16"
        _fail(
            name, f"add -m: members run as a Hydra multirun (python -m stages.{name} -m {example})"
        )
    try:
        base = base_overrides(root, overrides, sweep=True)
        settings = [o for o in overrides if override_key(o).startswith("hydra")]
        check_hydra(root / CONF_DIR, [*HYDRA_DEFAULTS, *hydra_defaults, *settings])
        if check is not None:
            check(base, [o for o in overrides if o not in settings])
    except PipelineError as exc:
        _fail(name, str(exc))

    @hydra.main(config_path=str(root / CONF_DIR), config_name=CONFIG_NAME, version_base=None)
    def app(cfg: DictConfig) -> Any:
        composed = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(composed, dict)
        composed[RECORD_KEY] = list(base)  # the member's own overrides are added by `run`
        return run(composed)

    # Hydra's argparse takes the overrides as one positional run, so flags (`-m`, `--cfg job`)
    # and their values go first, then our defaults, then params.yaml's, then the user's.
    sys.argv = [sys.argv[0], *flags, *HYDRA_DEFAULTS, *hydra_defaults]
    if base:  # members' folders are named by their own overrides only
        keys = ",".join(override_key(o) for o in base)
        sys.argv.append(f"hydra.job.config.override_dirname.exclude_keys=[{keys}]")
    sys.argv += [*base, *assignable(load_params(root), overrides)]
    app()
