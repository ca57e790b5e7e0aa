"""Inference: adapters hot-swapped on one loaded base, each answering as it does alone, with the
training prompt format, streamed; the generate command on prompt files and stdin."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedModel

from lorapipe import inference
from lorapipe.chat import build_prompt
from lorapipe.formatting import format_rows
from lorapipe.inference import BASE, Assistant
from lorapipe.models import load_tokenizer
from tests.test_merge import random_adapter
from tests.test_params import imported_modules, stage_process

QUESTIONS = ["What does `sorted([3, 1, 2])` return?", "What is `len('abc')`?", "hi"]
GREEDY = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters with deliberately different random weights."""
    out = tmp_path_factory.mktemp("adapters")
    return {
        name: random_adapter(tiny_base, out / name, seed) for name, seed in (("a", 1), ("b", 2))
    }


def answers(assistant: Assistant, name: str) -> list[str]:
    return [assistant.answer([{"role": "user", "content": q}], name, **GREEDY) for q in QUESTIONS]


def test_adapters_swap_on_one_base_and_answer_as_each_does_alone(
    tiny_base: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Any] = []
    real_loader = inference.load_base_model
    real_from_pretrained = PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting_loader(*args: Any, **kwargs: Any) -> Any:
        loads.append(("load_base_model", args))
        return real_loader(*args, **kwargs)

    def counting_from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        loads.append(("from_pretrained", args))
        return real_from_pretrained(cls, *args, **kwargs)

    # Spies that count and call the real functions: the weights really load.
    monkeypatch.setattr(inference, "load_base_model", counting_loader)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting_from_pretrained))
    both = Assistant(tiny_base, adapters, dtype="float32")
    assert both.names == ["a", "b", BASE]
    got = {name: answers(both, name) for name in ("a", "b", BASE)}
    assert answers(both, "a") == got["a"]  # switching back: nothing of b is left on
    assert [kind for kind, _ in loads] == ["load_base_model", "from_pretrained"]  # once, ever

    monkeypatch.undo()
    assert got["a"] != got["b"] and got["a"] != got[BASE]  # the adapters really differ
    for name in ("a", "b"):  # each adapter alone, on a fresh base, answers the same
        assert (
            answers(Assistant(tiny_base, {name: adapters[name]}, dtype="float32"), name)
            == got[name]
        )
    assert answers(Assistant(tiny_base, {}, dtype="float32"), BASE) == got[BASE]


def test_prompts_are_formatted_as_in_training_and_tokens_stream(
    tiny_base: Path, adapters: dict[str, Path]
) -> None:
    assistant = Assistant(tiny_base, {"a": adapters["a"]}, dtype="float32")
    row = {"id": "0", "instruction": QUESTIONS[0], "response": "[1, 2, 3]"}
    trained = format_rows([row], load_tokenizer(tiny_base), None)[0]["prompt"]
    assert assistant.prompt_for([{"role": "user", "content": QUESTIONS[0]}], "a") == trained
    stream = io.StringIO()
    answer = assistant.answer(
        [{"role": "user", "content": QUESTIONS[0]}], "a", stream=stream, **GREEDY
    )
    assert answer and stream.getvalue().strip() == answer


def common_args(tiny_base: Path, adapters: dict[str, Path]) -> list[str]:
    return [
        "--base",
        str(tiny_base),
        *[f"--adapter={name}={path}" for name, path in adapters.items()],
        "--max-new-tokens",
        "6",
    ]


