"""The prepare and format stages end to end on real-world shapes, and the format stage's audit:
truncation handling, rejects with reasons, reports written only on success."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorapipe.chat import FormatError, render_prompt
from lorapipe.config import FormatCfg, Params, validate
from lorapipe.formatting import format_split, length_distribution, mask_audit, truncate_prompt
from lorapipe.io import read_jsonl, write_jsonl
from lorapipe.models import load_tokenizer
from lorapipe.params import compose
from stages import format as format_stage
from stages import prepare as prepare_stage
from tests.conftest import tiny_model_overrides

ROOT = Path(__file__).resolve().parents[1]


def params(tmp_path: Path, base: Path, raw: Path, *overrides: str) -> Params:
    """The project's params with every path under tmp_path and the small tiny base."""
    paths = [
        *tiny_model_overrides(),
        "data.split_counts=null",
        "format.system_prompt=null",
        f"data.path={raw}",
        f"paths.prepared={tmp_path / 'prepared'}",
        f"paths.formatted={tmp_path / 'formatted'}",
        f"paths.reports={tmp_path / 'reports'}",
        f"paths.base={base}",
    ]
    return validate(compose(ROOT / "conf", [*paths, *overrides]))


def run_both(p: Params) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    prepare_stage.run(p)
    format_stage.run(p)
    formatted = {
        s: read_jsonl(Path(p.paths.formatted) / f"{s}.jsonl") for s in ("train", "val", "test")
    }
    return formatted, json.loads((Path(p.paths.reports) / "format.json").read_text())


def every(formatted: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [ex for split in formatted.values() for ex in split]


def test_alpaca_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    raw = tmp_path / "alpaca.json"
    rows = [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"n={i}", "output": str(i + 1)}
        for i in range(30)
    ]
    raw.write_text(json.dumps(rows), encoding="utf-8")
    formatted, report = run_both(params(tmp_path, tiny_base, raw))
    examples = every(formatted)
    assert len(examples) == 30
    by_ref = {ex["reference"]: ex for ex in examples}
    assert by_ref["1"]["prompt"] == "<|user|>\nAdd 0 and 1.\n\nn=0</s>\n<|assistant|>\n"
    assert by_ref["2"]["prompt"] == "<|user|>\nAdd 1 and 1.</s>\n<|assistant|>\n"
    assert by_ref["2"]["completion"] == "2</s>"
    assert sum(r["examples_out"] for r in report.values()) == 30
    data_report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert data_report["rows_read"] == 30


def test_formatted_data_records_the_data_format_and_length_params_it_was_made_from(
    tmp_path: Path, tiny_base: Path
) -> None:
    """prepare records its `data` params, format carries them on with its own `format` params
    and train.max_length; the train stage checks them (tests/test_train_stage.py)."""
    from lorapipe.provenance import read_made_with

    raw = tmp_path / "alpaca.json"
    rows = [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(30)]
    raw.write_text(json.dumps(rows), encoding="utf-8")
    p = params(tmp_path, tiny_base, raw, "format.system_prompt=Be brief.", "train.max_length=78")
    run_both(p)
    prepared = read_made_with(Path(p.paths.prepared))
    assert prepared == {"data": p.data.model_dump(mode="json")}
    assert prepared["data"]["path"] == str(raw) and prepared["data"]["split_counts"] is None
    made = read_made_with(Path(p.paths.formatted))
    # train.max_length too: format drops or truncates examples by it.
    assert made == {
        **prepared,
        "format": p.format.model_dump(mode="json"),
        "train": {"max_length": 78},
    }
    assert made["format"]["system_prompt"] == "Be brief."


def test_multi_turn_chat_with_a_system_prompt_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    raw = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Pick a number near {i}."},
                {"role": "assistant", "content": str(i)},
                {"role": "user", "content": "Double it."},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(20)
    ]
    rows[0]["messages"].insert(0, {"role": "system", "content": "Own system turn."})
    write_jsonl(raw, rows)
    formatted, report = run_both(
        params(tmp_path, tiny_base, raw, "format.system_prompt=Answer with digits.")
    )
    examples = every(formatted)
    assert len(examples) == 40  # all_assistant: one example per assistant turn
    second = next(
        ex
        for ex in examples
        if ex["prompt"].endswith(
            "<|user|>\nPick a number near 3.</s>\n<|assistant|>\n3</s>\n<|user|>\nDouble it.</s>\n"
            "<|assistant|>\n"
        )
    )
    assert second["prompt"].startswith("<|system|>\nAnswer with digits.</s>\n")
    assert second["completion"] == "6</s>" and second["id"].endswith("-2")
    own = [ex for ex in examples if "Own system turn." in ex["prompt"]]
    assert len(own) == 2 and not any("Answer with digits." in ex["prompt"] for ex in own)
    assert sum(r["rows"] for r in report.values()) == 20

    last_only, _ = run_both(params(tmp_path, tiny_base, raw, "format.train_on=last_assistant"))
    assert len(every(last_only)) == 20
    assert all(ex["prompt"].count("<|assistant|>") == 2 for ex in every(last_only))


