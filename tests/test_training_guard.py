"""The trainable-parameter guard: wrong target names stop before training, naming the options."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from lorapipe.models import load_base_model
from lorapipe.training import TrainingError, adaptable_module_names, check_target_modules


def gpt2_tiny() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))


def test_llama_names_on_gpt2_stop_with_the_gpt2_names() -> None:
    with pytest.raises(TrainingError) as err:
        check_target_modules(gpt2_tiny(), ["q_proj", "v_proj"])
    message = str(err.value)
    assert "q_proj, v_proj match no layer" in message
    for name in ("c_attn", "c_proj", "c_fc"):
        assert name in message


def test_partly_matching_names_stop_on_llama(tiny_base: Path) -> None:
    model = load_base_model(tiny_base)
    with pytest.raises(TrainingError) as err:
        check_target_modules(model, ["q_proj", "query_key_value"])
    assert "query_key_value matches no layer" in str(err.value)  # said "match"
    assert "gate_proj" in str(err.value)


def test_matching_names_regex_and_all_linear_pass(tiny_base: Path) -> None:
    model = load_base_model(tiny_base)
    check_target_modules(model, ["q_proj", "v_proj"])
    check_target_modules(model, "all-linear")
    check_target_modules(model, r".*\.(q_proj|v_proj)")
    with pytest.raises(TrainingError, match="regex"):
        check_target_modules(model, r".*\.c_attn")


def test_adaptable_names_cover_linear_and_conv1d(tiny_base: Path) -> None:
    llama = adaptable_module_names(load_base_model(tiny_base))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        llama
    )
    assert {"c_attn", "c_proj", "c_fc"} <= set(adaptable_module_names(gpt2_tiny()))


def test_a_layer_name_given_as_a_string_hints_at_a_list(tiny_base: Path) -> None:
    """`lora.target_modules=q_proj` is a regex (peft matches a string against the full module
    name): the message said q_proj matches no module, then listed q_proj among the names."""
    model = load_base_model(tiny_base)
    with pytest.raises(TrainingError) as err:
        check_target_modules(model, "q_proj")
    assert str(err.value) == (
        "lora.target_modules: regex 'q_proj' matches no module; a string is a regex that must "
        "match a module's full name (such as model.layers.0.self_attn.q_proj); for layer names "
        "give a list, lora.target_modules=[q_proj], or match the end, '.*q_proj'"
    )
    check_target_modules(model, ".*q_proj")  # what the hint says works
