"""`params.yaml` and `conf/`: compose one from the other, and apply command-line overrides.

`params.yaml` is what DVC tracks and what every stage reads. It is made from `conf/` by Hydra:
by `dvc exp run -S key=value` (DVC's Hydra composition) or by this module's command, which
composes without running anything and records the overrides under `composed_with`:

    python -m lorapipe.params                   # recompose from conf/
    python -m lorapipe.params lora.r=4 quant=nf4
    python -m lorapipe.params --check           # bad values in params.yaml; what conf/ lacks

`params.yaml` as it stands is always a valid state, also after `dvc exp run -S` or
`dvc exp apply` changed it: a stage run without overrides reads it exactly. A stage run with
overrides (`python -m stages.train quant=nf4 train.max_steps=1`) composes `conf/` with the
recorded overrides, then the values `params.yaml` holds beyond them (written as overrides, so
nothing applied is lost), then the new overrides; values that a new override changes, or a group
it selects anew, take the new value.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lorapipe.config import RENAMED, ConfigError, validate
from lorapipe.errors import exit_with

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONFIG_NAME = "config"
RECORD_KEY = "composed_with"
# conf/ folders that are not groups of params.yaml (Hydra's own and accelerate's configs).
NOT_PARAMS = ("hydra", "accelerate")
DVC_FILE = "dvc.yaml"
# The params sections a stage compares with the record of an input it reads (a dvc.yaml dep):
# the base's pin (models.require_base), the formatted data's record (lorapipe.provenance), the
# adapter's lineage (lineage.require_trained_with). A stage reacts to their keys without
# computing with them. tests/test_dvc_params.py runs every stage to keep this in step.
CHECKED_THROUGH = {
    "${paths.base}": ("model",),
    "${paths.formatted}/made_with.json": ("data", "format", "train.max_length"),
    "${paths.adapter}": ("model", "data", "format", "lora", "quant", "train"),
}


class ParamsFileError(ConfigError):
    """`params.yaml` is missing or not a mapping of config groups."""


def compose(conf_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose `conf_dir/config.yaml` with Hydra `overrides` into a plain, resolved dict whose
    `composed_with` lists the overrides. Raises ConfigError with Hydra's reason on failure."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except yaml.YAMLError as exc:  # a syntax error in a conf/ file: Hydra passes it on
        raise ConfigError(yaml_problem(exc)) from None
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # group=null: ValueError
        reason = " ".join(str(exc).split())
        raise ConfigError(f"cannot compose {conf_dir}/ with {list(overrides)}: {reason}") from None
    container = OmegaConf.to_container(cfg)
    assert isinstance(container, dict)
    container[RECORD_KEY] = list(overrides)
    return container  # type: ignore[return-value]


def yaml_problem(exc: yaml.YAMLError, path: Path | None = None) -> str:
    """One line for a YAML syntax error: `file line N: the parser's problem`, with a hint."""
    mark = getattr(exc, "problem_mark", None)
    name = str(path) if path is not None else str(getattr(mark, "name", "a YAML file"))
    with contextlib.suppress(ValueError):  # outside the working directory: the full path
        name = str(Path(name).resolve().relative_to(Path.cwd().resolve()))
    where = f"{name} line {mark.line + 1}" if mark is not None else name
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        problem += f" ({context} started on line {start.line + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: {problem}; fix the YAML syntax there"


def dump(params: dict[str, Any]) -> str:
    """YAML text for `params`, in the same layout DVC's Hydra composition writes."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(params))