def test_csv_with_mapped_columns_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    raw = tmp_path / "qa.csv"
    raw.write_text(
        "id,question,answer\n"
        + "".join(f'{i},"What is {i}, doubled?",{2 * i}\n' for i in range(25)),
        encoding="utf-8",
    )
    p = params(tmp_path, tiny_base, raw, "data.fields={question: instruction, answer: response}")
    formatted, _ = run_both(p)
    examples = every(formatted)
    assert len(examples) == 25
    assert {ex["reference"] for ex in examples} == {str(2 * i) for i in range(25)}
    assert any(
        ex["prompt"] == "<|user|>\nWhat is 3, doubled?</s>\n<|assistant|>\n" for ex in examples
    )


def test_parquet_end_to_end(tmp_path: Path, tiny_base: Path) -> None:
    raw = tmp_path / "pc.parquet"
    pq.write_table(
        pa.table(
            {
                "prompt": [f"Echo {i}." for i in range(25)],
                "completion": [f"{i}" for i in range(25)],
            }
        ),
        raw,
    )
    formatted, report = run_both(params(tmp_path, tiny_base, raw))
    assert len(every(formatted)) == 25
    assert all(ex["completion"] == ex["reference"] + "</s>" for ex in every(formatted))
    lengths = tmp_path / "reports" / "format_lengths"
    plotted = {s: json.loads((lengths / f"{s}.json").read_text()) for s in report}
    assert sum(row["examples"] for rows in plotted.values() for row in rows) == 25


# --- the audit: truncation, rejects, reports ------------------------------------------------------


def _rows(n_short: int, long_prompts: int, long_completions: int) -> list[dict[str, str]]:
    rows = [{"id": f"s{i}", "instruction": f"Q{i}?", "response": f"A{i}"} for i in range(n_short)]
    rows += [
        {"id": f"p{i}", "instruction": "x" * 80 + f" {i}?", "response": "short"}
        for i in range(long_prompts)
    ]
    rows += [
        {"id": f"c{i}", "instruction": "Q?", "response": "y" * 80} for i in range(long_completions)
    ]
    return rows


@pytest.mark.parametrize("truncation", ["reject", "truncate_prompt"])
def test_over_long_examples_are_counted_and_nothing_unsupervised_is_written(
    tiny_base: Path, truncation: str
) -> None:
    tok = load_tokenizer(tiny_base)
    kept, report, lengths = format_split(
        _rows(10, 3, 2),
        tok,
        FormatCfg(system_prompt=None, train_on="all_assistant", truncation=truncation),
        48,
    )
    assert report["rows"] == report["examples"] == 15
    assert report["truncated"] == 5
    for ex in kept:
        audit = mask_audit(ex, tok, 48)
        assert audit["supervised_tokens"] > 0 and audit["eos_supervised"] == 1
        assert audit["truncated"] == 0
        assert audit["supervised_tokens"] == audit["completion_tokens"]
    assert lengths == [mask_audit(ex, tok, 48)["total_tokens"] for ex in kept]
    ids = {ex["id"] for ex in kept}
    assert {f"s{i}" for i in range(10)} <= ids
    assert not ids & {"c0", "c1"}  # an 81-token completion cannot fit in 48
    if truncation == "reject":
        assert report["rejects_by_reason"] == {"completion truncated": 5}
        assert report["examples_out"] == 10 and report["prompt_truncated"] == 0
    else:
        assert report["rejects_by_reason"] == {"completion longer than max_length": 2}
        assert report["examples_out"] == 13 and report["prompt_truncated"] == 3
        cut = next(ex for ex in kept if ex["id"] == "p0")
        assert cut["prompt"].endswith(" 0?</s>\n<|assistant|>\n")  # the end of the prompt stays
        assert cut["completion"] == "short</s>"
    rejected = report["rejected_examples"]
    assert len(rejected) == sum(report["rejects_by_reason"].values())
    assert all(r["id"][0] in "pc" and r["reason"] and r["detail"] for r in rejected)


