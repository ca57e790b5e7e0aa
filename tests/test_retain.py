"""The retain set: the shipped instructions, the base's own answers as references, the retain
entry of evaluate (1.0 for the base by construction, and for an adapter that changes nothing),
and its place in the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from lorapipe.chat import render_prompt, with_system
from lorapipe.config import Params
from lorapipe.evaluation import retain_scores
from lorapipe.generation import generate_with_stops
from lorapipe.io import write_json
from lorapipe.models import load_base_model, load_tokenizer, read_pin
from lorapipe.report import most_changed, render_html, render_markdown
from lorapipe.retain import (
    RetainError,
    base_references,
    made_with,
    made_with_file,
    read_retain,
    require_references,
)

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"fact", "explanation", "rewriting", "arithmetic", "multi-turn"}


def test_the_shipped_retain_set_is_varied_and_its_parts_disjoint() -> None:
    parts = {p: read_retain(ROOT / f"data/retain/{p}.jsonl") for p in ("train", "eval")}
    assert 120 <= sum(len(rows) for rows in parts.values()) <= 200
    assert not {r["id"] for r in parts["train"]} & {r["id"] for r in parts["eval"]}
    for part in parts:
        kinds = Counter(
            json.loads(line)["kind"]
            for line in (ROOT / f"data/retain/{part}.jsonl").read_text().splitlines()
        )
        assert set(kinds) == KINDS and min(kinds.values()) >= 4, (part, kinds)
        multi = [r for r in parts[part] if len(r["messages"]) > 1]
        assert multi and all(r["messages"][-1]["role"] == "user" for r in multi)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"instruction": "  "}', "needs a non-empty 'instruction'"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
            '"content": "hello"}]}',
            "must end with a user turn",
        ),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0] needs a role"),
        ("{not json", "invalid JSON"),
        ("[1]", "expected a JSON object, got list"),
        ('{"instruction": "What is 2 + 2?"}', "repeats an earlier row"),
    ],
)
def test_a_bad_retain_row_is_named_by_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"instruction": "What is 2 + 2?"}\n' + line + "\n")
    with pytest.raises(RetainError, match=rf"eval.jsonl:2: .*{re.escape(problem)}"):
        read_retain(path)


def test_references_are_the_bases_greedy_answers_to_the_task_prompts(
    tiny_base: Path, tmp_path: Path
) -> None:
    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    path = tmp_path / "train.jsonl"
    rows = [
        {"instruction": "What is the capital of France?"},
        {
            "messages": [
                {"role": "user", "content": "My name is Sam."},
                {"role": "assistant", "content": "Hello Sam."},
                {"role": "user", "content": "What is my name?"},
            ]
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    retain = read_retain(path)
    refs = base_references(
        model, tok, retain, system_prompt="Be brief.", batch_size=2, max_new_tokens=6
    )
    prompts = [render_prompt(tok, with_system(r["messages"], "Be brief.")) for r in retain]
    answers, stopped = generate_with_stops(model, tok, prompts, batch_size=2, max_new_tokens=6)
    assert [r["prompt"] for r in refs] == prompts and "Be brief." in prompts[1]
    assert [r["reference"] for r in refs] == answers
    assert [r["stopped"] for r in refs] == stopped
    assert refs[1]["messages"][:3] == rows[1]["messages"]
    assert refs[1]["messages"][3] == {"role": "assistant", "content": answers[1]}


def test_references_are_checked_against_the_base_prompt_and_budget_that_made_them(
    tiny_base: Path, train_params: Callable[..., Params], tmp_path: Path
) -> None:
    """The record the references stage writes beside a part names the base (its pin's
    identity), the system prompt and the token budget; `evaluate` refuses references whose
    record differs from its own base and params in any of them, naming each key."""
    pin, params = read_pin(tiny_base), train_params()
    require_references(tmp_path, "eval", pin, params)  # no record (made before records): passes
    write_json(made_with_file(tmp_path, "eval"), made_with(pin, params))
    require_references(tmp_path, "eval", pin, params)
    require_references(tmp_path, "eval", pin, train_params("retain.batch_size=3", "lora.r=2"))
    other = {**pin, "config_hash": "0" * 64}
    changed = train_params("format.system_prompt=Be brief.", "retain.max_new_tokens=5")
    with pytest.raises(RetainError) as err:
        require_references(tmp_path, "eval", other, changed)
    assert str(err.value) == (
        f"{tmp_path / 'eval.jsonl'} was made from other params "
        f"({tmp_path / 'eval.made_with.json'}): "
        f"base.config_hash is {'0' * 64!r} here, {pin['config_hash']!r} there; "
        f"format.system_prompt is 'Be brief.' here, {params.format.system_prompt!r} there; "
        f"retain.max_new_tokens is 5 here, {params.retain.max_new_tokens} there. Make it from "
        "these first (`dvc repro`, or `python -m stages.references eval` with the same "
        "overrides), or give this stage the params it was made from"
    )


def test_prepare_replays_only_answers_this_base_gave_under_this_prompt(
    tiny_base: Path, train_params: Callable[..., Params], tmp_path: Path
) -> None:
    """`python -m stages.prepare data.replay=0.1` after the base or the system prompt changed
    without the references stage re-run: the answers it would replay are not the base's own, so
    the stage stops, naming the keys, before it writes anything; with replay off they are not
    read, and with the record matching they are replayed."""
    from lorapipe.pyqa import generate
    from stages.prepare import run

    refs = tmp_path / "refs"
    rows = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ],
            "stopped": True,
        }
        for i in range(5)
    ]
    refs.mkdir()
    (refs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tmp_path / "raw" / "qa.jsonl"
    raw.parent.mkdir()
    raw.write_text("".join(json.dumps(r) + "\n" for r in generate(60, seed=2)))
    paths = [
        f"paths.base={tiny_base}",
        f"paths.references={refs}",
        f"paths.prepared={tmp_path / 'prepared'}",
        f"paths.reports={tmp_path / 'reports'}",
        f"data.path={raw}",
        "data.split_counts={train: 40, val: 10, test: 10}",
    ]
    pin = read_pin(tiny_base)
    write_json(
        made_with_file(refs, "train"), made_with(pin, train_params("format.system_prompt=Hi."))
    )
    with pytest.raises(RetainError) as err:
        run(train_params(*paths, "data.replay=0.2"))
    assert str(err.value).startswith(
        f"{refs / 'train.jsonl'} was made from other params ({refs / 'train.made_with.json'}): "
        f"format.system_prompt is {train_params().format.system_prompt!r} here, 'Hi.' there."
    )
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "reports").exists()
    run(train_params(*paths))  # nothing replayed: the references are not read
    assert "What is" not in (tmp_path / "prepared" / "train.jsonl").read_text()
    write_json(made_with_file(refs, "train"), made_with(pin, train_params()))
    run(train_params(*paths, "data.replay=0.2"))
    assert "What is 4 plus 4?" in (tmp_path / "prepared" / "train.jsonl").read_text()


def _refs(answers: list[str]) -> list[dict[str, object]]:
    return [
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}],
            "reference": a,
        }
        for i, a in enumerate(answers)
    ]


def test_retain_scores_and_the_most_changed_answers() -> None:
    refs = _refs(["Paris is the capital.", "4", "The sky is blue.", "Canberra"])
    answers = ["Paris is the capital.", "[4]", "The sky is blue today.", " Canberra "]
    metrics, rows = retain_scores(refs, {"adapter": answers}, use_stemmer=False)
    assert metrics["base"] == {"rougeL": 1.0, "identical": 1.0}
    assert metrics["adapter"]["identical"] == 0.5  # "[4]" and the longer sentence changed
    assert 0.0 < metrics["adapter"]["rougeL"] < 1.0
    changed = most_changed(rows, "adapter")
    assert [r["id"] for r in changed] == ["r2", "r1"]  # lowest ROUGE-L first; identical never
    assert changed[0]["instruction"] == "q2" and changed[0]["base"] == "The sky is blue."

    report = {"base": {"exact_match": 0.0}, "adapter": {"exact_match": 1.0}, "examples": 1}
    report["retain"] = metrics
    predictions = [
        {
            "id": "t",
            "prompt": "p",
            "reference": "r",
            "base": "x",
            "adapter": "r",
            "scores": {"base": {"rougeL": 0.0}, "adapter": {"rougeL": 1.0}},
        }
    ]
    text = render_markdown(report, predictions, rows)
    assert (
        "| retain ROUGE-L | 1.0000 |" in text and "| retain identical | 1.0000 | 0.5000 |" in text
    )
    assert "## Retain answers the adapter changed most" in text
    page = render_html(report, predictions, rows)
    assert '<section id="retain">' in page and page.count("<svg") == 2
    assert page.count("<code>r") == 2 and "The sky is blue today." in page