def write_params(root: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose `root/conf` with `overrides` and write `root/params.yaml` atomically, once the
    result is params every stage accepts (`config.validate`); raises ConfigError otherwise and
    leaves params.yaml as it was."""
    check_overrides(root / CONF_DIR, [], overrides)
    overrides = assignable(compose(root / CONF_DIR, []), overrides)  # as a stage run takes them
    params = compose(root / CONF_DIR, overrides)
    validate(params)
    target = root / PARAMS_FILE
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(dump(params), encoding="utf-8")
    os.replace(tmp, target)
    return params


def load_params(root: Path) -> dict[str, Any]:
    """Read `root/params.yaml`; raises ParamsFileError when it is missing or not a mapping."""
    path = root / PARAMS_FILE
    if not path.exists():
        raise ParamsFileError(
            f"{path} not found: run stages from the project root (where dvc.yaml is), after "
            "`make params` composed it from conf/"
        )
    from omegaconf import OmegaConf

    try:  # OmegaConf reads YAML 1.2 floats (1e-3) as DVC does; plain PyYAML reads a string
        data = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as exc:
        raise ParamsFileError(yaml_problem(exc, path)) from None
    except OSError:  # a scalar, not a mapping ("Invalid loaded object type")
        data = None
    if not isinstance(data, dict):
        raise ParamsFileError(f"{path}: expected a mapping of config groups")
    recorded = data.get(RECORD_KEY) or []
    if not isinstance(recorded, list):
        raise ParamsFileError(f"{path}: {RECORD_KEY} must be a list of overrides")
    return {str(key): value for key, value in data.items()}


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar (null, true, 1e-05, 'text', [a, b], {k: v})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def as_overrides(target: Any, source: Any, prefix: str = "") -> list[str]:
    """The overrides that turn the composed dict `source` into `target`: `++key=value` for a
    changed or added value, `~key` for a key `target` lacks (`composed_with` is not compared)."""
    if isinstance(target, dict) and isinstance(source, dict):
        out: list[str] = []
        for key in target:
            name = f"{prefix}.{key}" if prefix else str(key)
            if name == RECORD_KEY:
                continue
            if key not in source:
                out.append(f"++{name}={hydra_value(target[key])}")
            else:
                out.extend(as_overrides(target[key], source[key], name))
        out += [f"~{prefix}.{k}" if prefix else f"~{k}" for k in source if k not in target]
        return [o for o in out if o != f"~{RECORD_KEY}"]
    return [] if target == source else [f"++{prefix}={hydra_value(target)}"]


def override_key(override: str) -> str:
    """The dotted key (or group) an override names: `lora.r` for `++lora.r=4` or `~lora.r`."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].replace("/", ".")


def _changed_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        out: set[str] = set()
        for key in keys:
            name = f"{prefix}.{key}" if prefix else str(key)
            out |= _changed_keys(a.get(key), b.get(key), name) if key in a and key in b else {name}
        return out
    return set() if a == b else {prefix}


def _overlaps(key: str, keys: set[str]) -> bool:
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)


def groups(conf_dir: Path) -> list[str]:
    """The config groups of `conf_dir` (its folders holding params options)."""
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in NOT_PARAMS)


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [prefix] * bool(prefix) + [
        k for key, value in tree.items() for k in _leaf_keys(value, f"{prefix}.{key}".strip("."))
    ]


def _key_hint(key: str, composed: dict[str, Any]) -> str:
    name = key.rsplit(".", 1)[-1]
    if name in RENAMED:
        return f"use {RENAMED[name]}"
    parent = key.rpartition(".")[0]
    siblings = _get(composed, parent) if parent else composed
    close = [
        f"{parent}.{c}".strip(".")
        for c in difflib.get_close_matches(
            name, list(siblings) if isinstance(siblings, dict) else [], n=1
        )
    ] or difflib.get_close_matches(key, _leaf_keys(composed), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "check the spelling against conf/; a new key needs '+' (+key=value)"


def check_overrides(
    conf_dir: Path, base: Sequence[str], overrides: Sequence[str], *, sweep: bool = False
) -> None:
    """Raise ConfigError, one line per problem with a hint, when `overrides` name a key the
    composed config does not have (without '+'), a group option conf/ does not hold, or cannot
    be parsed. `base` are the overrides composed before them. `sweep` allows comma lists and
    hydra/... settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    known = groups(conf_dir)
    chosen = [
        o
        for o in _first_values(overrides)
        if override_key(o) in known and not o.endswith("=null")  # Hydra raises a bare ValueError
    ]
    try:  # keys are looked up in the groups as the overrides choose them
        composed = compose(conf_dir, [*base, *chosen])
    except ConfigError:
        composed = compose(conf_dir, base)  # a bad choice is reported below
    problems = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as exc:
            problems.append(f"{text}: not an override ({' '.join(str(exc).split())})")
            continue
        key = override.key_or_group
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        if key.startswith("hydra"):
            if not sweep:
                problems.append(f"{text}: hydra settings apply to sweeps (python -m stages.sweep)")
            continue
        if override.is_sweep_override() and not sweep:
            problems.append(
                f"{text}: a list of values is a sweep; use python -m stages.sweep -m {text}"
            )
            continue
        if key in known and not override.is_add():
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            problems += [
                f"{key}={value}: to drop a group choice use ~{key}"
                if value == "null"
                else f"{key}={value}: conf/{key}/ has no {value}.yaml (options: "
                f"{', '.join(options)})"
                for value in values
                if value not in options and not override.is_delete()
            ]
            continue
        if override.is_add() or override.is_force_add():
            continue  # a new key: the schema says whether the stage reads it
        node: Any = composed
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f"{key}: unknown key ({_key_hint(key, composed)})")
                break
            node = node[part]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("\n  ".join([f"{len(problems)} invalid overrides:", *problems]))


def check_hydra(conf_dir: Path, settings: Sequence[str]) -> None:
    """Raise ConfigError, one line, when Hydra cannot compose its own config with the sweep's
    hydra settings (`hydra/launcher=nope`), which Hydra reports in many lines once it runs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base=None):
            hydra_compose(CONFIG_NAME, overrides=list(settings), return_hydra_config=True)
    except MissingConfigException as exc:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = ", ".join(exc.options or [])
        raise ConfigError(f"{group}={option}: no such option (options: {options})") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None