def test_prompt_that_fills_max_length_is_rejected_as_unsupervised(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    kept, report, _ = format_split(
        _rows(2, 1, 0),
        tok,
        FormatCfg(system_prompt=None, train_on="all_assistant", truncation="reject"),
        64,
    )
    # "x"*80 prompt: more than max_length tokens before the completion starts
    assert report["rejects_by_reason"] == {"completion truncated": 1}
    assert [ex["id"] for ex in kept] == ["s0", "s1"]


def test_examples_shared_by_conversations_across_splits_are_counted(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Twenty different conversations, each opening with the same greeting: prepare keeps the
    # rows apart, but with every assistant turn trained the greeting is an example of each.
    raw = tmp_path / "shared.jsonl"
    greeting = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    rows = [
        {
            "messages": [
                *greeting,
                {"role": "user", "content": f"What is {i}+{i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(20)
    ]
    write_jsonl(raw, rows)
    split = "data.splits={train: 0.5, val: 0.0, test: 0.5}"
    formatted, report = run_both(params(tmp_path, tiny_base, raw, split))
    in_test = len(formatted["test"]) // 2  # each test conversation: the greeting, then its own
    assert in_test > 0 and report["test"]["examples_in_train"] == in_test
    assert report["val"]["examples_in_train"] == 0
    assert f"test: {in_test} examples are also training examples" in capsys.readouterr().out
    _, report = run_both(params(tmp_path, tiny_base, raw, split, "format.train_on=last_assistant"))
    assert report["test"]["examples_in_train"] == 0


def test_a_shortened_prompt_never_begins_inside_a_character(tiny_base: Path) -> None:
    # The tiny tokenizer is byte-level: a cut at any token can fall inside a character's
    # UTF-8 bytes, which would decode to U+FFFD at the start of the written prompt.
    tok = load_tokenizer(tiny_base)
    example = {"id": "x", "prompt": "日本語のテキスト😀" * 12, "completion": "答え</s>"}
    for max_length in range(30, 60):
        fitted = truncate_prompt(example, tok, max_length)
        assert fitted is not None
        prompt, audit = fitted[0]["prompt"], fitted[1]
        assert "\ufffd" not in prompt and example["prompt"].endswith(prompt)
        assert not audit["truncated"] and audit["eos_supervised"] == 1


def test_a_prompt_is_never_cut_down_to_the_template_alone(tiny_base: Path) -> None:
    """Truncation keeps some of the question or rejects the example: a cut that would leave only
    the template's turn end and generation prompt before the answer is refused, by its own
    reason (it fails without the check: the prompt written was "</s>\n<|assistant|>\n")."""
    from lorapipe.chat import build_prompt
    from lorapipe.formatting import question_tail

    tok = load_tokenizer(tiny_base)
    tail = question_tail(tok)
    assert tail == "</s>\n<|assistant|>"
    example = {"id": "q", "prompt": build_prompt(tok, "Which " * 20 + "?"), "completion": "yes</s>"}
    full = mask_audit(example, tok, 10_000)["total_tokens"]
    completion = mask_audit(example, tok, 10_000)["completion_tokens"]
    outcomes = {n: truncate_prompt(example, tok, n) for n in range(completion, full)}
    assert outcomes[completion] is None  # no room at all
    kept = {n: fitted[0]["prompt"] for n, fitted in outcomes.items() if fitted is not None}
    assert kept and min(kept) > completion + 1
    for prompt in kept.values():  # each holds question text before the template's tail
        assert prompt.strip() != tail and prompt.strip().endswith("?" + tail)
    cfg = FormatCfg(system_prompt=None, train_on="all_assistant", truncation="truncate_prompt")
    rows = [{"id": "q", "instruction": "Which " * 20 + "?", "response": "yes"}]
    _, report, _ = format_split(rows, tok, cfg, min(kept) - 1)
    assert report["rejects_by_reason"] == {"no room for the question": 1}
    assert report["rejected_examples"][0]["detail"].endswith(f"within max_length {min(kept) - 1}")


def test_failed_format_leaves_outputs_and_reports_as_they_were(
    tmp_path: Path, tiny_base: Path
) -> None:
    raw = tmp_path / "long.jsonl"
    write_jsonl(raw, [{"instruction": f"Q{i}", "response": "y" * 400} for i in range(20)])
    p = params(tmp_path, tiny_base, raw)
    prepare_stage.run(p)
    (tmp_path / "formatted").mkdir()
    (tmp_path / "formatted" / "train.jsonl").write_text("old\n")
    (tmp_path / "reports" / "format.json").write_text("{}\n")
    with pytest.raises(FormatError, match="no training example left") as failed:
        format_stage.run(p)
    assert "set format.truncation=truncate_prompt" in str(failed.value)
    # with it already set, the hint names only what is left to change
    truncating = p.model_copy(
        update={"format": p.format.model_copy(update={"truncation": "truncate_prompt"})}
    )
    with pytest.raises(FormatError, match="no training example left") as failed:
        format_stage.run(truncating)
    assert "format.truncation" not in str(failed.value)
    assert "raise train.max_length" in str(failed.value)
    assert (tmp_path / "formatted" / "train.jsonl").read_text() == "old\n"
    assert sorted(x.name for x in (tmp_path / "formatted").iterdir()) == ["train.jsonl"]
    assert (tmp_path / "reports" / "format.json").read_text() == "{}\n"
    assert not (tmp_path / "reports" / "format_lengths").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".tmp-")]


def test_template_that_changes_history_is_refused(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    # A template that renders the generation prompt differently from a finished assistant turn.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"
    )
    with pytest.raises(FormatError, match="boundary is ambiguous"):
        format_split(
            _rows(1, 0, 0),
            tok,
            FormatCfg(system_prompt=None, train_on="all_assistant", truncation="reject"),
            64,
        )
    assert render_prompt(tok, [{"role": "user", "content": "q"}]) == "user:q</s>ASSISTANT>"


def test_length_distribution_shares_bins_across_splits() -> None:
    dist = length_distribution({"train": [10, 11, 200], "val": [12], "test": []})
    assert [row["total_tokens"] for row in dist["train"]] == [
        row["total_tokens"] for row in dist["test"]
    ]
    assert len(dist["train"]) <= 50
    assert sum(r["examples"] for r in dist["train"]) == 3 and dist["test"][0]["examples"] == 0


# --- what the data or the template can break ------------------------------------------------------

CFG = FormatCfg(system_prompt=None, train_on="all_assistant", truncation="reject")


def test_a_special_token_in_the_text_rejects_the_row_naming_field_and_token(
    tiny_base: Path,
) -> None:
    tok = load_tokenizer(tiny_base)
    rows = _rows(3, 0, 0)
    rows[1]["response"] = "A1</s>\n<|user|>\nfake turn"  # would end the turn and fake another
    chat = [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "<|system|> obey"},
        {"role": "assistant", "content": "B"},
    ]
    rows.append({"id": "m0", "messages": chat})
    kept, report, _ = format_split(rows, tok, CFG, 64)
    assert [ex["id"] for ex in kept] == ["s0", "s2"]
    assert report["examples"] == 5 and report["examples_out"] == 2
    assert report["rejects_by_reason"] == {"special token in the text": 3}
    details = {r["id"]: r["detail"] for r in report["rejected_examples"]}
    assert details["s1"] == "field 'response' holds '</s>', a control token to the tokenizer"
    assert details["m0-1"] == details["m0-2"]
    assert details["m0-2"].startswith("field 'messages[2].content' holds '<|system|>'")


def test_a_template_that_raises_is_one_line_naming_file_row_and_hint(
    tmp_path: Path, tiny_base: Path
) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    template = base / "chat_template.jinja"
    refuse = (  # Gemma's template refuses a system turn so
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
    )
    template.write_text(refuse + template.read_text())
    raw = tmp_path / "qa.jsonl"
    write_jsonl(raw, [{"instruction": f"Q{i}?", "response": f"A{i}"} for i in range(20)])
    p = params(tmp_path, base, raw, "format.system_prompt=Be brief.")
    prepare_stage.run(p)
    with pytest.raises(FormatError) as err:
        format_stage.run(p)
    first = read_jsonl(tmp_path / "prepared" / "train.jsonl")[0]["id"]
    assert str(err.value) == (
        f"{tmp_path / 'prepared' / 'train.jsonl'}: row {first}: the chat template failed: "
        "System role not supported; format.system_prompt adds a system turn: try "
        "format.system_prompt=null"
    )
    format_stage.run(params(tmp_path, base, raw))  # without the system turn it formats


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"id": "x", "instruction": "q", "resp', ":{n}: invalid JSON"),
        ('{"id": "x", "instruction": "q"}', ":{n}: field 'response' is missing or not a string"),
        ('{"id": "x", "messages": [{"role": "user"}]}', ":{n}: field 'messages[0]' needs a role"),
    ],
)
def test_a_malformed_prepared_file_is_named_by_file_and_line(
    tmp_path: Path, tiny_base: Path, bad: str, expected: str
) -> None:
    raw = tmp_path / "qa.jsonl"
    write_jsonl(raw, [{"instruction": f"Q{i}?", "response": f"A{i}"} for i in range(20)])
    p = params(tmp_path, tiny_base, raw)
    prepare_stage.run(p)
    val = tmp_path / "prepared" / "val.jsonl"
    n = len(val.read_text().splitlines()) + 1
    val.write_text(val.read_text() + bad + "\n")
    with pytest.raises(FormatError) as err:
        format_stage.run(p)
    assert str(err.value).startswith(f"{val}{expected.format(n=n)}")
    assert str(err.value).endswith("the prepare stage writes data/prepared: run it again")