def out_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_as_its_own_process_answers_without_bitsandbytes(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """`python -m stages.generate` on a base saved unquantised never imports bitsandbytes
    (peft would), and answers as the adapter does in this process, where it is imported."""
    out = tmp_path / "answers.jsonl"
    args = [*common_args(tiny_base, adapters), "--use", "b", "--out", str(out), QUESTIONS[0]]
    done = stage_process(tmp_path, "stages.generate", *args, python=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-3000:]
    imported = imported_modules(done.stderr)
    assert "peft" in imported and not {m for m in imported if m.startswith("bitsandbytes.")}
    alone = Assistant(tiny_base, {"b": adapters["b"]}, dtype="float32")
    expected = alone.answer([{"role": "user", "content": QUESTIONS[0]}], "b", **GREEDY)
    assert [r["answer"] for r in out_rows(out)] == [expected]


def test_generate_command_answers_files_and_stdin(
    tiny_base: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from stages.generate import main

    common = common_args(tiny_base, adapters)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in QUESTIONS[:2]))
    out = tmp_path / "answers.jsonl"
    assert main([*common, "--prompts", str(prompts), "--use", "b,a", "--out", str(out)]) == 0
    rows = out_rows(out)
    assert [r["adapter"] for r in rows] == ["b", "a", "b", "a"]
    alone = Assistant(tiny_base, {"b": adapters["b"]}, dtype="float32")
    assert rows[0]["answer"] == alone.answer(
        [{"role": "user", "content": QUESTIONS[0]}], "b", **GREEDY
    )
    printed = capsys.readouterr().out
    assert all(f"[{r['adapter']}] {r['answer']}" in printed for r in rows)

    monkeypatch.setattr(
        sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n/use b\n{QUESTIONS[0]}\n/quit\n")
    )
    assert main([*common, "-i", "--out", str(out)]) == 0
    rows = out_rows(out)
    # without --use every adapter answers, until /use b
    assert [r["adapter"] for r in rows] == ["a", "b", "b"] and rows[2]["answer"] == alone.answer(
        [{"role": "user", "content": QUESTIONS[0]}], "b", **GREEDY
    )

    assert main([*common, "--use", "c", "hi"]) == 2
    assert "--use 'c': not a loaded adapter or base (use a, b, base)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    for text, problem in [
        ('{"question": "hi"}\n', ":1: needs a non-empty 'instruction' string or 'messages'"),
        # blank lines count: the line, not the row
        ('{"instruction": "hi"}\n\n{"messages": [{"role": "user"}]}\n', ":3: messages[0] needs"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
            '"yo"}]}',
            ":1: messages must end with a user turn",
        ),
        ('{"instruction": "hi"}\n["hi"]\n', ":2: expected a JSON object, got list"),
    ]:
        bad.write_text(text)
        assert main([*common, "--prompts", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"{bad}{problem}" in err and "Traceback" not in err, err
    bad.write_bytes(b'{"instruction": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert main([*common, "--prompts", str(bad)]) == 2
    assert (
        f"{bad}: not UTF-8 text (invalid continuation byte at byte 20)" in capsys.readouterr().err
    )
    for option, value, problem in [
        ("--max-new-tokens", "0", "must be > 0, got 0"),
        ("--temperature", "-1", "must be > 0, got -1"),
        ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
        ("--max-new-tokens", "many", "expected a number, got 'many'"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main([*common, option, value, "hi"])
        assert exited.value.code == 2
        assert f"argument {option}: {problem}" in capsys.readouterr().err


class InterruptedStdin(io.StringIO):
    """stdin whose lines run out in a Ctrl-C (KeyboardInterrupt), as a person presses it."""

    def readline(self, size: int | None = -1) -> str:
        line = super().readline(size)
        if not line:
            raise KeyboardInterrupt
        return line


def test_interactive_answers_with_every_name_and_keeps_answers_on_ctrl_c(
    tiny_base: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from stages.generate import main

    common = common_args(tiny_base, adapters)
    out = tmp_path / "answers.jsonl"
    lines = [QUESTIONS[0], "/use", "/use b,x", "/use b", QUESTIONS[1], "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert main([*common, "-i", "--use", "a,base", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = out_rows(out)
    # every name in --use answers each prompt; a bare /use shows the names, is no prompt
    assert [(r["adapter"], r["messages"][0]["content"]) for r in rows] == [
        ("a", QUESTIONS[0]),
        (BASE, QUESTIONS[0]),
        ("b", QUESTIONS[1]),
    ]
    assert "[a,base]> " in printed and f"[{BASE}] {rows[1]['answer']}" in printed
    assert "answering with a, base; /use NAME" in printed
    assert "unknown adapter 'x'; loaded: a, b, base" in printed

    # Ctrl-C at the next prompt: what was answered is in --out
    monkeypatch.setattr(sys, "stdin", InterruptedStdin(f"{QUESTIONS[0]}\n"))
    assert main([*common, "-i", "--use", "a,b", "--out", str(out)]) == 130
    assert [r["adapter"] for r in out_rows(out)] == ["a", "b"]
    assert f"interrupted; the 2 answers given are in {out}" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", InterruptedStdin(""))  # before any answer
    assert main([*common, "-i", "--out", str(out)]) == 130
    assert f"interrupted; {out} untouched" in capsys.readouterr().err
    assert len(out_rows(out)) == 2


def test_generate_bad_paths_files_and_empty_prompts_get_one_line_naming_them(
    tiny_base: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each bad path or file: exit 2, one line naming it, no traceback; an --out that cannot be
    written is refused before anything is generated (the answers were lost, and a stray
    `.NAME.tmp` was left beside it)."""
    from stages.generate import main

    common = common_args(tiny_base, {"a": adapters["a"]})
    folder = tmp_path / "answers"
    folder.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    truncated = tmp_path / "truncated"
    shutil.copytree(adapters["a"], truncated)
    os.truncate(truncated / "adapter_model.safetensors", 5000)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(adapters["a"], bad_config)
    (bad_config / "adapter_config.json").write_text("{'r': 4}")
    for args, problem in [
        (["--out", str(folder), "hi"], f"--out {folder}: is a folder; give a file"),
        (["--out", str(afile / "a.jsonl"), "hi"], f"--out {afile / 'a.jsonl'}: {afile} is not a"),
        (["--prompts", str(folder)], f"--prompts {folder}: cannot read it (Is a directory)"),
        (
            ["--prompts", str(tmp_path / "none.txt")],
            f"--prompts {tmp_path / 'none.txt'}: cannot read it (No such file or directory)",
        ),
        (
            ["--adapter", f"h={truncated}", "hi"],
            f"adapter 'h': {truncated / 'adapter_model.safetensors'}: unreadable",
        ),
        (
            ["--adapter", f"h={bad_config}", "hi"],
            f"adapter 'h': {bad_config / 'adapter_config.json'}: not valid JSON (Expecting",
        ),
    ]:
        assert main([*common, *args]) == 2, args
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and problem in err[0] and "[a] " not in captured.out, captured
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for args, problem in [
        ([""], "empty prompt"),
        (["   "], "empty prompt"),
        (["--prompts", str(empty)], f"--prompts {empty}: no prompts in it"),
    ]:
        assert main([*common, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and problem in err[0], err
    empty.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "answers",
        "bad_config",
        "file.txt",
        "truncated",
    ]


def test_write_text_leaves_no_temporary_file_when_it_fails(tmp_path: Path) -> None:
    from lorapipe.io import write_text

    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        write_text(tmp_path / "folder", "text")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_write_texts_replaces_no_file_unless_every_text_was_written(tmp_path: Path) -> None:
    """The second text cannot be encoded (a lone surrogate): the first file, whose text was
    written first, keeps its old content, and no hidden sibling is left."""
    from lorapipe.io import write_texts

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text("old a")
    with pytest.raises(UnicodeEncodeError):
        write_texts({first: "new a", second: "new b \ud800"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert first.read_text() == "old a"
    write_texts({first: "new a", second: "new b"})
    assert (first.read_text(), second.read_text()) == ("new a", "new b")


def test_generate_with_the_base_alone_needs_no_trained_adapter(
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In a project whose adapter is not trained yet, `--use base` answers (the default adapter
    was loaded anyway, and refused); asking for the adapter says to train it."""
    from stages.generate import main

    missing = tmp_path / "models/adapter"
    params = {"paths": {"base": str(tiny_base), "adapter": str(missing)}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    assert main(["--use", BASE, "--max-new-tokens", "2", "hi"]) == 0
    assert f"[{BASE}] " in capsys.readouterr().out
    assert main(["--max-new-tokens", "2", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"generate: error: {missing}: no trained adapter; train it first (`dvc repro train`), "
        "or answer with the base alone (--use base)\n"
    )


def test_generate_gives_every_model_the_system_prompt_evaluate_gives(
    tiny_base: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The base answered with no system prompt while evaluate gave it format.system_prompt (the
    formatted test prompts), so `--use base` differed from reports/predictions.jsonl. Now every
    model answers the formatted prompt, unless --system-prompt; an adapter trained with another
    system prompt gets a note."""
    from lorapipe.generation import generate
    from lorapipe.models import load_base_model
    from stages.generate import main

    system = "Answer with the value only."
    params = {"paths": {"base": str(tiny_base)}, "format": {"system_prompt": system}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    other = tmp_path / "other"  # adapter a, trained (its lineage says) with another prompt
    shutil.copytree(adapters["a"], other)
    pin = json.loads((tiny_base / "pin.json").read_text())
    lineage = {"base_model": pin, "params": {"format": {"system_prompt": "Be brief."}}}
    (other / "lineage.json").write_text(json.dumps(lineage))
    monkeypatch.chdir(tmp_path)
    tok, model = load_tokenizer(tiny_base), load_base_model(tiny_base, dtype="float32")

    def evaluated(prompt: str | None) -> str:
        """The base's answer to the test prompt format writes with `prompt` (evaluate's)."""
        row = {"id": "0", "instruction": QUESTIONS[0], "response": "[1, 2, 3]"}
        formatted = format_rows([row], tok, prompt)[0]["prompt"]
        return generate(model, tok, [formatted], batch_size=1, **GREEDY)[0]

    out = tmp_path / "answers.jsonl"
    run = ["--adapter", f"a={other}", "--use", f"a,{BASE}", "--max-new-tokens", "6"]
    assert main([*run, "--out", str(out), QUESTIONS[0]]) == 0
    assert out_rows(out)[1]["answer"] == evaluated(system) != evaluated(None)
    err = capsys.readouterr().err
    assert (
        f"adapter 'a' was trained with the system prompt 'Be brief.'; every model answers "
        f"with {system!r}"
    ) in err
    assert main([*run, "--out", str(out), "--system-prompt", "Be brief.", QUESTIONS[0]]) == 0
    assert out_rows(out)[1]["answer"] == evaluated("Be brief.")
    assert "was trained with" not in capsys.readouterr().err


def test_generate_refuses_a_prompt_longer_than_the_context_before_generating(
    tiny_base: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A prompt past max_position_embeddings (256 here) was answered with garbage and exit 0;
    now one line, before anything is generated (in -i: said, and the next line is answered)."""
    from stages.generate import main

    common = common_args(tiny_base, {"a": adapters["a"]})
    monkeypatch.chdir(tmp_path)  # no params.yaml: no system prompt
    long = " ".join(["word"] * 300)
    tok = load_tokenizer(tiny_base)
    tokens = len(tok(build_prompt(tok, long))["input_ids"])
    assert tokens > 256
    assert main([*common, long]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (  # after transformers' loading bar
        f"generate: error: prompt 1 is {tokens:,} tokens; the model's context is 256 "
        "(with --max-new-tokens 6)"
    )
    assert "[a] " not in captured.out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"hi\n{long}\n")
    assert main([*common, "--prompts", str(prompts)]) == 2
    captured = capsys.readouterr()
    assert f"--prompts {prompts}: prompt 2 is {tokens:,} tokens" in captured.err
    assert "[a] " not in captured.out  # not even prompt 1
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\nhi\n"))
    assert main([*common, "-i"]) == 0
    printed = capsys.readouterr().out
    assert f"this prompt is {tokens:,} tokens" in printed and printed.count("[a] ") == 1