def _dvc_stages(root: Path) -> dict[str, Any]:
    path = root / DVC_FILE
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages")
    return stages if isinstance(stages, dict) else {}


def stage_reads(root: Path, stage: str) -> tuple[list[str], list[str]] | None:
    """(the params keys dvc.yaml lists for `stage`, for every part of a foreach stage; the
    params sections it checks its inputs' records against), or None when `root` has no dvc.yaml
    with that stage."""
    entry = _dvc_stages(root).get(stage)
    if not isinstance(entry, dict):
        return None
    body, parts = entry.get("do", entry), [""]
    if isinstance(entry.get("foreach"), str):  # `${retain.sets}`: one run per key
        items = _get(load_params(root), entry["foreach"].strip("${}"))
        parts = list(items) if isinstance(items, dict) else parts
    keys = [k for k in body.get("params", []) if isinstance(k, str)]
    listed = sorted({k.replace("${key}", part) for k in keys for part in parts})
    every = {s for dep in body.get("deps", []) for s in CHECKED_THROUGH.get(dep, ())}
    # A key under a section listed or checked whole (train.max_length under train) is not named.
    checked = sorted(c for c in every if not any(c.startswith(f"{k}.") for k in {*listed, *every}))
    return listed, checked


def _listed(root: Path, stage: str) -> list[str]:
    reads = stage_reads(root, stage)
    return reads[0] if reads else []


def check_reads(root: Path, stage: str, composed: dict[str, Any]) -> None:
    """Raise ConfigError, one line per key, when the run's overrides change a key (against
    params.yaml) that `stage` neither reads nor checks its inputs against: the override would
    change nothing (`python -m stages.train eval.max_examples=5`), and the user expects it to.
    Outside a DVC project, or for a module that is not a dvc.yaml stage, nothing is checked."""
    reads = stage_reads(root, stage)
    if reads is None:
        return
    listed, checked = reads
    known = {*listed, *checked, "paths", RECORD_KEY}
    unread = sorted(
        k for k in _changed_keys(load_params(root), composed) if not _overlaps(k, known)
    )
    if not unread:
        return
    also = f" and checks {', '.join(checked)} against its inputs" if checked else ""
    # `check` lists every section to validate it (stages/check.py): it is no place to send one.
    listed_by = {s: set(_listed(root, s)) for s in _dvc_stages(root) if s != "check"}
    problems = []
    for key in unread:
        users = [s for s, keys in listed_by.items() if _overlaps(key, keys)]
        where = f"; give it to {', '.join(users)}" if users else ""
        problems.append(
            f"{key}: stage {stage} does not read it, so the override changes nothing ({stage} "
            f"reads {', '.join(listed)}{also}; dvc.yaml){where}"
        )
    if len(problems) == 1:
        raise ConfigError(problems[0])
    raise ConfigError("\n  ".join([f"{len(problems)} overrides change nothing here:", *problems]))


