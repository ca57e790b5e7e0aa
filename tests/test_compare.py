"""lorapipe.compare: predictions at two git revisions (or an experiment ref, or the workspace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorapipe.compare import CompareError, compare, format_text, load_predictions
from lorapipe.errors import PipelineError

SRC = Path(__file__).resolve().parents[1] / "src"


def _row(i: str, ref: str, out: str, rouge_l: float) -> dict[str, Any]:
    em = float(out == ref)
    scores = {"rouge1": rouge_l, "rouge2": 0.0, "rougeL": rouge_l, "rougeLsum": rouge_l}
    return {
        "id": i,
        "prompt": f"<|user|>\nq{i}</s>\n<|assistant|>\n",
        "reference": ref,
        "base": "zz",
        "adapter": out,
        "scores": {
            "base": {**scores, "rougeL": 0.0, "exact_match": 0.0},
            "adapter": {**scores, "exact_match": em},
        },
    }


# Revision 1 -> revision 2: "a" gains (0->1), "b" loses (1->0), "c" unchanged and right,
# "d" improves in ROUGE-L only, "e" worsens a little; "x" only in rev 1, "y" only in rev 2.
REV1 = [
    _row("a", "[1, 2, 3]", "[1, 2]", 0.8),
    _row("b", "True", "True", 1.0),
    _row("c", "7", "7", 1.0),
    _row("d", "the cat sat", "a dog", 0.0),
    _row("e", "one two three", "one two", 0.8),
    _row("x", "1", "1", 1.0),
]
REV2 = [
    _row("y", "2", "2", 1.0),
    _row("e", "one two three", "one", 0.5),
    _row("d", "the cat sat", "the cat", 0.8),
    _row("c", "7", "7", 1.0),
    _row("b", "True", "Fals\u000e", 0.0),
    _row("a", "[1, 2, 3]", "[1, 2, 3]", 1.0),
]


def _write(root: Path, reports: str, rows: list[dict[str, Any]]) -> None:
    (root / "params.yaml").write_text(f"paths:\n  reports: {reports}\n")
    path = root / reports / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _commit(root: Path, message: str) -> str:
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return _git(root, "rev-parse", "HEAD")


@pytest.fixture()
def repo(tmp_path: Path) -> dict[str, Any]:
    """A git repo: commit 1 with REV1, commit 2 with REV2 (reports moved to `out/`), and a
    workspace holding only REV2's first three rows."""
    _git(tmp_path, "init", "-q")
    _write(tmp_path, "reports", REV1)
    first = _commit(tmp_path, "one")
    (tmp_path / "reports" / "predictions.jsonl").unlink()
    _write(tmp_path, "out", REV2)
    second = _commit(tmp_path, "two")
    _write(tmp_path, "out", REV2[:3])
    return {"root": tmp_path, "first": first, "second": second}


def _run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorapipe.compare", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_load_predictions_at_both_revisions_and_the_workspace(repo: dict[str, Any]) -> None:
    root = repo["root"]
    assert load_predictions(repo["first"], root) == REV1
    assert load_predictions("HEAD~1", root) == REV1
    # the second commit's params.yaml moved the reports: the path is read at each revision
    assert load_predictions(repo["second"][:10], root) == REV2
    assert load_predictions("HEAD", root) == REV2
    assert load_predictions("workspace", root) == REV2[:3]


def test_a_dvc_experiment_name_resolves_through_its_ref(repo: dict[str, Any]) -> None:
    root, base = repo["root"], repo["first"]
    ref = f"refs/exps/{base[:2]}/{base[2:]}/lucky-exp"
    _git(root, "update-ref", ref, repo["second"])
    assert load_predictions("lucky-exp", root) == REV2
    assert load_predictions(ref, root) == REV2


def test_flips_both_ways_with_both_outputs(repo: dict[str, Any]) -> None:
    root = repo["root"]
    result = compare(
        load_predictions("HEAD~1", root), load_predictions("HEAD", root), "adapter", 10
    )
    gained, lost = result["gained"], result["lost"]
    assert [g["id"] for g in gained] == ["a"]
    assert (gained[0]["reference"], gained[0]["a"], gained[0]["b"]) == (
        "[1, 2, 3]",
        "[1, 2]",
        "[1, 2, 3]",
    )
    assert [g["id"] for g in lost] == ["b"]
    assert (lost[0]["reference"], lost[0]["a"], lost[0]["b"]) == ("True", "True", "Fals\u000e")
    s = result["summary"]
    assert (s["common"], s["only_a"], s["only_b"], s["gained"], s["lost"]) == (5, 1, 1, 1, 1)
    # deltas over the 5 common ids: a +0.2, b -1.0, c 0, d +0.8, e -0.3
    assert s["mean_rougeL_delta"] == pytest.approx((0.2 - 1.0 + 0.8 - 0.3) / 5)
    assert s["exact_match_a"] == pytest.approx(2 / 5)
    assert s["exact_match_b"] == pytest.approx(2 / 5)
    # swapped revisions swap the directions
    back = compare(load_predictions("HEAD", root), load_predictions("HEAD~1", root), "adapter", 10)
    assert ([g["id"] for g in back["gained"]], [g["id"] for g in back["lost"]]) == (["b"], ["a"])


