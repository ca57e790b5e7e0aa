"""The evaluation report (HTML self-contained and escaped, Markdown table), the validation loss
against the model's own loss, and seeded sampling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lorapipe.chat import build_prompt
from lorapipe.evaluation import completion_loss
from lorapipe.generation import generate
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.pyqa import generate as make_questions
from lorapipe.report import render_html, render_markdown, write_reports

METRICS = {
    "adapter": {
        "exact_match": 0.954397,
        "rouge1": 0.960912,
        "rouge2": 0.236156,
        "rougeL": 0.960912,
        "rougeLsum": 0.960912,
        "val_loss": 0.123456,
        "val_perplexity": 1.131401,
    },
    "base": {
        "exact_match": 0.0,
        "rouge1": 0.015775,
        "rouge2": 0.0,
        "rougeL": 0.015775,
        "rougeLsum": 0.015775,
        "val_loss": 5.654321,
        "val_perplexity": 285.5,
    },
    "examples": 12,
    "val_examples": 8,
}


def _row(i: int, rouge_l: float, exact: float) -> dict[str, object]:
    scores = {"rouge1": rouge_l, "rouge2": 0.0, "rougeL": rouge_l, "rougeLsum": rouge_l}
    return {
        "id": f"id{i:02d}",
        "prompt": f"<|user|>\nWhat does `len([{i}])` return? <b>&</b></s>\n<|assistant|>\n",
        "reference": "1",
        "base": "\x01<script>alert(1)</script>",
        "adapter": f"answer-{i}",
        "scores": {
            "base": {**scores, "rougeL": 0.0, "exact_match": 0.0},
            "adapter": {**scores, "exact_match": exact},
        },
    }


# ids 00-05 perfect, 06-08 half right, 09-11 wrong, the worst of them (11) scoring 0 twice.
PREDICTIONS = [_row(i, 1.0, 1.0) for i in range(6)] + [
    _row(6, 0.5, 0.0),
    _row(7, 0.5, 0.0),
    _row(8, 0.6, 0.0),
    _row(9, 0.2, 0.0),
    _row(10, 0.1, 0.0),
    _row(11, 0.0, 0.0),
]


def _sections(page: str) -> tuple[str, str]:
    """The best and the worst sections of the page (the worst one runs to the end)."""
    assert page.count('<section id="best">') == 1 and page.count('<section id="worst">') == 1
    before_worst, worst = page.split('<section id="worst">')
    return before_worst.split('<section id="best">')[1], worst


def test_html_is_self_contained_escaped_and_complete() -> None:
    page = render_html(METRICS, PREDICTIONS)
    assert "http" not in page  # no URL of any kind: nothing to fetch
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # model output escaped
    assert "&lt;|user|&gt;" in page and "<|user|>" not in page
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in page
    assert "\\x01" in page and "\x01" not in page  # control characters shown, not emitted
    assert page.count("<svg") == 2  # scores and validation loss
    for model in ("base", "adapter"):
        for key, value in METRICS[model].items():  # type: ignore[attr-defined]
            assert f"<td>{value:.4f}</td>" in page, (model, key)
    best, worst = _sections(page)
    assert best.count('class="example"') == 5 and worst.count('class="example"') == 5
    assert re.findall(r"<code>(id\d+)</code>", best) == [f"id{i:02d}" for i in range(5)]
    assert re.findall(r"<code>(id\d+)</code>", worst) == ["id11", "id10", "id09", "id06", "id07"]
    assert render_html(METRICS, PREDICTIONS) == page  # deterministic


def test_markdown_table_has_a_row_per_metric_with_both_models(tmp_path: Path) -> None:
    text = render_markdown(METRICS, PREDICTIONS)
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["metric", "base", "adapter"]
    labels = {
        "exact_match": "exact match",
        "rouge1": "ROUGE-1",
        "rouge2": "ROUGE-2",
        "rougeL": "ROUGE-L",
        "rougeLsum": "ROUGE-Lsum",
        "val_loss": "val loss",
        "val_perplexity": "val perplexity",
    }
    for key, label in labels.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == 1, label
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[1] == f"{METRICS['base'][key]:.4f}"  # type: ignore[index]
        assert cells[2] == f"{METRICS['adapter'][key]:.4f}"  # type: ignore[index]
    assert "## Best 5 examples" in text and "## Worst 5 examples" in text
    # Without validation loss the rows are simply absent.
    plain = {
        m: {k: v for k, v in METRICS[m].items() if not k.startswith("val")}  # type: ignore[attr-defined]
        for m in ("base", "adapter")
    }
    assert "val loss" not in render_markdown(plain, PREDICTIONS)
    assert render_html(plain, PREDICTIONS).count("<svg") == 1
    md, page = write_reports(tmp_path, METRICS, PREDICTIONS)
    assert md.read_text(encoding="utf-8") == text and page.name == "report.html"


def test_documented_render_command_writes_what_evaluate_writes(tmp_path: Path) -> None:
    """docs/evaluation-report.md's "render a report from existing results" command, run as
    printed (its output moved under tmp_path), on the committed reports/: the same page as
    `write_reports`, what the evaluate stage writes, retain section included."""
    import json
    import os
    import subprocess
    import sys

    from lorapipe.io import read_jsonl

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs/evaluation-report.md").read_text()
    intro = "To render a report from existing results"
    command = re.search(r"```bash\n(.*?)```", docs[docs.index(intro) :], re.S)
    assert command, "the documented command is gone"
    out = tmp_path / "report.html"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = command.group(1).replace("/tmp/report.html", str(out))
    subprocess.run(["bash", "-c", script], cwd=root, env=env, check=True)
    reports = root / "reports"
    expected = write_reports(
        tmp_path / "evaluate",
        json.loads((reports / "metrics.json").read_text()),
        read_jsonl(reports / "predictions.jsonl"),
        read_jsonl(reports / "retain.jsonl"),
    )[1]
    assert 'id="retain"' in expected.read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == expected.read_text(encoding="utf-8")


def test_val_loss_equals_the_models_own_loss_for_one_example(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    prompt = build_prompt(tok, "What does `len([1, 2])` return?")
    example = {"prompt": prompt, "completion": "2" + tok.eos_token}
    prompt_ids = tok(prompt)["input_ids"]
    full_ids = tok(prompt + example["completion"])["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids) + 1
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor([full_ids]), labels=torch.tensor([labels])
        ).loss.item()
    assert completion_loss(model, tok, [example], batch_size=4) == pytest.approx(expected, rel=1e-5)
    # Batched with longer examples (right padding), the short one still counts the same.
    others = [
        {"prompt": build_prompt(tok, q["instruction"]), "completion": q["response"] + tok.eos_token}
        for q in make_questions(5, seed=2)
    ]
    one_by_one = [completion_loss(model, tok, [ex], batch_size=1) for ex in [example, *others]]
    tokens = [
        len(tok(ex["prompt"] + ex["completion"])["input_ids"]) - len(tok(ex["prompt"])["input_ids"])
        for ex in [example, *others]
    ]
    weighted = sum(loss * n for loss, n in zip(one_by_one, tokens, strict=True)) / sum(tokens)
    batched = completion_loss(model, tok, [example, *others], batch_size=6)
    assert batched == pytest.approx(weighted, rel=1e-5)


def test_val_loss_from_the_supervised_positions_alone_equals_every_positions(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`completion_loss` computes the examples' shared beginning once (the chat template's
    system turn) and sends only the positions that predict a supervised token through the
    output layer (`logits_to_keep`); with every position projected, as for a model whose
    forward does not take it, the loss is the same. (That the shared beginning changes no
    loss: the test above, batched against the model's own loss one example at a time.)"""
    from lorapipe import evaluation

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    examples = [
        {"prompt": build_prompt(tok, q["instruction"]), "completion": q["response"] + tok.eos_token}
        for q in make_questions(9, seed=7)
    ]
    assert evaluation._keeps_logits(model)
    encoded = [
        (tok(ex["prompt"] + ex["completion"])["input_ids"], len(tok(ex["prompt"])["input_ids"]))
        for ex in examples
    ]
    shared, prefix = evaluation._shared_start(model, encoded)
    assert 5 <= shared < min(start for _, start in encoded) and prefix.get_seq_length() == shared
    projected: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))
    compact = completion_loss(model, tok, examples, batch_size=4)
    monkeypatch.setattr(evaluation, "_keeps_logits", lambda _model: False)
    widths = len(projected)
    full = completion_loss(model, tok, examples, batch_size=4)
    assert compact == pytest.approx(full, rel=1e-6)
    assert sum(projected[:widths]) < sum(projected[widths:]) / 2  # far fewer positions


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tiny_base: Path) -> None:
    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32")
    prompts = [build_prompt(tok, r["instruction"]) for r in make_questions(6, seed=4)]
    kwargs = {"batch_size": 3, "max_new_tokens": 12}
    greedy = generate(model, tok, prompts, **kwargs)
    assert generate(model, tok, prompts, **kwargs, do_sample=False) == greedy

    def sample(seed: int) -> list[str]:
        return generate(model, tok, prompts, **kwargs, do_sample=True, temperature=5.0, seed=seed)

    first = sample(7)
    assert sample(7) == first
    assert first != greedy
    assert sample(8) != first
