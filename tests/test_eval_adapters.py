"""Several adapters evaluated at once, on one loaded base: each scores as it would alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorapipe.chat import build_prompt
from lorapipe.config import EvalCfg
from lorapipe.evaluation import evaluate_models
from lorapipe.models import load_base_model, load_tokenizer
from lorapipe.pyqa import generate as make_questions
from lorapipe.retain import base_references, read_retain
from tests.conftest import conf_group

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


@pytest.mark.parametrize("name", ["base", "adapter", "9lives", "a b"])
def test_adapter_names_that_would_clash_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot name an adapter"):
        EvalCfg(**conf_group("eval", adapters={name: "x"}))


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
