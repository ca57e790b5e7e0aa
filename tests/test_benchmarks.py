"""The benchmarks' own logic: the FLOP counts, the GPU script's code path on CPU, and the speed
benchmarks run small on the tiny pipeline."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the benchmark scripts importable as they import each other (from their folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_train_flops_counts_frozen_lora_and_attention(benchmarks: None, tiny_base: Path) -> None:
    from flops import train_flops
    from peft import LoraConfig, get_peft_model

    from lorapipe.models import load_base_model

    model = get_peft_model(
        load_base_model(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    c = model.config
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    # The tiny Llama has as many key/value heads as heads: q, k, v, o are all h x h.
    frozen = layers * (4 * h * h + 3 * h * i) + h * vocab  # + lm_head; embeddings are lookups
    lora = layers * 2 * 4 * (h + h)  # q_proj and v_proj: A (h x r) and B (r x h)
    expected = sum(n * (4 * frozen + 6 * lora) + 12 * layers * h * n * n for n in (5, 9))
    assert train_flops(model, [5, 9]) == expected


def _lora_step(tiny_base: Path, length: int = 7) -> tuple[Any, Any]:
    """A peft LoRA model of the tiny base (every linear layer) and one training pass over one
    sequence of `length` tokens, without padding, with the model's own loss."""
    from peft import LoraConfig, get_peft_model

    from lorapipe.models import load_base_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(load_base_model(tiny_base), config)
    ids = torch.randint(0, 200, (1, length))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return model, step


def test_flop_formula_is_what_torch_performs(benchmarks: None, tiny_base: Path) -> None:
    """flops.py's count against torch's own FLOP counter over a real forward and backward: the
    products of the linear layers (frozen, LoRA, output layer) are exactly the formula less its
    attention term (the CPU's fused SDPA kernel, whose products torch's counter does not see), and
    the recorder of benchmarks/products.py sees the same products."""
    from flops import attention_width, train_flops
    from products import ProductRecorder
    from torch.utils.flop_counter import FlopCounterMode

    model, step = _lora_step(tiny_base, length=7)
    model.enable_input_require_grads()  # the first layer's input gradient too, as counted
    with FlopCounterMode(display=False) as counter, ProductRecorder() as recorder:
        step()
    layers, width = attention_width(model.config)
    attention = 12 * layers * width * 7**2
    assert counter.get_total_flops() == train_flops(model, [7]) - attention
    assert sum(p.flops for p in recorder.products) == counter.get_total_flops()


@pytest.mark.parametrize("supervised_only", [True, False], ids=["pipeline", "trl-cpu-default"])
def test_counted_flops_are_what_the_trl_loss_performs(
    benchmarks: None, tiny_base: Path, supervised_only: bool
) -> None:
    """The train stage's loss (TRL's fused LM head: the output layer at the supervised positions
    only, `score_only_supervised_positions`, their logits kept on CPU, or at every one through
    TRL's kernel as TRL does on CPU by default, which the recipe side runs): the products a
    training pass dispatches, forward and backward, are exactly `performed_train_flops` less its
    attention term, with TRL's head computed a third time in its backward. Fails if the recorder
    misses the head's `mm(out=)` or the count TRL's recomputation."""
    from flops import attention_width, performed_train_flops, pipeline_head
    from products import ProductRecorder
    from train_memory import pipeline_loss
    from train_speed import output_layer_everywhere

    model, _ = _lora_step(tiny_base)
    assert pipeline_loss(model)  # compact on this CPU, as the train stage makes it
    model.enable_input_require_grads()  # the first layer's input gradient too, as counted
    ids = torch.randint(0, 200, (2, 9))
    labels = ids.clone()
    labels[0, :6] = labels[1, :4] = -100  # prompts: 6 and 4 positions; 3 and 5 supervised
    head = nullcontext() if supervised_only else output_layer_everywhere()
    with ProductRecorder() as recorder, head:
        model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    # positions that predict a supervised token: the label shifted by one
    supervised = [int((row[1:] != -100).sum()) for row in labels]
    loss = pipeline_head(supervised_only, "cpu")  # "supervised" (logits kept) or "trl"
    count = performed_train_flops(model, [9, 9], supervised, head=loss)
    layers, width = attention_width(model.config)
    assert sum(p.flops for p in recorder.products) == count - 2 * 12 * layers * width * 9**2


