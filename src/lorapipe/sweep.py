"""Hyperparameter sweeps: one member per Hydra multirun job, then a ranked summary.

`python -m stages.sweep -m lora.r=4,8 lora.alpha=8,16` trains and evaluates each member on the
formatted data and base model that `dvc repro` made (nothing upstream re-runs). Each member
writes `<sweep dir>/<overrides>/` with `adapter/` (lineage.json names the overrides through
`params.composed_with`, and the data md5s), `reports/` (train.json, metrics.json, report) and
`member.json` (status, overrides, error if any). The summary is built from those files, so it
works whatever launcher ran the members (basic, joblib, submitit, ray):

    summary.csv, summary.md   members ranked by the chosen metric; failed members last
    summary.png               the metric against trainable parameters and against training time

Re-rank an existing sweep (here the folder sweeps/x) by another metric:

    python -m lorapipe.sweep sweeps/x --metric adapter.rougeL
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from lorapipe.errors import PipelineError, exit_with
from lorapipe.io import write_json

SWEEP_ROOT = "sweeps"
MEMBER_FILE = "member.json"
DEFAULT_METRIC = "adapter.exact_match"
# Params a member cannot vary: they shape the formatted data, base model and retain references
# that `dvc repro` made, which every member shares. `train.max_length` is read by `format` too.
FIXED_KEYS = (
    *("model", "data", "format", "retain", "train.max_length"),
    *("paths.formatted", "paths.base", "paths.references"),
)
# Where each member's files go: the sweep stage overrides these paths per member.
MEMBER_PATHS = {"adapter": "adapter", "reports": "reports", "checkpoints": "checkpoints"}
COLUMNS = (
    "rank",
    "member",
    "status",
    "metric",
    "exact_match",
    "rougeL",
    "val_loss",
    "trainable_params",
    "train_seconds",
    "overrides",
    "error",
)


class SweepError(PipelineError, ValueError):
    """A sweep cannot run as asked; the message names the override or file."""


def override_key(override: str) -> str:
    """The dotted key of an override: `+lora.r=4` -> `lora.r`, `model=tinyllama` -> `model`."""
    return override.split("=", 1)[0].lstrip("+~")


def own_overrides(base: Sequence[str], task: Sequence[str]) -> list[str]:
    """The overrides of a member's `task` (Hydra's `hydra.overrides.task`) that are its own, not
    the `base` ones params.yaml contributed. Hydra's sweeper rewrites each override in its own
    compact form (`[a, b]` becomes `[a,b]`, `{k: v}` becomes `{k:v}`), so both are compared as
    Hydra parses them: an override is the member's own unless `base` sets its key to the same
    value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    def parsed(text: str) -> tuple[str, str]:
        (override,) = parser.parse_overrides([text])
        if override.is_sweep_override():  # a list of values: never a base override
            return override.get_key_element(), f"sweep {text}"
        return override.get_key_element(), override.get_value_element_as_str()

    given = dict(parsed(o) for o in base)
    own = []
    for text in task:
        key, value = parsed(text)  # each override parsed once
        if key not in given or given[key] != value:
            own.append(text)
    return own


def check_sweepable(overrides: Sequence[str]) -> None:
    """Raise SweepError if an override changes what the shared inputs were made from."""
    fixed = [
        o
        for o in overrides
        if any(override_key(o) == k or override_key(o).startswith(k + ".") for k in FIXED_KEYS)
    ]
    if fixed:
        raise SweepError(
            f"cannot sweep {', '.join(fixed)}: members share the formatted data, base model "
            "and retain references that `dvc repro` made. Change conf/ and `dvc repro`, or "
            "sweep those keys with "
            "`dvc exp run --queue -S ...`, which re-runs the stages they feed"
        )
    # The sweep sets these for every member (member_params): an override of one changed nothing.
    placed = [o for o in overrides if override_key(o) in {f"paths.{k}" for k in MEMBER_PATHS}]
    if placed:
        raise SweepError(
            f"cannot set {', '.join(placed)}: each member's adapter, reports and checkpoints go "
            "in its own folder under hydra.sweep.dir (set that to choose where)"
        )


