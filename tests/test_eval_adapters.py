"""Several adapters evaluated at once, on one loaded base: each scores as it would alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorapipe.chat import build_prompt
from lorapipe.config import NOT_ADAPTER_NAMES, RETAIN, ConfigError, EvalCfg, validate
from lorapipe.evaluation import evaluate_models
from lorapipe.formatting import format_rows
from lorapipe.io import read_jsonl, write_jsonl
from lorapipe.models import ADAPTER_WEIGHTS, load_base_model, load_tokenizer
from lorapipe.params import compose
from lorapipe.pyqa import generate as make_questions
from lorapipe.retain import base_references, read_retain
from tests.conftest import broken_adapter, conf_group, run_stage, tiny_model_overrides

ROOT = Path(__file__).resolve().parents[1]

CFG = EvalCfg(**conf_group("eval", batch_size=4, max_new_tokens=8, val_loss_examples=0))


def _adapter(base: Path, out: Path, *, seed: int, trained: bool) -> Path:
    """A LoRA adapter on `base`: PEFT's own init (B = 0: no change to the base) or, when
    `trained`, random non-zero A and B drawn from `seed` (large enough to change answers)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=not trained
    )
    model = get_peft_model(load_base_model(base, dtype="float32"), config)
    if trained:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return out


def test_extra_adapters_score_as_they_would_alone(tiny_base: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_base)
    examples = [
        {"id": str(i), "prompt": build_prompt(tok, q["instruction"]), "reference": q["response"]}
        for i, q in enumerate(make_questions(8, seed=5))
    ]
    a = _adapter(tiny_base, tmp_path / "a", seed=1, trained=True)
    b = _adapter(tiny_base, tmp_path / "b", seed=2, trained=True)
    zero = _adapter(tiny_base, tmp_path / "zero", seed=3, trained=False)

    retain = read_retain(ROOT / "data/retain/eval.jsonl")[:6]
    model = load_base_model(tiny_base, dtype="float32")
    refs = base_references(model, tok, retain, system_prompt=None, batch_size=4, max_new_tokens=8)
    metrics, rows, kept = evaluate_models(
        CFG, tiny_base, a, examples, extra_adapters={"b": b, "zero": zero}, retain=(refs, 8)
    )
    models = [k for k in metrics if isinstance(metrics[k], dict) and k != "retain"]
    assert models == ["base", "adapter", "b", "zero"]
    assert all({"base", "adapter", "b", "zero"} <= set(r["scores"]) for r in rows)
    outputs = {m: [r[m] for r in rows] for m in ("base", "adapter", "b", "zero")}
    # An adapter that changes nothing answers exactly as the base does ...
    assert outputs["zero"] == outputs["base"]
    # ... the two random adapters answer differently from each other and from the base ...
    assert outputs["b"] != outputs["adapter"] and outputs["b"] != outputs["base"]
    # ... and each one, evaluated later on the shared base, answers as it does alone.
    _, alone, _ = evaluate_models(CFG, tiny_base, b, examples)
    assert [r["adapter"] for r in alone] == outputs["b"]
    # Retain: the base is 1.0 by construction, and so is an adapter that changes nothing; the
    # random one changes answers.
    assert metrics["retain"]["examples"] == 6 and metrics["retain"]["base"]["identical"] == 1.0
    assert metrics["retain"]["zero"]["identical"] == 1.0
    assert metrics["retain"]["adapter"]["identical"] < 1.0
    assert [r["zero"] for r in kept] == [r["reference"] for r in refs]


@pytest.mark.parametrize("name", [*NOT_ADAPTER_NAMES, "9lives", "a b"])
def test_adapter_names_that_would_clash_are_refused(name: str) -> None:
    """An adapter named like a key evaluation writes beside the models would overwrite it:
    `examples` replaced metrics.json's example count with its scores (and report.md began with
    a dict), `retain` its own test scores with the retain section."""
    with pytest.raises(ValueError, match="cannot name an adapter"):
        EvalCfg(**conf_group("eval", adapters={name: "x"}))
    raw = compose(ROOT / "conf", [])
    raw["eval"]["adapters"] = {name: "x"}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value).startswith(f"eval.adapters.{name}: cannot name an adapter")
    assert "\n" not in str(err.value)