def test_replay_runs_the_recorded_products_again(benchmarks: None, tiny_base: Path) -> None:
    """The step's products as the pipeline runs them (LoRA's update fused in place, `addmm_`) are
    run again by `replay_seconds` with the same operators, shapes, strides and arguments, in the
    same order: a warm-up pass, then each timed one."""
    from products import PRODUCTS, ProductRecorder, replay_seconds, summary

    from lorapipe.fused_lora import fuse_lora_updates

    model, step = _lora_step(tiny_base)
    assert fuse_lora_updates(model) > 0
    with ProductRecorder() as recorded:
        step()
    ops = {p.op for p in recorded.products}
    assert torch.ops.aten.addmm_.default in ops and ops <= set(PRODUCTS)
    with ProductRecorder() as again:
        seconds = replay_seconds(recorded.products, repeats=2)
    assert again.products == recorded.products * 3
    result = summary(recorded.products, seconds, peak=1e9)
    assert result["products"] == len(recorded.products) and seconds > 0
    # (rounded to 4 places: a slow machine's fraction of 1e9 is ~0.002)
    assert result["matmul_peak_fraction"] == pytest.approx(
        result["flops"] / seconds / 1e9, abs=5e-5
    )


def test_gpu_script_runs_its_code_path_on_cpu(benchmarks: None, tmp_path: Path) -> None:
    from gpu_train import main

    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert main([*args, "--params", str(ROOT / "params.yaml")]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"lora-bf16", "qlora-nf4"}
    for r in result["variants"].values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and math.isfinite(r["loss"])
    # Same shape and adapters, so the same FLOPs per token: QLoRA's 4-bit layers are counted
    # by their logical shape, not by their packed storage.
    per_token = [r["model_flops_per_s"] / r["tokens_per_s"] for r in result["variants"].values()]
    assert per_token[0] == pytest.approx(per_token[1], rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script really runs")
def test_gpu_script_skips_without_cuda(
    benchmarks: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpu_train import main

    out = tmp_path / "gpu.json"
    assert main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA")
    assert json.loads(out.read_text())["skipped"].startswith("skipped: no CUDA")


def test_gpu_script_rejects_a_zero_step_count(benchmarks: None) -> None:
    from gpu_train import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--steps", "0"])
    assert exc.value.code == 2


def test_performed_flops_count_the_output_layer_where_it_runs(
    benchmarks: None, tiny_base: Path
) -> None:
    from flops import generation_flops, lm_head_weights, performed_train_flops, train_flops
    from peft import LoraConfig, get_peft_model

    from lorapipe.models import load_base_model

    model = get_peft_model(
        load_base_model(tiny_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    c = model.config
    head = c.hidden_size * c.vocab_size
    assert lm_head_weights(model) == head
    lengths, supervised = [5, 9], [2, 3]
    everywhere = performed_train_flops(model, lengths, supervised, head="model")
    assert everywhere == train_flops(model, lengths)
    # TRL's fused head, 6H a position: at the 12 with a next token, or the 5 supervised ones.
    trl = performed_train_flops(model, lengths, supervised, head="trl")
    assert trl - everywhere == 6 * head * 12 - 4 * head * 14
    compact = performed_train_flops(model, lengths, supervised, head="trl-supervised")
    assert everywhere - compact == 4 * head * 14 - 6 * head * 5
    kept = performed_train_flops(model, lengths, supervised, head="supervised")  # logits kept
    assert everywhere - kept == 4 * head * 14 - 4 * head * 5
    with pytest.raises(ValueError, match="head must be one of"):
        performed_train_flops(model, lengths, supervised, head="trl_supervised")

    # Generation: a prompt of 3 tokens and 3 new tokens = a prefill (output layer once) and two
    # one-token passes attending over 4 and 5 positions.
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    weights = layers * (4 * h * h + 3 * h * i) + head + layers * 2 * 4 * (h + h)
    prefill = 2 * (weights - head) * 3 + 2 * head + 4 * layers * h * 9
    decode = sum(2 * weights + 4 * layers * h * kv for kv in (4, 5))
    assert generation_flops(model, [3], [3]) == prefill + decode
    assert generation_flops(model, [3], [1]) == prefill  # the first token comes from the prefill


@pytest.mark.parametrize("batch_size", [6, 2])
def test_generation_flops_are_what_batched_generation_performs(
    benchmarks: None, tiny_base: Path, batch_size: int
) -> None:
    """The products `generate_with_stops` dispatches (torch's own FLOP counter) for prompts of
    one length that share their beginning, each batch's shared part computed once, are the
    counted FLOPs less the attention term (CPU SDPA, which torch's counter does not see); a
    count of every prompt whole would be higher."""
    from flops import attention_width, batched_generation_flops, generation_flops
    from torch.utils.flop_counter import FlopCounterMode

    from lorapipe.generation import generate_with_stops
    from lorapipe.models import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_base)
    model = load_base_model(tiny_base, dtype="float32").eval()
    prompts = [f"The letter {c} comes first" for c in "abcdef"]
    ids = [tok(p)["input_ids"] for p in prompts]
    (length,) = {len(i) for i in ids}  # one length: no padding, which is computed, not counted
    shared = next(j for j in range(length) if len({i[j] for i in ids}) > 1)
    assert 2 <= shared <= length - 3  # a prefix, then something of each prompt's own
    with FlopCounterMode(display=False) as counter:
        generate_with_stops(model, tok, prompts, batch_size=batch_size, max_new_tokens=1)
    counted = batched_generation_flops(model, ids, [1] * 6, batch_size=batch_size)
    layers, width = attention_width(model.config)
    attention = 6 // batch_size * 4 * layers * width * shared**2  # each batch's prefix
    attention += 6 * 4 * layers * width * (length - shared) * length
    assert counter.get_total_flops() == counted - attention
    assert counted < generation_flops(model, [length] * 6, [1] * 6)


def ratio_of_rounded(ratio: float, num: float, den: float, *, step: float) -> bool:
    """Whether `ratio` (of unrounded figures, itself rounded to 2 places) can be num / den, the
    two given rounded to `step`."""
    half = step / 2
    return (num - half) / (den + half) - 0.01 <= ratio <= (num + half) / (den - half) + 0.01


@pytest.mark.parametrize("pack", [True, False], ids=["padding-free", "padded"])
def test_step_work_counts_every_real_and_supervised_token_of_an_epoch(
    benchmarks: None,
    tiny_base: Path,
    formatted: Path,
    train_params: Any,
    tmp_path: Path,
    pack: bool,
) -> None:
    """The steady side's tokens and FLOPs come from what the model's forward passes were given:
    over one epoch that is every example once, so its counts must equal the examples' own (the
    tokenizer's, as the format stage's mask audit counts them), packed in one row or padded."""
    from train_speed import StepWork

    from lorapipe.formatting import mask_audit
    from lorapipe.io import read_jsonl
    from lorapipe.models import load_tokenizer
    from lorapipe.training import train_adapter

    epoch = ("train.max_steps=-1", "train.epochs=1", "train.batch_size=8", "train.grad_accum=2")
    params = train_params(*epoch)
    seen = StepWork()
    train_adapter(
        params, tiny_base, formatted, tmp_path / "a", tmp_path / "c", callbacks=[seen], pack=pack
    )
    tokenizer = load_tokenizer(tiny_base)
    audits = [mask_audit(ex, tokenizer, 10**9) for ex in read_jsonl(formatted / "train.jsonl")]
    assert len(seen.steps) == 2 and all(step["seconds"] > 0 for step in seen.steps)
    lengths = sorted(n for step in seen.steps for n in step["lengths"])
    supervised = sorted(n for step in seen.steps for n in step["supervised"])
    assert lengths == sorted(a["total_tokens"] for a in audits)
    assert supervised == sorted(a["supervised_tokens"] for a in audits)


@pytest.mark.slow
def test_speed_benchmarks_run_on_a_pipeline_and_report_their_targets(
    benchmarks: None, repro_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make bench`'s training and evaluation scripts, on a copy of the shrunken tiny pipeline
    (its base, formatted data and adapter), as small as they go: every side runs and is timed,
    the target verdicts follow from the figures, and folding the adapter changes no answer."""
    import shutil

    import eval_speed
    import train_speed

    project = tmp_path / "project"
    shutil.copytree(repro_project, project, symlinks=True)
    monkeypatch.chdir(project)
    out = tmp_path / "eval.json"
    assert eval_speed.main(["--limit", "3", "--tutorial-every", "2", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["examples"] == 3 and ev["examples_total"] > 3 and ev["tutorial_every"] == 2
    for name in ("base", "adapter"):
        model = ev["models"][name]
        # one at a time on prompts 1 and 3 of the 3, compared per prompt with all 3 batched
        assert model["tutorial"]["examples"] == 2 and model["pipeline"]["examples"] == 3
        assert model["tutorial"]["seconds"] > 0 and model["pipeline"]["flops"] > 0
        per_prompt = (model[way]["seconds_per_prompt"] for way in ("tutorial", "pipeline"))
        assert ratio_of_rounded(model["speedup"], *per_prompt, step=1e-6)
        assert model["tutorial"]["relative_standard_error"] >= 0
    stage = ev["models"]["adapter"]["stage"]
    assert stage["examples"] == ev["examples_total"]
    assert stage["same_answers_unfolded"] == stage["examples"]
    assert len(stage["runs_seconds"]) == 3 and stage["seconds"] == sorted(stage["runs_seconds"])[1]
    assert ev["holds"]["base_speedup"] == (ev["models"]["base"]["speedup"] >= 10)
    assert ev["holds"]["adapter_peak_fraction"] == (stage["matmul_peak_fraction"] >= 0.5)

    out = tmp_path / "train.json"
    args = ["--examples", "24", "--rounds", "1", "--plain-steps", "2", "--out", str(out)]
    assert train_speed.main(args) == 0
    tr = json.loads(out.read_text())
    names = ("recipe", "pipeline", "plain loop", "pipeline steps")
    recipe, pipeline, plain, steps = (tr["sides"][s] for s in names)
    assert tr["examples"] == 24 and recipe["optimizer_steps"] == 3  # 24 / (2 x 4), one epoch
    assert tr["target_val_loss"] == pytest.approx(recipe["val_loss"], abs=1e-6)
    assert tr["reached_target"] and max(pipeline["val_loss"]) <= tr["target_val_loss"]
    assert plain["optimizer_steps"] == steps["optimizer_steps"] == 2
    assert [len(each) for each in steps["runs_step_seconds"]] == [3]  # an untimed first
    # the peak: the best of the part's two readings and each fresh process's two (1 round: one
    # process for the plain loop, one for the pipeline's steps)
    readings = tr["matmul_peak_readings"]
    assert len(readings) == 6 and min(readings) > 0
    assert tr["matmul_peak_flops_per_s"] == max(readings)
    assert "the best of 6 readings" in train_speed.markdown(tr)
    for side in (recipe, pipeline, plain, steps):
        assert side["seconds"] > 0 and side["tokens_per_s"] > 0
        assert side["matmul_peak_fraction"] == pytest.approx(
            side["flops_per_s"] / tr["matmul_peak_flops_per_s"], abs=1e-3
        )
    seconds = recipe["seconds"], pipeline["seconds"]
    assert ratio_of_rounded(tr["time_to_loss_ratio"], *seconds, step=0.01)
    ratio = steps["tokens_per_s"] / plain["tokens_per_s"]
    assert tr["plain_loop_ratio"] == pytest.approx(ratio, rel=0.01)
    alone = tr["products_alone"]
    assert alone["products"] > 0 and alone["seconds_alone"] > 0
    assert alone["flops_per_s"] == pytest.approx(alone["flops"] / alone["seconds_alone"], 1e-3)
    assert alone["matmul_peak_fraction"] == pytest.approx(
        alone["flops_per_s"] / tr["matmul_peak_flops_per_s"], abs=1e-3
    )  # against the same peak as the sides
    # make bench's targets table states the figures the verdicts come from
    from run_all import _eval_targets, _train_targets

    time_row, step_row, throughput_row = _train_targets(tr)
    assert f"{100 * steps['matmul_peak_fraction']:.1f}%" in step_row[1]
    assert f"({steps['tokens_per_s']:.0f} vs {plain['tokens_per_s']:.0f} " in throughput_row[1]
    verdicts = [row[3] for row in (time_row, step_row, throughput_row)]
    assert verdicts == [
        tr["holds"][k] for k in ("time_to_loss", "matmul_peak_fraction", "plain_loop")
    ]
    base_row, adapter_row = _eval_targets(ev)
    assert f"one at a time on {ev['models']['base']['tutorial']['examples']} of" in base_row[1]
    assert f"{100 * stage['matmul_peak_fraction']:.1f}% of" in adapter_row[1]
    assert tr["holds"] == {
        "time_to_loss": tr["time_to_loss_ratio"] >= 3,
        "matmul_peak_fraction": steps["matmul_peak_fraction"] >= 0.6,
        "plain_loop": tr["plain_loop_ratio"] >= 1.2,
    }


def test_the_overhead_target_allows_the_check_stage_and_evaluate_only(benchmarks: None) -> None:
    """An eval-only params change re-runs `check` (it validates every params change) and
    `evaluate`; anything more, or `evaluate` without `check`, does not hold."""
    from run_all import _overhead_targets

    def verdict(stages: list[str]) -> bool:
        noop = {"seconds": 1.0, "stages_ran": []}
        change = {"change": "eval.max_examples=64", "seconds": 40.0, "stages_ran": stages}
        return bool(_overhead_targets({"noop_repro": noop, "eval_only_change": change})[1][3])

    assert verdict(["check", "evaluate"]) and verdict(["evaluate", "check"])
    assert not verdict(["evaluate"]) and not verdict(["check", "train", "evaluate"])


def test_a_shared_random_base_is_built_once_and_refused_when_it_differs(
    benchmarks: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make bench` hands the memory and merge benchmarks one folder (`--base-dir`): the first
    builds TinyLlama's shape there (made small here), the second finds it (no model built) with
    the same record; a base of another depth or a folder of other files is refused, not used or
    overwritten."""
    import shapes
    from shapes import RANDOM_BASE_INFO, random_base_at, random_base_in

    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    for key, value in {**small, "num_key_value_heads": 2, "vocab_size": 512}.items():
        monkeypatch.setitem(shapes.TINYLLAMA, key, value)

    folder = tmp_path / "shared"
    assert random_base_at(folder, dtype="bfloat16", layers=1) is None
    model, built = random_base_in(folder, dtype="bfloat16", layers=1)
    assert model is not None and model.config.num_hidden_layers == 1
    assert built["parameters"] == sum(p.numel() for p in model.parameters())
    again, found = random_base_in(folder, dtype="bfloat16", layers=1)
    assert again is None and found == built
    with pytest.raises(FileExistsError, match="layers': 1"):
        random_base_in(folder, dtype="bfloat16", layers=2)
    with pytest.raises(FileExistsError, match="'float32'"):
        random_base_at(folder, dtype="float32", layers=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a base\n")
    with pytest.raises(FileExistsError, match=f"holds no {RANDOM_BASE_INFO}"):
        random_base_in(other, dtype="bfloat16", layers=1)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
