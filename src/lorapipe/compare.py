"""Compare two runs example by example: which test prompts changed between two revisions.

python -m lorapipe.compare HEAD~1 workspace                  # the adapter's changed answers
python -m lorapipe.compare HEAD~1 workspace --model base --top 3 --json

A revision is a git revision (`HEAD~1`, a branch, a sha), a DVC experiment name or ref
(`dvc exp list`; experiments live under `refs/exps/<sha[:2]>/<sha[2:]>/<name>`), or `workspace`
(the files on disk). At each revision `params.yaml` gives `paths.reports`, and
`<reports>/predictions.jsonl` as stored there is read. Rows are joined by example `id`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lorapipe.errors import PipelineError, exit_with
from lorapipe.io import parse_jsonl

WORKSPACE = "workspace"
PARAMS_FILE = "params.yaml"
PREDICTIONS_FILE = "predictions.jsonl"
DEFAULT_REPORTS = "reports"
EXPS_NAMESPACE = "refs/exps"
# refs/exps/<2 hex>/<38 hex>/<name>: a finished experiment (not the stash, queue or exec refs)
_EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(?P<name>[^/]+)$")
_MAX_TEXT = 300  # characters of an output shown in text mode


class CompareError(PipelineError):
    """A revision, its predictions or the join cannot be used; the message says which."""


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise CompareError("git not found: comparing revisions needs git on PATH") from None


def _exp_refs(root: Path) -> dict[str, list[str]]:
    """Experiment name -> the refs with that name (one per baseline commit)."""
    out = _git(root, "for-each-ref", "--format=%(refname)", EXPS_NAMESPACE)
    refs: dict[str, list[str]] = {}
    for ref in out.stdout.split():
        m = _EXP_REF.match(ref)
        if m:
            refs.setdefault(m.group("name"), []).append(ref)
    return refs


def resolve_revision(rev: str, root: Path) -> str:
    """The commit sha that `rev` (a git revision, DVC experiment name or exp ref) names.

    An experiment name run on several baselines resolves to the one on the current HEAD.
    Raises CompareError for an unknown or ambiguous revision, or when `root` is not in git.
    """
    if not rev or rev.startswith("-"):
        raise CompareError(f"unknown revision {rev!r}")
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0:
        raise CompareError(f"{root} is not inside a git repository: only 'workspace' can be read")
    found = _git(root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.strip()
    candidates = _exp_refs(root).get(rev, [])
    if len(candidates) > 1:
        head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD").stdout.strip()
        on_head = [r for r in candidates if head and r.split("/")[2] + r.split("/")[3] == head]
        if len(on_head) == 1:
            candidates = on_head
        else:
            raise CompareError(
                f"experiment name {rev!r} is ambiguous: give one of the refs "
                f"{', '.join(candidates)}"
            )
    if candidates:
        found = _git(root, "rev-parse", "--verify", "--quiet", f"{candidates[0]}^{{commit}}")
        if found.returncode == 0:
            return found.stdout.strip()
    raise CompareError(
        f"unknown revision {rev!r}: not a git revision, DVC experiment (dvc exp list) or "
        f"'{WORKSPACE}'"
    )


def _read_at(rev: str, sha: str | None, path: str, root: Path) -> str | None:
    """The text of `path` (relative to `root`) at commit `sha`, or on disk when `sha` is None."""
    if sha is None:
        file = Path(path) if Path(path).is_absolute() else root / path
        return file.read_text(encoding="utf-8") if file.is_file() else None
    shown = _git(root, "show", f"{sha}:./{path}")
    return shown.stdout if shown.returncode == 0 else None


def predictions_path(rev: str, root: Path, sha: str | None = None) -> str:
    """`<paths.reports>/predictions.jsonl` per params.yaml at `rev` (`reports` if it has none)."""
    text = _read_at(rev, sha, PARAMS_FILE, root)
    reports: Any = DEFAULT_REPORTS
    if text is not None:
        try:
            params = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise CompareError(f"{rev}: {PARAMS_FILE} is not valid YAML ({exc})") from None
        paths = params.get("paths") if isinstance(params, dict) else None
        if isinstance(paths, dict) and paths.get("reports"):
            reports = paths["reports"]
    return f"{str(reports).rstrip('/')}/{PREDICTIONS_FILE}"


def load_predictions(rev: str, root: Path | str = ".") -> list[dict[str, Any]]:
    """The prediction rows stored at `rev` (see the module doc), in file order.

    Raises CompareError for an unknown revision, a missing or malformed predictions file.
    """
    root = Path(root)
    sha = None if rev == WORKSPACE else resolve_revision(rev, root)
    path = predictions_path(rev, root, sha)
    text = _read_at(rev, sha, path, root)
    if text is None:
        raise CompareError(f"{rev}: no {path} (has the evaluate stage run at that revision?)")
    try:
        rows = parse_jsonl(text, f"{rev}: {path}")
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    for row in rows:
        if "id" not in row:
            raise CompareError(f"{rev}: {path}: a row has no id: {json.dumps(row)[:80]}")
    return rows


def _exact(row: dict[str, Any], model: str, label: str) -> tuple[bool, float]:
    try:
        scores = row["scores"][model]
        return float(scores["exact_match"]) >= 0.5, float(scores["rougeL"])
    except (KeyError, TypeError, ValueError):
        raise CompareError(
            f"{label}: example {row.get('id')!r} has no exact_match/rougeL scores for model "
            f"{model!r}"
        ) from None


def compare(
    a_rows: list[dict[str, Any]],
    b_rows: list[dict[str, Any]],
    model: str = "adapter",
    top: int = 10,
    *,
    labels: tuple[str, str] = ("A", "B"),
) -> dict[str, Any]:
    """Join `a_rows` and `b_rows` by id and report what changed for `model` from A to B.

    Returns {"labels", "model", "gained": [...], "lost": [...], "rougeL_changes": [...],
    "summary": {...}}. `gained` are the examples whose exact match went 0->1, `lost` 1->0, each
    with id, prompt, reference and both outputs and rougeL scores, in A's order.
    `rougeL_changes` are the `top` examples with the largest |rougeL delta| (non-zero only;
    ties by id). Raises CompareError when no id is in both or a row lacks `model`'s scores.
    """
    a_by_id = {row["id"]: row for row in a_rows}
    b_by_id = {row["id"]: row for row in b_rows}
    common = [i for i in a_by_id if i in b_by_id]
    if not common:
        raise CompareError(
            f"no example ids in common between {labels[0]} ({len(a_by_id)} examples) and "
            f"{labels[1]} ({len(b_by_id)} examples): were they evaluated on the same test split?"
        )
    gained: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    em = [0, 0]
    rouge_sums = [0.0, 0.0]
    for i in common:
        a, b = a_by_id[i], b_by_id[i]
        em_a, rl_a = _exact(a, model, labels[0])
        em_b, rl_b = _exact(b, model, labels[1])
        em[0] += em_a
        em[1] += em_b
        rouge_sums[0] += rl_a
        rouge_sums[1] += rl_b
        item = {
            "id": i,
            "prompt": a.get("prompt"),
            "reference": a.get("reference"),
            "a": a.get(model),
            "b": b.get(model),
            "rougeL_a": rl_a,
            "rougeL_b": rl_b,
            "rougeL_delta": rl_b - rl_a,
        }
        if b.get("reference") != a.get("reference"):
            item["reference_b"] = b.get("reference")
        if em_b and not em_a:
            gained.append(item)
        elif em_a and not em_b:
            lost.append(item)
        if rl_b != rl_a:
            changes.append(item)
    changes.sort(key=lambda c: (-abs(c["rougeL_delta"]), c["id"]))
    n = len(common)
    return {
        "labels": list(labels),
        "model": model,
        "gained": gained,
        "lost": lost,
        "rougeL_changes": changes[: max(top, 0)],
        "summary": {
            "common": n,
            "only_a": len(a_by_id) - n,
            "only_b": len(b_by_id) - n,
            "gained": len(gained),
            "lost": len(lost),
            "exact_match_a": em[0] / n,
            "exact_match_b": em[1] / n,
            "rougeL_a": rouge_sums[0] / n,
            "rougeL_b": rouge_sums[1] / n,
            "mean_rougeL_delta": (rouge_sums[1] - rouge_sums[0]) / n,
        },
    }


def _show(text: Any) -> str:
    """A JSON-quoted one-line rendering (control characters escaped), cut at _MAX_TEXT."""
    s = "" if text is None else str(text)
    if len(s) > _MAX_TEXT:
        s = s[:_MAX_TEXT] + "..."
    return json.dumps(s, ensure_ascii=False)


def format_text(result: dict[str, Any]) -> str:
    """The human-readable report of a `compare` result."""
    la, lb = result["labels"]
    width = max(len(la), len(lb))
    lines: list[str] = []
    for key, arrow in (("gained", "0->1"), ("lost", "1->0")):
        flips = result[key]
        lines.append(f"exact match {arrow} ({la} -> {lb}), {result['model']}: {len(flips)}")
        for f in flips:
            lines.append(f"  {f['id']}  reference {_show(f['reference'])}")
            if "reference_b" in f:
                lines.append(f"    reference at {lb}: {_show(f['reference_b'])}")
            lines.append(f"    {la:<{width}}  {_show(f['a'])}")
            lines.append(f"    {lb:<{width}}  {_show(f['b'])}")
        lines.append("")
    changes = result["rougeL_changes"]
    lines.append(f"largest ROUGE-L changes ({la} -> {lb}): {len(changes)} shown")
    for c in changes:
        lines.append(
            f"  {c['rougeL_delta']:+.3f}  {c['id']}  {c['rougeL_a']:.3f} -> {c['rougeL_b']:.3f}  "
            f"reference {_show(c['reference'])}"
        )
        lines.append(f"    {la:<{width}}  {_show(c['a'])}")
        lines.append(f"    {lb:<{width}}  {_show(c['b'])}")
    lines.append("")
    s = result["summary"]
    only = (
        f" ({s['only_a']} only in {la}, {s['only_b']} only in {lb})"
        if s["only_a"] or s["only_b"]
        else ""
    )
    lines.append(
        f"summary: {s['common']} examples in common{only}; exact match 0->1: {s['gained']}, "
        f"1->0: {s['lost']} ({s['exact_match_a']:.3f} -> {s['exact_match_b']:.3f}); "
        f"mean rougeL delta {s['mean_rougeL_delta']:+.4f} "
        f"({s['rougeL_a']:.3f} -> {s['rougeL_b']:.3f}); model {result['model']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorapipe.compare",
        description="Compare reports/predictions.jsonl at two revisions, example by example.",
    )
    parser.add_argument("rev_a", help="git revision, DVC experiment name, or 'workspace'")
    parser.add_argument("rev_b", help="git revision, DVC experiment name, or 'workspace'")
    parser.add_argument(
        "--model", default="adapter", help="which model's outputs (default adapter)"
    )
    parser.add_argument("--top", type=int, default=10, help="ROUGE-L changes to show (default 10)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--root", default=".", help="project root (default: current folder)")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be 0 or more")
    try:
        a_rows = load_predictions(args.rev_a, args.root)
        b_rows = load_predictions(args.rev_b, args.root)
        result = compare(a_rows, b_rows, args.model, args.top, labels=(args.rev_a, args.rev_b))
    except PipelineError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_text(result))
    return 0


if __name__ == "__main__":
    exit_with(main)