def test_evaluate_refuses_an_adapter_named_like_a_metrics_key_in_one_line() -> None:
    status, err = run_stage("stages.evaluate", "eval.adapters={examples: models/adapter}")
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("evaluate: error: eval.adapters.examples: cannot name an adapter")


def test_a_folded_adapter_answers_as_the_unfolded_one(tiny_base: Path, tmp_path: Path) -> None:
    """The evaluate stage generates with the adapter folded into the weights (faster): the same
    greedy answers and the same validation loss as computing LoRA's products apart."""
    from peft import PeftModel

    from lorapipe.evaluation import adapter_folded, completion_loss
    from lorapipe.generation import generate_with_stops

    tok = load_tokenizer(tiny_base)
    questions = make_questions(24, seed=7)
    prompts = [build_prompt(tok, q["instruction"]) for q in questions]
    val = [
        {"prompt": p, "completion": q["response"] + tok.eos_token}
        for p, q in zip(prompts, questions, strict=True)
    ]
    adapter = _adapter(tiny_base, tmp_path / "a", seed=1, trained=True)
    model = PeftModel.from_pretrained(load_base_model(tiny_base, dtype="float32"), str(adapter))
    base_weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    before = base_weight.detach().clone()

    apart, apart_stops = generate_with_stops(model, tok, prompts, batch_size=8, max_new_tokens=12)
    apart_loss = completion_loss(model, tok, val, batch_size=8)
    with adapter_folded(model) as folded:
        assert not torch.equal(base_weight, before)  # folded in: the base layer alone runs
        answers, stops = generate_with_stops(folded, tok, prompts, batch_size=8, max_new_tokens=12)
        loss = completion_loss(folded, tok, val, batch_size=8)
    assert answers == apart and stops == apart_stops
    assert len(set(answers)) > 1  # the answers say something (a random adapter changes them)
    assert loss == pytest.approx(apart_loss, rel=1e-5)
    # Taken out again: the base weights as they were, to rounding.
    torch.testing.assert_close(base_weight, before, rtol=1e-5, atol=1e-6)


# --- the evaluate stage: every adapter checked before any model loads ---------------------------