def test_rouge_l_changes_largest_first_nonzero_only_and_cut_at_top() -> None:
    result = compare(REV1, REV2, "adapter", 10)
    changes = result["rougeL_changes"]
    assert [c["id"] for c in changes] == ["b", "d", "e", "a"]
    assert [round(c["rougeL_delta"], 6) for c in changes] == [-1.0, 0.8, -0.3, 0.2]
    assert [c["id"] for c in compare(REV1, REV2, "adapter", 2)["rougeL_changes"]] == ["b", "d"]
    base = compare(REV1, REV2, "base", 10)  # the other model: nothing changed
    assert base["gained"] == base["lost"] == base["rougeL_changes"] == []


def test_format_text_shows_flips_with_reference_and_both_outputs() -> None:
    text = format_text(compare(REV1, REV2, "adapter", 3, labels=("old", "new")))
    flips = text.split("largest ROUGE-L")[0]
    assert "0->1 (old -> new), adapter: 1" in flips and "1->0 (old -> new), adapter: 1" in flips
    lost = flips.split("1->0")[1]
    assert 'reference "True"' in lost
    assert 'old  "True"' in lost
    assert 'new  "Fals\\u000e"' in lost  # control characters are escaped, one line each
    assert text.splitlines()[-1].startswith(
        "summary: 5 examples in common (1 only in old, 1 only in new); exact match 0->1: 1, 1->0: 1"
    )
    assert "mean rougeL delta -0.0600" in text.splitlines()[-1]


def test_errors_unknown_revision_missing_file_no_common_ids(repo: dict[str, Any]) -> None:
    root = repo["root"]
    with pytest.raises(CompareError, match="unknown revision 'no-such-rev'"):
        load_predictions("no-such-rev", root)
    (root / "out" / "predictions.jsonl").unlink()
    with pytest.raises(CompareError, match=r"workspace: no out/predictions\.jsonl"):
        load_predictions("workspace", root)
    with pytest.raises(CompareError, match="no example ids in common"):
        compare(REV1[:1], REV2[:1], "adapter", 10)
    with pytest.raises(CompareError, match="no exact_match/rougeL scores for model 'merged'"):
        compare(REV1, REV2, "merged", 10)
    assert issubclass(CompareError, PipelineError)


def test_cli_errors_exit_2_with_one_line_and_no_traceback(repo: dict[str, Any]) -> None:
    root = repo["root"]
    # a commit without predictions (an empty tree), made without touching the work tree
    empty_tree = _git(root, "hash-object", "-t", "tree", "/dev/null")
    empty = _git(
        root, "-c", "user.name=t", "-c", "user.email=t@t", "commit-tree", empty_tree, "-m", "e"
    )
    cases = {
        "no-such-rev": "compare: error: unknown revision 'no-such-rev'",
        empty: f"compare: error: {empty}: no reports/predictions.jsonl",
    }
    for rev, message in cases.items():
        done = _run_cli(root, rev, repo["second"])
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(message), done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert done.stdout == ""


def test_cli_prints_the_report_and_json(repo: dict[str, Any]) -> None:
    root = repo["root"]
    done = _run_cli(root, repo["first"], repo["second"], "--top", "1")
    assert done.returncode == 0, done.stderr
    assert "summary: 5 examples in common" in done.stdout
    done = _run_cli(root, "HEAD~1", "HEAD", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [g["id"] for g in result["gained"]] == ["a"]
    assert result["labels"] == ["HEAD~1", "HEAD"]


def test_a_reader_that_stops_early_ends_the_cli_quietly(repo: dict[str, Any]) -> None:
    # `compare ... | head`: the report is larger than a pipe holds, and the reader closes its end
    # after one line; the next write fails with EPIPE, which must end the tool without a traceback
    # (outputs are shortened in the report, so it is made large by its number of changes: 3,000
    # examples whose ROUGE-L moves, all shown)
    root = repo["root"]
    _write(root, "out", [_row(f"n{i}", "True", f"o{i}", 0.0) for i in range(3000)])
    before = _commit(root, "many")
    _write(root, "out", [_row(f"n{i}", "True", f"o{i}", 0.5) for i in range(3000)])
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "lorapipe.compare", before, "workspace", "--top", "3000"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 1
    assert stderr == ""