def higher_is_better(metric: str) -> bool:
    """Losses and perplexities rank ascending, scores (exact match, ROUGE) descending."""
    leaf = metric.rsplit(".", 1)[-1]
    return not (leaf.endswith("loss") or leaf.endswith("perplexity") or leaf.endswith("seconds"))


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """The member records under `sweep_dir` (each `member.json`), by member name."""
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such sweep folder")
    records = []
    for path in sorted(sweep_dir.glob(f"*/{MEMBER_FILE}")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record.setdefault("member", path.parent.name)
        records.append(record)
    return records


def rank(records: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Summary rows: completed members by `metric` (best first, ties by name), then the rest.

    `metric` is a dotted key into a member's metrics.json (`adapter.exact_match`,
    `adapter.val_loss`, `base.rougeL`) or train.json (`train.train_seconds`).
    """
    sign = -1.0 if higher_is_better(metric) else 1.0

    def row(record: dict[str, Any]) -> dict[str, Any]:
        metrics = record.get("metrics") or {}
        adapter = metrics.get("adapter") or {}
        train = record.get("train") or {}
        return {
            "member": record["member"],
            "status": record.get("status", "unknown"),
            "metric": _lookup({**metrics, "train": train}, metric),
            "exact_match": adapter.get("exact_match"),
            "rougeL": adapter.get("rougeL"),
            "val_loss": adapter.get("val_loss"),
            "trainable_params": train.get("trainable_params"),
            "train_seconds": train.get("train_seconds"),
            "overrides": " ".join(record.get("overrides", [])),
            "error": record.get("error") or "",
        }

    rows = [row(r) for r in records]
    done = [r for r in rows if r["status"] == "completed" and isinstance(r["metric"], int | float)]
    rest = [r for r in rows if r not in done]
    done.sort(key=lambda r: (sign * r["metric"], r["member"]))
    rest.sort(key=lambda r: r["member"])
    for i, r in enumerate(done, start=1):
        r["rank"] = i
    for r in rest:
        r["rank"] = None
    return done + rest


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("seconds") else f"{value:.4f}"
    return str(value)


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    return out.getvalue()


def render_markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    lines = [
        f"# Sweep summary, ranked by {metric}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for r in rows:
        cells = [_cell(k, r.get(k)).replace("|", "\\|").replace("\n", " ") for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(r["status"] != "completed" for r in rows)
    lines += ["", f"{len(rows) - failed} of {len(rows)} members completed.", ""]
    return "\n".join(lines)


def _format_x(ax: Any, key: str, xs: Sequence[float]) -> None:
    """Parameter counts on a log axis when they span 10x, else as whole numbers; seconds in
    plain decimals, as many as the ticks need (training times of one sweep are often within a
    second of each other, which whole numbers would print as one value on every tick)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    if key == "trainable_params" and xs and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        return
    ax.xaxis.set_major_locator(MaxNLocator(5))
    if key == "trainable_params":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))


def plot(rows: Sequence[dict[str, Any]], metric: str, out: Path) -> bool:
    """`metric` against trainable parameters and against training time, one point per member.

    Returns False (and draws nothing) when no member completed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and cluster nodes
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["rank"] is not None]
    if not done:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.22 * len(done)), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for ax, key, label in (
        (axes[0], "trainable_params", "trainable parameters"),
        (axes[1], "train_seconds", "training time (s)"),
    ):
        for i, r in enumerate(done):
            if r[key] is None:  # e.g. a member.json written without its runtime facts
                continue
            ax.scatter(
                r[key],
                r["metric"],
                color=colors(i % 10),
                zorder=2,
                label=f"#{r['rank']} {r['member']}",
            )
            ax.annotate(
                f"#{r['rank']}",
                (r[key], r["metric"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        _format_x(ax, key, [r[key] for r in done if r[key]])
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, zorder=0)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    fig.suptitle(f"{metric} per sweep member ({len(done)} of {len(rows)} completed)")
    fig.savefig(out, format=out.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return True


def _numeric_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _numeric_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def check_metric(records: Sequence[dict[str, Any]], metric: str) -> None:
    """Raise SweepError when `metric` names a number in no completed member's metrics (a typo
    would otherwise leave every member unranked), naming the closest key."""
    done = [r for r in records if r.get("status") == "completed"]
    trees = [{**(r.get("metrics") or {}), "train": r.get("train") or {}} for r in done]
    if not trees or any(isinstance(_lookup(t, metric), int | float) for t in trees):
        return
    keys = sorted({k for t in trees for k in _numeric_keys(t)})
    close = difflib.get_close_matches(metric, keys, n=1)
    hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(keys[:12])}"
    raise SweepError(f"metric {metric!r}: no completed member has this number ({hint})")


def write_summary(sweep_dir: Path, metric: str = DEFAULT_METRIC) -> list[dict[str, Any]]:
    """Rank the members of `sweep_dir` by `metric`; write summary.{csv,md,png}; return the rows."""
    records = collect(sweep_dir)
    if not records:
        raise SweepError(f"{sweep_dir}: no member has a {MEMBER_FILE}; nothing to summarise")
    check_metric(records, metric)
    rows = rank(records, metric)
    (sweep_dir / "summary.csv").write_text(render_csv(rows), encoding="utf-8")
    (sweep_dir / "summary.md").write_text(render_markdown(rows, metric), encoding="utf-8")
    plot(rows, metric, sweep_dir / "summary.png")
    write_json(sweep_dir / "summary.json", {"metric": metric, "members": rows})
    return rows


class SweepSummary(Callback):
    """Hydra callback: after the last member, write the summary into the sweep folder.

    Set the ranking metric with `hydra.callbacks.sweep_summary.metric=adapter.rougeL`.
    Exits with status 1 after writing it when any member failed, so scripts notice.
    """

    def __init__(self, metric: str = DEFAULT_METRIC) -> None:
        self.metric = metric

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            rows = write_summary(sweep_dir, self.metric)
        except PipelineError as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(render_markdown(rows, self.metric))
        print(f"sweep: summary in {sweep_dir}/summary.{{md,csv,png}}")
        failed = [r["member"] for r in rows if r["status"] != "completed"]
        if failed:
            print(
                f"sweep: error: {len(failed)} member(s) failed: {', '.join(failed)}",
                file=sys.stderr,
            )
            raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)write a sweep's ranked summary.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="dotted key, e.g. adapter.rougeL")
    args = parser.parse_args(argv)
    try:
        rows = write_summary(args.sweep_dir, args.metric)
    except PipelineError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(rows, args.metric))
    return 0


if __name__ == "__main__":
    exit_with(main)
