"""Compose `conf/` into `params.yaml`, and refuse to run on a `params.yaml` that is stale.

`params.yaml` is what DVC tracks and what every stage reads. It is made from `conf/` by Hydra:
by `dvc exp run -S key=value` (DVC's Hydra composition) or by this module's command, which
composes without running anything:

    python -m lorapipe.params                 # recompose from conf/
    python -m lorapipe.params lora.r=4 model=tinyllama

The overrides given here are recorded in `params.yaml` under `composed_with`, so the staleness
check can replay them: a stage refuses to run when `params.yaml` differs from what `conf/`
composes to with those overrides (someone edited `conf/` or `params.yaml` by hand and forgot to
recompose). Under `dvc exp run` DVC has just composed `params.yaml` itself, so the check is off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from lorapipe.errors import PipelineError

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONFIG_NAME = "config"


class StaleParamsError(PipelineError, RuntimeError):
    """`params.yaml` does not match what `conf/` composes to."""


def compose(conf_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Compose `conf_dir/config.yaml` with Hydra `overrides` into a plain, resolved dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    container = OmegaConf.to_container(cfg)
    assert isinstance(container, dict)
    container["composed_with"] = list(overrides)
    return container  # type: ignore[return-value]


def dump(params: dict[str, Any]) -> str:
    """YAML text for `params`, in the same layout DVC's Hydra composition writes."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(params))


def write_params(root: Path, overrides: list[str]) -> dict[str, Any]:
    """Compose `root/conf` with `overrides` and write `root/params.yaml` atomically."""
    params = compose(root / CONF_DIR, overrides)
    target = root / PARAMS_FILE
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(dump(params), encoding="utf-8")
    os.replace(tmp, target)
    return params


def load_params(root: Path) -> dict[str, Any]:
    """Read `root/params.yaml`; raises StaleParamsError when it is missing or not a mapping."""
    path = root / PARAMS_FILE
    if not path.exists():
        raise StaleParamsError(f"{path} not found: run `make params` to compose it from conf/")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise StaleParamsError(f"{path}: expected a mapping of config groups")
    return data


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where `a` and `b` differ, each with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a:
                out.append(f"{name}: missing from params.yaml (conf/ has {b[key]!r})")
            elif key not in b:
                out.append(f"{name}: in params.yaml but not in conf/")
            else:
                out.extend(_diff(a[key], b[key], name))
        return out
    return [] if a == b else [f"{prefix}: params.yaml has {a!r}, conf/ composes {b!r}"]


def check_fresh(root: Path) -> None:
    """Raise StaleParamsError unless `params.yaml` equals `conf/` composed with its overrides.

    Skipped inside `dvc exp run` (DVC sets DVC_EXP_NAME), where DVC has just composed the file.
    """
    if os.environ.get("DVC_EXP_NAME"):
        return
    params = load_params(root)
    overrides = params.get("composed_with") or []
    if not isinstance(overrides, list):
        raise StaleParamsError(f"{root / PARAMS_FILE}: composed_with must be a list of overrides")
    expected = compose(root / CONF_DIR, [str(o) for o in overrides])
    problems = _diff(params, expected)
    if problems:
        listed = "\n  ".join(problems[:20])
        raise StaleParamsError(
            f"params.yaml is stale against conf/:\n  {listed}\n"
            "Recompose it with `make params` (add overrides: "
            "`python -m lorapipe.params lora.r=4`), or change conf/ instead of params.yaml."
        )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        params = write_params(Path.cwd(), args)
    except Exception as exc:  # Hydra's own errors name the bad override or file
        print(f"error: cannot compose conf/: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {PARAMS_FILE} (overrides: {params['composed_with'] or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