@pytest.fixture(scope="module")
def project(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the evaluate stage reads, for the tiny base: 4 test and 4 validation examples, the
    base's references to 2 retain prompts and the pipeline's adapter (PEFT's init). No records
    or lineage beside them, so none is checked against the params."""
    out = tmp_path_factory.mktemp("project")
    tok = load_tokenizer(tiny_base)
    rows = [{"id": str(i), **q} for i, q in enumerate(make_questions(8, seed=5))]
    write_jsonl(out / "formatted/test.jsonl", format_rows(rows[:4], tok, None))
    write_jsonl(out / "formatted/val.jsonl", format_rows(rows[4:], tok, None))
    retain = read_retain(ROOT / "data/retain/eval.jsonl")[:2]
    model = load_base_model(tiny_base, dtype="float32")
    refs = base_references(model, tok, retain, system_prompt=None, batch_size=2, max_new_tokens=4)
    write_jsonl(out / "references/eval.jsonl", refs)
    _adapter(tiny_base, out / "adapter", seed=1, trained=False)
    return out


def evaluate_args(tiny_base: Path, project: Path, reports: Path, *more: str) -> list[str]:
    return [
        *tiny_model_overrides(),
        f"paths.base={tiny_base}",
        f"paths.adapter={project / 'adapter'}",
        f"paths.formatted={project / 'formatted'}",
        f"paths.references={project / 'references'}",
        f"paths.reports={reports}",
        "eval.batch_size=4",
        "eval.max_new_tokens=4",
        "retain.max_new_tokens=4",
        *more,
    ]


EXTRA_ADVICE = (
    "; point eval.adapters.x at an adapter folder as PEFT saves one (adapter_config.json and "
    "adapter_model.safetensors)"
)


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("json", "adapter_config.json: not valid JSON (Expecting property name"),
        ("truncated", f"{ADAPTER_WEIGHTS}: unreadable: truncated or not safetensors (Error "),
        ("missing", ": no such folder"),
    ],
)
def test_a_bad_extra_adapter_stops_evaluate_before_any_model_loads(
    tiny_base: Path, project: Path, tmp_path: Path, how: str, problem: str
) -> None:
    """A corrupt or missing extra adapter: one line naming eval.adapters.x and the file, with
    advice for an extra adapter (not "rerun the train stage"), before any model loads; it was a
    traceback from peft or safetensors after the base and the adapter had answered every
    prompt, or for a missing folder advice to retrain."""
    bad = broken_adapter(project / "adapter", tmp_path / "x", how)
    reports = tmp_path / "reports"
    args = evaluate_args(tiny_base, project, reports, f'eval.adapters={{x: "{bad}"}}')
    status, err = run_stage("stages.evaluate", *args)
    assert status == 2 and len(err) == 1, err
    where = f"{bad}{'/' if how != 'missing' else ''}"
    assert err[0].startswith(f"evaluate: error: eval.adapters.x: {where}{problem}"), err
    assert err[0].endswith(EXTRA_ADVICE), err
    assert not reports.exists()


def test_a_truncated_pipeline_adapter_stops_evaluate_with_advice_to_retrain(
    tiny_base: Path, project: Path, tmp_path: Path
) -> None:
    bad = broken_adapter(project / "adapter", tmp_path / "adapter", "truncated")
    reports = tmp_path / "reports"
    args = evaluate_args(tiny_base, project, reports, f"paths.adapter={bad}")
    status, err = run_stage("stages.evaluate", *args)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"evaluate: error: {bad / ADAPTER_WEIGHTS}: unreadable: truncated")
    assert err[0].endswith("; rerun the train stage (`dvc repro train`)"), err
    assert not reports.exists()


def test_evaluate_writes_nothing_beside_the_models_but_the_names_adapters_cannot_take(
    tiny_base: Path, project: Path, tmp_path: Path
) -> None:
    """The stage run through with an extra adapter (so the project above is one it runs on):
    every key of metrics.json, of its retain section and of each predictions and retain row
    that is not a model's name is in NOT_ADAPTER_NAMES, the names eval.adapters refuses. A key
    evaluation starts writing without adding it there fails here."""
    reports = tmp_path / "reports"
    extra = f'eval.adapters={{b: "{project / "adapter"}"}}'
    status, err = run_stage("stages.evaluate", *evaluate_args(tiny_base, project, reports, extra))
    assert status == 0, err
    # Made outside the pipeline: nothing says which base it was trained on, and the user is told.
    note = f"evaluate: note: eval.adapters.b: {project / 'adapter'} has no lineage.json, so it is "
    assert [line for line in err if line.startswith(note)], err
    models = {"base", "adapter", "b"}
    metrics = json.loads((reports / "metrics.json").read_text())
    assert models < set(metrics) and models < set(metrics[RETAIN])
    assert set(metrics) - models == {"examples", "val_examples", "retain"}
    rows = [metrics, metrics[RETAIN], *read_jsonl(reports / "predictions.jsonl")]
    rows += read_jsonl(reports / "retain.jsonl")
    for row in rows:
        assert set(row) - models <= set(NOT_ADAPTER_NAMES), sorted(row)


def test_evaluate_interrupted_while_its_report_renders_keeps_the_last_runs_files(
    tiny_base: Path, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the HTML report renders: each of the stage's five files is the last
    complete run's, byte for byte, and no hidden sibling is left. The stage used to write the
    answers and metrics before rendering, so a run by hand stopped there left new answers (here
    2 instead of every test example) beside the old report."""
    reports = tmp_path / "reports"
    status, err = run_stage("stages.evaluate", *evaluate_args(tiny_base, project, reports))
    assert status == 0, err
    before = {p.name: p.read_bytes() for p in reports.iterdir()}
    assert sorted(before) == [
        "metrics.json",
        "predictions.jsonl",
        "report.html",
        "report.md",
        "retain.jsonl",
    ]

    def interrupted(*args: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("lorapipe.report.render_html", interrupted)
    args = evaluate_args(tiny_base, project, reports, "eval.max_examples=2")
    status, err = run_stage("stages.evaluate", *args)
    assert status == 130, err
    assert {p.name: p.read_bytes() for p in reports.iterdir()} == before