def compose_run(root: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The params a stage runs with given command-line `overrides`: `conf/` composed with the
    overrides `params.yaml` records, then its values beyond them, then `overrides` (see the
    module docstring). `composed_with` lists all three. Raises ConfigError."""
    recorded = [*base_overrides(root, overrides), *assignable(load_params(root), overrides)]
    return compose(root / CONF_DIR, recorded)


def assignable(params: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """`overrides` with `group.key={...}` on a mapping (eval.adapters, data.fields) written as
    `++group.key={...}`, which Hydra needs to add entries to a mapping (it merges them into
    it). A group choice (`quant=nf4`) has no dot and stays as it is."""
    out = []
    for text in overrides:
        key = text.split("=", 1)[0]
        if not text.startswith(("+", "~")) and "." in key and isinstance(_get(params, key), dict):
            text = f"++{text}"
        out.append(text)
    return out


def base_overrides(root: Path, overrides: Sequence[str], *, sweep: bool = False) -> list[str]:
    """The overrides composed before `overrides`: those `params.yaml` records, then those that
    give its values beyond them, less any on a key that `overrides` change."""
    params = load_params(root)
    overrides = assignable(params, overrides)
    conf_dir = root / CONF_DIR
    recorded = [str(o) for o in params.get(RECORD_KEY) or []]
    recorded_params = compose(conf_dir, recorded)
    applied = as_overrides(params, recorded_params)
    check_overrides(conf_dir, [*recorded, *applied], overrides, sweep=sweep)
    # A group chosen anew takes all of its values; otherwise what the overrides change.
    known = groups(conf_dir)
    touched = {override_key(o) for o in overrides if override_key(o) in known}
    for variant in _variants(overrides) if overrides else []:
        touched |= _changed_keys(recorded_params, compose(conf_dir, [*recorded, *variant]))
    return [*recorded, *(o for o in applied if not _overlaps(override_key(o), touched))]


def _sweep_values(text: str) -> list[str] | None:
    """The values of a sweep override (`lora.r=4,8`, `key=a,[b]`), or None for a single value;
    read with Hydra's own override parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except HydraException:
        return None  # check_overrides reports it
    if not override.is_sweep_override():
        return None
    return [str(v) for v in override.sweep_string_iterator()]


def _variants(overrides: Sequence[str]) -> list[list[str]]:
    """Each single choice of a sweep's lists, one override at a time (the rest at their first
    value), so every key any member changes is found."""
    first = _first_values(overrides)
    out = [first]
    for i, text in enumerate(overrides):
        values = _sweep_values(text)
        key = text.split("=", 1)[0]
        out += [[*first[:i], f"{key}={v}", *first[i + 1 :]] for v in (values or [])[1:]]
    return out


def _first_values(overrides: Sequence[str]) -> list[str]:
    """`overrides` without hydra settings, each sweep at its first value."""
    out = []
    for text in overrides:
        if text.startswith("hydra"):
            continue
        values = _sweep_values(text)
        out.append(f"{text.split('=', 1)[0]}={values[0]}" if values else text)
    return out


def describe_drift(root: Path) -> list[str]:
    """What `params.yaml` sets beyond `conf/` composed with its recorded overrides, one line per
    key with both values; [] when they agree."""
    params = load_params(root)
    recorded = [str(o) for o in params.get(RECORD_KEY) or []]
    composed = compose(root / CONF_DIR, recorded)
    lines = []
    for key in sorted(_changed_keys(params, composed) - {RECORD_KEY}):
        mine, theirs = _get(params, key), _get(composed, key)
        lines.append(f"{key}: params.yaml has {mine!r}, conf/ composes {theirs!r}")
    return lines


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "(absent)"
        tree = tree[part]
    return tree


def exp_run_note(recorded: Sequence[str]) -> str:
    """What `dvc exp run -S` does with the overrides params.yaml records (drops them)."""
    return (
        f"note: `dvc exp run -S` composes conf/ with its -S values only, so it drops "
        f"{' '.join(recorded)}: keep lasting values in conf/, or pass them again with -S"
    )


def check(root: Path) -> int:
    """`--check`: ConfigError for values a stage would refuse; 1 when params.yaml sets values
    beyond conf/ (printed), else 0. Notes the recorded overrides an experiment would drop."""
    recorded = [str(o) for o in validate(load_params(root)).composed_with]
    drift = describe_drift(root)
    if not drift:
        print(f"{PARAMS_FILE} is what conf/ composes (with its recorded overrides)")
    else:
        print(
            f"{PARAMS_FILE} sets values beyond conf/ (from dvc exp run -S, dvc exp apply or "
            "a hand edit); stages use them as they stand:\n  " + "\n  ".join(drift) + "\n"
            "To keep one in conf/, write it into the group's file under conf/; "
            "`make params` recomposes params.yaml from conf/ and drops the others."
        )
    if recorded:
        print(exp_run_note(recorded))
    return 1 if drift else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        if "--check" in args:
            if args != ["--check"]:
                raise ConfigError(
                    "--check takes no overrides: it checks params.yaml as it stands (run "
                    "`python -m lorapipe.params --check` alone)"
                )
            return check(Path.cwd())
        params = write_params(Path.cwd(), args)
    except ConfigError as exc:
        print(f"params: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {PARAMS_FILE} (overrides: {params[RECORD_KEY] or 'none'})")
    if params[RECORD_KEY]:
        print(exp_run_note(params[RECORD_KEY]))
    return 0


if __name__ == "__main__":
    exit_with(main)
